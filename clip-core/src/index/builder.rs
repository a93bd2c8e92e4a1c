//! Building a layer index in one streaming pass.
//!
//! The compressed layer flows through a hashing reader (the layer digest), the zran indexer
//! (checkpoints, span digests, the DiffID) and the tar parser (entries and file offsets); nothing
//! is buffered beyond a few hundred KiB and nothing touches the disk.

use super::{show_path, BlobRef, Codec, Entry, EntryKind, IndexError, LayerIndex, Span};
use crate::digest::{Digest, Hasher};
use crate::gzip::{GzipError, GzipIndexer};
use crate::tarscan::TarTrack;
use crate::zstdseek::{ZstdIndexer, ZstdSeekError};
use std::collections::HashMap;
use std::io::{self, Read};

#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Distance between checkpoints in bytes of uncompressed output.
    pub span_size: u64,
    /// When known (from the manifest), the stream's digest must match.
    pub expected_layer: Option<Digest>,
    /// When known (from the image config), the uncompressed stream's digest must match.
    pub expected_diff_id: Option<Digest>,
    /// zstd level for the checkpoint windows.
    pub window_compression_level: i32,
    /// Checkpoint distance inside files smaller than `small_file` (used when smaller than
    /// `span_size`; 0: uniform spans).
    pub dense_span_size: u64,
    pub small_file: u64,
    /// Index a zstd:chunked layer from its bytes (its frames, checkpointed like plain zstd)
    /// rather than from its table of contents, which is the image publisher's word.
    pub from_bytes: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            span_size: super::DEFAULT_SPAN_SIZE,
            expected_layer: None,
            expected_diff_id: None,
            // Level 1: dense checkpoints mean many windows; higher levels cost indexing speed
            // for ~4 % smaller windows.
            window_compression_level: 1,
            dense_span_size: super::DEFAULT_DENSE_SPAN_SIZE,
            small_file: 1 << 20,
            from_bytes: false,
        }
    }
}

/// Where a compressed window sits in the windows blob: (offset, length).
type WindowPlace = (u64, u32);

/// A freshly built index and the windows blob it refers to.
pub struct BuiltLayer {
    pub index: LayerIndex,
    pub windows: Vec<u8>,
}

/// Hashes the compressed bytes as they are read, and reports them.
struct Hashing<R, F> {
    inner: R,
    hasher: Hasher,
    progress: F,
}

impl<R: Read, F: FnMut(u64)> Read for Hashing<R, F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        (self.progress)(n as u64);
        Ok(n)
    }
}

/// Builds the index of one gzip-compressed tar layer read from `input`. `progress` is called
/// with the number of compressed bytes read at each step.
pub fn build_layer_index<R: Read>(
    input: R,
    opts: &BuildOptions,
    progress: impl FnMut(u64),
) -> Result<BuiltLayer, IndexError> {
    build_layer_index_with_sink(input, opts, progress, None)
}

