//! One streaming pass over a gzip stream that yields its uncompressed bytes (it is a `Read`)
//! while recording checkpoints and a digest of every span.

use super::inflater::{Inflater, GZIP};
use super::{Checkpoint, GzipError};
use crate::digest::{Digest, Hasher};
use crate::limits;
use crate::tarscan::TarTrack;
use std::io::{self, BufRead, Read};

const IN_BUF: usize = 256 * 1024;
/// Output is inflated in large steps (few, long `inflate` calls) and handed out from here.
const OUT_BUF: usize = 256 * 1024;

/// What indexing a gzip stream produces.
#[derive(Debug)]
pub struct ZranOutput {
    /// Checkpoints in order; the first is at uncompressed offset 0.
    pub checkpoints: Vec<Checkpoint>,
    /// `span_digests[i]` is the sha256 of the uncompressed bytes from checkpoint `i` to checkpoint
    /// `i + 1` (or to the end of the stream for the last one).
    pub span_digests: Vec<Digest>,
    /// sha256 of the whole uncompressed stream (the layer's DiffID).
    pub diff_id: Digest,
    /// Compressed bytes consumed, including any zero padding after the last member.
    pub compressed_size: u64,
    pub uncompressed_size: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before a member header (or at the end of the stream).
    BetweenMembers,
    InMember,
    Done,
}

/// Inflates a gzip stream read from `R`, yielding the uncompressed bytes through [`Read`] and
/// recording zran checkpoints about every `span_size` bytes of output.
pub struct GzipIndexer<R> {
    input: R,
    inflater: Inflater,
    in_buf: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
    input_eof: bool,
    state: State,
    members: u64,
    compressed: u64,
    uncompressed: u64,
    span_size: u64,
    /// Denser checkpoints inside small files: (span size there, largest "small" file).
    dense: Option<(u64, u64)>,
    tar: TarTrack,
    checkpoints: Vec<Checkpoint>,
    /// Hashes the output (span digests, DiffID) on a thread of its own.
    hashes: HashWorker,
    stalls: u32,
    out_buf: Box<[u8]>,
    out_pos: usize,
    out_len: usize,
    /// Receives each checkpoint's window as it is taken (the checkpoint then keeps none).
    window_sink: Option<WindowSink>,
}

/// Called with each checkpoint's window (empty at the start of the stream), in order.
pub type WindowSink = Box<dyn FnMut(Vec<u8>) + Send>;

/// Called with each completed span (digest, uncompressed bytes), in order.
pub type SpanSink = Box<dyn FnMut(Digest, Vec<u8>) + Send>;

impl<R: Read> GzipIndexer<R> {
    /// Checkpoints every `span` bytes (instead of every `span_size`) inside tar entries smaller
    /// than `small`: reads of small files then fetch less around them.
    pub fn with_density(mut self, span: u64, small: u64) -> Self {
        if span > 0 && span < self.span_size && small > 0 {
            self.dense = Some((span, small));
        }
        self
    }

    pub fn new(input: R, span_size: u64) -> Result<Self, GzipError> {
        Ok(GzipIndexer {
            input,
            inflater: Inflater::new(GZIP)?,
            in_buf: vec![0u8; IN_BUF].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
            input_eof: false,
            state: State::BetweenMembers,
            members: 0,
            compressed: 0,
            uncompressed: 0,
            span_size: span_size.max(1),
            dense: None,
            tar: TarTrack::default(),
            checkpoints: Vec::new(),
            hashes: HashWorker::default(),
            stalls: 0,
            out_buf: vec![0u8; OUT_BUF].into_boxed_slice(),
            out_pos: 0,
            out_len: 0,
            window_sink: None,
        })
    }

    /// Hands every checkpoint's window to `sink` as it is taken instead of keeping it in the
    /// checkpoint: a caller compressing them as they come holds none of them.
    pub fn with_window_sink(mut self, sink: WindowSink) -> Self {
        self.window_sink = Some(sink);
        self
    }

    /// Hands every span's bytes to `sink` as it completes (e.g. to fill a cache while indexing);
    /// `sink` runs on the hashing thread.
    pub fn with_span_sink(mut self, sink: SpanSink) -> Self {
        self.hashes.sink = Some(sink);
        self
    }

    fn end_span(&mut self) -> io::Result<()> {
        self.hashes.flush()?;
        self.hashes.send(HashMsg::EndSpan)
    }

    /// Reads the rest of the stream (so every byte is checked) and returns the index and the input.
    pub fn finish(mut self) -> Result<(ZranOutput, R), GzipError> {
        io::copy(&mut self, &mut io::sink())?;
        self.end_span()?;
        let (span_digests, diff_id) = self.hashes.finish()?;
        let out = ZranOutput {
            checkpoints: self.checkpoints,
            span_digests,
            diff_id,
            compressed_size: self.compressed,
            uncompressed_size: self.uncompressed,
        };
        Ok((out, self.input))
    }

