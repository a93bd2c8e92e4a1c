//! Keeping FUSE connections alive across daemon restarts.
//!
//! A FUSE mount lives as long as one file descriptor of its `/dev/fuse` connection is open.
//! The daemon that serves the mount is the natural holder, so when it dies (crash, upgrade,
//! `kill -9`) the kernel aborts the connection and every process reading the mount gets
//! `ENOTCONN`: containers that were running are broken. Most lazy-pulling snapshotters fail
//! exactly here.
//!
//! clip hands a duplicate of each connection's descriptor to a tiny *keeper* process (`clip
//! fuse-keeper`, started by the daemon, in its own session so signals aimed at the daemon miss
//! it). When the daemon dies the connection stays up: new requests queue in the kernel and the
//! readers wait. A new daemon asks the keeper for the descriptors, serves them again, and tells
//! the kernel to resend the requests the dead daemon had read but not answered
//! (`FUSE_NOTIFY_RESEND`, Linux 6.9+). Inode numbers are derived from the image, so the kernel's
//! cached inodes mean the same files to the new daemon.
//!
//! The new daemon cannot repeat the FUSE `INIT` handshake (the kernel sent it once, long ago), and
//! fuser insists on one. So [`resume`] hands fuser one end of a socket pair holding a synthetic
//! `INIT` built from the original connection's parameters, and once the handshake is done
//! replaces that descriptor, in place, with the real connection (`dup3`).
//!
//! The kernel refuses to mix page-cached and passthrough opens of one inode, and every
//! passthrough open of an inode must name the same registered backing file. Backing files stay
//! registered in the connection when the daemon dies, so the daemon also tells the keeper which
//! inodes are open in which mode (and with which backing id); the new daemon continues from
//! that table.
//!
//! The keeper is single-threaded, poll-driven and stateless on disk. It drops a connection when
//! the kernel reports it gone (unmounted) or when the daemon says so, and exits when it holds
//! nothing and no daemon is connected.
//!
//! Protocol: `SOCK_SEQPACKET` messages of ASCII words, a descriptor attached where noted.
//! daemon -> keeper: `P id caps minor` + fd (hold), `D id` (drop), `O id ino c` /
//! `O id ino p backing` (an open), `R id ino` (a release), `L` (list). keeper -> daemon, answer
//! to `L`: `H id caps minor` + fd per connection, `S id ino c|p backing count` per open inode,
//! then `E`.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

/// How an inode is open, as far as the kernel's I/O mode is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenState {
    /// Opened through the page cache (served by the daemon).
    Cached,
    /// Opened by passthrough with this registered backing id.
    Passthrough(u32),
}

/// A connection handed back by the keeper.
#[derive(Debug)]
pub struct Held {
    /// The caller's id for the connection (the snapshotter uses the snapshot id).
    pub id: u64,
    /// The `/dev/fuse` descriptor.
    pub fd: OwnedFd,
    /// The capability flags the kernel offered at the original `INIT`.
    pub caps: u64,
    /// The kernel's FUSE ABI minor version.
    pub minor: u32,
    /// Inodes open when the previous daemon stopped: (inode, mode, open count).
    pub opens: Vec<(u64, OpenState, u32)>,
}

/// `FUSE_NOTIFY_RESEND`: the kernel requeues requests read but not answered.
const FUSE_NOTIFY_RESEND: i32 = 7;
/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;
const MAX_MSG: usize = 256;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
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
fn recv_msg(
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
    let mut fd = None;
    // SAFETY: the kernel filled the control buffer; the CMSG macros walk what it wrote, and a
    // SCM_RIGHTS descriptor received here is ours to own.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const RawFd);
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, fd))
}

fn words(msg: &[u8]) -> Vec<&str> {
    std::str::from_utf8(msg)
        .unwrap_or("")
        .split_ascii_whitespace()
        .collect()
}

/// The daemon's connection to the keeper.
#[derive(Debug)]
pub struct Keeper {
    sock: OwnedFd,
}

