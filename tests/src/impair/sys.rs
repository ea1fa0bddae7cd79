//! The calls the harness needs that have no safe wrapper: attaching to a TUN device
//! (`TUNSETIFF`), moving the calling thread into a network namespace (`setns`), killing a
//! process by pid, and registering a TUN descriptor with tokio.
//!
//! Everything else (namespaces, veths, addresses) goes through `ip`, so this module stays the
//! only `unsafe` in the harness.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// `_IOW('T', 202, int)` from `<linux/if_tun.h>`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as `TUNSETIFF` reads it: the name, then the flags, padded to the kernel's
/// 40 bytes.
#[repr(C)]
struct InterfaceRequest {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    padding: [u8; 22],
}

/// Creates TUN device `name` (IP packets, no packet-information header) in the calling
/// thread's network namespace and returns its non-blocking file. The device exists while the
/// file is open.
pub(crate) fn open_tun(name: &str) -> io::Result<File> {
    if name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} does not fit IFNAMSIZ"),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut request = InterfaceRequest {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TUN | IFF_NO_PI,
        padding: [0; 22],
    };
    request.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: `file` is an open /dev/net/tun descriptor and `request` is a properly sized,
    // NUL-terminated `struct ifreq` that outlives the call; TUNSETIFF only reads and writes
    // within it.
    let result = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Moves the calling thread (only it) into the network namespace at `path`
/// (`/run/netns/NAME`). Sockets and devices it creates afterwards belong to that namespace
/// for their whole life, whichever thread uses them later.
pub(crate) fn enter_network_namespace(path: &Path) -> io::Result<()> {
    let namespace = File::open(path)?;
    // SAFETY: setns(2) with a valid namespace descriptor and CLONE_NEWNET changes only the
    // calling thread's network namespace; no memory is shared with the kernel.
    let result = unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends SIGKILL to `pid` (a process the harness started in one of its namespaces).
pub(crate) fn kill(pid: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Registers a TUN device with the current tokio runtime (call inside one), only for
/// readiness to read: writes to a TUN never block.
pub(crate) fn register_tun(tun: File) -> io::Result<tokio::io::unix::AsyncFd<File>> {
    // SAFETY: the `File` is moved into the `AsyncFd`, which owns it until dropped, so its
    // descriptor stays open and the same for the AsyncFd's whole life.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(tun, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}
