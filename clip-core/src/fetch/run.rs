//! One run: a range request for adjacent claimed spans, inflated from the first span's
//! checkpoint as the bytes arrive, each span verified and handed to its waiters at once, a
//! failed verification retried from the first span not yet delivered, and the write-back to the
//! slower tiers after the waiters have their bytes, within the process's budget.
//!
//! Part of [`super::LayerFetcher`]; answers the claims of [`super::claims`], gets its window
//! from [`super::window`].

use super::claims::{Claimed, Event, SpanResult};
use super::window::WindowFrom;
use super::{LayerFetcher, ReadError};
use crate::cache::Reach;
use crate::digest::Digest;
use crate::index::Codec;
use bytes::Bytes;
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;
use tracing::Instrument;

/// The most compressed bytes of one run queued between the response and the inflater, charged
/// to the memory budget: the queue holds 64 chunks, each at most a read buffer of the body.
const COMPRESSED_QUEUED: u64 = 4 << 20;

/// Whether a run takes a demand permit or its caller already holds one of another pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Permit {
    /// A demand fetch: the run waits for a permit of the demand pool.
    Demand,
    /// The caller holds a permit (the prefetch pool's).
    Held,
}

/// A run's spans being delivered: the waiters not yet answered (in span order), the spans
/// delivered so far, and whether the last attempt's window came from this node's windows blob.
struct Delivery {
    waiters: std::collections::VecDeque<(usize, watch::Sender<SpanResult>)>,
    done: Vec<(usize, Bytes)>,
    local_window: bool,
    /// When the first span was handed out (for the `fetched` debug event).
    first_at: Option<Instant>,
}

impl LayerFetcher {
    /// Groups claimed spans (in index order) into runs of adjacent spans, each at most `limit`
    /// uncompressed bytes (at least one span): one range request per run, whatever the spans'
    /// sizes (denser where files are small).
    pub(super) fn runs_of(&self, claimed: Claimed, limit: u64) -> Vec<Claimed> {
        let len = |i: usize| {
            let (s, e) = self.index.span_range(i);
            e - s
        };
        let mut runs: Vec<(u64, Claimed)> = Vec::new();
        for (i, tx) in claimed {
            match runs.last_mut() {
                Some((bytes, run))
                    if run.last().is_some_and(|(j, _)| *j + 1 == i)
                        && bytes.saturating_add(len(i)) <= limit =>
                {
                    *bytes += len(i);
                    run.push((i, tx))
                }
                _ => runs.push((len(i), vec![(i, tx)])),
            }
        }
        runs.into_iter().map(|(_, r)| r).collect()
    }

