//! The thin fuser binding: each kernel request is answered from [`ClipFs`]; reads run on the
//! tokio runtime and reply when their bytes are verified, so slow fetches never block the FUSE
//! worker threads. Errors become errno here and nowhere else.

use crate::fs::{Attr, ClipFs, FsError, Kind};
use crate::handover::{self, Held, Keeper, OpenState};
use fuser::{
    BackgroundSession, BackingId, Config, Errno, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyXattr, Request, Session, SessionACL,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The image never changes under a mount: the kernel may cache entries and attributes long.
const TTL: Duration = Duration::from_secs(24 * 3600);

/// Whether the kernel lets clip's mounts be id-mapped: 0 not known yet (no mount made), 1 no,
/// 2 yes. A property of the running kernel, learnt at the first mount's INIT.
static KERNEL_IDMAP: AtomicU8 = AtomicU8::new(0);

/// Whether mounts made by this process can be id-mapped (`FUSE_ALLOW_IDMAP`, Linux 6.12+):
/// `None` until the first mount has met the kernel.
pub fn kernel_allows_idmap() -> Option<bool> {
    match KERNEL_IDMAP.load(Ordering::Relaxed) {
        0 => None,
        v => Some(v == 2),
    }
}

/// How to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Let other users (a container's non-root users) use the mount (`allow_other`).
    pub allow_other: bool,
    /// Honour setuid/setgid bits and device nodes (`suid,dev`). Containers need them, as under
    /// overlayfs; a user's `clip mount` does not (`nosuid,nodev`, the default).
    pub suid_dev: bool,
    /// FUSE worker threads.
    pub threads: usize,
    /// The name shown in /proc/mounts.
    pub fsname: String,
    /// Serve files whose bytes are all local by FUSE passthrough (when the kernel offers it).
    pub passthrough: bool,
    /// Smallest file served by passthrough once local (the filesystem's
    /// [`crate::ClipFs::with_passthrough`] takes it).
    pub passthrough_min_size: u64,
    /// What opening a file starts fetching.
    pub guesses: Guesses,
}

/// What opening a file starts fetching before anything reads it: the reads a program makes
/// next, guessed. Every one yields to demand reads, and none happens where a startup profile
/// lists the reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guesses {
    /// Opening a cold file of at most this many bytes requests all of its spans at once
    /// (0: off; files are then fetched read by read).
    pub prefetch_on_open: u64,
    /// On the second cold open in a directory (the first, for a package's `__init__`), up to
    /// this many bytes of the files next to it with the same extension are fetched on a guess,
    /// yielding to demand reads (0: off).
    pub speculate_siblings: u64,
    /// Opening a program or shared library starts fetching the libraries it needs (from its
    /// ELF headers), each as an open would. A snapshotter mount that no startup profile covers
    /// also fetches, as it is made, the files nearly every start reads (the user databases,
    /// the dynamic loader, the C library: [`crate::ClipFs::prefetch_startup_files`]).
    pub prefetch_libraries: bool,
    /// A container starting on a snapshotter mount that no startup profile covers has its
    /// program (from containerd's record of it) fetched, with its libraries and a script's
    /// interpreter, before the runtime execs it ([`crate::ClipFs::prefetch_program`]).
    pub prefetch_program: bool,
}

impl Default for Guesses {
    fn default() -> Self {
        Guesses {
            prefetch_on_open: DEFAULT_PREFETCH_ON_OPEN,
            speculate_siblings: DEFAULT_SPECULATE_SIBLINGS,
            prefetch_libraries: true,
            prefetch_program: true,
        }
    }
}

impl Guesses {
    /// True if opening a file guesses anything at all.
    fn any(&self) -> bool {
        self.prefetch_on_open > 0 || self.speculate_siblings > 0 || self.prefetch_libraries
    }
}

/// Files at least this big are served by passthrough once local (smaller ones are cheap to
/// serve from the page cache, and each passthrough file costs a copy on disk).
pub const DEFAULT_PASSTHROUGH_MIN_SIZE: u64 = 1 << 20;

/// Files up to this size whose bytes are local are written into the kernel's page cache as
/// they are opened: a FUSE READ is a round trip (the reader sleeps, a worker wakes, answers and
/// wakes the reader; tens of microseconds on a small VM), and a tar of `/usr` opens 31,000
/// files, most read whole by one READ of at most 128 KiB.
pub const STORE_ON_OPEN_MAX: u64 = 128 << 10;

