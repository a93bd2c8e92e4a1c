//! The image's merged tree as inodes.
//!
//! Inode numbers are assigned in path order from the merged view (root = 1), so the same image
//! always gets the same numbers. Hard links share one inode (the file's), with `nlink` counting
//! its names; directories count `2 + subdirectories`. Everything but file bytes is answered
//! from these tables.

use bytes::Bytes;
use clip_core::cache::files::FileStore;
use clip_core::elf;
use clip_core::index::{view::IMPLIED, EntryKind, ImageView};
use clip_core::reader::{LayerReader, ReadError};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Why an object's libraries were not read (see [`ClipFs::needed_libraries`]): logged, never
/// shown to the program.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error(transparent)]
    Read(#[from] FsError),
    #[error(transparent)]
    Elf(#[from] elf::ElfError),
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("no such attribute")]
    NoAttr,
    #[error("invalid argument")]
    Invalid,
    #[error("read failed: {0}")]
    Read(#[from] ReadError),
    /// The merged tree cannot be served (a malformed image): this image fails, nothing else.
    #[error("malformed image tree: {0}")]
    Tree(String),
}

impl FsError {
    /// The errno the kernel gets.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NoAttr => libc::ENODATA,
            FsError::Invalid => libc::EINVAL,
            FsError::Read(_) | FsError::Tree(_) => libc::EIO,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

#[derive(Clone, Debug)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub rdev: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
}

#[derive(Debug)]
enum Data {
    Dir { children: Vec<(Vec<u8>, u64)> },
    File { layer: u32, offset: u64 },
    Symlink(Vec<u8>),
    None,
}

/// Extended attributes: (name, value) pairs.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug)]
pub struct Inode {
    pub attr: Attr,
    data: Data,
    xattrs: Xattrs,
}

pub struct ClipFs {
    inodes: Vec<Inode>,
    /// The directory holding each inode's first name (the root's is itself).
    parents: Vec<u64>,
    readers: Vec<Arc<LayerReader>>,
    has_xattrs: bool,
    passthrough: Option<Passthrough>,
    /// Cold opens seen in each directory (see [`ClipFs::prefetch_on_open`]).
    cold_opens: Mutex<HashMap<u64, u32>>,
    /// Objects already read for the libraries they need (see [`ClipFs::prefetch_libraries`]).
    scanned: Mutex<HashSet<u64>>,
    /// Whether the loader's cache (`/etc/ld.so.cache`) was fetched for a program that needs
    /// libraries.
    loader_cache: std::sync::atomic::AtomicBool,
}

/// Objects read for their libraries in one mount at most.
const MAX_SCANNED: usize = 4096;

/// The part of the loader's cache fetched with a program's libraries (a typical one is tens of
/// KiB).
const LOADER_CACHE_MAX: u64 = 1 << 20;

/// What [`ClipFs::prefetch_startup_files`] fetches, where the image has it (symbolic links
/// followed), before the loader's cache: the user and group databases the runtime reads, the
/// dynamic loaders of glibc and musl (x86-64, arm64), and glibc's C library.
const STARTUP_FILES: &[&[u8]] = &[
    b"/etc/passwd",
    b"/etc/group",
    b"/lib64/ld-linux-x86-64.so.2",
    b"/lib/ld-linux-aarch64.so.1",
    b"/lib/ld-musl-x86_64.so.1",
    b"/lib/ld-musl-aarch64.so.1",
    b"/lib/x86_64-linux-gnu/libc.so.6",
    b"/lib/aarch64-linux-gnu/libc.so.6",
];

/// Symbolic links followed in one path at most (the kernel's limit).
const MAX_SYMLINKS: u32 = 40;

/// A directory's siblings of a cold-opened file are fetched on its second cold open there (on
/// the first for a package's `__init__`).
const SIBLINGS_AFTER: u32 = 2;

/// Siblings bigger than this are not fetched on a guess (a big file is seldom read whole).
const SIBLING_MAX_SIZE: u64 = 512 << 10;

/// Whether a file name is a shared library's: `*.so` or `*.so.*`.
fn library_name(name: &[u8]) -> bool {
    name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.")
}

/// The file name's extension (after its last dot; none for dot files and names without one).
fn extension(name: &[u8]) -> Option<&[u8]> {
    match name.iter().rposition(|&b| b == b'.') {
        Some(0) | None => None,
        Some(i) => Some(&name[i + 1..]),
    }
}

/// Whole-file copies for FUSE passthrough (see [`ClipFs::backing_file`]).
struct Passthrough {
    store: Arc<FileStore>,
    min_size: u64,
    /// Inodes whose file is being verified or written.
    busy: Mutex<HashSet<u64>>,
    /// One file written at a time: it is background work.
    writer: Arc<tokio::sync::Semaphore>,
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

fn makedev(major: u32, minor: u32) -> u32 {
    // The kernel's new_encode_dev, which FUSE's rdev carries.
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

impl ClipFs {
    /// Builds the inode tables from the merged view; `readers[i]` reads layer `i`. A view that
    /// breaks the tree's invariant (see [`ImageView::check`]) is an error, never a panic.
    pub fn new(view: &ImageView, readers: Vec<Arc<LayerReader>>) -> Result<Self, FsError> {
        view.check().map_err(FsError::Tree)?;
        let mut inodes: Vec<Inode> = Vec::with_capacity(view.nodes.len());
        // Directories only: nothing else is anyone's parent.
        let mut by_path: HashMap<&[u8], u64> = HashMap::new();
        let mut by_data: HashMap<(u32, u32), u64> = HashMap::new();
        let mut children: HashMap<u64, Vec<(Vec<u8>, u64)>> = HashMap::new();
        let mut parents: Vec<u64> = Vec::with_capacity(view.nodes.len());
        for (path, node) in &view.nodes {
            let entry = view.entry(node.layer, node.entry);
            let file_key = match entry.map(|e| &e.kind) {
                Some(EntryKind::File { .. }) => Some((node.layer, node.entry)),
                Some(EntryKind::Hardlink { .. }) => node.data,
                _ => None,
            };
            let ino = match file_key.and_then(|k| by_data.get(&k)) {
                Some(&ino) => {
                    inodes[ino as usize - 1].attr.nlink += 1;
                    ino
                }
                None => {
                    let ino = inodes.len() as u64 + 1;
                    // A hard link takes the metadata of the file it names.
                    let meta = match file_key {
                        Some((l, e)) => view.entry(l, e),
                        None => entry,
                    };
                    let (kind, size, rdev, data) =
                        match (entry.map(|e| &e.kind), meta.map(|m| &m.kind)) {
                            (None, _) | (Some(EntryKind::Dir), _) => (
                                Kind::Dir,
                                0,
                                0,
                                Data::Dir {
                                    children: Vec::new(),
                                },
                            ),
                            (_, Some(EntryKind::File { offset, size })) => {
                                let (l, _) = file_key.expect("file key for files");
                                (
                                    Kind::File,
                                    *size,
                                    0,
                                    Data::File {
                                        layer: l,
                                        offset: *offset,
                                    },
                                )
                            }
                            (Some(EntryKind::Symlink { target }), _) => (
                                Kind::Symlink,
                                target.len() as u64,
                                0,
                                Data::Symlink(target.clone()),
                            ),
                            (Some(EntryKind::CharDevice { major, minor }), _) => {
                                (Kind::CharDevice, 0, makedev(*major, *minor), Data::None)
                            }
                            (Some(EntryKind::BlockDevice { major, minor }), _) => {
                                (Kind::BlockDevice, 0, makedev(*major, *minor), Data::None)
                            }
                            (Some(EntryKind::Fifo), _) => (Kind::Fifo, 0, 0, Data::None),
                            _ => (Kind::File, 0, 0, Data::None),
                        };
                    let (perm, uid, gid, mtime, mtime_nsec, xattrs) = match meta {
                        Some(m) => (
                            m.mode as u16 & 0o7777,
                            m.uid,
                            m.gid,
                            m.mtime,
                            m.mtime_nsec,
                            m.xattrs.clone(),
                        ),
                        None => (0o755, 0, 0, 0, 0, Vec::new()),
                    };
                    let nlink = if kind == Kind::Dir { 2 } else { 1 };
                    inodes.push(Inode {
                        attr: Attr {
                            ino,
                            kind,
                            perm,
                            nlink,
                            uid,
                            gid,
                            size,
                            rdev,
                            mtime,
                            mtime_nsec,
                        },
                        data,
                        xattrs,
                    });
                    if let Some(k) = file_key {
                        by_data.insert(k, ino);
                    }
                    ino
                }
            };
            if inodes[ino as usize - 1].attr.kind == Kind::Dir {
                by_path.insert(path.as_slice(), ino);
            }
            if path.is_empty() && parents.len() < inodes.len() {
                parents.push(ino);
            }
            if !path.is_empty() {
                let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
                    Some(i) => (&path[..i], &path[i + 1..]),
                    None => (&path[..0], &path[..]),
                };
                let pino = *by_path.get(parent).ok_or_else(|| {
                    FsError::Tree(format!("orphan {}", String::from_utf8_lossy(path)))
                })?;
                children.entry(pino).or_default().push((name.to_vec(), ino));
                if parents.len() < inodes.len() {
                    parents.push(pino);
                }
                if node.entry == IMPLIED || entry.is_some_and(|e| e.kind == EntryKind::Dir) {
                    inodes[pino as usize - 1].attr.nlink += 1;
                }
            }
        }
        for (pino, mut kids) in children {
            kids.sort();
            if let Data::Dir { children } = &mut inodes[pino as usize - 1].data {
                *children = kids;
            }
        }
        let has_xattrs = inodes.iter().any(|i| !i.xattrs.is_empty());
        Ok(ClipFs {
            inodes,
            parents,
            readers,
            has_xattrs,
            passthrough: None,
            cold_opens: Mutex::new(HashMap::new()),
            scanned: Mutex::new(HashSet::new()),
            loader_cache: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Serves files of at least `min_size` bytes by FUSE passthrough once their bytes are all
    /// local, from whole-file copies kept in `store`.
    pub fn with_passthrough(mut self, store: Arc<FileStore>, min_size: u64) -> Self {
        self.passthrough = Some(Passthrough {
            store,
            min_size: min_size.max(1),
            busy: Mutex::new(HashSet::new()),
            writer: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        self
    }

    /// (reader, offset of the bytes in the layer, size) of a regular file.
    fn file_data(&self, ino: u64) -> Option<(&Arc<LayerReader>, u64, u64)> {
        let inode = self.get(ino).ok()?;
        match inode.data {
            Data::File { layer, offset } => {
                Some((self.readers.get(layer as usize)?, offset, inode.attr.size))
            }
            _ => None,
        }
    }

    /// Starts fetching every span of regular file `ino` that no local tier has, if the file is
    /// at most `max` bytes: a program that opens a file reads it, so its runs are requested
    /// at once, concurrently, instead of read by read (no wait; demand reads join them), unless
    /// a startup profile says which parts of it are read.
    ///
    /// On the second cold open in a directory (where no startup profile knows better), the
    /// files next to it with the same extension, up to `siblings` bytes in all (those nearest
    /// in the layer first, each at most 512 KiB), are fetched on a guess, in the background
    /// and yielding to demand reads: a program that loads two modules from a directory
    /// (python's `__pycache__`, a node_modules package, a plugin directory) tends to load
    /// more, one at a time, and each would cost a round trip.
    pub fn prefetch_on_open(&self, ino: u64, max: u64, siblings: u64) {
        let Some((reader, offset, size)) = self.file_data(ino) else {
            return;
        };
        if size == 0 {
            return;
        }
        // Looked up only when guesses are on (every span of the file, on every open).
        let cold = siblings > 0 && !reader.is_local(offset, size) && !reader.profiled(offset, size);
        tracing::debug!(ino, path = %self.path_of(ino), layer = %reader.index().layer, offset, size, cold, "open");
        if size <= max {
            reader.prefetch_opened(offset, size);
        }
        if cold {
            self.note_cold_open(ino, siblings);
        }
    }

    /// Counts a cold open of `ino` in its directory and starts the sibling guess there when
    /// [`ClipFs::siblings_due`] says so.
    fn note_cold_open(&self, ino: u64, budget: u64) {
        let Some(dir) = self.siblings_due(ino) else {
            return;
        };
        let Some(picked) = self.siblings(dir, ino, budget) else {
            return;
        };
        for (layer, ranges) in picked {
            let reader = self.readers[layer as usize].clone();
            tokio::spawn(async move { reader.speculate(&ranges).await });
        }
    }

    /// Counts a cold open of `ino` in its directory: `Some(dir)` once per directory, on the
    /// [`SIBLINGS_AFTER`]th cold open there, or on the first if it is a package's entry module
    /// (`__init__.*`: python imports a package's modules right after its `__init__`, one
    /// round trip each). Shared libraries (`lib*.so*`) are not counted: the loader opens those
    /// by name, from its programs' headers (see [`ClipFs::prefetch_libraries`]), and a
    /// directory of them (`/usr/lib/<triplet>`) says nothing about which come next.
    fn siblings_due(&self, ino: u64) -> Option<u64> {
        let dir = *self.parents.get((ino as usize).checked_sub(1)?)?;
        let name = self.name_in(dir, ino)?;
        if name.starts_with(b"lib") && library_name(name) {
            return None;
        }
        let entry = name.starts_with(b"__init__.");
        let mut seen = self.cold_opens.lock().expect("cold opens lock");
        let n = seen.entry(dir).or_insert(0);
        // u32::MAX: the guess was made.
        if *n == u32::MAX {
            return None;
        }
        *n += 1;
        if *n < SIBLINGS_AFTER && !entry {
            return None;
        }
        *n = u32::MAX;
        Some(dir)
    }

    /// The regular files of `dir` with `ino`'s extension (other than `ino`), at most
    /// [`SIBLING_MAX_SIZE`] each, nearest to `ino` in its layer first, up to `budget` bytes:
    /// their (offset, size) ranges by layer.
    fn siblings(&self, dir: u64, ino: u64, budget: u64) -> Option<HashMap<u32, Vec<(u64, u64)>>> {
        let kids = self.children(dir).ok()?;
        let ext = extension(self.name_in(dir, ino)?);
        let (home, at) = match self.get(ino).ok()?.data {
            Data::File { layer, offset } => (layer, offset),
            _ => return None,
        };
        let mut found: Vec<(u64, u32, u64, u64)> = kids
            .iter()
            .filter(|(n, i)| *i != ino && extension(n) == ext)
            .filter_map(|(_, i)| {
                let inode = self.get(*i).ok()?;
                match inode.data {
                    Data::File { layer, offset }
                        if inode.attr.size > 0 && inode.attr.size <= SIBLING_MAX_SIZE =>
                    {
                        let distance = match layer == home {
                            true => offset.abs_diff(at),
                            false => u64::MAX,
                        };
                        Some((distance, layer, offset, inode.attr.size))
                    }
                    _ => None,
                }
            })
            .collect();
        found.sort_unstable();
        let mut out: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        let mut left = budget;
        for (_, layer, offset, size) in found {
            if size > left {
                break;
            }
            left -= size;
            out.entry(layer).or_default().push((offset, size));
        }
        Some(out)
    }

    /// Starts fetching, as opens would, the files that nearly every container start on Linux
    /// reads before the program's own, those of them the image has ([`STARTUP_FILES`]): the
    /// user and group databases (the runtime reads them before it starts the program), the
    /// dynamic loader, the C library and the loader's cache. For a mount no startup profile
    /// covers: it is made before the runtime starts the container, so these are in flight, or
    /// in, by the time the kernel asks for the loader. A file above `max` bytes is left alone;
    /// an image of a static program has none of them, and costs nothing. Returns at once (the
    /// fetches run on the current tokio runtime).
    pub fn prefetch_startup_files(&self, max: u64) {
        for path in STARTUP_FILES {
            let Some((reader, offset, size)) =
                self.resolve(1, path).and_then(|i| self.file_data(i))
            else {
                continue;
            };
            if size <= max {
                reader.prefetch_opened(offset, size);
            }
        }
        self.prefetch_loader_cache();
    }

    /// Starts fetching the loader's cache (`/etc/ld.so.cache`, up to [`LOADER_CACHE_MAX`]
    /// bytes), once per mount: the loader reads it before it opens any library.
    fn prefetch_loader_cache(&self) {
        if self
            .loader_cache
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some((reader, offset, size)) = self
            .resolve(1, b"/etc/ld.so.cache")
            .and_then(|c| self.file_data(c))
        {
            reader.prefetch_opened(offset, size.min(LOADER_CACHE_MAX));
        }
    }

    /// On the first open of a program or shared library (an executable file, or one named
    /// like a library), reads the libraries it needs from its ELF headers (`DT_NEEDED`), finds
    /// them where the dynamic loader would (its `DT_RUNPATH` or `DT_RPATH` with `$ORIGIN`, then
    /// the default directories), and starts fetching each as an open would (whole if at most
    /// `max` bytes), then does the same for their libraries; the loader's cache
    /// (`/etc/ld.so.cache`) is fetched with the first program's. The loader opens them one after
    /// another, each after reading the one before; here they are all requested as soon as the
    /// headers naming them are in. A wrong guess costs bandwidth, never correctness: the bytes
    /// are verified as any others, and an object that is not ELF, or is malformed, is skipped.
    ///
    /// Returns at once (the work runs on the current tokio runtime); an object is read once
    /// per mount.
    pub fn prefetch_libraries(self: &Arc<Self>, ino: u64, max: u64) {
        if self.scanned.lock().expect("scanned lock").contains(&ino)
            || !self.may_be_object(ino)
            || !self.first_scan(ino)
        {
            return;
        }
        tokio::spawn(self.clone().scan_libraries(ino, max));
    }

    /// The work of [`ClipFs::prefetch_libraries`] for object `ino`, and then for each library
    /// found, as their headers come in.
    async fn scan_libraries(self: Arc<Self>, ino: u64, max: u64) {
        let mut scans = tokio::task::JoinSet::new();
        let scan = |scans: &mut tokio::task::JoinSet<_>, obj: u64| {
            let fs = self.clone();
            scans.spawn(async move { (obj, fs.needed_libraries(obj).await) });
        };
        scan(&mut scans, ino);
        while let Some(done) = scans.join_next().await {
            let Ok((obj, found)) = done else { continue };
            let libs = match found {
                Ok(libs) => libs,
                Err(e) => {
                    tracing::debug!(ino = obj, "libraries not read: {e}");
                    continue;
                }
            };
            for lib in libs {
                if !self.first_scan(lib) {
                    continue;
                }
                if let Some((reader, offset, size)) = self.file_data(lib) {
                    tracing::debug!(ino = lib, of = obj, size, "library");
                    if size <= max {
                        reader.prefetch_opened(offset, size);
                    }
                    crate::metrics::library_prefetched();
                }
                scan(&mut scans, lib);
            }
        }
    }

    /// Whether `ino` may be an ELF program or library: a regular file with an execute bit, or
    /// named like a library (`*.so`, `*.so.*`).
    fn may_be_object(&self, ino: u64) -> bool {
        let Ok(inode) = self.get(ino) else {
            return false;
        };
        if !matches!(inode.data, Data::File { .. }) || inode.attr.size < elf::HEADER_LEN {
            return false;
        }
        if inode.attr.perm & 0o111 != 0 {
            return true;
        }
        let Some(&dir) = self.parents.get(ino as usize - 1) else {
            return false;
        };
        self.name_in(dir, ino).is_some_and(library_name)
    }

    /// The name of `ino` in directory `dir` (its first, if it has several there).
    fn name_in(&self, dir: u64, ino: u64) -> Option<&[u8]> {
        let kids = self.children(dir).ok()?;
        kids.iter()
            .find(|(_, i)| *i == ino)
            .map(|(n, _)| n.as_slice())
    }

    /// The path of `ino` from the root (its first name), for logs; `?` where the tree is broken.
    fn path_of(&self, ino: u64) -> String {
        let mut names: Vec<String> = Vec::new();
        let mut cur = ino;
        while cur > 1 && names.len() < 256 {
            let Some(&dir) = self.parents.get(cur as usize - 1) else {
                break;
            };
            let name = self.name_in(dir, cur).unwrap_or(b"?");
            names.push(String::from_utf8_lossy(name).into_owned());
            cur = dir;
        }
        names.reverse();
        format!("/{}", names.join("/"))
    }

    /// Marks `ino` as read for its libraries: false if it was already, or if this mount has
    /// read [`MAX_SCANNED`] objects.
    fn first_scan(&self, ino: u64) -> bool {
        let mut seen = self.scanned.lock().expect("scanned lock");
        seen.len() < MAX_SCANNED && seen.insert(ino)
    }

    /// The inodes of the regular files that ELF object `ino` names as its libraries, each
    /// found in the first directory that has it (in the loader's order). Names with a `/`
    /// (paths the loader takes as they are, relative to its working directory) are skipped.
    pub async fn needed_libraries(&self, ino: u64) -> Result<Vec<u64>, ScanError> {
        // Every length asked for is bounded (at most MAX_STRINGS).
        let read = |off, len: u64| async move {
            self.read(ino, off, len as u32)
                .await
                .map_err(ScanError::from)
        };
        let (h, names) = elf::needed(read).await?;
        if names.libraries.is_empty() {
            return Ok(Vec::new());
        }
        self.prefetch_loader_cache();
        let origin = self.parents.get(ino as usize - 1).copied().unwrap_or(1);
        let mut dirs: Vec<(u64, Vec<u8>)> = Vec::new();
        for p in &names.search {
            // `$ORIGIN` (or `${ORIGIN}`) is the object's directory; other tokens are skipped.
            let (start, rest) = match p
                .strip_prefix(b"$ORIGIN")
                .or_else(|| p.strip_prefix(b"${ORIGIN}"))
            {
                Some(r) => (origin, r),
                None => (1, p.as_slice()),
            };
            if !rest.contains(&b'$') {
                dirs.push((start, rest.to_vec()));
            }
        }
        dirs.extend(elf::default_dirs(&h).into_iter().map(|d| (1, d)));
        let mut found = Vec::new();
        for lib in names.libraries.iter().filter(|l| !l.contains(&b'/')) {
            let hit = dirs.iter().find_map(|(start, dir)| {
                let mut path = dir.clone();
                path.push(b'/');
                path.extend_from_slice(lib);
                self.resolve(*start, &path)
            });
            if let Some(i) = hit {
                found.push(i);
            }
        }
        Ok(found)
    }

    /// The regular file at `path` from directory `dir` (from the root if `path` is absolute),
    /// following symbolic links (absolute targets from the image's root).
    fn resolve(&self, dir: u64, path: &[u8]) -> Option<u64> {
        let mut cur = if path.first() == Some(&b'/') { 1 } else { dir };
        // Components still to walk, last first.
        let mut todo: Vec<Vec<u8>> = path
            .split(|&b| b == b'/')
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut links = 0;
        while let Some(name) = todo.pop() {
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur = *self.parents.get(cur as usize - 1)?;
                    continue;
                }
                _ => {}
            }
            let inode = self.lookup(cur, &name).ok()?;
            match &inode.data {
                Data::Symlink(target) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return None;
                    }
                    if target.first() == Some(&b'/') {
                        cur = 1;
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                Data::Dir { .. } => cur = inode.attr.ino,
                Data::File { .. } if todo.iter().all(|c| c.is_empty() || c == b".") => {
                    return Some(inode.attr.ino)
                }
                _ => return None,
            }
        }
        None
    }

    /// A verified local copy of the whole file to hand the kernel for passthrough, if there is
    /// one (cheap: a lookup and an open). Without one, [`ClipFs::prepare_backing`] makes one
    /// in the background when the file qualifies.
    pub fn backing_file(&self, ino: u64) -> Option<std::fs::File> {
        let pt = self.passthrough.as_ref()?;
        let (reader, offset, size) = self.file_data(ino)?;
        if size < pt.min_size {
            return None;
        }
        let content = pt.store.lookup(&reader.index().layer, offset)?;
        pt.store.open_verified(&content)
    }

    /// Background work so that later opens of `ino` can use passthrough: hash a copy left by an
    /// earlier run, or write one when every span of the file is in a local tier (never fetches
    /// from the registry for this). Returns at once; at most one such task per inode.
    pub fn prepare_backing(self: &Arc<Self>, ino: u64, rt: &tokio::runtime::Handle) {
        let Some(pt) = self.passthrough.as_ref() else {
            return;
        };
        let Some((reader, offset, size)) = self.file_data(ino) else {
            return;
        };
        if size < pt.min_size {
            return;
        }
        let existing = pt.store.lookup(&reader.index().layer, offset);
        if existing.is_some_and(|c| pt.store.is_verified(&c))
            || (existing.is_none() && !reader.is_local(offset, size))
            || !pt.busy.lock().expect("busy lock").insert(ino)
        {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            let pt = me.passthrough.as_ref().expect("checked above");
            let r = match existing {
                Some(content) => {
                    let store = pt.store.clone();
                    tokio::task::spawn_blocking(move || store.verify(&content))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                None => me.write_backing(ino).await,
            };
            if let Err(e) = r {
                tracing::warn!(ino, "no passthrough copy: {e}");
            }
            pt.busy.lock().expect("busy lock").remove(&ino);
        });
    }

    async fn write_backing(&self, ino: u64) -> Result<(), String> {
        let pt = self.passthrough.as_ref().ok_or("passthrough is off")?;
        let (reader, base, size) = self.file_data(ino).ok_or("not a regular file")?;
        let _permit = pt.writer.acquire().await.map_err(|e| e.to_string())?;
        let store = pt.store.clone();
        let s = store.clone();
        let Some(mut file) = blocking(move || s.create(size)).await? else {
            return Ok(());
        };
        let index = reader.index().clone();
        for i in index.spans_covering(base, size) {
            let span = reader
                .spans(i..i + 1)
                .await
                .map_err(|e| e.to_string())?
                .pop()
                .ok_or("no span")?;
            let (start, _) = index.span_range(i);
            let lo = base.max(start) - start;
            let hi = (base + size - start).min(span.len() as u64);
            let part = span.slice(lo as usize..hi as usize);
            file = blocking(move || file.write(&part).map(|()| file)).await?;
        }
        let layer = index.layer;
        blocking(move || store.commit(file, &layer, base))
            .await
            .map(|_| ())
    }

    /// False when no file of the image has an extended attribute.
    pub fn has_xattrs(&self) -> bool {
        self.has_xattrs
    }

    pub fn inode_count(&self) -> usize {
        self.inodes.len()
    }

    pub fn get(&self, ino: u64) -> Result<&Inode, FsError> {
        ino.checked_sub(1)
            .and_then(|i| self.inodes.get(i as usize))
            .ok_or(FsError::NotFound)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<&Inode, FsError> {
        match &self.get(parent)?.data {
            Data::Dir { children } => {
                let i = children
                    .binary_search_by(|(n, _)| n.as_slice().cmp(name))
                    .map_err(|_| FsError::NotFound)?;
                self.get(children[i].1)
            }
            _ => Err(FsError::NotDir),
        }
    }

    /// The directory's entries (name, inode), sorted by name; `.` and `..` are the adapter's.
    pub fn children(&self, ino: u64) -> Result<&[(Vec<u8>, u64)], FsError> {
        match &self.get(ino)?.data {
            Data::Dir { children } => Ok(children),
            _ => Err(FsError::NotDir),
        }
    }

    pub fn readlink(&self, ino: u64) -> Result<&[u8], FsError> {
        match &self.get(ino)?.data {
            Data::Symlink(t) => Ok(t),
            _ => Err(FsError::Invalid),
        }
    }

    pub fn xattrs(&self, ino: u64) -> Result<&Xattrs, FsError> {
        Ok(&self.get(ino)?.xattrs)
    }

    pub fn xattr(&self, ino: u64, name: &[u8]) -> Result<&[u8], FsError> {
        self.xattrs(ino)?
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
            .ok_or(FsError::NoAttr)
    }

    /// Up to `size` bytes of a file at `offset`, read lazily through the cache.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        let inode = self.get(ino)?;
        match &inode.data {
            Data::File {
                layer,
                offset: base,
            } => {
                let file_size = inode.attr.size;
                if offset >= file_size {
                    return Ok(Bytes::new());
                }
                let len = u64::from(size).min(file_size - offset);
                let reader = self.readers.get(*layer as usize).ok_or(FsError::Invalid)?;
                Ok(reader
                    .read_within(base + offset, len, base + file_size)
                    .await?)
            }
            Data::Dir { .. } => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clip_core::digest::Digest;
    use clip_core::index::{BlobRef, Entry, LayerIndex};

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 7,
            gid: 8,
            mtime: 1,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }

    fn layer(entries: Vec<Entry>) -> Arc<LayerIndex> {
        Arc::new(LayerIndex {
            layer: Digest::of(b"l"),
            diff_id: Digest::of(b"d"),
            compressed_size: 1,
            uncompressed_size: 4096,
            span_size: 1 << 20,
            windows: BlobRef {
                digest: Digest::of(b""),
                size: 0,
            },
            spans: vec![],
            entries,
        })
    }

    fn fs() -> ClipFs {
        let mut ping = entry(
            "bin/ping",
            EntryKind::File {
                offset: 512,
                size: 4,
            },
        );
        ping.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2])];
        let layer = layer(vec![
            entry("bin", EntryKind::Dir),
            ping,
            entry(
                "bin/a",
                EntryKind::File {
                    offset: 1024,
                    size: 10,
                },
            ),
            entry(
                "bin/b",
                EntryKind::Hardlink {
                    target: b"bin/a".to_vec(),
                },
            ),
            entry(
                "etc/deep/x",
                EntryKind::Symlink {
                    target: b"../../bin/a".to_vec(),
                },
            ),
            entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }),
        ]);
        let view = ImageView::build(vec![layer]).unwrap();
        ClipFs::new(&view, vec![]).unwrap()
    }

    #[test]
    fn siblings_are_files_of_the_same_kind_nearest_first_within_a_budget() {
        let file = |p: &str, offset: u64, size: u64| entry(p, EntryKind::File { offset, size });
        let mut l = layer(vec![
            entry("pkg/__pycache__", EntryKind::Dir),
            file("pkg/__pycache__/a.pyc", 0, 1000),
            file("pkg/__pycache__/b.pyc", 10_000, 1000),
            file("pkg/__pycache__/c.pyc", 20_000, 3000),
            file("pkg/__pycache__/d.pyc", 900_000, 1000),
            file("pkg/__pycache__/huge.pyc", 1 << 20, 600 << 10),
            file("pkg/__pycache__/notes.txt", 11_000, 100),
            file("pkg/__pycache__/empty.pyc", 12_000, 0),
            file("pkg/other.pyc", 13_000, 100),
            file("pkg/__init__.py", 14_000, 100),
            file("lib/libm.so.6", 15_000, 100),
            file("lib/libz.so.1.2.13", 16_000, 100),
            file("lib/libx.so", 17_000, 100),
            entry("pkg/__pycache__/sub", EntryKind::Dir),
        ]);
        Arc::get_mut(&mut l).unwrap().uncompressed_size = 4 << 20;
        let view = ImageView::build(vec![l]).unwrap();
        let fs = ClipFs::new(&view, vec![]).unwrap();
        let dir = fs.lookup(1, b"pkg").unwrap().attr.ino;
        let dir = fs.lookup(dir, b"__pycache__").unwrap().attr.ino;
        let b = fs.lookup(dir, b"b.pyc").unwrap().attr.ino;
        assert_eq!(fs.parents[b as usize - 1], dir);
        // From b.pyc: a.pyc and c.pyc are nearest, d.pyc further; huge.pyc is too big, the
        // text file another kind, the empty file has nothing to fetch, other.pyc elsewhere.
        let all = fs.siblings(dir, b, 1 << 20).unwrap();
        assert_eq!(all[&0], vec![(0, 1000), (20_000, 3000), (900_000, 1000)]);
        // A budget of 4000 bytes takes the nearest that fit, then stops.
        let some = fs.siblings(dir, b, 4000).unwrap();
        assert_eq!(some[&0], vec![(0, 1000), (20_000, 3000)]);
        // Once per directory: on its second cold open, or on the first if that is a package's
        // entry module.
        let a = fs.lookup(dir, b"a.pyc").unwrap().attr.ino;
        let c = fs.lookup(dir, b"c.pyc").unwrap().attr.ino;
        assert_eq!(fs.siblings_due(a), None);
        assert_eq!(fs.siblings_due(b), Some(dir));
        assert_eq!(fs.siblings_due(c), None);
        let pkg = fs.lookup(1, b"pkg").unwrap().attr.ino;
        let init = fs.lookup(pkg, b"__init__.py").unwrap().attr.ino;
        let other = fs.lookup(pkg, b"other.pyc").unwrap().attr.ino;
        assert_eq!(fs.siblings_due(init), Some(pkg));
        assert_eq!(fs.siblings_due(other), None);
        // Shared libraries do not count: two of them opened cold guess nothing.
        let libs = fs.lookup(1, b"lib").unwrap().attr.ino;
        for name in [&b"libm.so.6"[..], b"libz.so.1.2.13", b"libx.so"] {
            let lib = fs.lookup(libs, name).unwrap().attr.ino;
            assert_eq!(fs.siblings_due(lib), None);
        }
        assert_eq!(extension(b"x.tar.gz"), Some(&b"gz"[..]));
        assert_eq!(extension(b".bashrc"), None);
        assert_eq!(extension(b"README"), None);
    }

    #[test]
    fn library_paths_resolve_as_the_loader_would() {
        let file = |p: &str, offset: u64| entry(p, EntryKind::File { offset, size: 100 });
        let link = |p: &str, t: &str| {
            entry(
                p,
                EntryKind::Symlink {
                    target: t.as_bytes().to_vec(),
                },
            )
        };
        let mut tool = file("opt/app/bin/tool", 0);
        tool.mode = 0o755;
        let l = layer(vec![
            link("lib", "usr/lib"),
            file("usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1", 512),
            link("usr/lib/x86_64-linux-gnu/liblzma.so.5", "liblzma.so.5.4.1"),
            file("usr/lib/x86_64-linux-gnu/blas/libblas.so.3", 1024),
            link(
                "usr/lib/x86_64-linux-gnu/libblas.so.3",
                "/etc/alternatives/libblas.so.3",
            ),
            link(
                "etc/alternatives/libblas.so.3",
                "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3",
            ),
            tool,
            file("opt/app/lib/libx.so", 1536),
            file("opt/app/lib/notes.txt", 2048),
            link("loop/a", "b"),
            link("loop/b", "a"),
        ]);
        let view = ImageView::build(vec![l]).unwrap();
        let fs = ClipFs::new(&view, vec![]).unwrap();
        let ino = |p: &str| {
            p.split('/')
                .fold(1, |dir, n| fs.lookup(dir, n.as_bytes()).unwrap().attr.ino)
        };
        let lzma = ino("usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1");
        // Through the usrmerge link and the soname link.
        assert_eq!(
            fs.resolve(1, b"/lib/x86_64-linux-gnu/liblzma.so.5"),
            Some(lzma)
        );
        // Through absolute links (Debian's alternatives).
        assert_eq!(
            fs.resolve(1, b"/usr/lib/x86_64-linux-gnu/libblas.so.3"),
            Some(ino("usr/lib/x86_64-linux-gnu/blas/libblas.so.3"))
        );
        // Relative to the object's directory, as $ORIGIN/../lib is.
        let bin = ino("opt/app/bin");
        assert_eq!(
            fs.resolve(bin, b"../lib/libx.so"),
            Some(ino("opt/app/lib/libx.so"))
        );
        assert_eq!(
            fs.resolve(bin, b"../lib//./libx.so"),
            Some(ino("opt/app/lib/libx.so"))
        );
        // A loop, a directory, a missing file, a path through a file: nothing.
        assert_eq!(fs.resolve(1, b"/loop/a"), None);
        assert_eq!(fs.resolve(1, b"/opt/app/lib"), None);
        assert_eq!(fs.resolve(1, b"/opt/app/lib/liby.so"), None);
        assert_eq!(fs.resolve(1, b"/opt/app/lib/libx.so/x"), None);
        // Executables and library-named files may be objects; other files are not read.
        assert!(fs.may_be_object(ino("opt/app/bin/tool")));
        assert!(fs.may_be_object(lzma));
        assert!(fs.may_be_object(ino("opt/app/lib/libx.so")));
        assert!(!fs.may_be_object(ino("opt/app/lib/notes.txt")));
        assert!(!fs.may_be_object(bin));
    }

    #[test]
    fn tables_without_a_kernel() {
        let fs = fs();
        let root = fs.get(1).unwrap();
        assert_eq!(root.attr.kind, Kind::Dir);
        // root: ".", "..", and subdirectories bin, dev, etc.
        assert_eq!(root.attr.nlink, 5);
        let bin = fs.lookup(1, b"bin").unwrap().attr.ino;
        let names: Vec<&[u8]> = fs
            .children(bin)
            .unwrap()
            .iter()
            .map(|(n, _)| n.as_slice())
            .collect();
        assert_eq!(names, [&b"a"[..], b"b", b"ping"]);
        let a = fs.lookup(bin, b"a").unwrap();
        let b = fs.lookup(bin, b"b").unwrap();
        assert_eq!(a.attr.ino, b.attr.ino, "hard links share an inode");
        assert_eq!(a.attr.nlink, 2);
        assert_eq!((a.attr.uid, a.attr.gid, a.attr.size), (7, 8, 10));
        let ping = fs.lookup(bin, b"ping").unwrap().attr.ino;
        assert_eq!(
            fs.xattr(ping, b"security.capability").unwrap(),
            &[1, 0, 0, 2]
        );
        assert_eq!(
            fs.xattr(ping, b"user.none").unwrap_err().errno(),
            libc::ENODATA
        );
        let etc = fs.lookup(1, b"etc").unwrap();
        assert_eq!(
            (etc.attr.perm, etc.attr.uid),
            (0o755, 0),
            "implied directories"
        );
        let deep = fs.lookup(etc.attr.ino, b"deep").unwrap().attr.ino;
        let x = fs.lookup(deep, b"x").unwrap().attr.ino;
        assert_eq!(fs.readlink(x).unwrap(), b"../../bin/a");
        let dev = fs.lookup(1, b"dev").unwrap().attr.ino;
        assert_eq!(fs.lookup(dev, b"null").unwrap().attr.rdev, (1 << 8) | 3);
        assert_eq!(fs.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
        assert_eq!(fs.lookup(ping, b"x").unwrap_err().errno(), libc::ENOTDIR);
        assert_eq!(fs.get(9999).unwrap_err().errno(), libc::ENOENT);
    }

    #[tokio::test]
    async fn reads_map_to_errno() {
        let fs = fs();
        let bin = fs.lookup(1, b"bin").unwrap().attr.ino;
        assert_eq!(fs.read(bin, 0, 10).await.unwrap_err().errno(), libc::EISDIR);
        let a = fs.lookup(bin, b"a").unwrap().attr.ino;
        // Past the end of the file: empty, no read issued.
        assert!(fs.read(a, 10, 10).await.unwrap().is_empty());
        // No reader for the layer (a broken setup): EINVAL, not a panic.
        assert_eq!(fs.read(a, 0, 4).await.unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn malformed_layer_sets_build_a_tree_or_an_error_never_a_panic() {
        let f = || EntryKind::File { offset: 0, size: 1 };
        // A lower `a` whited out by a layer that also lists a/b; a whiteout naming the root.
        let sets = [
            vec![
                layer(vec![entry("a", EntryKind::Dir), entry("a/old", f())]),
                layer(vec![entry("a/b", f()), entry("a", EntryKind::Whiteout)]),
            ],
            vec![
                layer(vec![entry("etc", EntryKind::Dir), entry("etc/x", f())]),
                layer(vec![entry("", EntryKind::Whiteout)]),
            ],
        ];
        for set in sets {
            let view = ImageView::build(set).unwrap();
            let fs = ClipFs::new(&view, vec![]).unwrap();
            assert_eq!(fs.get(1).unwrap().attr.kind, Kind::Dir);
        }
        // A view that breaks the invariant (built by hand): an error for this image.
        let mut view = ImageView::build(vec![layer(vec![entry("a/b", f())])]).unwrap();
        view.nodes.remove(&b"a"[..]);
        assert!(matches!(ClipFs::new(&view, vec![]), Err(FsError::Tree(_))));
        view.nodes.clear();
        assert!(matches!(ClipFs::new(&view, vec![]), Err(FsError::Tree(_))));
    }
}