/// [`build_layer_index`], handing each span's bytes and digest to `sink` as it completes (spans
/// are keyed by their own digest, so bytes of a stream that later fails verification can never
/// be mistaken for a span of the right one).
pub fn build_layer_index_with_sink<R: Read>(
    input: R,
    opts: &BuildOptions,
    progress: impl FnMut(u64),
    sink: Option<crate::gzip::SpanSink>,
) -> Result<BuiltLayer, IndexError> {
    let hashing = Hashing {
        inner: input,
        hasher: Hasher::new(),
        progress,
    };
    // Windows are compressed on a thread of their own as checkpoints are taken: the inflate
    // pass does not wait for zstd, and no raw window is held beyond a short queue.
    let (wtx, wrx) = std::sync::mpsc::sync_channel::<Vec<u8>>(32);
    let level = opts.window_compression_level;
    let compressor = std::thread::Builder::new()
        .name("clip-windows".into())
        .spawn(move || -> io::Result<(Vec<u8>, Vec<WindowPlace>)> {
            let (mut blob, mut places) = (Vec::new(), Vec::new());
            // One context for every window (making one per window costs more than a window).
            let mut zstd = zstd::bulk::Compressor::new(level)?;
            for w in wrx {
                if w.is_empty() {
                    places.push((blob.len() as u64, 0));
                    continue;
                }
                let z = zstd.compress(&w)?;
                places.push((blob.len() as u64, z.len() as u32));
                blob.extend_from_slice(&z);
            }
            Ok((blob, places))
        })
        .map_err(IndexError::Io)?;
    // Joined on every path. Locals are dropped last declared first, so the sender is moved into
    // a sink declared after the guard: on any early return the sender goes first, the thread
    // sees the end of its input, and the join cannot wait forever.
    let compressor = crate::gzip::JoinOnDrop::new(compressor);
    let window_sink: crate::gzip::WindowSink = Box::new(move |w| {
        // The receiver goes away only if the compressor failed, which is reported below.
        let _ = wtx.send(w);
    });
    // The stream says what it is: zstd frames (or a skippable frame) start with their magic.
    // The bytes read to tell are put back in front of the rest.
    let mut hashing = hashing;
    let mut magic = Vec::with_capacity(4);
    (&mut hashing)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(IndexError::Io)?;
    let zstd = <[u8; 4]>::try_from(&magic[..]).is_ok_and(|m| {
        let m = u32::from_le_bytes(m);
        m == 0xFD2F_B528 || m & 0xFFFF_FFF0 == 0x184D_2A50
    });
    let input = io::Cursor::new(magic).chain(hashing);
    let span_size = if zstd {
        opts.span_size.max(crate::zstdseek::SPAN_SIZE)
    } else {
        opts.span_size
    };
    let stream = if zstd {
        let mut z = ZstdIndexer::new(input, span_size)?.with_window_sink(window_sink);
        if let Some(sink) = sink {
            z = z.with_span_sink(sink);
        }
        Stream::Zstd(Box::new(z))
    } else {
        let mut gz = GzipIndexer::new(input, span_size)?
            .with_density(opts.dense_span_size, opts.small_file)
            .with_window_sink(window_sink);
        if let Some(sink) = sink {
            gz = gz.with_span_sink(sink);
        }
        Stream::Gzip(Box::new(gz))
    };
    let mut archive = tar::Archive::new(TarGuard {
        inner: stream,
        track: TarTrack::default(),
        pos: 0,
    });
    let mut entries = Vec::new();
    read_entries(&mut archive, &mut entries)?;
    let (codec, zran, input) = match archive.into_inner().inner {
        Stream::Gzip(gz) => {
            let (zran, input) = gz.finish()?;
            (Codec::Gzip, zran, input)
        }
        Stream::Zstd(z) => {
            let (zran, sizes, input) = z.finish()?;
            tracing::debug!(
                checkpoints = sizes.count,
                history = sizes.history,
                full_windows = sizes.full_windows,
                dictionaries = sizes.dictionaries,
                "zstd checkpoints"
            );
            (Codec::ZstdCheckpoints, zran, input)
        }
    };
    let (_, hashing) = input.into_inner();
    let (windows, places) = compressor
        .join()
        .map_err(|_| IndexError::Format("the window compressor panicked".into()))?
        .map_err(IndexError::Io)?;
    if places.len() != zran.checkpoints.len() {
        return Err(IndexError::Format(format!(
            "{} windows for {} checkpoints",
            places.len(),
            zran.checkpoints.len()
        )));
    }
    let layer = hashing.hasher.finish();
    if let Some(expected) = opts.expected_layer {
        if expected != layer {
            return Err(IndexError::DigestMismatch {
                what: "layer digest",
                expected,
                actual: layer,
            });
        }
    }
    if let Some(expected) = opts.expected_diff_id {
        if expected != zran.diff_id {
            return Err(IndexError::DigestMismatch {
                what: "DiffID",
                expected,
                actual: zran.diff_id,
            });
        }
    }
    check_hardlinks(&entries)?;

    let mut spans = Vec::with_capacity(zran.checkpoints.len());
    for ((cp, digest), &(window_offset, window_len)) in
        zran.checkpoints.iter().zip(&zran.span_digests).zip(&places)
    {
        spans.push(Span {
            uncompressed: cp.uncompressed,
            compressed: cp.compressed,
            bits: cp.bits,
            window_offset,
            window_len,
            digest: *digest,
        });
    }
    let index = LayerIndex {
        layer,
        diff_id: zran.diff_id,
        codec,
        compressed_size: zran.compressed_size,
        uncompressed_size: zran.uncompressed_size,
        span_size,
        windows: BlobRef {
            digest: Digest::of(&windows),
            size: windows.len() as u64,
        },
        spans,
        entries,
        charge: Default::default(),
    };
    Ok(BuiltLayer { index, windows })
}

/// The checkpointing decoder of a layer, by its compression.
enum Stream<R> {
    Gzip(Box<GzipIndexer<R>>),
    Zstd(Box<ZstdIndexer<R>>),
}

impl<R: Read> Read for Stream<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Gzip(g) => g.read(buf),
            Stream::Zstd(z) => z.read(buf),
        }
    }
}