/// Files up to this size are requested whole when opened cold.
pub const DEFAULT_PREFETCH_ON_OPEN: u64 = 8 << 20;

/// Bytes of a directory's files fetched on a guess after two cold opens in it.
pub const DEFAULT_SPECULATE_SIBLINGS: u64 = 4 << 20;

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            allow_other: true,
            suid_dev: false,
            threads: 4,
            fsname: "clip".into(),
            passthrough: true,
            passthrough_min_size: DEFAULT_PASSTHROUGH_MIN_SIZE,
            guesses: Guesses::default(),
        }
    }
}

/// A mount's link to the FUSE keeper (see [`crate::handover`]): the connection survives the
/// daemon, and the keeper learns which inodes are open in which mode.
#[derive(Clone, Debug)]
pub struct Handover {
    pub keeper: Arc<Keeper>,
    /// The connection's id with the keeper (the snapshotter uses the snapshot id).
    pub id: u64,
}

struct Adapter {
    fs: Arc<ClipFs>,
    rt: tokio::runtime::Handle,
    /// Asked for by the mount, and granted by the kernel at init.
    passthrough: bool,
    guesses: Guesses,
    /// How each open inode is open. The kernel refuses (EIO) to mix page-cached and passthrough
    /// opens of one inode, and every passthrough open of an inode must name the same backing
    /// file, so an inode keeps its mode until its last open file is released.
    open: Mutex<HashMap<u64, OpenMode>>,
    /// The `/dev/fuse` descriptor (set before the session serves its first request).
    fuse_fd: Arc<OnceLock<RawFd>>,
    /// Writes to the kernel unasked (page cache stores), on the same connection; set with
    /// `fuse_fd`.
    notifier: Arc<OnceLock<fuser::Notifier>>,
    /// What the kernel offered at INIT: capability flags and ABI minor version.
    kernel: Arc<OnceLock<(u64, u32)>>,
    handover: Option<Handover>,
    /// The worker threads this mount was granted, given back when the session ends.
    workers: Workers,
    /// One bit per inode: its bytes were stored in the page cache at an open, and no READ has
    /// come for it since (the kernel still has them, as far as the daemon can tell).
    stored: Box<[std::sync::atomic::AtomicU64]>,
}

enum OpenMode {
    Cached(u32),
    /// The backing id (managed, and its number for the keeper) and the open count.
    Passthrough(BackingId, u32, u32),
    /// Open by passthrough since before a daemon restart, on a backing id the previous daemon
    /// registered (still registered in the kernel's connection).
    Inherited(u32, u32),
}

impl Adapter {
    /// For a small file (`size` bytes) whose bytes are all local: writes them into the
    /// kernel's page cache (`FUSE_NOTIFY_STORE`) before the OPEN is answered, so that its reads
    /// cost no round trip (see [`STORE_ON_OPEN_MAX`]). Never fetches; a file whose bytes are
    /// not local is read as before.
    fn store_on_open(&self, ino: u64, size: u64) {
        let Some(notifier) = self.notifier.get() else {
            return;
        };
        if size == 0 || size > STORE_ON_OPEN_MAX {
            return;
        }
        // Stored already and not asked for since: the pages are cached; storing them again on
        // every open would cost more than the READ it saves.
        let Some(word) = self.stored.get(ino as usize / 64) else {
            return;
        };
        let bit = 1u64 << (ino % 64);
        if word.load(Relaxed) & bit != 0 {
            return;
        }
        let local = {
            let _rt = self.rt.enter();
            self.fs.read_now(ino, 0, size as u32)
        };
        let Some(Ok(bytes)) = local else {
            return;
        };
        if bytes.len() as u64 != size {
            return;
        }
        match notifier.store(INodeNo(ino), 0, &bytes) {
            Ok(()) => {
                word.fetch_or(bit, Relaxed);
                crate::metrics::stored(size);
            }
            Err(e) => tracing::debug!(ino, "storing an opened file in the page cache: {e}"),
        }
    }

