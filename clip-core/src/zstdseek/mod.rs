//! Plain zstd layers, checkpointed: the zstd analogue of zran.
//!
//! A zstd frame can be resumed at a block boundary by a decoder that has the state the blocks
//! before left behind: the history its matches reach into, the literals' Huffman table, the
//! three sequence tables and the three repeat offsets. A zstd *dictionary* carries exactly that
//! state (entropy tables, repeat offsets, content), so a checkpoint is written as one, and
//! libzstd resumes from it: the blocks after the checkpoint are decoded as a new frame (same
//! window, no checksum) with the checkpoint as its dictionary.
//!
//! The state is followed while the layer is indexed ([`indexer::ZstdIndexer`]) by a walker
//! that parses every block's headers and decodes its sequences (never its literals): it learns
//! each block's output size, the tables and repeat offsets, and how far back the next span's
//! matches reach. A checkpoint keeps only that much history, not the whole window. Every
//! checkpoint is proved while indexing: the span after it is decoded from it and compared
//! with what the stream decoder produced; a checkpoint that does not reproduce its span fails
//! the index (the layer is then unpacked, never served wrong).
//!
//! Spans start at block boundaries, at least [`SPAN_SIZE`] apart, and at every frame start. A
//! span that starts at a frame start needs no checkpoint (its window is empty). The windows
//! blob holds, per checkpoint, one byte of window log and the dictionary.

pub mod indexer;
pub mod parse;

pub use indexer::ZstdIndexer;

/// Uncompressed bytes between checkpoints: a checkpoint holds up to a window of history
/// (2 MiB at zstd's default level), so spans are much longer than gzip's.
pub const SPAN_SIZE: u64 = 4 << 20;
/// The largest frame window clip checkpoints (8 MiB, zstd level 19's); a layer written with a
/// longer window (`--long`) is unpacked instead.
pub const MAX_WINDOW_LOG: u8 = 23;
/// The largest checkpoint (window log byte + dictionary) a windows blob may hold.
pub const MAX_CHECKPOINT: usize = (1 << MAX_WINDOW_LOG) + (64 << 10);

const FRAME_MAGIC: u32 = 0xFD2FB528;

#[derive(Debug, thiserror::Error)]
pub enum ZstdSeekError {
    #[error("corrupt zstd data: {0}")]
    Corrupt(&'static str),
    #[error("corrupt zstd data at compressed offset {offset}: {detail}")]
    At { offset: u64, detail: String },
    #[error("not a zstd stream (bad magic bytes)")]
    NotZstd,
    #[error("zstd stream truncated after {compressed} compressed bytes")]
    Truncated { compressed: u64 },
    #[error(
        "a zstd frame with a {window} byte window, over the {} MiB clip checkpoints \
         (written with --long?)",
        1u64 << (MAX_WINDOW_LOG - 20)
    )]
    WindowTooLarge { window: u64 },
    #[error("a zstd frame that needs an external dictionary ({id:#x})")]
    NeedsDictionary { id: u32 },
    #[error("the checkpoint at uncompressed offset {at} does not reproduce its span")]
    Checkpoint { at: u64 },
    #[error("zstd: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for ZstdSeekError {
    /// Our own errors come back out of the `Read` they travelled through.
    fn from(e: std::io::Error) -> Self {
        if e.get_ref().is_some_and(|i| i.is::<ZstdSeekError>()) {
            if let Some(inner) = e.into_inner() {
                if let Ok(z) = inner.downcast::<ZstdSeekError>() {
                    return *z;
                }
                return ZstdSeekError::Corrupt("unrecognized error");
            }
            return ZstdSeekError::Corrupt("unrecognized error");
        }
        ZstdSeekError::Io(e)
    }
}

impl From<ZstdSeekError> for std::io::Error {
    fn from(e: ZstdSeekError) -> Self {
        match e {
            ZstdSeekError::Io(e) => e,
            e => std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        }
    }
}

/// The window log that covers a window of `size` bytes.
fn window_log(size: u64) -> u8 {
    let log = 64 - size.saturating_sub(1).leading_zeros();
    log.max(10) as u8
}

