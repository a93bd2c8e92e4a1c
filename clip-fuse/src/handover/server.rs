//! The keeper process: a single-threaded poll loop holding FUSE descriptors for daemons.

use super::fdpass::{cvt, peer_uid, recv_msg, send_msg, seqpacket, sockaddr, MAX_MSG};
use super::protocol::Message;
use super::OpenState;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

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
    // Created 0600: the keeper is single-threaded, so narrowing the umask around bind(2) affects
    // nothing else (no window with a wider mode).
    // SAFETY: addr is a valid sockaddr_un of length len; listen on our own socket; umask(2)
    // only sets this process's mask.
    unsafe {
        let old = libc::umask(0o177);
        let bound = cvt(libc::bind(
            listener.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len,
        ));
        libc::umask(old);
        bound?;
        cvt(libc::listen(listener.as_raw_fd(), 16))?;
    }
    // Only root and the daemon's own user may talk to the keeper: a client can take every FUSE
    // descriptor it holds.
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
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
                    Ok((n, fd)) => match Message::decode(&buf[..n]) {
                        Ok(Message::List) => lists.push(i),
                        Ok(m) => keeper_message(&mut conns, m, fd),
                        Err(e) => eprintln!("clip fuse-keeper: ignored: {e}"),
                    },
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
                let client = unsafe { OwnedFd::from_raw_fd(fd) };
                match peer_uid(client.as_fd()) {
                    Ok(uid) if uid == 0 || uid == me => {
                        clients.push(client);
                        ever_connected = true;
                    }
                    Ok(uid) => eprintln!("clip fuse-keeper: refused a client with uid {uid}"),
                    Err(e) => eprintln!("clip fuse-keeper: refused a client: {e}"),
                }
            } else {
                // Out of descriptors or memory, say: the connection stays queued; do not spin.
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted && e.kind() != io::ErrorKind::WouldBlock {
                    eprintln!("clip fuse-keeper: accept failed: {e}; retrying in 100 ms");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

/// A daemon's message (other than `List`): changes what the keeper holds. Messages a daemon
/// never sends (a keeper's answers) are ignored.
fn keeper_message(conns: &mut HashMap<u64, Conn>, msg: Message, fd: Option<OwnedFd>) {
    match msg {
        Message::Hold { id, caps, minor } => {
            if let Some(fd) = fd {
                conns.insert(
                    id,
                    Conn {
                        fd,
                        caps,
                        minor,
                        opens: HashMap::new(),
                    },
                );
            }
        }
        Message::Drop { id } => {
            conns.remove(&id);
        }
        Message::Open { id, ino, state } => {
            if let Some(c) = conns.get_mut(&id) {
                let e = c.opens.entry(ino).or_insert((state, 0));
                e.0 = state;
                e.1 += 1;
            }
        }
        Message::Release { id, ino } => {
            if let Some(c) = conns.get_mut(&id) {
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
        let held = Message::Held {
            id: *id,
            caps: c.caps,
            minor: c.minor,
        };
        send_msg(client, &held.encode(), Some(c.fd.as_fd()))?;
        for (ino, (state, count)) in &c.opens {
            let opened = Message::Opened {
                id: *id,
                ino: *ino,
                state: *state,
                count: *count,
            };
            send_msg(client, &opened.encode(), None)?;
        }
    }
    send_msg(client, &Message::End.encode(), None)
}
