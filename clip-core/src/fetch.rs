//! Fetching spans that no cache tier has: claim, single flight, runs, range requests, inflate,
//! verify, then write-back.
//!
//! A [`Fetcher`] is shared by every layer reader of a process: it owns the fetch permits (how
//! many range requests run at once, and so how much compressed and inflated data is in flight),
//! the write-back budget and the registry/inflate counters. A [`LayerFetcher`] fetches the spans
//! of one layer from its [`BlobSource`]:
//!
//! 1. **claim**: missing spans are claimed under a lock; a span already claimed is waited on,
//!    never fetched twice (single flight).
//! 2. **runs**: adjacent claimed spans become one run, up to `max_run` spans: one range request.
//! 3. **fetch**: the run's compressed bytes, streamed, and the 32 KiB checkpoint window of its
//!    first span: cut from the end of the span before when a tier on this node has that one,
//!    else read from the local windows blob, else requested concurrently with the data (one
//!    round trip, not two).
//! 4. **inflate** as the bytes arrive, cut at span boundaries, and **verify** each span against
//!    its digest; a run that fails verification is fetched again from its first span not yet
//!    delivered (`verify_attempts`).
//! 5. **reply**: each verified span goes to the memory tier and to its waiters at once, while
//!    the rest of its run is still on the wire; **write-back** to the disk and shared tiers
//!    happens after the run, in the background, within a bounded budget of bytes.
//!
//! Guesses (files next to ones a program opened, [`LayerFetcher::speculate`]) and startup
//! profiles ([`LayerFetcher::prefetch_spans`]) fetch on a pool of their own and claim spans only
//! when they get a permit, so a demand read never waits behind them.
//!
//! Fetches run as their own tasks, so a reader that gives up does not strand the readers waiting
//! on the same spans.

use crate::cache::TieredCache;
use crate::digest::Digest;
use crate::index::{format, LayerIndex};
use crate::registry::RegistryError;
use crate::source::BlobSource;
use bytes::Bytes;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};
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

/// Spans claimed for one fetch, with the senders their waiters listen on.
type Claimed = Vec<(usize, watch::Sender<SpanResult>)>;

/// How spans are fetched. Defaults: 4 MiB runs, 3 attempts, fetches in flight sized from the
/// memory tier, 64 MiB of pending write-back.
#[derive(Clone, Debug)]
pub struct FetchConfig {
    /// Most uncompressed bytes (in whole spans, at least one) fetched by one demand range
    /// request.
    pub run_bytes: u64,
    /// Attempts at a run whose bytes fail verification.
    pub verify_attempts: u32,
    /// Range requests in flight at once, across every layer.
    pub concurrency: usize,
    /// Bytes of verified spans waiting to be written to the slower tiers; a fetch that would
    /// exceed it waits (holding its fetch permit) until writes drain.
    pub writeback_bytes: u64,
    /// Prefetch (startup profiles) range requests in flight at once, from a pool of their own:
    /// demand reads never wait for a prefetch permit.
    pub prefetch_concurrency: usize,
    /// Most uncompressed bytes (in whole spans) one prefetch range request covers.
    pub prefetch_run_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            run_bytes: 4 << 20,
            verify_attempts: 3,
            concurrency: concurrent_fetches(crate::cache::DEFAULT_MEMORY_BYTES),
            writeback_bytes: 64 << 20,
            prefetch_concurrency: 4,
            prefetch_run_bytes: 16 << 20,
        }
    }
}

impl FetchConfig {
    /// Defaults, with the fetches in flight sized for a memory tier of `memory_bytes`.
    pub fn for_memory(memory_bytes: u64) -> Self {
        FetchConfig {
            concurrency: concurrent_fetches(memory_bytes),
            ..Self::default()
        }
    }
}

/// Registry fetches in flight at once for a memory tier of `bytes`: each fetch holds up to a few
/// MiB of compressed and inflated data, so in-flight memory scales with the memory budget (one
/// fetch per 32 MiB of cap, 2 to 8).
pub fn concurrent_fetches(memory_bytes: u64) -> usize {
    (memory_bytes / (32 << 20)).clamp(2, 8) as usize
}