/// Runs `dec` over `input` to its end, appending the output to `out`; refuses more than `max`
/// bytes of output in all.
fn drain(
    dec: &mut zstd::stream::raw::Decoder<'_>,
    input: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), ZstdSeekError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    let mut buf = vec![0u8; 128 << 10];
    let mut src = InBuffer::around(input);
    loop {
        let before = src.pos();
        let mut dst = OutBuffer::around(&mut buf[..]);
        dec.run(&mut src, &mut dst)?;
        let n = dst.pos();
        if out.len() + n > max {
            return Err(ZstdSeekError::Corrupt(
                "a span decodes to more than its length",
            ));
        }
        out.extend_from_slice(&buf[..n]);
        if n == 0 && (src.pos() == input.len() || src.pos() == before) {
            return Ok(());
        }
    }
}

/// Decodes one span: `checkpoint` is its windows-blob entry (empty for a span at a frame
/// start), `data` its compressed bytes, `len` its uncompressed length.
pub fn decode_span(checkpoint: &[u8], data: &[u8], len: usize) -> Result<Vec<u8>, ZstdSeekError> {
    let mut out = Vec::with_capacity(len);
    if checkpoint.is_empty() {
        let mut dec = zstd::stream::raw::Decoder::new()?;
        dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(u32::from(
            MAX_WINDOW_LOG,
        )))?;
        drain(&mut dec, data, &mut out, len)?;
    } else {
        let log = checkpoint[0];
        if !(10..=MAX_WINDOW_LOG).contains(&log) {
            return Err(ZstdSeekError::Corrupt("checkpoint window log out of range"));
        }
        let mut dec = zstd::stream::raw::Decoder::with_dictionary(&checkpoint[1..])?;
        let mut frame = Vec::with_capacity(data.len() + 6);
        frame.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame.extend_from_slice(&[0, (log - 10) << 3]);
        frame.extend_from_slice(blocks_of_frame(data)?);
        drain(&mut dec, &frame, &mut out, len)?;
    }
    if out.len() != len {
        return Err(ZstdSeekError::Corrupt(
            "a span decodes to less than its length",
        ));
    }
    Ok(out)
}

/// The blocks at the start of `data` up to the end of the frame they belong to (or of `data`):
/// what follows a frame's last block (its checksum, skippable frames) is left out.
fn blocks_of_frame(data: &[u8]) -> Result<&[u8], ZstdSeekError> {
    let mut at = 0usize;
    while at < data.len() {
        let h = data
            .get(at..at + 3)
            .ok_or(ZstdSeekError::Corrupt("truncated block header"))?;
        let h = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
        let (last, kind, size) = (h & 1 == 1, (h >> 1) & 3, (h >> 3) as usize);
        let body = match kind {
            0 | 2 => size,
            1 => 1,
            _ => return Err(ZstdSeekError::Corrupt("reserved block type")),
        };
        at += 3 + body;
        if at > data.len() {
            return Err(ZstdSeekError::Corrupt("truncated block"));
        }
        if last {
            break;
        }
    }
    Ok(&data[..at])
}

/// Decodes a run of adjacent spans as their bytes arrive: each span once all of its bytes
/// are here, from its own checkpoint.
pub struct CheckpointSpans {
    /// (compressed length, uncompressed length, checkpoint) of the spans not yet decoded.
    spans: std::collections::VecDeque<(u64, usize, Vec<u8>)>,
    pending: Vec<u8>,
}

impl CheckpointSpans {
    pub fn new(spans: Vec<(u64, usize, Vec<u8>)>) -> Result<Self, ZstdSeekError> {
        if spans.iter().any(|s| s.0 > (64 << 20) || s.1 > (64 << 20)) {
            return Err(ZstdSeekError::Corrupt("a span over 64 MiB"));
        }
        Ok(CheckpointSpans {
            spans: spans.into(),
            pending: Vec::new(),
        })
    }

    /// Feeds the next compressed bytes; returns the spans completed, in order.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Vec<u8>>, ZstdSeekError> {
        let mut done = Vec::new();
        loop {
            let Some((clen, ulen, _)) = self.spans.front() else {
                return Ok(done);
            };
            let want = *clen as usize - self.pending.len();
            let take = want.min(input.len());
            self.pending.extend_from_slice(&input[..take]);
            input = &input[take..];
            if self.pending.len() < *clen as usize {
                return Ok(done);
            }
            let ulen = *ulen;
            let (_, _, cp) = self.spans.pop_front().expect("front");
            done.push(decode_span(&cp, &self.pending, ulen)?);
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests;
