//! Operating-system helpers shared by the daemon and the command line: sessions, mount points.

use std::path::{Path, PathBuf};

pub use clip_fuse::handover::own_session;

/// Whether `dir` itself is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    mounts_under(dir).iter().any(|m| m == dir)
}

/// Mount points (from /proc/self/mountinfo) at or under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect()
}

/// Detaches the mount at `p` (MNT_DETACH): it goes away once nothing uses it.
pub fn lazy_unmount(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) {
        // SAFETY: c is a valid NUL-terminated path.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// The connections of root and of the daemon's own user (containerd runs as root); any other
/// local user is refused, whatever the socket's mode. A failed accept (out of descriptors, say)
/// is retried after a pause instead of ending the server or spinning.
pub fn trusted_connections(
    listener: tokio::net::UnixListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    futures_util::stream::unfold(listener, move |l| async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => match s.peer_cred().map(|c| c.uid()) {
                    Ok(uid) if uid == 0 || uid == me => return Some((Ok(s), l)),
                    Ok(uid) => tracing::warn!(uid, "refused a connection from another user"),
                    Err(e) => tracing::warn!("refused a connection: {e}"),
                },
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}; retrying in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}