    /// Ensures at least `want` unread bytes are buffered unless the input ends first.
    fn fill(&mut self, want: usize) -> io::Result<()> {
        if self.in_pos > 0 && self.in_len - self.in_pos < want {
            self.in_buf.copy_within(self.in_pos..self.in_len, 0);
            self.in_len -= self.in_pos;
            self.in_pos = 0;
        }
        while self.in_len - self.in_pos < want && !self.input_eof {
            match self.input.read(&mut self.in_buf[self.in_len..]) {
                Ok(0) => self.input_eof = true,
                Ok(n) => self.in_len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn consume_input(&mut self, n: usize) {
        self.in_pos += n;
        self.compressed += n as u64;
    }

    /// At a member boundary: start the next member, or accept the end of the stream.
    fn start_member(&mut self) -> io::Result<()> {
        self.fill(2)?;
        let avail = &self.in_buf[self.in_pos..self.in_len];
        if avail.is_empty() {
            if self.members == 0 {
                return Err(GzipError::NotGzip.into());
            }
            self.state = State::Done;
            return Ok(());
        }
        if avail.len() >= 2 && avail[0] == 0x1f && avail[1] == 0x8b {
            if self.members > 0 {
                self.inflater.reset(GZIP)?;
            }
            self.members += 1;
            self.state = State::InMember;
            return Ok(());
        }
        if self.members == 0 {
            return Err(GzipError::NotGzip.into());
        }
        // Some writers pad the stream with zeros; accept that, refuse anything else.
        loop {
            let avail = &self.in_buf[self.in_pos..self.in_len];
            if let Some(i) = avail.iter().position(|&b| b != 0) {
                return Err(GzipError::TrailingGarbage {
                    compressed: self.compressed + i as u64,
                }
                .into());
            }
            let n = avail.len();
            self.consume_input(n);
            if self.input_eof {
                self.state = State::Done;
                return Ok(());
            }
            self.fill(1)?;
        }
    }

    /// Spans stay within [`limits::MAX_SPAN`] and [`limits::MAX_SPAN_COMPRESSED`]: checkpoints
    /// can only fall between deflate blocks, so a longer block makes the layer unservable.
    fn check_span_limits(&self) -> Result<(), GzipError> {
        let Some(last) = self.checkpoints.last() else {
            return Ok(());
        };
        if self.uncompressed - last.uncompressed > limits::MAX_SPAN
            || self.compressed - last.compressed > limits::MAX_SPAN_COMPRESSED
        {
            return Err(GzipError::SpanTooLong {
                compressed: last.compressed,
                max: limits::MAX_SPAN,
            });
        }
        Ok(())
    }

    fn checkpoint(&mut self, bits: u8) -> Result<(), GzipError> {
        let due = match self.checkpoints.last() {
            None => true,
            Some(last) => {
                let d = self.uncompressed - last.uncompressed;
                d >= self.span_size
                    || self.dense.is_some_and(|(span, small)| {
                        d >= span && self.tar.entry_size_at(self.uncompressed) < small
                    })
            }
        };
        if !due {
            return Ok(());
        }
        if !self.checkpoints.is_empty() {
            self.end_span().map_err(GzipError::from)?;
        }
        let mut window = if self.uncompressed == 0 {
            Vec::new()
        } else {
            self.inflater.dictionary()?
        };
        if let Some(sink) = &mut self.window_sink {
            sink(std::mem::take(&mut window));
        }
        self.checkpoints.push(Checkpoint {
            uncompressed: self.uncompressed,
            compressed: self.compressed,
            bits,
            window,
        });
        Ok(())
    }
}

impl<R: Read> GzipIndexer<R> {
    /// Inflates the next piece of output into `out_buf`; 0 at the end of the stream.
    fn produce(&mut self) -> io::Result<usize> {
        // Z_BLOCK returns at every deflate block boundary (every few tens of KiB of output); keep
        // going until the buffer is nearly full so readers see large pieces.
        let mut filled = 0;
        loop {
            if filled > 0
                && (self.out_buf.len() - filled < 64 * 1024 || self.state != State::InMember)
            {
                self.hashes.flush()?;
                return Ok(filled);
            }
            match self.state {
                State::Done => return Ok(filled),
                State::BetweenMembers => {
                    self.start_member()?;
                    continue;
                }
                State::InMember => {}
            }
            if self.in_pos == self.in_len {
                self.fill(1)?;
                if self.in_pos == self.in_len {
                    return Err(GzipError::Truncated {
                        compressed: self.compressed,
                    }
                    .into());
                }
            }
            let step = self
                .inflater
                .inflate(
                    &self.in_buf[self.in_pos..self.in_len],
                    &mut self.out_buf[filled..],
                    libz_rs_sys::Z_BLOCK,
                )
                .map_err(|message| GzipError::Corrupt {
                    compressed: self.compressed,
                    message,
                })?;
            self.consume_input(step.consumed);
            let out = &self.out_buf[filled..filled + step.produced];
            if !out.is_empty() {
                if self.dense.is_some() {
                    let _ = self
                        .tar
                        .feed(self.uncompressed, out, |_, _| Ok::<(), ()>(()));
                }
                self.hashes.pending.extend_from_slice(out);
                self.uncompressed += out.len() as u64;
                self.check_span_limits()?;
            }
            if step.stream_end {
                self.state = State::BetweenMembers;
            } else if step.data_type & 128 != 0 && step.data_type & 64 == 0 {
                self.checkpoint((step.data_type & 7) as u8)?;
            }
            filled += step.produced;
            if step.produced > 0 {
                self.stalls = 0;
                continue;
            }
            if step.consumed == 0 && !step.stream_end {
                self.stalls += 1;
                if self.stalls > 4 {
                    return Err(GzipError::Corrupt {
                        compressed: self.compressed,
                        message: "inflate made no progress".into(),
                    }
                    .into());
                }
            } else {
                self.stalls = 0;
            }
        }
    }
}

pub(crate) enum HashMsg {
    /// The next bytes of output.
    Data(Vec<u8>),
    /// The current span ends here.
    EndSpan,
}

/// Chunks of output queued for the hashing thread at most (each up to [`OUT_BUF`] bytes).
const HASH_QUEUE: usize = 8;

/// The hashing thread: the span digests and the DiffID are sha256 of the whole output, which
/// costs as much as inflating it; a thread of its own takes that off the inflating one. Output
/// is copied to it in chunks, and the chunk buffers come back to be reused.
#[derive(Default)]
pub(crate) struct HashWorker {
    /// Output not yet sent.
    pub(crate) pending: Vec<u8>,
    pub(crate) sink: Option<SpanSink>,
    running: Option<HashThread>,
}

/// Dropped field by field in this order: the sender first, so that the thread, joined last,
/// sees the end of its input.
struct HashThread {
    tx: std::sync::mpsc::SyncSender<HashMsg>,
    spare: std::sync::mpsc::Receiver<Vec<u8>>,
    handle: super::JoinOnDrop<(Vec<Digest>, Digest)>,
}

impl HashWorker {
    fn start(&mut self) -> io::Result<&mut HashThread> {
        if self.running.is_none() {
            let (tx, rx) = std::sync::mpsc::sync_channel::<HashMsg>(HASH_QUEUE);
            let (back, spare) = std::sync::mpsc::channel::<Vec<u8>>();
            let mut sink = self.sink.take();
            let handle = std::thread::Builder::new()
                .name("clip-hashes".into())
                .spawn(move || {
                    let (mut span, mut diff) = (Hasher::new(), Hasher::new());
                    let mut digests = Vec::new();
                    let mut buf = Vec::new();
                    for m in rx {
                        match m {
                            HashMsg::Data(mut d) => {
                                span.update(&d);
                                diff.update(&d);
                                if sink.is_some() {
                                    buf.extend_from_slice(&d);
                                }
                                d.clear();
                                let _ = back.send(d);
                            }
                            HashMsg::EndSpan => {
                                let digest = std::mem::take(&mut span).finish();
                                digests.push(digest);
                                if let Some(sink) = &mut sink {
                                    sink(digest, std::mem::take(&mut buf));
                                }
                            }
                        }
                    }
                    (digests, diff.finish())
                })?;
            let handle = super::JoinOnDrop::new(handle);
            self.running = Some(HashThread { tx, spare, handle });
        }
        Ok(self.running.as_mut().expect("started above"))
    }

    pub(crate) fn send(&mut self, m: HashMsg) -> io::Result<()> {
        self.start()?
            .tx
            .send(m)
            .map_err(|_| io::Error::other("the hashing thread stopped"))
    }

    /// Sends the pending output, taking a returned buffer (or a new one) for what comes next.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let next = match self.start()?.spare.try_recv() {
            Ok(b) => b,
            Err(_) => Vec::with_capacity(OUT_BUF),
        };
        let full = std::mem::replace(&mut self.pending, next);
        self.send(HashMsg::Data(full))
    }

    /// Waits for the thread: (span digests, digest of all the output).
    pub(crate) fn finish(mut self) -> io::Result<(Vec<Digest>, Digest)> {
        self.flush()?;
        self.start()?;
        let t = self.running.take().expect("started above");
        drop(t.tx);
        t.handle
            .join()
            .map_err(|_| io::Error::other("the hashing thread panicked"))
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = self.fill_buf()?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: Read> io::BufRead for GzipIndexer<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.out_pos == self.out_len {
            self.out_len = self.produce()?;
            self.out_pos = 0;
        }
        Ok(&self.out_buf[self.out_pos..self.out_len])
    }

    fn consume(&mut self, amt: usize) {
        self.out_pos = (self.out_pos + amt).min(self.out_len);
    }
}
