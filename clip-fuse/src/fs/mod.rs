//! The image's merged tree as inodes.
//!
//! Inode numbers are assigned in path order from the merged view (root = 1), so the same image
//! always gets the same numbers. Hard links share one inode (the file's), with `nlink` counting
//! its names; directories count `2 + subdirectories`. Everything but file bytes is answered
//! from these tables.
//!
//! One concern per file: this one is the tree (the inode tables, lookups, listings, reads);
//! [`guess`] is what opening a file fetches before anything reads it (whole files, a
//! directory's siblings, a program's libraries, the files every start reads); [`passthrough`]
//! hands the kernel verified local copies of whole files.

use bytes::Bytes;
use clip_core::elf;
use clip_core::index::{view::IMPLIED, EntryKind, ImageView};
use clip_core::reader::{LayerReader, ReadError};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
    /// Bytes this mount has read of each layer (see [`ClipFs::spread_bulk`]).
    read_bytes: Vec<AtomicU64>,
    /// Whether this mount's reads have streamed a layer in bulk and told the others.
    bulk_spread: AtomicBool,
}

/// Bytes a mount reads of a layer streamed in bulk before its other layers are told (see
/// [`ClipFs::spread_bulk`]): a layer another image's workload streamed says nothing of this one.
const SPREAD_AFTER_BYTES: u64 = 32 << 20;

mod guess;
mod passthrough;
#[cfg(test)]
mod tests;

use passthrough::Passthrough;

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
            has_xattrs,
            passthrough: None,
            cold_opens: Mutex::new(HashMap::new()),
            scanned: Mutex::new(HashSet::new()),
            loader_cache: std::sync::atomic::AtomicBool::new(false),
            read_bytes: (0..readers.len()).map(|_| AtomicU64::new(0)).collect(),
            bulk_spread: AtomicBool::new(false),
            readers,
        })
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

    /// Where a read of up to `size` bytes at `offset` of file `ino` lies in its layer; `None`
    /// past the end.
    fn file_range(
        &self,
        ino: u64,
        offset: u64,
        size: u32,
    ) -> Result<Option<FileRead<'_>>, FsError> {
        let inode = self.get(ino)?;
        match &inode.data {
            Data::File {
                layer,
                offset: base,
            } => {
                let file_size = inode.attr.size;
                if offset >= file_size {
                    return Ok(None);
                }
                let len = u64::from(size).min(file_size - offset);
                let reader = self.readers.get(*layer as usize).ok_or(FsError::Invalid)?;
                Ok(Some(FileRead {
                    layer: *layer as usize,
                    reader,
                    at: base + offset,
                    len,
                    end: base + file_size,
                }))
            }
            Data::Dir { .. } => Err(FsError::IsDir),
            _ => Err(FsError::Invalid),
        }
    }

    /// Counts `len` bytes this mount read of layer `layer`; once it has read
    /// [`SPREAD_AFTER_BYTES`] of a layer streamed in bulk, the workload reads most of the image,
    /// not just of that layer: every other layer is told
    /// ([`LayerReader::sibling_streams`]), so each switches as soon as a small share of it has
    /// been read. Call within the runtime's context.
    fn spread_bulk(&self, layer: usize, len: u64) {
        if self.bulk_spread.load(Relaxed) {
            return;
        }
        let Some(n) = self.read_bytes.get(layer) else {
            return;
        };
        let read = n.fetch_add(len, Relaxed) + len;
        if read >= SPREAD_AFTER_BYTES
            && self.readers[layer].bulk_started()
            && !self.bulk_spread.swap(true, Relaxed)
        {
            tracing::debug!(
                layer,
                "a layer read in bulk: the image's other layers are told"
            );
            for (i, r) in self.readers.iter().enumerate() {
                if i != layer {
                    r.sibling_streams();
                }
            }
        }
    }

    /// [`ClipFs::read`] on this thread when the bytes are local (see
    /// `clip_core::reader::LayerReader::read_now`); `None` when they must be fetched. Call
    /// within the runtime's context.
    pub fn read_now(&self, ino: u64, offset: u64, size: u32) -> Option<Result<Bytes, FsError>> {
        match self.file_range(ino, offset, size) {
            Ok(Some(f)) => {
                let r = f.reader.read_now(f.at, f.len, f.end)?;
                self.spread_bulk(f.layer, f.len);
                Some(r.map_err(FsError::from))
            }
            Ok(None) => Some(Ok(Bytes::new())),
            Err(e) => Some(Err(e)),
        }
    }

    /// Up to `size` bytes of a file at `offset`, read lazily through the cache.
    pub async fn read(&self, ino: u64, offset: u64, size: u32) -> Result<Bytes, FsError> {
        match self.file_range(ino, offset, size)? {
            Some(f) => {
                let b = f.reader.read_within(f.at, f.len, f.end).await?;
                self.spread_bulk(f.layer, f.len);
                Ok(b)
            }
            None => Ok(Bytes::new()),
        }
    }
}

/// A read of a file, placed in its layer: the layer (its position and reader), the layer
/// offset, the length, and where the file ends (read-ahead stops there).
struct FileRead<'a> {
    layer: usize,
    reader: &'a Arc<LayerReader>,
    at: u64,
    len: u64,
    end: u64,
}
