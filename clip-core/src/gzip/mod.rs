//! Random access into ordinary gzip streams ("zran").
//!
//! A gzip layer is one long deflate stream: to read byte N of its output, a plain decoder must
//! inflate everything before N. The Go original of clip paid exactly that, once per read, until it
//! gave up and cached whole inflated layers. We do what zlib's `zran.c` shows is possible:
//!
//! 1. **Indexing** ([`GzipIndexer`]): inflate the stream once with `Z_BLOCK`, which makes zlib stop
//!    at every deflate block boundary. At boundaries at least `span_size` bytes of output apart we
//!    record a [`Checkpoint`]: the uncompressed offset, the compressed offset, the number of bits of
//!    the previous byte that still belong to the next block, and the last 32 KiB of output (the
//!    window that back-references in the next block may point into). The uncompressed bytes between
//!    two checkpoints form a *span*; we hash each span so every lazy read can be verified.
//! 2. **Reading** ([`inflate_span`]): fetch the compressed bytes of one span, start a raw inflater,
//!    `inflatePrime` the leftover bits, `inflateSetDictionary` the window, and inflate forward.
//!
//! Multi-member gzip files (concatenated members, as written by some tools) are handled on both
//! sides: a member's end resets the inflater in gzip mode, which parses the next member's header.
//!
//! zlib's C API comes from `libz-rs-sys` (zlib-rs, pure Rust), the only binding that exposes
//! `inflatePrime`, `Z_BLOCK` and `data_type`. The unsafe calls are wrapped once, in [`inflater`].

mod indexer;
mod inflater;
mod span;

pub use indexer::{GzipIndexer, SpanSink, WindowSink, ZranOutput};
pub(crate) use indexer::{HashMsg, HashWorker};
pub use span::{compressed_range, inflate_span, inflate_spans, SpanInflater};

/// A thread that is joined when this is dropped: indexing's helper threads never outlive the
/// call that started them, on error paths too (whatever feeds the thread must be dropped first,
/// so it sees the end of its input).
pub(crate) struct JoinOnDrop<T>(Option<std::thread::JoinHandle<T>>);

impl<T> JoinOnDrop<T> {
    pub(crate) fn new(handle: std::thread::JoinHandle<T>) -> Self {
        JoinOnDrop(Some(handle))
    }

    /// Waits for the thread's result (`Err`: it panicked).
    pub(crate) fn join(mut self) -> std::thread::Result<T> {
        match self.0.take() {
            Some(h) => h.join(),
            None => Err(Box::new("joined twice")),
        }
    }
}

impl<T> Drop for JoinOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            let _ = h.join();
        }
    }
}

/// The size of a deflate window: the farthest a back-reference can reach.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// A resumable position in a gzip stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the uncompressed stream.
    pub uncompressed: u64,
    /// Offset in the compressed stream of the first byte wholly after the boundary.
    pub compressed: u64,
    /// How many bits (0-7) of the byte before `compressed` belong to the block that starts here.
    pub bits: u8,
    /// Up to 32 KiB of output preceding `uncompressed` (empty at the start of a gzip member).
    pub window: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum GzipError {
    #[error("not a gzip stream (bad magic bytes)")]
    NotGzip,
    #[error("gzip stream truncated after {compressed} compressed bytes")]
    Truncated { compressed: u64 },
    #[error("corrupt gzip data at compressed offset {compressed}: {message}")]
    Corrupt { compressed: u64, message: String },
    #[error("unexpected data after the end of the gzip stream at offset {compressed}")]
    TrailingGarbage { compressed: u64 },
    #[error("zlib error: {0}")]
    Zlib(String),
    #[error(
        "no checkpoint possible for more than {max} bytes of output (a deflate block that long \
         at compressed offset {compressed}): this layer cannot be served lazily"
    )]
    SpanTooLong { compressed: u64, max: u64 },
    #[error("span inflated to {got} bytes, expected {expected}")]
    ShortSpan { got: u64, expected: u64 },
    #[error("I/O error reading the compressed stream: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for GzipError {
    /// Recovers a `GzipError` that travelled through `std::io::Read` as an `io::Error`.
    fn from(e: std::io::Error) -> Self {
        if e.get_ref().is_some_and(|inner| inner.is::<GzipError>()) {
            match e.into_inner().map(|inner| inner.downcast::<GzipError>()) {
                Some(Ok(g)) => return *g,
                Some(Err(other)) => return GzipError::Io(std::io::Error::other(other)),
                None => unreachable!("checked above"),
            }
        }
        GzipError::Io(e)
    }
}

impl From<GzipError> for std::io::Error {
    fn from(e: GzipError) -> Self {
        match e {
            GzipError::Io(io) => io,
            GzipError::Truncated { .. } => {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e)
            }
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }
}

#[cfg(test)]
mod tests;