/// Turns an error from the tar parser into ours, recovering gzip errors that travelled through it.
/// Passes the uncompressed layer to the tar reader, refusing a metadata entry (GNU long name or
/// link, PAX header) larger than [`crate::limits::MAX_TAR_META`] as soon as its header goes by,
/// before the tar reader would buffer all of it (a gzip bomb in a name).
struct TarGuard<R> {
    inner: R,
    track: TarTrack,
    pos: u64,
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.track.feed(self.pos, &buf[..n], |flag, size| {
            let max = crate::limits::MAX_TAR_META;
            if matches!(flag, b'L' | b'K' | b'x' | b'g' | b'X') && size > max {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "a tar metadata entry (long name or PAX header, type {:?}) of {size} \
                         bytes, over clip's limit of {max}",
                        flag as char
                    ),
                ));
            }
            Ok(())
        })?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn tar_error(e: io::Error, entry: Option<&[u8]>) -> IndexError {
    if e.get_ref().is_some_and(|inner| inner.is::<GzipError>()) {
        return IndexError::Gzip(GzipError::from(e));
    }
    if e.get_ref().is_some_and(|inner| inner.is::<ZstdSeekError>()) {
        return IndexError::Zstd(ZstdSeekError::from(e));
    }
    IndexError::Tar {
        entry: entry.map(show_path),
        error: e,
    }
}

fn read_entries<R: Read>(
    archive: &mut tar::Archive<R>,
    out: &mut Vec<Entry>,
) -> Result<(), IndexError> {
    let mut last_path: Option<Vec<u8>> = None;
    let iter = archive.entries().map_err(|e| tar_error(e, None))?;
    for entry in iter {
        let mut entry = entry.map_err(|e| tar_error(e, last_path.as_deref()))?;
        let raw_path = entry.path_bytes().into_owned();
        last_path = Some(raw_path.clone());
        let header_type = entry.header().entry_type();
        if header_type.is_pax_global_extensions() {
            continue;
        }
        let mut pax: HashMap<String, Vec<u8>> = HashMap::new();
        let mut xattrs = Vec::new();
        if let Some(exts) = entry
            .pax_extensions()
            .map_err(|e| tar_error(e, Some(&raw_path)))?
        {
            for ext in exts {
                let ext = ext.map_err(|e| tar_error(e, Some(&raw_path)))?;
                let key = ext.key_bytes();
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else if let Ok(k) = std::str::from_utf8(key) {
                    pax.insert(k.to_string(), ext.value_bytes().to_vec());
                }
            }
        }
        let header = entry.header();
        let bad = |what: &str, e: io::Error| IndexError::Tar {
            entry: Some(show_path(&raw_path)),
            error: io::Error::new(e.kind(), format!("{what}: {e}")),
        };
        let mode = header.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let uid =
            pax_u32(&pax, "uid").map_or_else(|| header.uid().map_err(|e| bad("uid", e)), Ok)?;
        let gid =
            pax_u32(&pax, "gid").map_or_else(|| header.gid().map_err(|e| bad("gid", e)), Ok)?;
        let uid = u32::try_from(uid).map_err(|_| bad("uid", io::Error::other("out of range")))?;
        let gid = u32::try_from(gid).map_err(|_| bad("gid", io::Error::other("out of range")))?;
        let (mtime, mtime_nsec) = match pax.get("mtime").and_then(|v| parse_pax_time(v)) {
            Some(t) => t,
            None => (header.mtime().map_err(|e| bad("mtime", e))? as i64, 0),
        };

        let path = normalize(&raw_path)?;
        let (path, kind) = match whiteout(&path) {
            Some(Whiteout::Opaque(dir)) => (dir, EntryKind::Opaque),
            Some(Whiteout::Name(p)) => (p, EntryKind::Whiteout),
            Some(Whiteout::Ignore) => continue,
            None => {
                let kind = match header_type {
                    tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File {
                        offset: entry.raw_file_position(),
                        size: entry.size(),
                    },
                    tar::EntryType::Directory => EntryKind::Dir,
                    tar::EntryType::Symlink => EntryKind::Symlink {
                        target: entry
                            .link_name_bytes()
                            .map(|c| c.into_owned())
                            .unwrap_or_default(),
                    },
                    tar::EntryType::Link => {
                        let target = entry
                            .link_name_bytes()
                            .map(|c| c.into_owned())
                            .unwrap_or_default();
                        EntryKind::Hardlink {
                            target: normalize(&target)?,
                        }
                    }
                    tar::EntryType::Char | tar::EntryType::Block => {
                        let major = header
                            .device_major()
                            .map_err(|e| bad("device major", e))?
                            .unwrap_or(0);
                        let minor = header
                            .device_minor()
                            .map_err(|e| bad("device minor", e))?
                            .unwrap_or(0);
                        if header_type == tar::EntryType::Char {
                            EntryKind::CharDevice { major, minor }
                        } else {
                            EntryKind::BlockDevice { major, minor }
                        }
                    }
                    tar::EntryType::Fifo => EntryKind::Fifo,
                    other => {
                        return Err(IndexError::Unsupported {
                            path: show_path(&raw_path),
                            what: format!("tar entry type {:?}", other.as_byte() as char),
                        })
                    }
                };
                (path, kind)
            }
        };
        if path.is_empty() && kind != EntryKind::Dir && kind != EntryKind::Opaque {
            return Err(IndexError::UnsafePath {
                path: show_path(&raw_path),
                reason: "the root must be a directory",
            });
        }
        check_limits(&raw_path, &path, &kind, &xattrs, out.len())?;
        out.push(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs,
        });
    }
    Ok(())
}

