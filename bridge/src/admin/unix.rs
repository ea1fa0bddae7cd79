//! The admin socket's file and its callers: binding `admin.socket` (mode 0660, the daemon's
//! group, stale file replaced, removed on stop) and naming a peer from `SO_PEERCRED`.
//!
//! It owns no HTTP; `server` serves the API on the listener this returns.

use std::fmt;
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

/// Mode of the socket file: the owner (the daemon) and its group may connect, nobody else.
const SOCKET_MODE: u32 = 0o660;
/// Mode of a socket directory the daemon has to create itself (systemd creates
/// `/run/hybridge` with `RuntimeDirectoryMode=0750`).
const DIRECTORY_MODE: u32 = 0o750;

/// Why the admin socket could not be set up; each names the path and the step.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AdminSocketError {
    /// A file system step failed.
    #[error("admin socket {}: {step}: {source}", path.display())]
    Io {
        path: PathBuf,
        step: &'static str,
        source: io::Error,
    },
    /// Another process answers on the socket (a second node with the same config?).
    #[error(
        "admin socket {} is in use by another running process; stop it or set another `admin.socket`",
        path.display()
    )]
    InUse { path: PathBuf },
    /// Something that is not a socket sits where the socket belongs; it is left alone.
    #[error("admin socket {} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
}

/// The bound admin socket: its listener, and the file, removed when this (or the
/// [`SocketFile`] split off it) is dropped.
pub(crate) struct AdminSocket {
    pub(crate) listener: UnixListener,
    pub(crate) file: SocketFile,
}

/// The socket's path and inode; dropping it removes the file if it is still ours (a newer
/// node may have replaced it).
pub(crate) struct SocketFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl SocketFile {
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.dev() == self.device && m.ino() == self.inode);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl AdminSocket {
    /// Binds `path` on the current tokio runtime: creates a missing parent directory (0750),
    /// replaces a stale socket nobody answers on, refuses to replace a live socket or any
    /// other file, and leaves the socket mode 0660 in the process's group whatever the umask.
    pub(crate) fn bind(path: &Path) -> Result<AdminSocket, AdminSocketError> {
        let io = |step: &'static str| {
            move |source: io::Error| AdminSocketError::Io {
                path: path.to_path_buf(),
                step,
                source,
            }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(DIRECTORY_MODE)
                .create(parent)
                .map_err(io("creating its directory"))?;
        }
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("checking for an old socket")(e)),
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(AdminSocketError::NotASocket {
                    path: path.to_path_buf(),
                });
            }
            Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(AdminSocketError::InUse {
                        path: path.to_path_buf(),
                    });
                }
                // Left behind by a node that did not stop cleanly (SIGKILL, power loss).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(io("removing a stale socket"))?;
                }
                Err(e) => return Err(io("checking whether the old socket is in use")(e)),
            },
        }
        let listener = UnixListener::bind(path).map_err(io("binding"))?;
        let meta = std::fs::symlink_metadata(path).map_err(io("reading the new socket"))?;
        if !meta.file_type().is_socket() {
            return Err(AdminSocketError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        let file = SocketFile {
            path: path.to_path_buf(),
            device: meta.dev(),
            inode: meta.ino(),
        };
        // bind(2) applied the umask (0077 under systemd); set the mode and group the access
        // model promises. The directory is the daemon's, so nobody else can swap the file in
        // between; lchown never follows a link anyway. bind(2) already gave the socket the
        // daemon's group unless the directory is set-group-ID, and only then is chown called:
        // the unit's system-call filter (~@privileged) refuses chown.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .map_err(io("setting mode 0660"))?;
        let group = rustix::process::getegid().as_raw();
        if meta.gid() != group {
            std::os::unix::fs::lchown(path, None, Some(group))
                .map_err(io("setting the group to the daemon's"))?;
        }
        Ok(AdminSocket { listener, file })
    }
}

/// A local caller as the kernel names it (`SO_PEERCRED`), with its user name when
/// `/etc/passwd` has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PeerCredentials {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) pid: Option<i32>,
    pub(crate) user: Option<String>,
}

