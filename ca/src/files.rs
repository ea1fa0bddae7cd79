//! Crash-safe file writes: temp file in the same directory, fsync, then rename or link.
//!
//! Secret files are created with mode 0600 from the first byte; nothing here parses content.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Mode for private keys.
pub(crate) const SECRET_MODE: u32 = 0o600;
/// Mode for certificates, CRLs and other public material.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

/// A fully written and fsynced temporary file next to its final path.
#[derive(Debug)]
pub(crate) struct StagedFile {
    temp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl StagedFile {
    /// Writes `bytes` into a fresh temp file beside `target` with `mode`, and fsyncs it.
    pub(crate) fn write(target: &Path, bytes: &[u8], mode: u32) -> io::Result<Self> {
        let dir = parent_dir(target);
        let name = target
            .file_name()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
        let mut last_err = None;
        for _ in 0..8 {
            let mut temp_name = std::ffi::OsString::from(".");
            temp_name.push(name);
            temp_name.push(format!(".tmp-{:016x}", rand::random::<u64>()));
            let temp = dir.join(temp_name);
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp)
            {
                Ok(mut file) => {
                    let staged = StagedFile {
                        temp,
                        target: target.to_path_buf(),
                        done: false,
                    };
                    file.write_all(bytes)?;
                    file.sync_all()?;
                    return Ok(staged);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_err = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("could not create a temporary file")))
    }

    /// Moves the file into place, replacing whatever is there.
    pub(crate) fn commit_replace(mut self) -> io::Result<()> {
        fs::rename(&self.temp, &self.target)?;
        self.done = true;
        sync_dir(parent_dir(&self.target))
    }

    /// Moves the file into place only if nothing exists there yet (`AlreadyExists` otherwise).
    pub(crate) fn commit_new(mut self) -> io::Result<()> {
        // A hard link never replaces an existing file, so two racing `init`s cannot
        // both win; the temp name is removed when `self` drops.
        fs::hard_link(&self.temp, &self.target)?;
        self.done = true;
        let _ = fs::remove_file(&self.temp);
        sync_dir(parent_dir(&self.target))
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Writes `bytes` to `target` atomically, replacing any previous file.
pub(crate) fn write_atomic(target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    StagedFile::write(target, bytes, mode)?.commit_replace()
}

/// Fsyncs a directory so a rename in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// `prefix` with `suffix` appended to its final component (`out/a` + `.pem` = `out/a.pem`).
pub(crate) fn with_suffix(prefix: &Path, suffix: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secret_file_is_0600_and_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_atomic(&path, b"secret", SECRET_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn commit_new_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        fs::write(&path, b"old").unwrap();
        let staged = StagedFile::write(&path, b"new", PUBLIC_MODE).unwrap();
        let err = staged.commit_new().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn suffix_appends() {
        assert_eq!(
            with_suffix(Path::new("out/node.a"), ".pem"),
            PathBuf::from("out/node.a.pem")
        );
    }
}
