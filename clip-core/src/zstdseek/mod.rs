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

/// Uncompressed bytes between checkpoints. A checkpoint keeps only the history its span reads,
/// so it grows with the span: on the large test image (skopeo, 8 MiB windows), 1 MiB spans
/// make checkpoints of 52 KiB on average (20 % of the layers' bytes in all), 4 MiB spans 77 KiB
/// (7 %); a read of one small file costs a span and its checkpoint.
pub const SPAN_SIZE: u64 = 1 << 20;
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
    thread_local! {
        /// One output buffer per thread (a fresh 128 KiB one per call costs a mapping).
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 128 << 10]);
    }
    BUF.with(|b| drain_with(dec, input, out, max, &mut b.borrow_mut()))
}

fn drain_with(
    dec: &mut zstd::stream::raw::Decoder<'_>,
    input: &[u8],
    out: &mut Vec<u8>,
    max: usize,
    buf: &mut [u8],
) -> Result<(), ZstdSeekError> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
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

/// In a checkpoint's first byte, beside the window log: the frame ends with a checksum.
pub const CHECKSUM_FLAG: u8 = 0x80;

/// Decodes one span: `checkpoint` is its windows-blob entry (empty for a span at a frame
/// start), `data` its compressed bytes, `len` its uncompressed length.
pub fn decode_span(checkpoint: &[u8], data: &[u8], len: usize) -> Result<Vec<u8>, ZstdSeekError> {
    let mut d = SpanDecoder::new(checkpoint, len)?;
    d.feed(data)?;
    d.finish()
}

/// How the bytes of a span go to the decoder.
enum Mode {
    /// Whole frames from their start: libzstd takes them as they are (frame headers,
    /// checksums, skippable frames).
    Raw,
    /// Blocks of a frame resumed at a checkpoint (a synthetic frame without a checksum):
    /// block headers are followed, and what comes after the last block is not the decoder's.
    Blocks {
        /// Bytes of the current block's body still to come (0: a header is next), the
        /// header bytes seen so far, and whether the block is the frame's last.
        body_left: usize,
        header: Vec<u8>,
        last: bool,
        checksum: bool,
    },
    /// After a resumed frame's last block: its checksum (bytes left) before raw frames.
    Checksum(usize),
}

/// Decodes one span as its bytes arrive, resuming at its checkpoint. A checkpoint holds only
/// the history its own span reads (the rest is zeroed), so a decoder serves one span: the
/// spans after it may read history that this checkpoint left out.
struct SpanDecoder {
    len: usize,
    decoder: zstd::stream::raw::Decoder<'static>,
    mode: Mode,
    out: Vec<u8>,
}

impl SpanDecoder {
    /// `checkpoint`: the span's windows-blob entry (empty at a frame start); `len`: its
    /// uncompressed length.
    fn new(checkpoint: &[u8], len: usize) -> Result<Self, ZstdSeekError> {
        if len > (64 << 20) {
            return Err(ZstdSeekError::Corrupt("a span over 64 MiB"));
        }
        let (decoder, mode) = match checkpoint.split_first() {
            None => (decoder(None)?, Mode::Raw),
            Some((&first, dict)) => {
                let log = first & !CHECKSUM_FLAG;
                if !(10..=MAX_WINDOW_LOG).contains(&log) {
                    return Err(ZstdSeekError::Corrupt("checkpoint window log out of range"));
                }
                let mut d = decoder(Some(dict))?;
                let mut head = FRAME_MAGIC.to_le_bytes().to_vec();
                head.extend_from_slice(&[0, (log - 10) << 3]);
                drain(&mut d, &head, &mut Vec::new(), 0)?;
                let mode = Mode::Blocks {
                    body_left: 0,
                    header: Vec::new(),
                    last: false,
                    checksum: first & CHECKSUM_FLAG != 0,
                };
                (d, mode)
            }
        };
        Ok(SpanDecoder {
            len,
            decoder,
            mode,
            out: Vec::with_capacity(len),
        })
    }

    fn run(&mut self, input: &[u8]) -> Result<(), ZstdSeekError> {
        drain(&mut self.decoder, input, &mut self.out, self.len)
    }