impl PeerCredentials {
    /// Reads the peer of an accepted connection.
    pub(crate) fn of(stream: &tokio::net::UnixStream) -> io::Result<PeerCredentials> {
        let credentials = stream.peer_cred()?;
        Ok(PeerCredentials {
            uid: credentials.uid(),
            gid: credentials.gid(),
            pid: credentials.pid(),
            user: user_name(credentials.uid()),
        })
    }

    /// The audit actor: `uid:1000(alice)`, or `uid:1000` for a uid without a passwd entry.
    pub(crate) fn actor(&self) -> String {
        match &self.user {
            Some(user) => format!("uid:{}({user})", self.uid),
            None => format!("uid:{}", self.uid),
        }
    }
}

impl fmt::Display for PeerCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} gid:{}", self.actor(), self.gid)?;
        if let Some(pid) = self.pid {
            write!(f, " pid:{pid}")?;
        }
        Ok(())
    }
}

/// The audit actor of this process, for changes `hybridge acl --db` makes on a stopped node's
/// database: `cli:uid:0(root)`.
pub(crate) fn process_actor() -> String {
    let uid = rustix::process::getuid().as_raw();
    match user_name(uid) {
        Some(user) => format!("cli:uid:{uid}({user})"),
        None => format!("cli:uid:{uid}"),
    }
}

/// The name `/etc/passwd` gives `uid`. Only the local file: the daemon links no NSS modules,
/// and an unresolvable uid is still audited by number.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    user_name_in(&passwd, uid)
}

fn user_name_in(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let entry_uid = fields.nth(1)?.parse::<u32>().ok()?;
        // A name is printed in audit lines: keep it to what useradd allows.
        let printable = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
        (entry_uid == uid && printable).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_name_uids() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nalice:x:1000:1000:Alice,,,:/home/alice:/bin/sh\nodd name:x:1001:1001::/:/bin/false\n";
        assert_eq!(user_name_in(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_name_in(passwd, 1000).as_deref(), Some("alice"));
        assert_eq!(user_name_in(passwd, 1001), None);
        assert_eq!(user_name_in(passwd, 42), None);
        let alice = PeerCredentials {
            uid: 1000,
            gid: 1000,
            pid: Some(77),
            user: Some("alice".into()),
        };
        assert_eq!(alice.actor(), "uid:1000(alice)");
        assert_eq!(alice.to_string(), "uid:1000(alice) gid:1000 pid:77");
        let unknown = PeerCredentials {
            user: None,
            pid: None,
            ..alice
        };
        assert_eq!(unknown.to_string(), "uid:1000 gid:1000");
    }

    #[tokio::test]
    async fn binds_0660_replaces_a_stale_socket_refuses_a_live_one_and_cleans_up()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("run/admin.sock");
        // A stale socket: bound, then its listener gone without removing the file.
        std::fs::create_dir_all(dir.path().join("run"))?;
        drop(std::os::unix::net::UnixListener::bind(&path)?);
        let socket = AdminSocket::bind(&path)?;
        let meta = std::fs::metadata(&path)?;
        assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
        assert_eq!(meta.gid(), rustix::process::getegid().as_raw());

        let err = AdminSocket::bind(&path).err().map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "admin socket {} is in use by another running process; stop it or set another `admin.socket`",
                path.display()
            ))
        );

        let (client, accepted) = tokio::join!(
            tokio::net::UnixStream::connect(&path),
            socket.listener.accept()
        );
        let (server_side, _) = accepted?;
        let peer = PeerCredentials::of(&server_side)?;
        assert_eq!(peer.uid, rustix::process::geteuid().as_raw());
        assert_eq!(peer.pid, Some(std::process::id() as i32));
        drop(client);

        drop(socket);
        assert!(!path.exists(), "socket file left behind");

        let file = dir.path().join("not-a-socket");
        std::fs::write(&file, "keep me")?;
        let err = AdminSocket::bind(&file).err().map(|e| e.to_string());
        assert_eq!(
            err,
            Some(format!(
                "admin socket {} exists and is not a socket; refusing to replace it",
                file.display()
            ))
        );
        assert_eq!(std::fs::read_to_string(&file)?, "keep me");
        Ok(())
    }
}
