//! The per-layer index: everything needed to serve a layer's files without holding the layer.
//!
//! One [`LayerIndex`] per layer, keyed by the layer's (compressed) digest, so images that share base
//! layers share their indexes. It lists every tar entry of the layer in tar order with its metadata
//! and, for regular files, where the bytes sit in the layer's *uncompressed* tar stream. It also
//! lists the layer's spans: the zran checkpoints (see [`crate::gzip`]) and a sha256 of each span's
//! uncompressed bytes, so any byte range can be fetched as "the compressed bytes of spans i..j",
//! inflated from checkpoint i and verified before it is served.
//!
//! The 32 KiB windows the checkpoints need live in a separate *windows blob*: they are ~30x larger
//! than everything else, and a mount needs none of them up front; each is fetched (by range) the
//! first time its span is read. The encoded index (see [`format`]) is what a mount loads.
//!
//! [`builder`] makes an index in one streaming pass; [`view`] merges an image's layer indexes into
//! the root filesystem a container sees (whiteouts, opaque directories, implied parents).

pub mod builder;
pub mod format;
pub mod memory;
pub mod view;
pub mod windows;

use crate::digest::Digest;
use crate::gzip::GzipError;

pub use builder::{build_layer_index, BuildOptions, BuiltLayer};
pub use view::{ImageView, Node};
pub use windows::LocalWindows;

/// Default distance between checkpoints, in bytes of uncompressed output. Measured on the large
/// test image's startup profiles (docs/benchmarks.md, history at 9053815, "denser
/// checkpoints"): a read fetches compressed bytes from its span's checkpoint to the span's
/// end, so 128 KiB spans (64 KiB
/// inside small files) fetch ~30 % fewer bytes for `import numpy` than 1 MiB spans; the cost is
/// a larger windows blob (fetched only per span read) and 0.25 % instead of 0.18 % of index.
pub const DEFAULT_SPAN_SIZE: u64 = 128 << 10;
/// Default distance between checkpoints inside small files.
pub const DEFAULT_DENSE_SPAN_SIZE: u64 = 64 << 10;

/// One tar entry, in the layer's terms (before merging with other layers).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Normalised path relative to the root: no leading `/`, no `.` or `..`, `""` for the root.
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Extended attributes (e.g. `security.capability`), in the order the layer lists them.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    /// A regular file: its bytes are `[offset, offset + size)` of the uncompressed tar stream.
    File {
        offset: u64,
        size: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hard link to another path (normalised), in this layer or a lower one.
    Hardlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// `.wh.NAME`: `path` (the whited-out name) is deleted from lower layers.
    Whiteout,
    /// `.wh..wh..opq`: the directory `path` hides everything lower layers put in it.
    Opaque,
}

/// One span of the uncompressed stream, starting at a zran checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub uncompressed: u64,
    pub compressed: u64,
    pub bits: u8,
    /// Where this checkpoint's window (zstd-compressed) sits in the windows blob.
    pub window_offset: u64,
    pub window_len: u32,
    /// sha256 of the span's uncompressed bytes.
    pub digest: Digest,
}

/// How a layer's spans are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Codec {
    /// One gzip stream: spans start at zran checkpoints and need their windows.
    #[default]
    Gzip,
    /// Independent zstd frames (zstd:chunked, [`crate::zstdchunked`]): a span's bytes are the
    /// first bytes its frames decompress to; no windows.
    ZstdFrames,
    /// One or more plain zstd frames ([`crate::zstdseek`]): spans start at block boundaries
    /// and need their checkpoints (window log + dictionary), or at frame starts and need none.
    ZstdCheckpoints,
}

impl Codec {
    /// The largest window (checkpoint) a span of this codec may have, decoded.
    pub fn max_window(self) -> usize {
        match self {
            Codec::Gzip | Codec::ZstdFrames => crate::gzip::WINDOW_SIZE,
            Codec::ZstdCheckpoints => crate::zstdseek::MAX_CHECKPOINT,
        }
    }

    /// The largest window a span of this codec may have in the windows blob (compressed).
    pub fn max_window_len(self) -> u32 {
        match self {
            Codec::Gzip | Codec::ZstdFrames => crate::limits::MAX_WINDOW_LEN,
            Codec::ZstdCheckpoints => crate::limits::MAX_CHECKPOINT_LEN,
        }
    }
}

