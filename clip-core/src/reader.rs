//! Lazy reads: a byte range of a layer's uncompressed stream, served span by span from the
//! first cache tier that has each span, else from the registry.
//!
//! A read maps to the spans covering it. Spans missing from every tier are claimed under a lock
//! (single flight: a span being fetched is never fetched twice; later readers wait on the first
//! fetch's result), grouped into runs of adjacent spans, and each run is one HTTP range request
//! for its compressed bytes, inflated in one go from the run's first checkpoint (its 32 KiB window
//! comes from the local windows blob or a small range read of the published one), cut at span
//! boundaries and verified against each span's digest before anything is cached or returned. A
//! run that fails verification (a byte corrupted in transit) is fetched again, a bounded number
//! of times. Fetches run as their own tasks, so a reader that gives up does not strand the
//! readers waiting on the same spans. Sequential reads trigger read-ahead of the next spans.

use crate::cache::TieredCache;
use crate::digest::Digest;
use crate::gzip::inflate_spans;
use crate::index::{format, LayerIndex};
use crate::reference::Reference;
use crate::registry::{Client, RegistryError};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("layer {layer} span {span}: {detail}")]
    Corrupt {
        layer: Digest,
        span: usize,
        detail: String,
    },
    #[error("read of {len} bytes at {offset} is outside the layer ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Shared(Arc<ReadError>),
}

type SpanResult = Option<Result<Bytes, Arc<ReadError>>>;

/// How a layer reader behaves. Defaults: 4-span runs, 4 spans of read-ahead, 3 attempts.
#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// Most spans fetched by one range request.
    pub max_run: usize,
    /// Spans fetched ahead of a sequential reader.
    pub readahead: usize,
    /// Attempts at a run whose bytes fail verification.
    pub verify_attempts: u32,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            max_run: 4,
            readahead: 4,
            verify_attempts: 3,
        }
    }
}

/// Reads one layer lazily.
pub struct LayerReader {
    client: Client,
    reference: Reference,
    index: Arc<LayerIndex>,
    /// The windows blob when it is on local disk (the index was built here).
    local_windows: Option<Bytes>,
    cache: Arc<TieredCache>,
    cfg: ReaderConfig,
    inflight: Mutex<HashMap<usize, watch::Receiver<SpanResult>>>,
    /// One past the last span of the previous read (for read-ahead).
    last_end: AtomicUsize,
}