    /// Fetches one run of claimed spans; takes a demand permit unless the caller holds one
    /// (prefetch holds a permit of its own pool). Each span goes to the memory tier and its
    /// waiters as soon as it is inflated and verified, while the rest of the run is still on
    /// the wire; a run that fails verification is fetched again from its first span not yet
    /// delivered.
    /// Returns how many of the run's spans were delivered.
    pub(super) async fn fetch_run(self: Arc<Self>, run: Claimed, permit: Permit) -> usize {
        let range = run[0].0..run[run.len() - 1].0 + 1;
        let permit = match permit {
            Permit::Held => None,
            Permit::Demand => self.fetcher.permits.clone().acquire_owned().await.ok(),
        };
        // The run's memory, reserved before a byte is requested: its spans inflated, the
        // compressed bytes on their way, the checkpoint it inflates from. A fetch waits here
        // while the process's budget is spent on fetches in flight.
        let spans_bytes = self.span_bytes(range.clone());
        let mut memory = crate::budget::process()
            .reserve(spans_bytes + self.run_overhead(range.clone()))
            .await;
        let started = Instant::now();
        crate::metrics::run_in_flight(1);
        let mut out = Delivery {
            waiters: run.into_iter().collect(),
            done: Vec::with_capacity(range.len()),
            local_window: false,
            first_at: None,
        };
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let from = range.start + out.done.len();
            let span = tracing::debug_span!("fetch_spans", layer = %self.index.layer, first = from, count = range.end - from);
            let r = self
                .fetch_from(from..range.end, &mut out)
                .instrument(span)
                .await;
            match r {
                Err(e @ ReadError::Corrupt { .. }) => {
                    self.fetcher.stats.verify_failures.fetch_add(1, Relaxed);
                    if out.local_window && !self.local_windows_bad.swap(true, Relaxed) {
                        tracing::warn!(layer = %self.index.layer, "a span read with this node's windows blob failed verification; using the published windows from now on");
                    }
                    if attempt >= self.fetcher.cfg.verify_attempts {
                        break Err(e);
                    }
                    tracing::warn!(layer = %self.index.layer, "refetching after a verification failure: {e}");
                }
                other => break other,
            }
        };
        crate::metrics::span_fetch(started.elapsed().as_secs_f64(), range.len());
        crate::metrics::run_in_flight(-1);
        tracing::debug!(
            layer = %self.index.layer,
            first = range.start,
            count = range.len(),
            first_ms = out.first_at.map_or(-1.0, |t| (t - started).as_secs_f64() * 1e3),
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            background = permit.is_none(),
            "fetched"
        );
        let Delivery { waiters, done, .. } = out;
        if let Err(e) = result {
            let e = Arc::new(e);
            for (i, tx) in waiters {
                let _ = tx.send(Some(Err(e.clone())));
                self.claims.answer(i, Event::Fail);
            }
        }
        self.claims.notify_answered();
        // Write-back after the reply, within the budget (held with the fetch permit so a slow
        // disk throttles fetching instead of piling up bytes).
        let delivered = done.len();
        if done.is_empty() {
            return 0;
        }
        // Until written back, the delivered spans are what this run holds.
        memory.shrink_to(done.iter().map(|(_, p)| p.len() as u64).sum());
        let kib: usize = done.iter().map(|(_, p)| p.len().div_ceil(1024)).sum();
        let kib = kib.clamp(1, self.fetcher.writeback_total()) as u32;
        let budget = self.fetcher.writeback.clone().acquire_many_owned(kib).await;
        drop(permit);
        for (i, data) in done {
            self.fetcher
                .cache
                .put_slow(&self.key(i), &data, Reach::Everywhere)
                .await;
        }
        drop(budget);
        drop(memory);
        delivered
    }

    /// The uncompressed bytes of spans `range`.
    fn span_bytes(&self, range: Range<usize>) -> u64 {
        range
            .map(|i| {
                let (s, e) = self.index.span_range(i);
                e - s
            })
            .sum()
    }

    /// What a run of spans `range` holds besides its spans: compressed bytes queued for the
    /// inflater (a bounded channel), and the checkpoint it inflates from, compressed and
    /// decoded.
    fn run_overhead(&self, range: Range<usize>) -> u64 {
        let (cs, _) = self.index.span_compressed_range(range.start);
        let (_, ce) = self.index.span_compressed_range(range.end - 1);
        let queued = ce.saturating_sub(cs).min(COMPRESSED_QUEUED);
        queued + 2 * u64::from(self.index.codec.max_window_len())
    }

    /// Span `i`, verified: to the memory tier, then its waiter, then its claim is released.
    fn deliver(&self, out: &mut Delivery, i: usize, data: Bytes) {
        self.fetcher.cache.put_fast(&self.key(i), &data);
        if out.waiters.front().is_some_and(|(j, _)| *j == i) {
            if let Some((_, tx)) = out.waiters.pop_front() {
                let _ = tx.send(Some(Ok(data.clone())));
            }
        }
        self.claims.answer(i, Event::Deliver);
        out.first_at.get_or_insert_with(Instant::now);
        out.done.push((i, data));
    }

    /// Fetches spans `range` in one range request and hands each to `deliver` (in order) as
    /// soon as it is inflated and verified. Spans delivered before an error stay delivered.
    async fn fetch_from(&self, range: Range<usize>, out: &mut Delivery) -> Result<(), ReadError> {
        let ix = &self.index;
        let (cs, _) = ix.span_compressed_range(range.start);
        let (_, ce) = ix.span_compressed_range(range.end - 1);
        let len = ce.saturating_sub(cs);
        let layer = ix.layer;
        tracing::debug!(layer = %layer, first = range.start, count = range.len(), bytes = len, "fetch");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        self.fetcher.stats.registry_requests.fetch_add(1, Relaxed);
        let data = self.source.read_range_into(&layer, cs, len, tx);
        let corrupt = |span: usize, detail: String| ReadError::Corrupt {
            layer,
            span,
            detail,
        };
        let inflate = async {
            let lens: Vec<usize> = range
                .clone()
                .map(|i| {
                    let (s, e) = ix.span_range(i);
                    (e - s) as usize
                })
                .collect();
            let mut inflater = match ix.codec {
                Codec::Gzip => {
                    // The window and the data travel concurrently: one round trip.
                    let (from, window) = self.window(range.start).await;
                    out.local_window = from == WindowFrom::LocalBlob;
                    let window = window?;
                    Decoder::Gzip(
                        crate::gzip::SpanInflater::new(ix.spans[range.start].bits, &window, &lens)
                            .map_err(|e| corrupt(range.start, e.to_string()))?,
                    )
                }
                Codec::ZstdFrames => {
                    let spans = range
                        .clone()
                        .zip(&lens)
                        .map(|(i, &len)| {
                            let (s, e) = ix.span_compressed_range(i);
                            (len, e - s)
                        })
                        .collect();
                    Decoder::Zstd(
                        crate::zstdchunked::FrameSpans::new(spans)
                            .map_err(|e| corrupt(range.start, e.to_string()))?,
                    )
                }
                Codec::ZstdCheckpoints => {
                    // Each span resumes at its own checkpoint (a checkpoint holds only what
                    // its span reads); they are read together while the data is on the wire.
                    let windows = futures_util::future::join_all(
                        range.clone().map(|i| self.window_compressed(i)),
                    )
                    .await;
                    out.local_window = windows.iter().any(|(f, _)| *f == WindowFrom::LocalBlob);
                    let mut spans = Vec::with_capacity(range.len());
                    for ((i, &len), (_, window)) in range.clone().zip(&lens).zip(windows) {
                        let (s, e) = ix.span_compressed_range(i);
                        spans.push((e - s, len, window?));
                    }
                    Decoder::Checkpoints(
                        crate::zstdseek::CheckpointSpans::new(spans)
                            .map_err(|e| corrupt(range.start, e.to_string()))?,
                    )
                }
            };
            let mut next = range.start;
            let mut received = 0u64;
            let mut ended = false;
            while !ended {
                // Inflate what has arrived: wait for a chunk, then take whatever else is
                // already there (up to 256 KiB), never waiting for more.
                let mut batch: Vec<Bytes> = Vec::new();
                let mut batch_len = 0usize;
                match rx.recv().await {
                    Some(c) => {
                        batch_len += c.len();
                        batch.push(c);
                    }
                    None => ended = true,
                }
                while !ended && batch_len < (256 << 10) {
                    match rx.try_recv() {
                        Ok(c) => {
                            batch_len += c.len();
                            batch.push(c);
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => ended = true,
                    }
                }
                if batch.is_empty() {
                    // The end: let empty spans complete.
                    batch.push(Bytes::new());
                }
                received += batch_len as u64;
                self.fetcher
                    .stats
                    .registry_bytes
                    .fetch_add(batch_len as u64, Relaxed);
                let started = Instant::now();
                let (back, outs) = tokio::task::spawn_blocking(move || {
                    let mut outs = Vec::new();
                    for c in &batch {
                        match inflater.feed(c) {
                            Ok(o) => outs.extend(o.into_iter().map(|o| {
                                let b = Bytes::from(o);
                                (Digest::of(&b), b)
                            })),
                            Err(e) => return (Err(e), outs),
                        }
                    }
                    (Ok(inflater), outs)
                })
                .await
                .map_err(|e| ReadError::Internal(format!("inflate task: {e}")))?;
                let inflated: u64 = outs.iter().map(|(_, o)| o.len() as u64).sum();
                crate::metrics::inflated(inflated, started.elapsed().as_secs_f64());
                self.fetcher
                    .stats
                    .inflated_bytes
                    .fetch_add(inflated, Relaxed);
                for (actual, part) in outs {
                    if actual != ix.spans[next].digest {
                        return Err(corrupt(
                            next,
                            format!(
                                "span digest mismatch: expected {}, got {actual}",
                                ix.spans[next].digest
                            ),
                        ));
                    }
                    self.deliver(out, next, part);
                    next += 1;
                }
                inflater = back.map_err(|e| corrupt(next, e.to_string()))?;
            }
            if next < range.end {
                return Err(corrupt(
                    next,
                    format!(
                        "{received} of {len} compressed bytes gave {} of {} spans",
                        next - range.start,
                        range.len()
                    ),
                ));
            }
            Ok(())
        };
        let (sent, inflated) = tokio::join!(data, inflate);
        // A request that failed explains a short answer better than the inflater can.
        match (sent, inflated) {
            (_, Ok(())) => Ok(()),
            (Err(e), Err(_)) => Err(e.into()),
            (Ok(()), Err(e)) => Err(e),
        }
    }
}

/// A run's decoder: inflate from a zran checkpoint, or zstd frames.
enum Decoder {
    Gzip(crate::gzip::SpanInflater),
    Zstd(crate::zstdchunked::FrameSpans),
    Checkpoints(crate::zstdseek::CheckpointSpans),
}

impl Decoder {
    fn feed(&mut self, input: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        match self {
            Decoder::Gzip(d) => d.feed(input).map_err(|e| e.to_string()),
            Decoder::Zstd(d) => d.feed(input).map_err(|e| e.to_string()),
            Decoder::Checkpoints(d) => d.feed(input).map_err(|e| e.to_string()),
        }
    }
}