impl Keeper {
    /// Connects to the keeper listening on `path`.
    pub fn connect(path: &Path) -> io::Result<Keeper> {
        let sock = seqpacket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        cvt(unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        })?;
        Ok(Keeper { sock })
    }

    /// Connects to the keeper on `path`, starting one with `spawn` if none answers.
    pub fn connect_or_spawn(
        path: &Path,
        spawn: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<Keeper> {
        if let Ok(k) = Self::connect(path) {
            return Ok(k);
        }
        spawn()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::connect(path) {
                Ok(k) => return Ok(k),
                Err(e) if Instant::now() > deadline => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("the FUSE keeper on {} did not start: {e}", path.display()),
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    fn send(&self, text: &str, fd: Option<BorrowedFd>) -> io::Result<()> {
        send_msg(self.sock.as_fd(), text.as_bytes(), fd)
    }

    /// Hands the keeper a duplicate of connection `id`'s descriptor.
    pub fn hold(&self, id: u64, fd: BorrowedFd, caps: u64, minor: u32) -> io::Result<()> {
        self.send(&format!("P {id} {caps} {minor}"), Some(fd))
    }

    /// The keeper closes its descriptor of connection `id` (it is being unmounted).
    pub fn drop_connection(&self, id: u64) {
        if let Err(e) = self.send(&format!("D {id}"), None) {
            tracing::warn!(id, "telling the FUSE keeper to drop a connection: {e}");
        }
    }

    /// Records an open of `ino` on connection `id`.
    pub fn note_open(&self, id: u64, ino: u64, state: OpenState) {
        let msg = match state {
            OpenState::Cached => format!("O {id} {ino} c"),
            OpenState::Passthrough(b) => format!("O {id} {ino} p {b}"),
        };
        if let Err(e) = self.send(&msg, None) {
            tracing::warn!(id, ino, "telling the FUSE keeper of an open: {e}");
        }
    }

    /// Records a release of `ino` on connection `id`.
    pub fn note_release(&self, id: u64, ino: u64) {
        if let Err(e) = self.send(&format!("R {id} {ino}"), None) {
            tracing::warn!(id, ino, "telling the FUSE keeper of a release: {e}");
        }
    }

    /// Every connection the keeper holds (it keeps holding them).
    pub fn list(&self) -> io::Result<Vec<Held>> {
        self.send("L", None)?;
        let mut out: Vec<Held> = Vec::new();
        let mut buf = [0u8; MAX_MSG];
        loop {
            let (n, fd) = recv_msg(self.sock.as_fd(), &mut buf, 0)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the FUSE keeper closed the connection",
                ));
            }
            let w = words(&buf[..n]);
            let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad message from the keeper");
            let num = |i: usize| -> io::Result<u64> {
                w.get(i).and_then(|s| s.parse().ok()).ok_or_else(bad)
            };
            match w.first().copied() {
                Some("H") => out.push(Held {
                    id: num(1)?,
                    fd: fd.ok_or_else(bad)?,
                    caps: num(2)?,
                    minor: num(3)? as u32,
                    opens: Vec::new(),
                }),
                Some("S") => {
                    let (id, ino, backing, count) = (num(1)?, num(2)?, num(4)?, num(5)?);
                    let state = match w.get(3) {
                        Some(&"p") => OpenState::Passthrough(backing as u32),
                        _ => OpenState::Cached,
                    };
                    if let Some(h) = out.iter_mut().find(|h| h.id == id) {
                        h.opens.push((ino, state, count as u32));
                    }
                }
                Some("E") => return Ok(out),
                _ => return Err(bad()),
            }
        }
    }
}

struct Conn {
    fd: OwnedFd,
    caps: u64,
    minor: u32,
    /// ino -> (mode, open count)
    opens: HashMap<u64, (OpenState, u32)>,
}