/// What the decoder accepts ([`crate::limits`]), checked where the layer is read, so every index
/// clip builds can be loaded again.
fn check_limits(
    raw_path: &[u8],
    path: &[u8],
    kind: &EntryKind,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    entries: usize,
) -> Result<(), IndexError> {
    use crate::limits::*;
    let too_big = |what: String| IndexError::Unsupported {
        path: show_path(raw_path),
        what,
    };
    if entries as u64 >= MAX_ENTRIES {
        return Err(too_big(format!(
            "more than {MAX_ENTRIES} entries in one layer"
        )));
    }
    if path.len() > MAX_PATH {
        return Err(too_big(format!("a path longer than {MAX_PATH} bytes")));
    }
    if let EntryKind::Symlink { target } | EntryKind::Hardlink { target } = kind {
        if target.len() > MAX_PATH {
            return Err(too_big(format!(
                "a link target longer than {MAX_PATH} bytes"
            )));
        }
    }
    for (k, v) in xattrs {
        if k.len() > MAX_XATTR_NAME || v.len() > MAX_XATTR_VALUE {
            return Err(too_big(format!(
                "an extended attribute beyond Linux's limits ({MAX_XATTR_NAME}-byte name, \
                 {MAX_XATTR_VALUE}-byte value)"
            )));
        }
    }
    Ok(())
}

fn pax_u32(pax: &HashMap<String, Vec<u8>>, key: &str) -> Option<u64> {
    std::str::from_utf8(pax.get(key)?).ok()?.trim().parse().ok()
}

/// PAX times are decimal seconds with an optional fraction, possibly negative.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: u32 = digits.parse().ok()?;
    Some((secs, nsec))
}

/// Normalises a tar path: strips `./` and trailing `/`, refuses absolute paths and `..`.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, IndexError> {
    let unsafe_path = |reason| IndexError::UnsafePath {
        path: show_path(raw),
        reason,
    };
    if raw.first() == Some(&b'/') {
        return Err(unsafe_path("absolute path"));
    }
    if raw.contains(&0) {
        return Err(unsafe_path("NUL byte in path"));
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(unsafe_path("'..' component")),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

enum Whiteout {
    Opaque(Vec<u8>),
    Name(Vec<u8>),
    /// Other `.wh..wh.` metadata (aufs hard-link directories): not part of the tree.
    Ignore,
}

/// What a whiteout name means: `None`, not a whiteout; `Some(None)`, metadata to skip;
/// `Some(Some((path, kind)))`, the entry it stands for (for indexes built from a table of
/// contents rather than a tar stream).
pub fn whiteout_entry(path: &[u8]) -> Option<Option<(Vec<u8>, EntryKind)>> {
    Some(match whiteout(path)? {
        Whiteout::Opaque(dir) => Some((dir, EntryKind::Opaque)),
        Whiteout::Name(p) => Some((p, EntryKind::Whiteout)),
        Whiteout::Ignore => None,
    })
}

fn whiteout(path: &[u8]) -> Option<Whiteout> {
    let (dir, base) = match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&path[..0], path),
    };
    let name = base.strip_prefix(b".wh.")?;
    if name == b".wh..opq" {
        return Some(Whiteout::Opaque(dir.to_vec()));
    }
    if name.starts_with(b".wh.") || name.is_empty() {
        return Some(Whiteout::Ignore);
    }
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    Some(Whiteout::Name(p))
}

/// Hard links must point at a regular file (or link) listed *before* them in the layer, or at a
/// path the layer does not contain (a lower layer's file, checked when layers are merged).
fn check_hardlinks(entries: &[Entry]) -> Result<(), IndexError> {
    let mut first_seen: HashMap<&[u8], usize> = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        first_seen.entry(&e.path).or_insert(i);
    }
    for (i, e) in entries.iter().enumerate() {
        if let EntryKind::Hardlink { target } = &e.kind {
            let err = |reason| IndexError::BadHardlink {
                path: show_path(&e.path),
                target: show_path(target),
                reason,
            };
            if target == &e.path {
                return Err(err("is the link itself"));
            }
            match first_seen.get(target.as_slice()) {
                Some(&j) if j > i => return Err(err("appears later in the layer")),
                Some(&j)
                    if !matches!(
                        entries[j].kind,
                        EntryKind::File { .. } | EntryKind::Hardlink { .. }
                    ) =>
                {
                    return Err(err("is not a regular file"))
                }
                _ => {}
            }
        }
    }
    Ok(())
}
