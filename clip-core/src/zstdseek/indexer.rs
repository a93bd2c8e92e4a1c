//! One streaming pass over a plain zstd layer that yields its bytes (it is a `Read`) while
//! recording checkpoints, proving each, and digesting every span.

use super::parse::{BlockHeader, BlockState, MAX_BLOCK};
use super::{window_log, ZstdSeekError as E, FRAME_MAGIC, MAX_WINDOW_LOG};
use crate::gzip::{Checkpoint, HashMsg, HashWorker, SpanSink, WindowSink, ZranOutput};
use std::io::{self, Read};

/// A frame being read.
struct Frame {
    /// Uncompressed offset of its first byte.
    start: u64,
    window: u64,
    checksum: bool,
    state: BlockState,
}

/// The checkpoint a span starts from, and what proving it needs.
struct Open {
    /// The decoder state at the checkpoint (tables, Huffman tree, repeat offsets).
    state: BlockState,
    /// The window log, with [`super::CHECKSUM_FLAG`] when the frame ends with a checksum.
    log: u8,
    /// Where the checkpoint is in the indexer's history buffer, and how much of the frame's
    /// output before it (up to a window) is there.
    hist_end: usize,
    hist_len: usize,
    /// The span's blocks, compressed, and its output.
    compressed: Vec<u8>,
    output: Vec<u8>,
    /// How far before the checkpoint the span's matches reach, and which of the
    /// checkpoint's repeat offsets it reads.
    reach: u64,
    used: u8,
    /// The ranges of history (frame offsets) the span's matches copy from.
    refs: Vec<(u64, u64)>,
    /// The frame offset of the checkpoint.
    at: u64,
}

/// What [`ZstdIndexer::finish`] adds to the checkpoints: how large they came out.
#[derive(Debug, Default, Clone, Copy)]
pub struct CheckpointSizes {
    /// Checkpoints taken inside frames (those at frame starts need nothing).
    pub count: u64,
    /// Bytes of history they keep, and the bytes a whole window each would have kept.
    pub history: u64,
    pub full_windows: u64,
    /// Dictionary bytes in all (history, tables and repeat offsets).
    pub dictionaries: u64,
    /// Bytes of the kept history that matches copy from (the rest is zeroed).
    pub referenced: u64,
}

/// Decodes a zstd stream read from `R`, yielding the uncompressed bytes through [`Read`] and
/// recording a checkpoint about every `span_size` bytes of output (at a block boundary).
pub struct ZstdIndexer<R> {
    input: R,
    buf: Vec<u8>,
    eof: bool,
    /// Compressed offset of `buf[0]`.
    compressed: u64,
    uncompressed: u64,
    decoder: zstd::stream::raw::Decoder<'static>,
    out: Vec<u8>,
    out_pos: usize,
    frame: Option<Frame>,
    frames: u64,
    span_size: u64,
    /// Span starts (the first at 0), and the open span's checkpoint (`None` at a frame start).
    checkpoints: Vec<Checkpoint>,
    open: Option<Open>,
    /// A frame start where the next span begins once the frame gives output.
    pending_frame: Option<u64>,
    /// The checkpoint of a span whose frame has ended, until the span does.
    sealed: Option<Vec<u8>>,
    /// The current frame's output, the last window of it at least.
    history: Vec<u8>,
    hashes: HashWorker,
    window_sink: Option<WindowSink>,
    sizes: CheckpointSizes,
    done: bool,
}

impl<R: Read> ZstdIndexer<R> {
    pub fn new(input: R, span_size: u64) -> Result<Self, E> {
        let decoder = super::decoder(None)?;
        Ok(ZstdIndexer {
            input,
            buf: Vec::with_capacity(MAX_BLOCK + 64),
            eof: false,
            compressed: 0,
            uncompressed: 0,
            decoder,
            out: Vec::new(),
            out_pos: 0,
            frame: None,
            frames: 0,
            span_size: span_size.max(1),
            checkpoints: vec![Checkpoint {
                uncompressed: 0,
                compressed: 0,
                bits: 0,
                window: Vec::new(),
            }],
            open: None,
            pending_frame: None,
            sealed: None,
            history: Vec::new(),
            hashes: HashWorker::default(),
            window_sink: None,
            sizes: CheckpointSizes::default(),
            done: false,
        })
    }

    /// Receives each span's checkpoint (window log byte + dictionary; empty at a frame start).
    pub fn with_window_sink(mut self, sink: WindowSink) -> Self {
        self.window_sink = Some(sink);
        self
    }

    pub fn with_span_sink(mut self, sink: SpanSink) -> Self {
        self.hashes.sink = Some(sink);
        self
    }