/// The keeper process: holds FUSE descriptors for daemons on `path` until the kernel reports the
/// connection gone, a daemon drops it, or nothing is left to hold and no daemon is connected.
pub fn run_keeper(path: &Path) -> io::Result<()> {
    let listener = seqpacket()?;
    let (addr, len) = sockaddr(path)?;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    // SAFETY: addr is a valid sockaddr_un of length len; listen on our own socket.
    unsafe {
        cvt(libc::bind(
            listener.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        ))?;
        cvt(libc::listen(listener.as_raw_fd(), 16))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut clients: Vec<OwnedFd> = Vec::new();
    let mut ever_connected = false;
    let mut buf = [0u8; MAX_MSG];
    loop {
        if ever_connected && clients.is_empty() && conns.is_empty() {
            let _ = std::fs::remove_file(path);
            return Ok(());
        }
        let ids: Vec<u64> = conns.keys().copied().collect();
        let mut pfds: Vec<libc::pollfd> = Vec::with_capacity(1 + clients.len() + ids.len());
        pfds.push(libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        for c in &clients {
            pfds.push(libc::pollfd {
                fd: c.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        // Events 0: never read a FUSE descriptor (that would steal a request); the kernel still
        // reports POLLERR once the connection is aborted (the mount is gone).
        for id in &ids {
            pfds.push(libc::pollfd {
                fd: conns[id].fd.as_raw_fd(),
                events: 0,
                revents: 0,
            });
        }
        // SAFETY: pfds is a live array of pollfd of the given length.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let nclients = clients.len();
        for (i, id) in ids.iter().enumerate() {
            if pfds[1 + nclients + i].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL)
                != 0
            {
                conns.remove(id);
            }
        }
        // Every queued message of every daemon first (a dead daemon's last opens and releases
        // are still queued when its successor asks), then the list requests.
        let mut closed = Vec::new();
        let mut lists = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            if pfds[1 + i].revents == 0 {
                continue;
            }
            loop {
                match recv_msg(c.as_fd(), &mut buf, libc::MSG_DONTWAIT) {
                    Ok((0, _)) => {
                        closed.push(i);
                        break;
                    }
                    Ok((n, fd)) => {
                        if words(&buf[..n]).first() == Some(&"L") {
                            lists.push(i);
                        } else {
                            keeper_message(&mut conns, &buf[..n], fd);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed.push(i);
                        break;
                    }
                }
            }
        }
        for i in lists {
            if !closed.contains(&i) && send_list(&conns, clients[i].as_fd()).is_err() {
                closed.push(i);
            }
        }
        closed.sort_unstable();
        closed.dedup();
        for i in closed.into_iter().rev() {
            clients.remove(i);
        }
        if pfds[0].revents & libc::POLLIN != 0 {
            // SAFETY: accept(2) on our listening socket; the new descriptor is ours.
            let fd = unsafe {
                libc::accept4(
                    listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: fd is a fresh descriptor nobody else owns.
                clients.push(unsafe { OwnedFd::from_raw_fd(fd) });
                ever_connected = true;
            }
        }
    }
}

fn keeper_message(conns: &mut HashMap<u64, Conn>, msg: &[u8], fd: Option<OwnedFd>) {
    let w = words(msg);
    let num = |i: usize| -> Option<u64> { w.get(i).and_then(|s| s.parse().ok()) };
    match (w.first().copied(), num(1)) {
        (Some("P"), Some(id)) => {
            if let (Some(fd), Some(caps), Some(minor)) = (fd, num(2), num(3)) {
                conns.insert(
                    id,
                    Conn {
                        fd,
                        caps,
                        minor: minor as u32,
                        opens: HashMap::new(),
                    },
                );
            }
        }
        (Some("D"), Some(id)) => {
            conns.remove(&id);
        }
        (Some("O"), Some(id)) => {
            if let (Some(c), Some(ino)) = (conns.get_mut(&id), num(2)) {
                let state = match (w.get(3), num(4)) {
                    (Some(&"p"), Some(b)) => OpenState::Passthrough(b as u32),
                    _ => OpenState::Cached,
                };
                let e = c.opens.entry(ino).or_insert((state, 0));
                e.0 = state;
                e.1 += 1;
            }
        }
        (Some("R"), Some(id)) => {
            if let (Some(c), Some(ino)) = (conns.get_mut(&id), num(2)) {
                if let Some(e) = c.opens.get_mut(&ino) {
                    e.1 = e.1.saturating_sub(1);
                    if e.1 == 0 {
                        c.opens.remove(&ino);
                    }
                }
            }
        }
        _ => {}
    }
}

/// Answers `L`: every held connection with its descriptor and open inodes, then `E`.
fn send_list(conns: &HashMap<u64, Conn>, client: BorrowedFd) -> io::Result<()> {
    for (id, c) in conns {
        send_msg(
            client,
            format!("H {id} {} {}", c.caps, c.minor).as_bytes(),
            Some(c.fd.as_fd()),
        )?;
        for (ino, (state, n)) in &c.opens {
            let (m, b) = match state {
                OpenState::Cached => ("c", 0),
                OpenState::Passthrough(b) => ("p", *b),
            };
            send_msg(client, format!("S {id} {ino} {m} {b} {n}").as_bytes(), None)?;
        }
    }
    send_msg(client, b"E", None)
}

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
    use std::path::PathBuf;

    #[test]
    fn keeper_holds_descriptors_and_open_state_for_the_next_daemon() {
        let dir = tempfile_dir();
        let path = dir.join("k.sock");
        let p = path.clone();
        let keeper = std::thread::spawn(move || run_keeper(&p));
        let k = Keeper::connect_or_spawn(&path, || Ok(())).unwrap();
        // Any descriptor stands in for /dev/fuse here (a pipe reports no error while open).
        let (r, _w) = pipe();
        k.hold(7, r.as_fd(), 1 << 41, 44).unwrap();
        k.note_open(7, 12, OpenState::Cached);
        k.note_open(7, 12, OpenState::Cached);
        k.note_open(7, 13, OpenState::Passthrough(3));
        k.note_release(7, 12);
        k.note_open(7, 14, OpenState::Cached);
        k.note_release(7, 14);
        drop(k);
        // A new daemon finds what the first left.
        let k = Keeper::connect(&path).unwrap();
        let mut held = k.list().unwrap();
        assert_eq!(held.len(), 1);
        let h = held.pop().unwrap();
        assert_eq!((h.id, h.caps, h.minor), (7, 1 << 41, 44));
        let mut opens = h.opens.clone();
        opens.sort_by_key(|o| o.0);
        assert_eq!(
            opens,
            vec![
                (12, OpenState::Cached, 1),
                (13, OpenState::Passthrough(3), 1)
            ]
        );
        // The descriptor handed back is the same pipe.
        let mut st1: libc::stat = unsafe { std::mem::zeroed() };
        let mut st2: libc::stat = unsafe { std::mem::zeroed() };
        unsafe {
            libc::fstat(h.fd.as_raw_fd(), &mut st1);
            libc::fstat(r.as_raw_fd(), &mut st2);
        }
        assert_eq!(st1.st_ino, st2.st_ino);
        // Dropped connections are forgotten; with nothing held and no daemon, the keeper exits.
        k.drop_connection(7);
        assert!(k.list().unwrap().is_empty());
        drop(k);
        keeper.join().unwrap().unwrap();
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn synthetic_init_is_a_well_formed_init_request() {
        let m = synthetic_init(1 << 41 | 1, 44, 1 << 20);
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_ne_bytes(m[4..8].try_into().unwrap()), 26);
        assert_eq!(u32::from_ne_bytes(m[44..48].try_into().unwrap()), 44);
        // flags carry FUSE_INIT_EXT and the low bits; flags2 the high ones.
        assert_eq!(
            u32::from_ne_bytes(m[52..56].try_into().unwrap()),
            1 | 1 << 30
        );
        assert_eq!(u32::from_ne_bytes(m[56..60].try_into().unwrap()), 1 << 9);
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "clip-keeper-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