/// The write-back budget in KiB permits.
fn writeback_kib(cfg: &FetchConfig) -> usize {
    (cfg.writeback_bytes >> 10).clamp(1, Semaphore::MAX_PERMITS as u64) as usize
}

/// What the fetcher did.
#[derive(Default, Debug)]
pub struct FetchStats {
    pub registry_requests: AtomicU64,
    pub registry_bytes: AtomicU64,
    /// Window requests (each one a round trip a local windows blob would have saved).
    pub window_requests: AtomicU64,
    /// Windows cut from the end of the span before (no request).
    pub windows_from_spans: AtomicU64,
    pub inflated_bytes: AtomicU64,
    pub verify_failures: AtomicU64,
}

impl FetchStats {
    fn fetched(&self, bytes: usize) {
        self.registry_requests.fetch_add(1, Relaxed);
        self.registry_bytes.fetch_add(bytes as u64, Relaxed);
    }

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "registry_requests": self.registry_requests.load(Relaxed),
            "registry_bytes": self.registry_bytes.load(Relaxed),
            "window_requests": self.window_requests.load(Relaxed),
            "windows_from_spans": self.windows_from_spans.load(Relaxed),
            "inflated_bytes": self.inflated_bytes.load(Relaxed),
            "verify_failures": self.verify_failures.load(Relaxed),
        })
    }
}

/// A layer's windows blob on this node (its index was built here): in memory, or a file read by
/// range, so a node holding many built indexes does not hold their windows in memory.
#[derive(Clone)]
pub enum LocalWindows {
    Memory(Bytes),
    File(Arc<std::fs::File>, u64),
}

impl From<Bytes> for LocalWindows {
    fn from(b: Bytes) -> Self {
        LocalWindows::Memory(b)
    }
}

impl LocalWindows {
    /// Bytes `[off, off + len)`, or `None` when they are not all there (the published blob is
    /// read instead; a damaged window cannot produce the spans' digests either way).
    async fn read(&self, off: u64, len: u64) -> Option<Bytes> {
        match self {
            LocalWindows::Memory(w) => {
                let end = off.checked_add(len).filter(|&e| e <= w.len() as u64)?;
                Some(w.slice(off as usize..end as usize))
            }
            LocalWindows::File(f, size) => {
                off.checked_add(len).filter(|e| e <= size)?;
                let f = f.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, off)
                        .ok()
                        .map(|_| Bytes::from(buf))
                })
                .await
                .ok()
                .flatten()
            }
        }
    }
}

/// Why spans are fetched ahead of a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Background {
    /// A startup profile lists them.
    Profile,
    /// A guess (see [`LayerFetcher::speculate`]).
    Guess,
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

/// Fetch permits, write-back budget and counters shared by every layer of a process.
pub struct Fetcher {
    cache: Arc<TieredCache>,
    cfg: FetchConfig,
    permits: Arc<Semaphore>,
    /// Permits of prefetch fetches.
    background: Arc<Semaphore>,
    /// Write-back budget in KiB.
    writeback: Arc<Semaphore>,
    pub stats: FetchStats,
    /// The live fetcher of each layer (by layer, windows blob and source): every reader of a
    /// layer from the same repository shares one, so a span is in flight once whoever asks (a
    /// prefetch started at pull time and the mount's demand reads, say).
    layers: Mutex<HashMap<(Digest, Digest, String), std::sync::Weak<LayerFetcher>>>,
}

impl Fetcher {
    pub fn new(cache: Arc<TieredCache>, cfg: FetchConfig) -> Arc<Self> {
        let kib = writeback_kib(&cfg);
        Arc::new(Fetcher {
            cache,
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            background: Arc::new(Semaphore::new(cfg.prefetch_concurrency.max(1))),
            writeback: Arc::new(Semaphore::new(kib)),
            cfg,
            stats: FetchStats::default(),
            layers: Mutex::new(HashMap::new()),
        })
    }

    pub fn cache(&self) -> &Arc<TieredCache> {
        &self.cache
    }

