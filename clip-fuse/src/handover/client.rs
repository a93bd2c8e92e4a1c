//! The daemon's side: the connection to the keeper, and starting a keeper when none runs.

use super::fdpass::{cvt, recv_msg, send_msg, seqpacket, sockaddr, MAX_MSG};
use super::protocol::Message;
use super::{Held, OpenState};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

    fn send(&self, msg: Message, fd: Option<BorrowedFd>) -> io::Result<()> {
        debug_assert_eq!(msg.carries_fd(), fd.is_some());
        send_msg(self.sock.as_fd(), &msg.encode(), fd)
    }

    /// Hands the keeper a duplicate of connection `id`'s descriptor.
    pub fn hold(&self, id: u64, fd: BorrowedFd, caps: u64, minor: u32) -> io::Result<()> {
        self.send(Message::Hold { id, caps, minor }, Some(fd))
    }

    /// The keeper closes its descriptor of connection `id` (it is being unmounted).
    pub fn drop_connection(&self, id: u64) {
        if let Err(e) = self.send(Message::Drop { id }, None) {
            tracing::warn!(id, "telling the FUSE keeper to drop a connection: {e}");
        }
    }

    /// Records an open of `ino` on connection `id`.
    pub fn note_open(&self, id: u64, ino: u64, state: OpenState) {
        if let Err(e) = self.send(Message::Open { id, ino, state }, None) {
            tracing::warn!(id, ino, "telling the FUSE keeper of an open: {e}");
        }
    }

    /// Records a release of `ino` on connection `id`.
    pub fn note_release(&self, id: u64, ino: u64) {
        if let Err(e) = self.send(Message::Release { id, ino }, None) {
            tracing::warn!(id, ino, "telling the FUSE keeper of a release: {e}");
        }
    }

    /// Every connection the keeper holds (it keeps holding them).
    pub fn list(&self) -> io::Result<Vec<Held>> {
        self.send(Message::List, None)?;
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
            let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
            match Message::decode(&buf[..n]).map_err(|e| bad(e.to_string()))? {
                Message::Held { id, caps, minor } => out.push(Held {
                    id,
                    fd: fd.ok_or_else(|| {
                        bad(format!("connection {id} came without its descriptor"))
                    })?,
                    caps,
                    minor,
                    opens: Vec::new(),
                }),
                Message::Opened {
                    id,
                    ino,
                    state,
                    count,
                } => {
                    if let Some(h) = out.iter_mut().find(|h| h.id == id) {
                        h.opens.push((ino, state, count));
                    }
                }
                Message::End => return Ok(out),
                other => return Err(bad(format!("unexpected answer from the keeper: {other:?}"))),
            }
        }
    }
}

impl Keeper {
    /// The keeper on `sock` (started with `exe fuse-keeper --socket SOCK` if none runs) and the
    /// connections a previous daemon left with it. Without one, lazy mounts work but do not
    /// outlive this daemon: the error says why.
    pub fn connect_or_start(sock: &Path, exe: &Path) -> io::Result<(Arc<Keeper>, Vec<Held>)> {
        let mut last = None;
        // Twice: a keeper that was just exiting (nothing held, no daemon) drops the connection.
        for _ in 0..2 {
            match Keeper::connect_or_spawn(sock, || spawn_keeper(sock, exe))
                .and_then(|k| k.list().map(|held| (k, held)))
            {
                Ok((k, held)) => return Ok((Arc::new(k), held)),
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(last.unwrap_or_else(|| io::Error::other("no keeper")))
    }

    /// Handover is off, but a keeper from an earlier run may still hold connections: have it
    /// let go, so their mounts end (ENOTCONN for their readers) instead of waiting for a server
    /// that will not come; the keeper then exits.
    pub fn release_all(sock: &Path) {
        let Ok(k) = Keeper::connect(sock) else {
            return;
        };
        match k.list() {
            Ok(held) => {
                for h in held {
                    tracing::info!(
                        id = h.id,
                        "handover is off: releasing a kept FUSE connection"
                    );
                    k.drop_connection(h.id);
                }
            }
            Err(e) => tracing::warn!("asking the FUSE keeper for its connections: {e}"),
        }
    }
}

/// Starts `exe fuse-keeper` in its own session (signals for the daemon's process group miss
/// it), reaped by a thread if it exits while the daemon runs.
fn spawn_keeper(sock: &Path, exe: &Path) -> io::Result<()> {
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("fuse-keeper")
        .arg("--socket")
        .arg(sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut child = own_session(&mut cmd).spawn()?;
    tracing::info!(pid = child.id(), socket = %sock.display(), "started the FUSE keeper");
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// Makes `cmd` start in a session of its own, so that signals for this process's group (a
/// terminal's Ctrl-C, a supervisor) miss it.
pub fn own_session(cmd: &mut std::process::Command) -> &mut std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches nothing of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    }
}
