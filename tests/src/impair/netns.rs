//! Network namespaces and veth pairs, made and removed with iproute2's `ip`, and running code
//! inside a namespace from this process.
//!
//! Owns names and cleanup only; which addresses go where is `Link`'s business.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::sys;

/// Every namespace the harness makes is named `hbi-PID-INDEX-...`, so one left behind by a
/// killed test can be recognised (its PID is gone) and removed by the next.
pub(crate) const NAME_PREFIX: &str = "hbi-";

/// Runs `ip ARGS`; the error carries the command and what `ip` printed.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

pub(crate) fn path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Runs `f` on a thread inside namespace `name` and returns its result. Sockets `f` creates
/// stay in that namespace after the thread ends.
pub fn in_namespace<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                sys::enter_network_namespace(&path(name))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Fails with a message naming what is missing unless this process may make namespaces,
/// veths and TUN devices.
pub(crate) fn check_privileges() -> anyhow::Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |capability: u32| effective & (1 << capability) != 0;
    if !has(CAP_NET_ADMIN) || !has(CAP_SYS_ADMIN) {
        bail!(
            "the impairment harness needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create \
             network namespaces, veth pairs and TUN devices; run it as root (CI does)"
        );
    }
    if !Path::new("/dev/net/tun").exists() {
        bail!("the impairment harness needs /dev/net/tun (modprobe tun)");
    }
    Ok(())
}

/// Removes namespaces (and their host-side veths) left by harness processes that no longer
/// run, e.g. a test binary killed before its `Link` dropped. Processes still inside are left
/// alone; their veths keep their names until they exit, and new links pick other indices.
pub(crate) fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(NAME_PREFIX) else {
            continue;
        };
        let mut fields = rest.split('-');
        let (Some(pid), Some(index)) = (fields.next(), fields.next()) else {
            continue;
        };
        if pid.parse::<u32>().is_err() || Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = ip(&["netns", "del", &name]);
        if let Ok(index) = index.parse::<u32>() {
            for side in ["a", "b"] {
                let _ = ip(&["link", "del", &format!("hbi{index}{side}")]);
            }
        }
    }
}

/// A named network namespace, deleted on drop after the processes in it are killed.
pub(crate) struct Namespace {
    pub(crate) name: String,
}

impl Namespace {
    pub(crate) fn create(name: String) -> anyhow::Result<Namespace> {
        ip(&["netns", "add", &name])?;
        let namespace = Namespace { name };
        // No IPv6: router solicitations and MLD reports would cross the link and make its
        // counters count packets no test sent.
        in_namespace(&namespace.name, || {
            for scope in ["all", "default"] {
                std::fs::write(format!("/proc/sys/net/ipv6/conf/{scope}/disable_ipv6"), "1")?;
            }
            io::Result::Ok(())
        })
        .and_then(|written| written)
        .with_context(|| format!("disabling IPv6 in namespace {}", namespace.name))?;
        ip(&["-n", &namespace.name, "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// `ip netns exec NAME program`: a command that runs inside this namespace.
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }

    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|output| {
                String::from_utf8_lossy(&output.stdout)
                    .split_whitespace()
                    .filter_map(|pid| pid.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills (SIGKILL) every process inside, except this one.
    pub(crate) fn kill_processes(&self) {
        let own = std::process::id() as i32;
        for pid in self.pids().into_iter().filter(|pid| *pid != own) {
            sys::kill(pid);
        }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.kill_processes();
        let _ = ip(&["netns", "del", &self.name]);
    }
}