    /// A fetcher for one layer, reading from `source`; `local_windows` is the layer's windows
    /// blob when it is on this node (the index was built here).
    pub fn layer(
        self: &Arc<Self>,
        source: Arc<dyn BlobSource>,
        index: Arc<LayerIndex>,
        local_windows: Option<LocalWindows>,
    ) -> Arc<LayerFetcher> {
        let key = source
            .shared_origin()
            .map(|o| (index.layer, index.windows.digest, o));
        let mut layers = self.layers.lock().expect("layers lock");
        if let Some(live) = key
            .as_ref()
            .and_then(|k| layers.get(k))
            .and_then(std::sync::Weak::upgrade)
        {
            return live;
        }
        let f = Arc::new(LayerFetcher {
            shared: self.clone(),
            source,
            local_windows,
            local_windows_bad: std::sync::atomic::AtomicBool::new(false),
            profiled: (0..index.spans.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            inflight: Mutex::new(HashMap::new()),
            finished: tokio::sync::Notify::new(),
            index,
        });
        if let Some(key) = key {
            if layers.len() >= 1024 {
                layers.retain(|_, w| w.strong_count() > 0);
            }
            layers.insert(key, Arc::downgrade(&f));
        }
        f
    }

    /// True while no fetch holds a permit (background work yields to demand).
    fn idle(&self) -> bool {
        self.permits.available_permits() >= self.cfg.concurrency.max(1)
    }

    /// Waits until every write-back started so far has finished.
    pub async fn drain_writeback(&self) {
        let total = self.writeback_total();
        if let Ok(p) = self.writeback.acquire_many(total as u32).await {
            drop(p);
        }
    }

    fn writeback_total(&self) -> usize {
        writeback_kib(&self.cfg)
    }
}

/// Fetches the spans of one layer; single flight per span.
pub struct LayerFetcher {
    shared: Arc<Fetcher>,
    source: Arc<dyn BlobSource>,
    index: Arc<LayerIndex>,
    local_windows: Option<LocalWindows>,
    /// Set once a run whose window came from `local_windows` failed verification: from then on
    /// the published windows are used (the local file is not hashed before use).
    local_windows_bad: std::sync::atomic::AtomicBool,
    /// One bit per span: a startup profile being replayed on this layer lists the span, so what
    /// the program reads around it is known and need not be guessed.
    profiled: Box<[AtomicU64]>,
    inflight: Mutex<HashMap<usize, watch::Receiver<SpanResult>>>,
    /// Signalled whenever fetches finish (see [`LayerFetcher::settled`]).
    finished: tokio::sync::Notify,
}

impl LayerFetcher {
    /// Waits until no fetch of this layer is in flight (claims made so far have completed).
    pub async fn settled(&self) {
        loop {
            let notified = self.finished.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inflight.lock().expect("inflight lock").is_empty() {
                return;
            }
            notified.await;
        }
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// True if a startup profile replayed on this layer lists any span of `range`.
    pub fn profiled(&self, range: Range<usize>) -> bool {
        range.into_iter().any(|i| {
            self.profiled
                .get(i / 64)
                .is_some_and(|w| w.load(Relaxed) & (1 << (i % 64)) != 0)
        })
    }

    fn mark_profiled(&self, spans: &[usize]) {
        for &i in spans {
            if let Some(w) = self.profiled.get(i / 64) {
                w.fetch_or(1 << (i % 64), Relaxed);
            }
        }
    }

    /// Whole spans in `bytes` of this layer (at least one).
    pub fn spans_in(&self, bytes: u64) -> usize {
        (bytes / self.index.span_size.max(1)).max(1) as usize
    }

    fn key(&self, i: usize) -> &Digest {
        &self.index.spans[i].digest
    }

    /// True if a tier on this node has span `i`.
    pub fn is_local(&self, i: usize) -> bool {
        self.shared.cache.contains_local(self.key(i))
    }

    /// The verified bytes of each span in `range`: from the cache, else fetched.
    pub async fn spans(self: &Arc<Self>, range: Range<usize>) -> Result<Vec<Bytes>, ReadError> {
        self.spans_with(range, 0).await
    }

    /// [`LayerFetcher::spans`]; when some span is missing, the fetch also takes the spans that
    /// follow up to `locality` bytes past the first one, in the same request (neighbouring files
    /// of the same directory are often read next), without waiting for them; not where a
    /// startup profile lists the read (it knows what comes next).
    pub async fn spans_with(
        self: &Arc<Self>,
        range: Range<usize>,
        locality: u64,
    ) -> Result<Vec<Bytes>, ReadError> {
        let mut out: Vec<Option<Bytes>> = vec![None; range.len()];
        let mut missing = Vec::new();
        for i in range.clone() {
            match self.shared.cache.get(self.key(i)).await {
                Some(b) => out[i - range.start] = Some(b),
                None => missing.push(i),
            }
        }
        if !missing.is_empty() && !self.profiled(range.clone()) {
            missing.extend(range.end..self.locality_end(range.clone(), locality));
        }
        for (i, mut rx) in self.claim(&missing, true) {
            if !range.contains(&i) {
                continue;
            }
            let got = rx
                .wait_for(|v| v.is_some())
                .await
                .map_err(|_| ReadError::Internal("span fetch was dropped".into()))?;
            match got.as_ref() {
                Some(Ok(b)) => out[i - range.start] = Some(b.clone()),
                Some(Err(e)) => return Err(ReadError::Shared(e.clone())),
                None => return Err(ReadError::Internal("span fetch gave nothing".into())),
            }
        }
        out.into_iter()
            .map(|b| b.ok_or_else(|| ReadError::Internal("span not filled".into())))
            .collect()
    }

    /// The end of `range` extended by the spans that follow it, while they start less than
    /// `locality` bytes past its first span and no local tier has them.
    pub fn locality_end(&self, range: Range<usize>, locality: u64) -> usize {
        let base = self.index.span_range(range.start).0;
        let mut k = range.end;
        while k < self.index.spans.len()
            && self.index.span_range(k).0 < base.saturating_add(locality)
            && !self.is_local(k)
        {
            k += 1;
        }
        k
    }

    /// Starts fetches of the spans of `range` that no local tier has, without waiting.
    pub fn prefetch(self: &Arc<Self>, range: Range<usize>) {
        let missing: Vec<usize> = range.filter(|&i| !self.is_local(i)).collect();
        self.claim(&missing, false);
    }

    /// Fetches the spans of `range` that no local tier has and waits for them.
    pub async fn fetch_missing(self: &Arc<Self>, range: Range<usize>) -> Result<(), ReadError> {
        let missing: Vec<usize> = range.filter(|&i| !self.is_local(i)).collect();
        for (_, mut rx) in self.claim(&missing, true) {
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
            while !self.shared.idle() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(fetched),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            let run = i..(i + self.spans_in(self.shared.cfg.run_bytes)).min(n);
            i = run.end;
            if run.clone().all(|k| self.is_local(k)) {
                continue;
            }
            let (cs, _) = self.index.span_compressed_range(run.start);
            let (_, ce) = self.index.span_compressed_range(run.end - 1);
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.fetch_missing(run) => r?,
            }
            fetched += ce - cs;
            if bytes_per_sec > 0 {
                let due = Duration::from_secs_f64(fetched as f64 / bytes_per_sec as f64);
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
        let mut mine: Claimed = Vec::new();
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
        for run in self.runs_of(mine, self.shared.cfg.run_bytes) {
            let me = self.clone();
            tokio::spawn(async move { me.fetch_run(run, false).await });
        }
        waits
    }

    /// Groups claimed spans (in index order) into runs of adjacent spans, each at most `limit`
    /// uncompressed bytes (at least one span): one range request per run, whatever the spans'
    /// sizes (denser where files are small).
    fn runs_of(&self, claimed: Claimed, limit: u64) -> Vec<Claimed> {
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

    /// Fetches `spans` ahead of need (a startup profile), in runs of up to `prefetch_run`
    /// adjacent spans ordered by first use, on the prefetch pool. A run claims its spans only
    /// once it holds a permit, so a demand read never waits behind queued prefetch; spans a
    /// demand read already claimed are left to it. Returns when every run has finished; the
    /// result is the number of runs fetched (errors are logged, prefetch is only a hint).
    pub async fn prefetch_spans(self: &Arc<Self>, spans: &[usize]) -> usize {
        self.mark_profiled(spans);
        let wanted: Vec<usize> = spans
            .iter()
            .copied()
            .filter(|&i| i < self.index.spans.len() && !self.is_local(i))
            .collect();
        let runs = crate::profile::runs(&wanted, self.spans_in(self.shared.cfg.prefetch_run_bytes));
        self.fetch_in_background(runs, Background::Profile).await
    }

    /// Fetches `spans` on a guess (files next to ones a program opened, say), on the prefetch
    /// pool: a run claims its spans only once it holds a prefetch permit, so a demand read never
    /// waits behind queued speculation, and spans a demand read or a profile already claimed
    /// are left to it; spans a startup profile lists are left to the profile. Returns the runs
    /// fetched.
    pub async fn speculate(self: &Arc<Self>, spans: &[usize]) -> usize {
        let wanted: Vec<usize> = spans
            .iter()
            .copied()
            .filter(|&i| {
                i < self.index.spans.len() && !self.is_local(i) && !self.profiled(i..i + 1)
            })
            .collect();
        let runs = crate::profile::runs(&wanted, self.spans_in(self.shared.cfg.prefetch_run_bytes));
        self.fetch_in_background(runs, Background::Guess).await
    }

    /// Fetches `runs` in order on the prefetch pool: each claims its spans only once it holds a
    /// permit (spans claimed by then, or local, are left out; the rest go one request per
    /// piece). Returns when every run has finished; the result is the number of runs fetched.
    async fn fetch_in_background(
        self: &Arc<Self>,
        runs: Vec<Range<usize>>,
        why: Background,
    ) -> usize {
        let mut tasks = tokio::task::JoinSet::new();
        let mut fetched = 0;
        for run in runs {
            let Ok(permit) = self.shared.background.clone().acquire_owned().await else {
                break;
            };
            let pieces = self.runs_of(self.claim_free(run), u64::MAX);
            if pieces.is_empty() {
                continue;
            }
            fetched += 1;
            if why == Background::Profile {
                crate::metrics::prefetched(pieces.iter().map(Vec::len).sum());
            }
            let me = self.clone();
            tasks.spawn(async move {
                for piece in pieces {
                    let delivered = me.clone().fetch_run(piece, true).await;
                    if why == Background::Guess {
                        // Counted once fetched: the count tells when a guess has landed.
                        crate::metrics::speculated(delivered);
                    }
                }
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
        fetched
    }

    /// Claims the spans of `run` that are neither in flight nor local.
    fn claim_free(&self, run: Range<usize>) -> Claimed {
        let mut inflight = self.inflight.lock().expect("inflight lock");
        let mut mine = Vec::new();
        for i in run {
            if inflight.contains_key(&i) || self.is_local(i) {
                continue;
            }
            let (tx, rx) = watch::channel(None);
            inflight.insert(i, rx);
            mine.push((i, tx));
        }
        mine
    }

    /// Fetches one run of claimed spans; takes a demand permit unless the caller holds one
    /// (prefetch holds a permit of its own pool). Each span goes to the memory tier and its
    /// waiters as soon as it is inflated and verified, while the rest of the run is still on
    /// the wire; a run that fails verification is fetched again from its first span not yet
    /// delivered.
    /// Returns how many of the run's spans were delivered.
    async fn fetch_run(self: Arc<Self>, run: Claimed, permit_held: bool) -> usize {
        let range = run[0].0..run[run.len() - 1].0 + 1;
        let permit = match permit_held {
            true => None,
            false => self.shared.permits.clone().acquire_owned().await.ok(),
        };
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
                    self.shared.stats.verify_failures.fetch_add(1, Relaxed);
                    if out.local_window && !self.local_windows_bad.swap(true, Relaxed) {
                        tracing::warn!(layer = %self.index.layer, "a span read with this node's windows blob failed verification; using the published windows from now on");
                    }
                    if attempt >= self.shared.cfg.verify_attempts {
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
            background = permit_held,
            "fetched"
        );
        let Delivery { waiters, done, .. } = out;
        if let Err(e) = result {
            let e = Arc::new(e);
            for (i, tx) in waiters {
                let _ = tx.send(Some(Err(e.clone())));
                self.inflight.lock().expect("inflight lock").remove(&i);
            }
        }
        self.finished.notify_waiters();
        // Write-back after the reply, within the budget (held with the fetch permit so a slow
        // disk throttles fetching instead of piling up bytes).
        let delivered = done.len();
        if done.is_empty() {
            return 0;
        }
        let kib: usize = done.iter().map(|(_, p)| p.len().div_ceil(1024)).sum();
        let kib = kib.clamp(1, self.shared.writeback_total()) as u32;
        let budget = self.shared.writeback.clone().acquire_many_owned(kib).await;
        drop(permit);
        for (i, data) in done {
            self.shared.cache.put_slow(self.key(i), &data, false).await;
        }
        drop(budget);
        delivered
    }

    /// Span `i`, verified: to the memory tier, then its waiter, then its claim is released.
    fn deliver(&self, out: &mut Delivery, i: usize, data: Bytes) {
        self.shared.cache.put_fast(self.key(i), &data);
        if out.waiters.front().is_some_and(|(j, _)| *j == i) {
            if let Some((_, tx)) = out.waiters.pop_front() {
                let _ = tx.send(Some(Ok(data.clone())));
            }
        }
        self.inflight.lock().expect("inflight lock").remove(&i);
        out.first_at.get_or_insert_with(Instant::now);
        out.done.push((i, data));
    }

    /// The 32 KiB checkpoint window of span `i`, inflated: the end of span `i - 1` when a tier
    /// has it (no registry request at all), else from the local windows blob (unless it
    /// proved damaged), else one small range read of the published one (concurrent with the
    /// span's data request). `from_local` tells whether it came from the local windows blob.
    async fn window(&self, i: usize, from_local: &mut bool) -> Result<Vec<u8>, ReadError> {
        *from_local = false;
        let s = &self.index.spans[i];
        if s.window_len == 0 {
            return Ok(Vec::new());
        }
        if let Some(w) = self.window_from_previous(i).await {
            return Ok(w);
        }
        let (off, len) = (s.window_offset, u64::from(s.window_len));
        let mut raw = None;
        if let Some(local) = &self.local_windows {
            if !self.local_windows_bad.load(Relaxed) {
                raw = local.read(off, len).await;
            }
        }
        *from_local = raw.is_some();
        let raw = match raw {
            Some(w) => w,
            None => {
                let b = self
                    .source
                    .read_range(&self.index.windows.digest, off, len)
                    .await?;
                self.shared.stats.fetched(b.len());
                self.shared.stats.window_requests.fetch_add(1, Relaxed);
                b
            }
        };
        // A wrong window cannot produce the right span digests, so the span check covers it.
        format::decode_window(&raw).map_err(|e| ReadError::Corrupt {
            layer: self.index.layer,
            span: i,
            detail: format!("window: {e}"),
        })
    }

    /// Span `i`'s window cut from the end of span `i - 1`, if a tier has that span (one on
    /// this node, or the shared tier: a window is the verified tail of the span before it, so
    /// the tiers hold every window of the spans they hold) and it holds a whole window.
    async fn window_from_previous(&self, i: usize) -> Option<Vec<u8>> {
        let prev = i.checked_sub(1)?;
        let local = self.is_local(prev);
        if !local && !self.shared.cache.has_shared() {
            return None;
        }
        let (ps, pe) = self.index.span_range(prev);
        let need = crate::gzip::WINDOW_SIZE as u64;
        if pe - ps < need && ps > 0 {
            return None;
        }
        // A probe: a miss here is not a miss of a span anyone asked for.
        let data = self.shared.cache.probe(self.key(prev)).await?;
        let keep = (need as usize).min(data.len());
        self.shared.stats.windows_from_spans.fetch_add(1, Relaxed);
        Some(data[data.len() - keep..].to_vec())
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
        self.shared.stats.registry_requests.fetch_add(1, Relaxed);
        let data = self.source.read_range_into(&layer, cs, len, tx);
        let corrupt = |span: usize, detail: String| ReadError::Corrupt {
            layer,
            span,
            detail,
        };
        let inflate = async {
            // The window and the data travel concurrently: one round trip.
            let window = self.window(range.start, &mut out.local_window).await?;
            let lens: Vec<usize> = range
                .clone()
                .map(|i| {
                    let (s, e) = ix.span_range(i);
                    (e - s) as usize
                })
                .collect();
            let mut inflater =
                crate::gzip::SpanInflater::new(ix.spans[range.start].bits, &window, &lens)
                    .map_err(|e| corrupt(range.start, e.to_string()))?;
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
                self.shared
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
                self.shared
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