impl LayerReader {
    pub fn new(
        client: Client,
        reference: Reference,
        index: Arc<LayerIndex>,
        local_windows: Option<Bytes>,
        cache: Arc<TieredCache>,
        cfg: ReaderConfig,
    ) -> Arc<Self> {
        Arc::new(LayerReader {
            client,
            reference,
            index,
            local_windows,
            cache,
            cfg,
            inflight: Mutex::new(HashMap::new()),
            last_end: AtomicUsize::new(usize::MAX),
        })
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// True if every span covering `[offset, offset + len)` is in memory or on local disk.
    pub fn is_local(&self, offset: u64, len: u64) -> bool {
        self.index
            .spans_covering(offset, len)
            .all(|i| self.cache.contains_local(&self.index.spans[i].digest))
    }

    /// Bytes `[offset, offset + len)` of the layer's uncompressed stream (clamped to its end).
    pub async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Bytes, ReadError> {
        self.read_within(offset, len, u64::MAX).await
    }

    /// Like [`LayerReader::read`], for a read inside a file whose bytes end at `end` in the
    /// layer: read-ahead never goes past the file (files are read one by one in an order
    /// unrelated to the tar order, so spans past the file are a guess, and usually wrong).
    pub async fn read_within(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        end: u64,
    ) -> Result<Bytes, ReadError> {
        let size = self.index.uncompressed_size;
        if offset > size {
            return Err(ReadError::OutOfRange { offset, len, size });
        }
        let len = len.min(size - offset);
        if len == 0 {
            return Ok(Bytes::new());
        }
        let spans = self.index.spans_covering(offset, len);
        let prev = self.last_end.swap(spans.end, Relaxed);
        // Sequential: this read starts where the last one ended (or re-reads its last span).
        let sequential = prev != usize::MAX
            && (prev == spans.start || prev == spans.start + 1 || prev == spans.end);
        if self.cfg.readahead > 0 && sequential && end > offset + len {
            let last = self
                .index
                .spans_covering(end.min(size) - 1, 1)
                .end
                .min(self.index.spans.len());
            let ahead = spans.end..(spans.end + self.cfg.readahead).min(last);
            if !ahead.is_empty() {
                let me = self.clone();
                tokio::spawn(async move {
                    let _ = me.claim_and_fetch(ahead, false).await;
                });
            }
        }
        let parts = self.spans(spans.clone()).await?;
        if parts.len() == 1 {
            let base = self.index.spans[spans.start].uncompressed;
            let s = (offset - base) as usize;
            return Ok(parts[0].slice(s..s + len as usize));
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let (start, end) = (offset, offset + len);
        for (i, part) in spans.zip(&parts) {
            let (ps, _) = self.index.span_range(i);
            let lo = start.max(ps) - ps;
            let hi = (end - ps).min(part.len() as u64);
            out.extend_from_slice(&part[lo as usize..hi as usize]);
        }
        Ok(out.freeze())
    }

    /// The verified bytes of each span in `range`.
    pub async fn spans(self: &Arc<Self>, range: Range<usize>) -> Result<Vec<Bytes>, ReadError> {
        let mut out: Vec<Option<Bytes>> = vec![None; range.len()];
        let mut missing = Vec::new();
        for i in range.clone() {
            match self.cache.get(&self.index.spans[i].digest).await {
                Some(b) => out[i - range.start] = Some(b),
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            let waits = self.claim(&missing, true);
            for (i, mut rx) in waits {
                let got = rx
                    .wait_for(|v| v.is_some())
                    .await
                    .map_err(|_| ReadError::Internal("span fetch was dropped".into()))?;
                match got.as_ref().expect("waited for Some") {
                    Ok(b) => out[i - range.start] = Some(b.clone()),
                    Err(e) => return Err(ReadError::Shared(e.clone())),
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every span filled"))
            .collect())
    }

    /// Fetches the spans of `range` that no tier has (read-ahead and background fill).
    pub async fn claim_and_fetch(
        self: &Arc<Self>,
        range: Range<usize>,
        wait: bool,
    ) -> Result<(), ReadError> {
        let missing: Vec<usize> = range
            .filter(|&i| !self.cache.contains_local(&self.index.spans[i].digest))
            .collect();
        let waits = self.claim(&missing, wait);
        for (_, mut rx) in waits {
            let got = rx
                .wait_for(|v| v.is_some())
                .await
                .map_err(|_| ReadError::Internal("span fetch was dropped".into()))?;
            if let Some(Err(e)) = got.as_ref() {
                return Err(ReadError::Shared(e.clone()));
            }
        }
        Ok(())
    }

    /// Background fill: fetches every span of the layer that no tier has, in order, one run at a
    /// time, yielding to demand reads (it waits while any demand fetch is in flight) and keeping
    /// to `bytes_per_sec` of registry traffic (0 = no cap). Stops early when `cancel` fires.
    /// Returns the compressed bytes it fetched.
    pub async fn fill(
        self: &Arc<Self>,
        bytes_per_sec: u64,
        cancel: CancellationToken,
    ) -> Result<u64, ReadError> {
        let started = Instant::now();
        let mut fetched = 0u64;
        let n = self.index.spans.len();
        let mut i = 0;
        while i < n {
            if cancel.is_cancelled() {
                break;
            }
            // Demand first: wait while demand fetches hold permits.
            while self.cache.fetch_permits.available_permits() < self.cache.fetch_permits_total() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(fetched),
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
            let run = i..(i + self.cfg.max_run.max(1)).min(n);
            i = run.end;
            let (cs, _) = self.index.span_compressed_range(run.start);
            let (_, ce) = self.index.span_compressed_range(run.end - 1);
            let missing = run
                .clone()
                .any(|k| !self.cache.contains_local(&self.index.spans[k].digest));
            if !missing {
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.claim_and_fetch(run, true) => r?,
            }
            fetched += ce - cs;
            if bytes_per_sec > 0 {
                let due = std::time::Duration::from_secs_f64(fetched as f64 / bytes_per_sec as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        Ok(fetched)
    }

    /// Claims unclaimed spans (starting fetches for them in runs) and returns receivers for all
    /// of `spans` (if `wait`) or none.
    fn claim(
        self: &Arc<Self>,
        spans: &[usize],
        wait: bool,
    ) -> Vec<(usize, watch::Receiver<SpanResult>)> {
        let mut waits = Vec::new();
        let mut mine: Vec<(usize, watch::Sender<SpanResult>)> = Vec::new();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            for &i in spans {
                if let Some(rx) = inflight.get(&i) {
                    if wait {
                        waits.push((i, rx.clone()));
                    }
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                inflight.insert(i, rx.clone());
                if wait {
                    waits.push((i, rx));
                }
                mine.push((i, tx));
            }
        }
        // Adjacent claimed spans become one run (one range request), up to max_run spans.
        let mut runs: Vec<Vec<(usize, watch::Sender<SpanResult>)>> = Vec::new();
        for (i, tx) in mine {
            match runs.last_mut() {
                Some(run)
                    if run.last().is_some_and(|(j, _)| *j + 1 == i)
                        && run.len() < self.cfg.max_run.max(1) =>
                {
                    run.push((i, tx))
                }
                _ => runs.push(vec![(i, tx)]),
            }
        }
        for run in runs {
            let me = self.clone();
            tokio::spawn(async move { me.fetch_run(run).await });
        }
        waits
    }

    async fn fetch_run(self: Arc<Self>, run: Vec<(usize, watch::Sender<SpanResult>)>) {
        let range = run[0].0..run[run.len() - 1].0 + 1;
        let permit = self.cache.fetch_permits.clone().acquire_owned().await;
        let started = Instant::now();
        let span = tracing::debug_span!("fetch_spans", layer = %self.index.layer, first = range.start, count = range.len());
        let result = self.fetch_verified(range.clone()).instrument(span).await;
        drop(permit);
        crate::metrics::span_fetch(started.elapsed().as_secs_f64(), range.len());
        match result {
            Ok(parts) => {
                for ((i, tx), data) in run.into_iter().zip(parts) {
                    self.cache.put(&self.index.spans[i].digest, &data).await;
                    let _ = tx.send(Some(Ok(data)));
                    self.inflight.lock().expect("inflight lock").remove(&i);
                }
            }
            Err(e) => {
                let e = Arc::new(e);
                for (i, tx) in run {
                    let _ = tx.send(Some(Err(e.clone())));
                    self.inflight.lock().expect("inflight lock").remove(&i);
                }
            }
        }
    }

    /// Fetches a run and verifies every span, retrying runs that fail verification.
    async fn fetch_verified(&self, range: Range<usize>) -> Result<Vec<Bytes>, ReadError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.fetch_once(range.clone()).await {
                Err(e @ ReadError::Corrupt { .. }) if attempt < self.cfg.verify_attempts => {
                    self.cache.stats.verify_failures.fetch_add(1, Relaxed);
                    tracing::warn!(layer = %self.index.layer, "refetching after a verification failure: {e}");
                }
                Err(e @ ReadError::Corrupt { .. }) => {
                    self.cache.stats.verify_failures.fetch_add(1, Relaxed);
                    return Err(e);
                }
                other => return other,
            }
        }
    }

    async fn window(&self, i: usize) -> Result<Vec<u8>, ReadError> {
        let s = &self.index.spans[i];
        if s.window_len == 0 {
            return Ok(Vec::new());
        }
        let (off, len) = (s.window_offset, u64::from(s.window_len));
        let raw = match &self.local_windows {
            Some(w) if off + len <= w.len() as u64 => w.slice(off as usize..(off + len) as usize),
            _ => {
                let b = self
                    .client
                    .get_blob_range(&self.reference, &self.index.windows.digest, off, len)
                    .await?;
                self.cache.stats.registry_requests.fetch_add(1, Relaxed);
                self.cache
                    .stats
                    .registry_bytes
                    .fetch_add(b.len() as u64, Relaxed);
                b
            }
        };
        // A wrong window cannot produce the right span digest, so the span check covers it.
        format::decode_window(&raw).map_err(|e| ReadError::Corrupt {
            layer: self.index.layer,
            span: i,
            detail: format!("window: {e}"),
        })
    }

    async fn fetch_once(&self, range: Range<usize>) -> Result<Vec<Bytes>, ReadError> {
        let ix = &self.index;
        let (cs, _) = ix.span_compressed_range(range.start);
        let (_, ce) = ix.span_compressed_range(range.end - 1);
        let window = self.window(range.start).await?;
        let compressed = self
            .client
            .get_blob_range(&self.reference, &ix.layer, cs, ce - cs)
            .await?;
        self.cache.stats.registry_requests.fetch_add(1, Relaxed);
        self.cache
            .stats
            .registry_bytes
            .fetch_add(compressed.len() as u64, Relaxed);
        let lens: Vec<usize> = range
            .clone()
            .map(|i| {
                let (s, e) = ix.span_range(i);
                (e - s) as usize
            })
            .collect();
        let bits = ix.spans[range.start].bits;
        let layer = ix.layer;
        let first = range.start;
        let started = Instant::now();
        let outs =
            tokio::task::spawn_blocking(move || inflate_spans(&compressed, bits, &window, &lens))
                .await
                .map_err(|e| ReadError::Internal(format!("inflate task: {e}")))?
                .map_err(|e| ReadError::Corrupt {
                    layer,
                    span: first,
                    detail: e.to_string(),
                })?;
        let inflated: u64 = outs.iter().map(|o| o.len() as u64).sum();
        crate::metrics::inflated(inflated, started.elapsed().as_secs_f64());
        self.cache.stats.inflated_bytes.fetch_add(inflated, Relaxed);
        let mut parts = Vec::with_capacity(range.len());
        for (i, out) in range.zip(outs) {
            let part = Bytes::from(out);
            let actual = Digest::of(&part);
            if actual != ix.spans[i].digest {
                return Err(ReadError::Corrupt {
                    layer,
                    span: i,
                    detail: format!(
                        "span digest mismatch: expected {}, got {actual}",
                        ix.spans[i].digest
                    ),
                });
            }
            parts.push(part);
        }
        Ok(parts)
    }
}