    /// A registered backing file for a passthrough open of `ino`, if it has a verified local
    /// copy; otherwise starts making one for later opens.
    fn backing(&self, ino: u64, reply: &ReplyOpen) -> Option<(u32, BackingId)> {
        if !self.passthrough {
            return None;
        }
        let Some(file) = self.fs.backing_file(ino) else {
            self.fs.prepare_backing(ino, &self.rt);
            return None;
        };
        let fuse = *self.fuse_fd.get()?;
        // SAFETY: the session owns this descriptor for as long as requests are served.
        let fuse = unsafe { BorrowedFd::borrow_raw(fuse) };
        match BackingId::create_raw(fuse, &file) {
            // SAFETY: a backing id just registered on this connection, wrapped once.
            Ok(raw) => Some((raw, unsafe { reply.wrap_backing(raw) })),
            Err(e) => {
                // E.g. the cache directory is on a stacked filesystem: serve through the daemon.
                tracing::warn!(ino, "FUSE passthrough unavailable for this file: {e}");
                None
            }
        }
    }
}

fn errno(e: &FsError) -> Errno {
    if let FsError::Read(r) = e {
        tracing::warn!("read failed, returning EIO: {r}");
    }
    Errno::from_i32(e.errno())
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
        Kind::CharDevice => FileType::CharDevice,
        Kind::BlockDevice => FileType::BlockDevice,
        Kind::Fifo => FileType::NamedPipe,
    }
}