/// A blob by digest and size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlobRef {
    pub digest: Digest,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerIndex {
    /// The layer blob's digest (of the compressed bytes).
    pub layer: Digest,
    /// sha256 of the uncompressed tar stream.
    pub diff_id: Digest,
    pub codec: Codec,
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub span_size: u64,
    /// The blob holding the checkpoints' windows.
    pub windows: BlobRef,
    pub spans: Vec<Span>,
    pub entries: Vec<Entry>,
    /// The memory this index holds against the process's budget of decoded indexes
    /// ([`memory`]); nothing for an index built here.
    pub charge: memory::Charge,
}

impl LayerIndex {
    /// Whether `other` cuts the layer into the same spans (the same checkpoints, lengths and
    /// digests): a fetcher of one serves the other's spans. Its files may still differ.
    pub fn same_spans(&self, other: &LayerIndex) -> bool {
        self.layer == other.layer
            && self.codec == other.codec
            && self.windows == other.windows
            && self.compressed_size == other.compressed_size
            && self.uncompressed_size == other.uncompressed_size
            && self.span_size == other.span_size
            && self.spans == other.spans
    }

    /// How long a span is, for counting spans in a number of bytes: the span size, or for an
    /// index without one (zstd:chunked, whose spans are files' chunks) the spans' mean length.
    pub fn typical_span(&self) -> u64 {
        match self.span_size {
            0 => (self.uncompressed_size / self.spans.len().max(1) as u64).max(1),
            s => s,
        }
    }

    /// The uncompressed range `[start, end)` of span `i`.
    pub fn span_range(&self, i: usize) -> (u64, u64) {
        let start = self.spans[i].uncompressed;
        let end = self
            .spans
            .get(i + 1)
            .map_or(self.uncompressed_size, |s| s.uncompressed);
        (start, end)
    }

    /// The compressed range `[start, end)` that must be fetched to inflate span `i`.
    pub fn span_compressed_range(&self, i: usize) -> (u64, u64) {
        let s = &self.spans[i];
        let next = self
            .spans
            .get(i + 1)
            .map_or(self.compressed_size, |n| n.compressed);
        crate::gzip::compressed_range(s.compressed, s.bits, next)
    }

    /// The spans covering uncompressed bytes `[offset, offset + len)`.
    pub fn spans_covering(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        if self.spans.is_empty() || len == 0 {
            return 0..0;
        }
        let first = self
            .spans
            .partition_point(|s| s.uncompressed <= offset)
            .saturating_sub(1);
        let end = offset.saturating_add(len);
        let last = self
            .spans
            .partition_point(|s| s.uncompressed < end)
            .max(first + 1);
        first..last
    }

    pub fn file_count(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.kind, EntryKind::File { .. } | EntryKind::Hardlink { .. }))
            .count()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Gzip(#[from] GzipError),
    #[error(transparent)]
    Zstd(#[from] crate::zstdseek::ZstdSeekError),
    #[error("malformed tar stream{}: {}", at_entry(.entry), tar_cause(.error))]
    Tar {
        entry: Option<String>,
        error: std::io::Error,
    },
    #[error("unsafe tar entry path {path:?}: {reason}")]
    UnsafePath { path: String, reason: &'static str },
    #[error("unsupported tar entry {path:?}: {what}")]
    Unsupported { path: String, what: String },
    #[error("hard link {path:?} points to {target:?}, which {reason}")]
    BadHardlink {
        path: String,
        target: String,
        reason: &'static str,
    },
    #[error(
        "the index of layer {layer} needs more than {available} bytes of memory decoded \
         (the budget is {budget} bytes: decoded indexes may hold --index-memory ([cache] \
         index_memory), at most half of it for one index, within the daemon's --memory-budget \
         ([cache] budget))"
    )]
    Budget {
        layer: crate::digest::Digest,
        budget: u64,
        available: u64,
    },
    #[error("{what} mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: &'static str,
        expected: Digest,
        actual: Digest,
    },
    #[error("invalid index: {0}")]
    Format(String),
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

fn tar_cause(e: &std::io::Error) -> String {
    if e.kind() == std::io::ErrorKind::UnexpectedEof || e.to_string().contains("unexpected EOF") {
        format!("{e} (the layer is truncated, or an entry claims more bytes than the layer holds)")
    } else {
        e.to_string()
    }
}

fn at_entry(e: &Option<String>) -> String {
    e.as_ref()
        .map(|p| format!(" at entry {p:?}"))
        .unwrap_or_default()
}

/// A path for messages: lossy UTF-8, capped.
pub(crate) fn show_path(p: &[u8]) -> String {
    let s = String::from_utf8_lossy(p);
    if s.chars().count() > 300 {
        format!("{}...", s.chars().take(300).collect::<String>())
    } else {
        s.into_owned()
    }
}

#[cfg(test)]
mod tests;