    /// Reads the rest of the stream and returns the index, the checkpoint sizes and the input.
    pub fn finish(mut self) -> Result<(ZranOutput, CheckpointSizes, R), E> {
        io::copy(&mut self, &mut io::sink())?;
        let (span_digests, diff_id) = self.hashes.finish()?;
        let out = ZranOutput {
            checkpoints: self.checkpoints,
            span_digests,
            diff_id,
            compressed_size: self.compressed,
            uncompressed_size: self.uncompressed,
        };
        Ok((out, self.sizes, self.input))
    }

    /// Ensures `want` bytes are buffered; false if the input ends first.
    fn fill(&mut self, want: usize) -> Result<bool, E> {
        let mut chunk = [0u8; 64 << 10];
        while self.buf.len() < want && !self.eof {
            let n = (want - self.buf.len()).max(4096).min(chunk.len());
            match self.input.read(&mut chunk[..n]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(self.buf.len() >= want)
    }

    fn need(&mut self, want: usize) -> Result<(), E> {
        if self.fill(want)? {
            Ok(())
        } else {
            Err(E::Truncated {
                compressed: self.compressed + self.buf.len() as u64,
            })
        }
    }

    /// Feeds the first `n` buffered bytes to the decoder; returns its output.
    fn decode(&mut self, n: usize) -> Result<Vec<u8>, E> {
        let mut out = Vec::new();
        let unit = &self.buf[..n];
        super::drain(&mut self.decoder, unit, &mut out, MAX_BLOCK + 1)?;
        if let Some(o) = &mut self.open {
            o.compressed.extend_from_slice(unit);
        }
        self.buf.drain(..n);
        self.compressed += n as u64;
        Ok(out)
    }

    fn corrupt(&self, detail: impl Into<String>) -> E {
        E::At {
            offset: self.compressed,
            detail: detail.into(),
        }
    }

    /// Ends the open span at the current position: hands out its checkpoint.
    fn end_span(&mut self) -> Result<(), E> {
        self.hashes.flush()?;
        self.hashes.send(HashMsg::EndSpan)?;
        self.seal()?;
        let entry = self.sealed.take().unwrap_or_default();
        if let Some(sink) = &mut self.window_sink {
            sink(entry);
        }
        Ok(())
    }

    /// Builds and proves the open span's checkpoint (its frame has ended, or the span does):
    /// it needs the frame's history, which the next frame replaces.
    fn seal(&mut self) -> Result<(), E> {
        let entry = match self.open.take() {
            None => return Ok(()),
            Some(o) => {
                let mut reps = [1u32; 3];
                for (i, r) in reps.iter_mut().enumerate() {
                    if o.used & (1 << i) != 0 {
                        *r = o.state.reps[i].0;
                    }
                }
                let keep = (o.reach.max(u64::from(*reps.iter().max().expect("3"))))
                    .max(8)
                    .min(o.hist_len as u64) as usize;
                // Only the bytes matches copy from matter; the rest of the history is zeroed,
                // so the checkpoint compresses to about what the span really reads.
                let mut entry = vec![o.log];
                entry.extend_from_slice(&o.state.dictionary_head(reps));
                let head = entry.len();
                entry.extend_from_slice(&self.history[o.hist_end - keep..o.hist_end]);
                let history = &mut entry[head..];
                let base = o.at - keep as u64;
                let mut refs: Vec<(usize, usize)> = o
                    .refs
                    .iter()
                    .map(|&(s, e)| {
                        (
                            s.saturating_sub(base) as usize,
                            e.saturating_sub(base) as usize,
                        )
                    })
                    .filter(|&(s, e)| s < e && e <= keep)
                    .collect();
                refs.sort_unstable();
                let mut covered = 0usize;
                for (s, e) in refs {
                    if s > covered {
                        history[covered..s].fill(0);
                    }
                    if e > covered {
                        self.sizes.referenced += (e - s.max(covered)) as u64;
                        covered = e;
                    }
                }
                history[covered..].fill(0);
                let at = self.checkpoints.last().map_or(0, |c| c.uncompressed);
                match super::decode_span(&entry, &o.compressed, o.output.len()) {
                    Ok(d) if d == o.output => {}
                    _ => return Err(E::Checkpoint { at }),
                }
                self.sizes.count += 1;
                self.sizes.history += keep as u64;
                self.sizes.full_windows += o.hist_len as u64;
                self.sizes.dictionaries += entry.len() as u64 - 1;
                entry
            }
        };
        self.sealed = Some(entry);
        Ok(())
    }

    /// Starts a span at compressed offset `at`: at a frame start (no checkpoint) or inside the
    /// current frame (here).
    fn start_span(&mut self, inside: bool, at: u64) -> Result<(), E> {
        self.end_span()?;
        self.checkpoints.push(Checkpoint {
            uncompressed: self.uncompressed,
            compressed: at,
            bits: 0,
            window: Vec::new(),
        });
        if inside {
            let f = self.frame.as_mut().expect("inside a frame");
            f.state.tag_reps();
            let hist_len = (f.window as usize).min(self.history.len());
            self.open = Some(Open {
                state: f.state.clone(),
                log: window_log(f.window) | if f.checksum { super::CHECKSUM_FLAG } else { 0 },
                hist_end: self.history.len(),
                hist_len,
                compressed: Vec::new(),
                output: Vec::new(),
                reach: 0,
                used: 0,
                refs: Vec::new(),
                at: self.uncompressed - f.start,
            });
        }
        Ok(())
    }

    /// Follows the compressed block in the buffer (body of `body` bytes, at frame offset `at`)
    /// as part of the open span, if any; returns its output size.
    fn walk(&mut self, body: usize, at: u64) -> Result<u64, E> {
        let start = self.frame.as_ref().map_or(0, |f| f.start);
        // While a frame start waits for its span, the open span is the last frame's.
        let open = self.open.as_mut().filter(|_| self.pending_frame.is_none());
        let reach_from = match &open {
            Some(_) => self.checkpoints.last().map_or(0, |c| c.uncompressed) - start,
            None => 0,
        };
        let (mut used, mut scratch) = (0u8, Vec::new());
        let refs = match open {
            Some(o) => &mut o.refs,
            None => &mut scratch,
        };
        let f = self.frame.as_mut().expect("in a frame");
        let e = f
            .state
            .block(&self.buf[3..3 + body], at, reach_from, &mut used, refs);
        let e = match e {
            Ok(e) => e,
            Err(e) => return Err(self.corrupt(e.to_string())),
        };
        if let Some(o) = self.open.as_mut().filter(|_| self.pending_frame.is_none()) {
            o.reach = o.reach.max(e.reach);
            o.used |= used;
        }
        Ok(e.output)
    }

    /// Reads one unit (a frame header, a block, a checksum, a skippable frame) and returns
    /// its output; `None` at the end of the stream.
    fn step(&mut self) -> Result<Option<Vec<u8>>, E> {
        let Some(frame) = &self.frame else {
            return self.between_frames();
        };
        let (start, window) = (frame.start, frame.window);
        self.need(3)?;
        let h = [self.buf[0], self.buf[1], self.buf[2]];
        let BlockHeader {
            last,
            kind,
            size,
            body,
        } = BlockHeader::read(h, MAX_BLOCK.min(window as usize))
            .map_err(|e| self.corrupt(e.to_string()))?;
        self.need(3 + body)?;
        let at = self.uncompressed - start;
        // A span starts here if the last one is long enough, unless this block adds nothing:
        // a span is never empty (a stream may end a frame with an empty block).
        let cut = self.pending_frame.is_none()
            && self.uncompressed - self.checkpoints.last().map_or(0, |c| c.uncompressed)
                >= self.span_size
            && at >= 64;
        let mut expect = size as u64;
        if kind == 2 && cut {
            // Walk the block as the first of a new span, on a copy of the state.
            let f = self.frame.as_ref().expect("in a frame");
            let mut state = f.state.clone();
            state.tag_reps();
            let (mut used, mut refs) = (0u8, Vec::new());
            let e = state
                .block(&self.buf[3..3 + body], at, at, &mut used, &mut refs)
                .map_err(|e| self.corrupt(e.to_string()))?;
            expect = e.output;
            if expect > 0 {
                self.start_span(true, self.compressed)?;
                self.frame.as_mut().expect("in a frame").state = state;
                let o = self.open.as_mut().expect("just opened");
                (o.used, o.refs, o.reach) = (used, refs, e.reach);
            } else {
                expect = self.walk(body, at)?;
            }
        } else {
            if cut && expect > 0 {
                self.start_span(true, self.compressed)?;
            }
            if kind == 2 {
                expect = self.walk(body, at)?;
            }
        }
        // A span that starts at a frame start begins with the frame's first output.
        if expect > 0 {
            if let Some(offset) = self.pending_frame.take() {
                self.start_span(false, offset)?;
            }
        }
        let out = self.decode(3 + body)?;
        if out.len() as u64 != expect {
            return Err(self.corrupt(format!(
                "a block decoded to {} bytes where its sequences make {expect}",
                out.len()
            )));
        }
        if last {
            let sum = if self.frame.as_ref().is_some_and(|f| f.checksum) {
                4
            } else {
                0
            };
            self.need(sum)?;
            let tail = self.decode(sum)?;
            if !tail.is_empty() {
                return Err(self.corrupt("output after a frame's last block"));
            }
            self.frame = None;
        }
        Ok(Some(out))
    }

    fn between_frames(&mut self) -> Result<Option<Vec<u8>>, E> {
        if !self.fill(4)? {
            if !self.buf.is_empty() {
                return Err(self.corrupt("trailing bytes after the last frame"));
            }
            if self.frames == 0 {
                return Err(E::NotZstd);
            }
            return Ok(None);
        }
        let magic = u32::from_le_bytes(self.buf[..4].try_into().expect("4"));
        if magic & 0xFFFF_FFF0 == 0x184D_2A50 {
            self.need(8)?;
            let size = u32::from_le_bytes(self.buf[4..8].try_into().expect("4")) as u64;
            let _ = self.decode(8)?;
            let mut left = size;
            while left > 0 {
                let n = left.min(64 << 10) as usize;
                self.need(n)?;
                let _ = self.decode(n)?;
                left -= n as u64;
            }
            return Ok(Some(Vec::new()));
        }
        if magic != FRAME_MAGIC {
            return Err(if self.frames == 0 {
                E::NotZstd
            } else {
                self.corrupt("bytes that are not a zstd frame")
            });
        }
        self.fill(18)?;
        let fhd = *self.buf.get(4).ok_or(E::Truncated {
            compressed: self.compressed + 4,
        })?;
        if fhd & 8 != 0 {
            return Err(self.corrupt("reserved frame header bit set"));
        }
        let single = fhd & 0x20 != 0;
        let did = [0usize, 1, 2, 4][usize::from(fhd & 3)];
        let fcs = match fhd >> 6 {
            0 => usize::from(single),
            1 => 2,
            2 => 4,
            _ => 8,
        };
        let len = 5 + usize::from(!single) + did + fcs;
        self.need(len)?;
        let h = &self.buf[..len];
        let mut p = 5;
        let mut window = 0u64;
        if !single {
            let wd = h[5];
            let base = 1u64 << (10 + (wd >> 3));
            window = base + (base / 8) * u64::from(wd & 7);
            p += 1;
        }
        let mut id = 0u32;
        for i in 0..did {
            id |= u32::from(h[p + i]) << (8 * i);
        }
        p += did;
        if id != 0 {
            return Err(E::NeedsDictionary { id });
        }
        if single {
            let mut v = 0u64;
            for i in 0..fcs {
                v |= u64::from(h[p + i]) << (8 * i);
            }
            window = if fcs == 2 { v + 256 } else { v };
        }
        if window > 1 << MAX_WINDOW_LOG {
            return Err(E::WindowTooLarge { window });
        }
        let checksum = fhd & 4 != 0;
        // A span inside a frame ends with it; one that started at a frame start goes on
        // through whole frames until it is long enough.
        let since = self.uncompressed - self.checkpoints.last().map_or(0, |c| c.uncompressed);
        if self.frames > 0 && (self.open.is_some() || since >= self.span_size) {
            // The span starts with this frame's first output (an empty frame stays with the
            // span before).
            self.pending_frame = Some(self.compressed);
        }
        self.frames += 1;
        self.seal()?;
        let _ = self.decode(len)?;
        self.history.clear();
        self.frame = Some(Frame {
            start: self.uncompressed,
            window: window.max(1),
            checksum,
            state: BlockState::default(),
        });
        Ok(Some(Vec::new()))
    }

    /// Produces the next output into `out`; false at the end.
    fn produce(&mut self) -> Result<bool, E> {
        if self.done {
            return Ok(false);
        }
        loop {
            match self.step()? {
                None => {
                    if self.frame.is_some() {
                        return Err(E::Truncated {
                            compressed: self.compressed,
                        });
                    }
                    self.end_span()?;
                    self.done = true;
                    return Ok(false);
                }
                Some(o) if o.is_empty() => continue,
                Some(o) => {
                    self.uncompressed += o.len() as u64;
                    self.hashes.pending.extend_from_slice(&o);
                    if self.hashes.pending.len() >= 256 << 10 {
                        self.hashes.flush()?;
                    }
                    if let Some(open) = &mut self.open {
                        open.output.extend_from_slice(&o);
                    }
                    let window = self.frame.as_ref().map_or(0, |f| f.window as usize);
                    self.history.extend_from_slice(&o);
                    if self.history.len() > 2 * window.max(1 << 20) {
                        // An open span's checkpoint keeps its window of history here.
                        let mut cut = self.history.len() - window;
                        if let Some(o) = &mut self.open {
                            cut = cut.min(o.hist_end - o.hist_len);
                            o.hist_end -= cut;
                        }
                        self.history.drain(..cut);
                    }
                    self.out = o;
                    self.out_pos = 0;
                    return Ok(true);
                }
            }
        }
    }
}

impl<R: Read> Read for ZstdIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.out_pos == self.out.len() && !self.produce()? {
            return Ok(0);
        }
        let n = (self.out.len() - self.out_pos).min(buf.len());
        buf[..n].copy_from_slice(&self.out[self.out_pos..self.out_pos + n]);
        self.out_pos += n;
        Ok(n)
    }
}
