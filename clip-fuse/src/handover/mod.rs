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
//! Protocol: `SOCK_SEQPACKET` messages of ASCII words, a descriptor attached where noted; every
//! message is a [`protocol::Message`], encoded and decoded only there.

mod client;
mod fdpass;
mod kernel;
pub mod protocol;
mod server;

pub use client::{own_session, Keeper};
pub(crate) use fdpass::{replace_fd, send_msg, socket_pair};
pub(crate) use kernel::synthetic_init;
pub use kernel::{close_backing, notify_resend};
pub use server::run_keeper;

use std::os::fd::OwnedFd;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, AsRawFd, FromRawFd};
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