fn time(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let t = time(a.mtime, a.mtime_nsec);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: t,
        mtime: t,
        ctime: t,
        crtime: t,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = self
            .kernel
            .set((config.capabilities().bits(), config.kernel_abi().1));
        // 1 MiB reads (the kernel's FUSE limit, 256 pages, is derived from this).
        let _ = config.set_max_readahead(1 << 20);
        if self.passthrough {
            // Depth 1: backing files on a plain filesystem, and this mount usable as an
            // overlayfs lower layer.
            self.passthrough = config.capabilities().contains(InitFlags::FUSE_PASSTHROUGH)
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if !self.passthrough {
                tracing::info!(
                    "the kernel offers no FUSE passthrough; every read goes through the daemon"
                );
            }
        }
        // Each is optional: a kernel without one simply does without.
        for flag in [
            // Listings carry attributes (fills the kernel's entry and attribute caches).
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            // The kernel answers and caches POSIX ACL lookups (images carry none).
            InitFlags::FUSE_POSIX_ACL,
            // No OPENDIR/RELEASEDIR round trips; the kernel caches listings (see opendir).
            InitFlags::FUSE_NO_OPENDIR_SUPPORT,
        ] {
            let _ = config.add_capabilities(flag);
        }
        // Id-mapped mounts of this filesystem (Linux 6.12+; needs default_permissions, which
        // every clip mount has): user-namespaced containers see the image's owners through
        // their own mapping, on this one mount.
        let idmap = config.add_capabilities(InitFlags::FUSE_ALLOW_IDMAP).is_ok();
        KERNEL_IDMAP.store(if idmap { 2 } else { 1 }, Ordering::Relaxed);
        Ok(())
    }

    /// With `FUSE_NO_OPENDIR_SUPPORT`, ENOSYS here tells the kernel to skip OPENDIR and
    /// RELEASEDIR from now on and to cache directory listings itself: a warm `find` over the
    /// mount then costs what it costs on local disk.
    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.error(Errno::ENOSYS)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::metrics::request("lookup");
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(i) => reply.entry(&TTL, &file_attr(&i.attr), Generation(0)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::metrics::request("getattr");
        match self.fs.get(ino.0) {
            Ok(i) => reply.attr(&TTL, &file_attr(&i.attr)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(t) => reply.data(t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::metrics::request("open");
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        let size = match self.fs.get(ino.0) {
            Ok(i) => i.attr.size,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut open = self.open.lock().expect("open lock");
        let note = |state| {
            if let Some(h) = &self.handover {
                h.keeper.note_open(h.id, ino.0, state);
            }
        };
        match open.get_mut(&ino.0) {
            Some(OpenMode::Passthrough(id, raw, n)) => {
                *n += 1;
                note(OpenState::Passthrough(*raw));
                crate::metrics::open("passthrough");
                return reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), id);
            }
            Some(OpenMode::Inherited(raw, n)) => {
                let (raw, n) = (*raw, *n + 1);
                note(OpenState::Passthrough(raw));
                // SAFETY: the previous daemon registered this id on this connection; it is
                // wrapped once, and closed when the last open file is released.
                let id = unsafe { reply.wrap_backing(raw) };
                reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id);
                open.insert(ino.0, OpenMode::Passthrough(id, raw, n));
                crate::metrics::open("passthrough");
                return;
            }
            Some(OpenMode::Cached(n)) => *n += 1,
            None => {
                if let Some((raw, id)) = self.backing(ino.0, &reply) {
                    note(OpenState::Passthrough(raw));
                    reply.opened_passthrough(FileHandle(0), FopenFlags::empty(), &id);
                    open.insert(ino.0, OpenMode::Passthrough(id, raw, 1));
                    crate::metrics::open("passthrough");
                    return;
                }
                open.insert(ino.0, OpenMode::Cached(1));
            }
        }
        note(OpenState::Cached);
        crate::metrics::open("daemon");
        let g = self.guesses;
        if g.any() {
            let _rt = self.rt.enter();
            self.fs
                .prefetch_on_open(ino.0, g.prefetch_on_open, g.speculate_siblings);
            if g.prefetch_libraries {
                self.fs.prefetch_libraries(ino.0, g.prefetch_on_open);
            }
        }
        self.store_on_open(ino.0, size);
        // Immutable content: keep the kernel's page cache across opens.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        crate::metrics::request("release");
        if let Some(h) = &self.handover {
            h.keeper.note_release(h.id, ino.0);
        }
        reply.ok();
        let mut open = self.open.lock().expect("open lock");
        let last = match open.get_mut(&ino.0) {
            Some(
                OpenMode::Cached(n) | OpenMode::Passthrough(_, _, n) | OpenMode::Inherited(_, n),
            ) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if last {
            // Dropping a BackingId closes it; open files keep their own reference.
            if let Some(OpenMode::Inherited(raw, _)) = open.remove(&ino.0) {
                if let Some(fd) = self.fuse_fd.get() {
                    handover::close_backing(*fd, raw);
                }
            }
            drop(open);
            if self.passthrough {
                // A file just read whole through the daemon is now local: copy it for next time.
                self.fs.prepare_backing(ino.0, &self.rt);
            }
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        crate::metrics::request("read");
        // The kernel asks for bytes it was given at an open: they left its page cache (memory
        // pressure, drop_caches), so the next open stores them again.
        if let Some(word) = self.stored.get(ino.0 as usize / 64) {
            word.fetch_and(!(1u64 << (ino.0 % 64)), Relaxed);
        }
        // Bytes already local are answered on this worker thread: no hop to the runtime and
        // back (two thread wake-ups per read, the bulk of a read-most start's cost).
        let now = {
            let _rt = self.rt.enter();
            self.fs.read_now(ino.0, offset, size)
        };
        match now {
            Some(Ok(b)) => {
                crate::metrics::read(b.len() as u64);
                return reply.data(&b);
            }
            Some(Err(e)) => return reply.error(errno(&e)),
            None => {}
        }
        let fs = self.fs.clone();
        self.rt.spawn(async move {
            match fs.read(ino.0, offset, size).await {
                Ok(b) => {
                    crate::metrics::read(b.len() as u64);
                    reply.data(&b)
                }
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        crate::metrics::request("readdir");
        let kids = match self.fs.children(ino.0) {
            Ok(k) => k,
            Err(e) => return reply.error(errno(&e)),
        };
        // Offsets: 1 = ".", 2 = "..", 3.. = children.
        let mut i = offset;
        loop {
            let full = match i {
                0 => reply.add(ino, 1, FileType::Directory, "."),
                1 => reply.add(ino, 2, FileType::Directory, ".."),
                n => match kids.get(n as usize - 2) {
                    Some((name, child)) => {
                        let kind = self
                            .fs
                            .get(*child)
                            .map(|c| file_type(c.attr.kind))
                            .unwrap_or(FileType::RegularFile);
                        reply.add(INodeNo(*child), n + 1, kind, OsStr::from_bytes(name))
                    }
                    None => break,
                },
            };
            if full {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        crate::metrics::request("readdirplus");
        let (kids, me) = match (self.fs.children(ino.0), self.fs.get(ino.0)) {
            (Ok(k), Ok(me)) => (k, me),
            (Err(e), _) | (_, Err(e)) => return reply.error(errno(&e)),
        };
        let mut i = offset;
        loop {
            let full = match i {
                0 => reply.add(ino, 1, ".", &TTL, &file_attr(&me.attr), Generation(0)),
                1 => reply.add(ino, 2, "..", &TTL, &file_attr(&me.attr), Generation(0)),
                n => match kids.get(n as usize - 2) {
                    Some((name, child)) => match self.fs.get(*child) {
                        Ok(c) => reply.add(
                            INodeNo(*child),
                            n + 1,
                            OsStr::from_bytes(name),
                            &TTL,
                            &file_attr(&c.attr),
                            Generation(0),
                        ),
                        Err(_) => false,
                    },
                    None => break,
                },
            };
            if full {
                break;
            }
            i += 1;
        }
        reply.ok();
    }

    /// Nothing to flush on a read-only image, and a FLUSH is a synchronous round trip on every
    /// close(): ENOSYS tells the kernel never to send one again on this connection (a tar of
    /// /usr closes 31,000 files).
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        crate::metrics::request("flush");
        reply.error(Errno::ENOSYS);
    }

    /// No ioctls (isatty() and friends probe with them): ENOTTY, quietly.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, self.fs.inode_count() as u64, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // An image without any xattr: ENOSYS makes the kernel stop asking for the whole mount
        // (FUSE cannot cache "no such attribute", and `ls -l` asks twice per file).
        if !self.fs.has_xattrs() {
            return reply.error(Errno::ENOSYS);
        }
        match self.fs.xattr(ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if !self.fs.has_xattrs() {
            return reply.error(Errno::ENOSYS);
        }
        let list: Vec<u8> = match self.fs.xattrs(ino.0) {
            Ok(x) => x
                .iter()
                .flat_map(|(k, _)| k.iter().copied().chain([0u8]))
                .collect(),
            Err(e) => return reply.error(errno(&e)),
        };
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() <= size as usize {
            reply.data(&list)
        } else {
            reply.error(Errno::ERANGE)
        }
    }
}

/// FUSE worker threads of every mount of this process together. Each mount asks for
/// [`MountOptions::threads`]; once this many are in use, a new mount gets one. Threads are
/// therefore at most this many plus one per mount beyond it.
pub const MAX_WORKER_THREADS: usize = 256;

static WORKERS_IN_USE: AtomicUsize = AtomicUsize::new(0);

/// Worker threads granted to one mount.
struct Workers {
    granted: usize,
    pool: &'static AtomicUsize,
}

impl Workers {
    /// Up to `want` threads (at least one) from what the process has left.
    fn take(want: usize) -> Workers {
        Self::take_from(&WORKERS_IN_USE, MAX_WORKER_THREADS, want)
    }

    fn take_from(pool: &'static AtomicUsize, max: usize, want: usize) -> Workers {
        let want = want.max(1);
        let mut granted = 1;
        let _ = pool.fetch_update(Relaxed, Relaxed, |used| {
            granted = want.min(max.saturating_sub(used)).max(1);
            Some(used + granted)
        });
        Workers { granted, pool }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.pool.fetch_sub(self.granted, Relaxed);
    }
}

#[cfg(test)]
#[test]
fn mounts_share_a_bounded_number_of_worker_threads() {
    static POOL: AtomicUsize = AtomicUsize::new(0);
    let a: Vec<Workers> = (0..3).map(|_| Workers::take_from(&POOL, 10, 4)).collect();
    let got: Vec<usize> = a.iter().map(|w| w.granted).collect();
    assert_eq!(got, [4, 4, 2]);
    let b = Workers::take_from(&POOL, 10, 4);
    assert_eq!(b.granted, 1, "a mount always gets one");
    drop(a);
    assert_eq!(POOL.load(Relaxed), 1);
    assert_eq!(Workers::take_from(&POOL, 10, 4).granted, 4);
}

fn config(opts: &MountOptions, workers: &Workers) -> Config {
    let mut cfg = Config::default();
    cfg.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(opts.fsname.clone()),
        MountOption::Subtype("clip".into()),
        MountOption::DefaultPermissions,
    ];
    if opts.suid_dev {
        cfg.mount_options
            .extend([MountOption::Dev, MountOption::Suid]);
    } else {
        cfg.mount_options
            .extend([MountOption::NoDev, MountOption::NoSuid]);
    }
    if opts.allow_other {
        cfg.acl = SessionACL::All;
    }
    // One descriptor shared by every worker thread (no FUSE_DEV_IOC_CLONE): a request a dying
    // daemon had read stays on the connection the keeper holds, and can be resent.
    cfg.clone_fd = false;
    cfg.n_threads = Some(workers.granted);
    cfg
}

fn adapter(
    fs: Arc<ClipFs>,
    rt: tokio::runtime::Handle,
    opts: &MountOptions,
    h: Option<Handover>,
) -> Adapter {
    let stored = (0..(fs.inode_count() + 1).div_ceil(64))
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    Adapter {
        stored,
        workers: Workers::take(opts.threads),
        fs,
        rt,
        passthrough: opts.passthrough,
        guesses: opts.guesses,
        open: Mutex::new(HashMap::new()),
        fuse_fd: Arc::new(OnceLock::new()),
        notifier: Arc::new(OnceLock::new()),
        kernel: Arc::new(OnceLock::new()),
        handover: h,
    }
}

/// Mounts `fs` read-only at `dir`; unmounted when the returned session is dropped.
pub fn mount(
    fs: ClipFs,
    dir: &Path,
    rt: tokio::runtime::Handle,
    opts: &MountOptions,
) -> std::io::Result<BackgroundSession> {
    mount_with(fs, dir, rt, opts, None)
}

/// [`mount`], and with `handover` the keeper holds the connection so that it outlives this
/// process (see [`crate::handover`]).
pub fn mount_with(
    fs: impl Into<Arc<ClipFs>>,
    dir: &Path,
    rt: tokio::runtime::Handle,
    opts: &MountOptions,
    handover: Option<Handover>,
) -> std::io::Result<BackgroundSession> {
    let a = adapter(fs.into(), rt, opts, handover.clone());
    let (fuse_fd, kernel, notifier) = (a.fuse_fd.clone(), a.kernel.clone(), a.notifier.clone());
    let cfg = config(opts, &a.workers);
    let session = Session::new(a, dir, &cfg)?;
    let _ = fuse_fd.set(session.as_fd().as_raw_fd());
    let _ = notifier.set(session.notifier());
    if let Some(h) = &handover {
        let (caps, minor) = kernel.get().copied().unwrap_or((0, 0));
        if let Err(e) = h.keeper.hold(h.id, session.as_fd(), caps, minor) {
            // Still a working mount; it just will not outlive this daemon.
            tracing::warn!(dir = %dir.display(), "the FUSE keeper did not take the connection: {e}");
        }
    }
    session.spawn()
}

/// Serves again a connection a previous daemon mounted and the keeper kept alive: the same
/// image's inode numbers, the previous daemon's open files and backing ids, and the requests
/// it read but never answered resent by the kernel.
pub fn resume(
    fs: impl Into<Arc<ClipFs>>,
    held: Held,
    rt: tokio::runtime::Handle,
    opts: &MountOptions,
    handover: Handover,
) -> std::io::Result<BackgroundSession> {
    let a = adapter(fs.into(), rt, opts, Some(handover));
    {
        let mut open = a.open.lock().expect("open lock");
        for (ino, state, n) in &held.opens {
            open.insert(
                *ino,
                match state {
                    OpenState::Cached => OpenMode::Cached(*n),
                    OpenState::Passthrough(raw) => OpenMode::Inherited(*raw, *n),
                },
            );
        }
    }
    let (fuse_fd, notifier) = (a.fuse_fd.clone(), a.notifier.clone());
    // fuser needs an INIT handshake; the kernel's happened long ago. Feed it one through a
    // socket, then put the real connection in that socket's place.
    let (ours, theirs) = handover::socket_pair()?;
    handover::send_msg(
        ours.as_fd(),
        &handover::synthetic_init(held.caps, held.minor, 1 << 20),
        None,
    )?;
    let cfg = config(opts, &a.workers);
    let session = Session::from_fd(a, theirs, cfg.acl, cfg.clone())?;
    let raw = session.as_fd().as_raw_fd();
    handover::replace_fd(held.fd.as_fd(), raw)?;
    let _ = fuse_fd.set(raw);
    // The same descriptor number, which now holds the real connection.
    let _ = notifier.set(session.notifier());
    drop(ours);
    let bg = session.spawn()?;
    if let Err(e) = handover::notify_resend(held.fd.as_fd()) {
        tracing::warn!(
            "the kernel cannot resend requests the previous daemon left unanswered ({e}); \
             their callers wait until interrupted"
        );
    }
    Ok(bg)
}