    /// Feeds the next compressed bytes of the span.
    fn feed(&mut self, mut input: &[u8]) -> Result<(), ZstdSeekError> {
        while !input.is_empty() {
            match &mut self.mode {
                Mode::Raw => {
                    self.run(input)?;
                    input = &[];
                }
                Mode::Checksum(left) => {
                    let n = (*left).min(input.len());
                    *left -= n;
                    input = &input[n..];
                    if *left == 0 {
                        self.decoder = decoder(None)?;
                        self.mode = Mode::Raw;
                    }
                }
                Mode::Blocks {
                    body_left,
                    header,
                    last,
                    ..
                } => {
                    if *body_left > 0 {
                        let n = (*body_left).min(input.len());
                        *body_left -= n;
                        let (now, rest) = input.split_at(n);
                        input = rest;
                        let ended = *body_left == 0 && *last;
                        self.run(now)?;
                        if ended {
                            self.end_of_frame()?;
                        }
                        continue;
                    }
                    let n = (3 - header.len()).min(input.len());
                    header.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    let Ok(h) = <[u8; 3]>::try_from(&header[..]) else {
                        continue;
                    };
                    let b = parse::BlockHeader::read(h, parse::MAX_BLOCK)?;
                    header.clear();
                    (*body_left, *last) = (b.body, b.last);
                    self.run(&h)?;
                    if b.body == 0 && b.last {
                        // An empty last block: the frame ends with its header.
                        self.end_of_frame()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A resumed frame's last block is in: its checksum, if any, is skipped, and what
    /// follows is whole frames.
    fn end_of_frame(&mut self) -> Result<(), ZstdSeekError> {
        if let Mode::Blocks { checksum, .. } = self.mode {
            if checksum {
                self.mode = Mode::Checksum(4);
            } else {
                self.decoder = decoder(None)?;
                self.mode = Mode::Raw;
            }
        }
        Ok(())
    }

    /// The end of the span's bytes: the span, if it decoded to its whole length.
    fn finish(self) -> Result<Vec<u8>, ZstdSeekError> {
        if self.out.len() != self.len {
            return Err(ZstdSeekError::Corrupt(
                "a span decodes to less than its length",
            ));
        }
        Ok(self.out)
    }
}

/// Decodes a run of adjacent spans as their bytes arrive, each from its own checkpoint, given
/// as the windows blob holds it (zstd-compressed) and decoded only when its span starts.
pub struct CheckpointSpans {
    /// (compressed length, uncompressed length, compressed checkpoint) of the spans not yet
    /// started.
    spans: std::collections::VecDeque<(u64, usize, bytes::Bytes)>,
    /// The span being decoded, and its compressed bytes still to come.
    current: Option<(SpanDecoder, u64)>,
}

impl CheckpointSpans {
    pub fn new(spans: Vec<(u64, usize, bytes::Bytes)>) -> Result<Self, ZstdSeekError> {
        if spans.iter().any(|s| s.0 > (64 << 20)) {
            return Err(ZstdSeekError::Corrupt("a span over 64 MiB"));
        }
        Ok(CheckpointSpans {
            spans: spans.into(),
            current: None,
        })
    }

    /// Feeds the next compressed bytes; returns the spans completed, in order.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Vec<u8>>, ZstdSeekError> {
        let mut done = Vec::new();
        loop {
            let (d, left) = match &mut self.current {
                Some(c) => c,
                None => {
                    let Some((clen, ulen, cp)) = self.spans.pop_front() else {
                        return Ok(done);
                    };
                    // Decompressed here, not with index::format::decode_window: the index
                    // module uses this one (no module cycles, docs/architecture.md).
                    let cp = if cp.is_empty() {
                        Vec::new()
                    } else {
                        zstd::bulk::decompress(&cp, MAX_CHECKPOINT).map_err(|_| {
                            ZstdSeekError::Corrupt("a checkpoint that does not decode")
                        })?
                    };
                    self.current.insert((SpanDecoder::new(&cp, ulen)?, clen))
                }
            };
            let n = (*left).min(input.len() as u64) as usize;
            let (now, rest) = input.split_at(n);
            input = rest;
            *left -= n as u64;
            d.feed(now)?;
            if *left > 0 {
                return Ok(done);
            }
            let (d, _) = self.current.take().expect("set above");
            done.push(d.finish()?);
        }
    }
}

/// A streaming decoder, its window bounded by [`MAX_WINDOW_LOG`]; with `dict`, a zstd
/// dictionary (a checkpoint) loaded.
fn decoder(dict: Option<&[u8]>) -> Result<zstd::stream::raw::Decoder<'static>, ZstdSeekError> {
    let mut d = match dict {
        None => zstd::stream::raw::Decoder::new()?,
        Some(dict) => zstd::stream::raw::Decoder::with_dictionary(dict)?,
    };
    d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(u32::from(
        MAX_WINDOW_LOG,
    )))?;
    Ok(d)
}

#[cfg(test)]
mod tests;
