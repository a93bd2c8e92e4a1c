//! Unix-socket plumbing: SOCK_SEQPACKET sockets and messages with an attached descriptor.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

pub(super) use super::protocol::MAX_MSG;

pub(super) fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub(super) fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(super) fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("socket path too long: {}", path.display()),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Sends one message, with `fd` attached if given.
pub(crate) fn send_msg(sock: BorrowedFd, data: &[u8], fd: Option<BorrowedFd>) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // u64s keep the control buffer aligned for cmsghdr.
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        // SAFETY: the control buffer is large and aligned enough for one descriptor, and the
        // header pointers come from the CMSG macros over that buffer.
        unsafe {
            let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, fd.as_raw_fd());
        }
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message (0 bytes: the peer closed) and the descriptor attached to it, if any;
/// `flags` as for recvmsg(2) (e.g. MSG_DONTWAIT).
pub(super) fn recv_msg(
    sock: BorrowedFd,
    buf: &mut [u8],
    flags: libc::c_int,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = [0u64; 8];
    // SAFETY: msghdr is plain data; all zeroes is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    // SAFETY: msg points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Every descriptor the message carried is owned here, so the ones beyond the first (no
    // message of ours carries more than one) are closed rather than leaked.
    let mut fds: Vec<OwnedFd> = Vec::new();
    // SAFETY: the kernel filled the control buffer; the CMSG macros walk what it wrote, and a
    // SCM_RIGHTS descriptor received here is ours to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const u8;
                let payload = (*c).cmsg_len - (data as usize - c as usize);
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(
                        data.add(i * std::mem::size_of::<RawFd>()) as *const RawFd
                    );
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let fd = (!fds.is_empty()).then(|| fds.swap_remove(0));
    Ok((n as usize, fd))
}

/// The uid of the process at the other end of a connected unix socket.
pub(super) fn peer_uid(sock: BorrowedFd) -> io::Result<u32> {
    // SAFETY: ucred is plain data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    cvt(unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    })?;
    Ok(cred.uid)
}

/// A connected pair of `SOCK_SEQPACKET` sockets.
pub(crate) fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair(2) into a live two-element array.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both are fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Replaces descriptor `target` with a duplicate of `src` (atomically, close-on-exec).
pub(crate) fn replace_fd(src: BorrowedFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup3 onto a descriptor the caller owns (it stays owned, now naming src's file).
    cvt(unsafe { libc::dup3(src.as_raw_fd(), target, libc::O_CLOEXEC) }).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    /// Sends one message carrying `n` descriptors in one SCM_RIGHTS header.
    fn send_many(sock: BorrowedFd, fds: &[BorrowedFd]) {
        let data = b"x";
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        let mut cbuf = [0u64; 16];
        // SAFETY: as in send_msg, with room for all of `fds`.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            let size = std::mem::size_of_val(fds.first().unwrap()) * fds.len();
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(size as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(size as u32) as usize;
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(
                    (libc::CMSG_DATA(c) as *mut RawFd).add(i),
                    fd.as_raw_fd(),
                );
            }
            assert_eq!(libc::sendmsg(sock.as_raw_fd(), &msg, 0), 1);
        }
    }

    /// Whether every write end of the pipe read by `r` is closed (a read sees end of file rather
    /// than "would block"). Other tests' descriptors do not matter to it.
    fn writers_gone(r: &std::io::PipeReader) -> bool {
        let mut b = [0u8; 1];
        // SAFETY: a non-blocking read(2) into a live one-byte buffer on a pipe we own.
        let n = unsafe {
            let fd = r.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            libc::read(fd, b.as_mut_ptr() as *mut libc::c_void, 1)
        };
        n == 0
    }

    #[test]
    fn every_received_descriptor_is_owned_and_the_extras_closed() {
        let (a, b) = socket_pair().unwrap();
        // Three pipes' write ends travel in one message; ours are closed once sent.
        let pipes: Vec<_> = (0..3).map(|_| std::io::pipe().unwrap()).collect();
        let borrowed: Vec<BorrowedFd> = pipes.iter().map(|(_, w)| w.as_fd()).collect();
        send_many(a.as_fd(), &borrowed);
        let readers: Vec<_> = pipes.into_iter().map(|(r, _)| r).collect();
        let mut buf = [0u8; 8];
        let (n, fd) = recv_msg(b.as_fd(), &mut buf, 0).unwrap();
        assert_eq!(n, 1);
        // The first is kept (its pipe still has a writer); the other two are already closed.
        assert!(fd.is_some());
        let gone: Vec<bool> = readers.iter().map(writers_gone).collect();
        assert_eq!(gone, [false, true, true]);
        drop(fd);
        assert!(writers_gone(&readers[0]));
    }

    #[test]
    fn peer_uid_is_the_connecting_process() {
        let (a, _b) = socket_pair().unwrap();
        // SAFETY: geteuid(2) has no preconditions.
        assert_eq!(peer_uid(a.as_fd()).unwrap(), unsafe { libc::geteuid() });
    }
}
