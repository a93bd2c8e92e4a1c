//! What the kernel's FUSE device needs beyond fuser: resend, backing-file close, a synthetic INIT.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

/// `FUSE_NOTIFY_RESEND`: the kernel requeues requests read but not answered.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// Asks the kernel to resend the requests of `fuse` that a previous daemon read but never
/// answered. Linux 6.9 and later; an older kernel answers EINVAL (those requests then wait
/// until their callers give up).
pub fn notify_resend(fuse: BorrowedFd) -> io::Result<()> {
    // struct fuse_out_header { u32 len; i32 error (the notify code); u64 unique (0) }
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&16u32.to_ne_bytes());
    hdr[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: write(2) of a live buffer to a descriptor we hold.
    let n = unsafe { libc::write(fuse.as_raw_fd(), hdr.as_ptr() as *const libc::c_void, 16) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unregisters a passthrough backing file a previous daemon registered on `fuse`.
pub fn close_backing(fuse: RawFd, backing: u32) {
    // SAFETY: ioctl on a descriptor the caller holds, with a pointer to a live u32.
    let r = unsafe {
        libc::ioctl(
            fuse,
            FUSE_DEV_IOC_BACKING_CLOSE as _,
            &backing as *const u32,
        )
    };
    if r < 0 {
        tracing::debug!(
            backing,
            "closing an inherited backing file: {}",
            io::Error::last_os_error()
        );
    }
}

/// A FUSE `INIT` request as the kernel would send it with these parameters: fed to fuser's
/// handshake when resuming a connection whose real `INIT` happened in a previous daemon.
pub(crate) fn synthetic_init(caps: u64, minor: u32, max_readahead: u32) -> Vec<u8> {
    const FUSE_INIT: u32 = 26;
    const FUSE_INIT_EXT: u64 = 1 << 30;
    let caps = caps | FUSE_INIT_EXT;
    let mut m = Vec::with_capacity(104);
    // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding
    m.extend_from_slice(&104u32.to_ne_bytes());
    m.extend_from_slice(&FUSE_INIT.to_ne_bytes());
    m.extend_from_slice(&1u64.to_ne_bytes());
    m.extend_from_slice(&0u64.to_ne_bytes());
    m.extend_from_slice(&[0u8; 16]);
    // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]
    m.extend_from_slice(&7u32.to_ne_bytes());
    m.extend_from_slice(&minor.to_ne_bytes());
    m.extend_from_slice(&max_readahead.to_ne_bytes());
    m.extend_from_slice(&(caps as u32).to_ne_bytes());
    m.extend_from_slice(&((caps >> 32) as u32).to_ne_bytes());
    m.extend_from_slice(&[0u8; 44]);
    debug_assert_eq!(m.len(), 104);
    m
}
