//! Bulk mode: a workload that reads most of a layer gets the rest of it streamed.
//!
//! Lazy reads fetch what a program asks for, a run at a time: right when a start reads a small
//! part of an image, slow when it reads nearly all of it (a JVM's classpath, a tar of /usr, one
//! large model file), where the round trips add up and a single inflating stream is the floor of
//! every unpacker. Each layer's demand reads are watched; once they have covered
//! [`BulkConfig::share`] of the layer's spans, or read [`BulkConfig::sequential_bytes`] in the
//! layer's order, or an eighth of that inside a file with [`BulkConfig::large_file_bytes`] still
//! to come, the spans no tier has are streamed: from where the reads are, onwards, then
//! the start of the layer, in runs of [`BulkConfig::run_bytes`], [`BulkConfig::concurrency`]
//! range requests at once, each run inflated from its own checkpoint (so on every core), each
//! span verified and put in the cache like any other.
//!
//! Spans the shared tier has come from it (probed run by run), not from the registry.
//!
//! Demand reads go first: bulk runs take permits of a pool of their own and claim spans only
//! once they hold one, so a read never waits behind a queued bulk run, and a span a read has
//! claimed is left to it. Memory and disk stay within their caps, the tiers' own; a layer larger
//! than half of the node's cache is streamed at most a quarter of the cache ahead of what the
//! reads have used, so that it does not evict what they have not read yet.
//!
//! Part of [`super::LayerFetcher`]; uses its claims and runs.

use super::run::Permit;
use super::LayerFetcher;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;
use tokio::sync::Notify;

/// A layer told that its image streams another layer switches at this fraction of
/// [`BulkConfig::share`] (see [`LayerFetcher::sibling_streams`]).
const SIBLING_SHARE: f64 = 0.25;

/// Small forward skips that keep a read "in order" (tar headers, a file nobody read).
const IN_ORDER_GAP: u64 = 1 << 20;

/// A read in order inside a large file switches the layer after this fraction of
/// [`BulkConfig::sequential_bytes`] (4 MiB of the default 32 MiB).
const LARGE_FILE_IN_ORDER: u64 = 8;

/// What demand reads have asked of one layer.
pub(super) struct Demand {
    /// One bit per span read on demand.
    seen: Box<[AtomicU64]>,
    /// Spans read on demand (distinct), and their uncompressed bytes.
    count: AtomicUsize,
    bytes: AtomicU64,
    /// The spans read in order so far (the latest run of reads, each starting where the one
    /// before ended or a little past it).
    in_order: Mutex<Range<usize>>,
    /// One past the last span of the latest read.
    last: AtomicUsize,
    /// Whether the layer is streamed in bulk (it switches once).
    started: AtomicBool,
    /// Whether a workload reading this layer streams another layer of its image: the layer
    /// then switches at [`SIBLING_SHARE`] of [`BulkConfig::share`].
    sibling_streams: AtomicBool,
    /// Told of each read of spans not read before, and when the layer's fetcher goes.
    pub(super) progress: Arc<Notify>,
    /// Set when the bulk stream has ended.
    ended: Arc<tokio::sync::watch::Sender<bool>>,
    /// How often the stream has waited for the reads to catch up.
    parked: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Demand {
    pub(super) fn new(spans: usize) -> Self {
        Demand {
            seen: (0..spans.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            in_order: Mutex::new(0..0),
            last: AtomicUsize::new(0),
            started: AtomicBool::new(false),
            sibling_streams: AtomicBool::new(false),
            progress: Arc::new(Notify::new()),
            ended: Arc::new(tokio::sync::watch::channel(false).0),
            parked: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    /// Notes a read of `range` (`len(i)`: span `i`'s length); returns how many of its spans
    /// had not been read before.
    fn note(&self, range: Range<usize>, len: impl Fn(usize) -> u64) -> usize {
        let (mut new, mut bytes) = (0, 0);
        for i in range.clone() {
            if let Some(w) = self.seen.get(i / 64) {
                let bit = 1u64 << (i % 64);
                if w.fetch_or(bit, Relaxed) & bit == 0 {
                    new += 1;
                    bytes += len(i);
                }
            }
        }
        self.count.fetch_add(new, Relaxed);
        self.bytes.fetch_add(bytes, Relaxed);
        self.last.store(range.end, Relaxed);
        if new > 0 {
            self.progress.notify_waiters();
        }
        new
    }
}

impl LayerFetcher {
    /// Notes a demand read of spans `range`, and switches the layer to bulk streaming when the
    /// reads so far say the workload reads most of it.
    pub(super) fn note_demand(self: &Arc<Self>, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        self.demand.note(range.clone(), |i| self.span_len(i));
        let cfg = &self.fetcher.cfg.bulk;
        if !self.may_switch() {
            return;
        }
        let reason = if self.read_share_reached(cfg.share) {
            Some("share")
        } else if cfg.sequential_bytes > 0 && self.in_order_bytes(range) >= cfg.sequential_bytes {
            Some("sequential")
        } else if self.demand.sibling_streams.load(Relaxed)
            && self.read_share_reached(cfg.share * SIBLING_SHARE)
        {
            Some("image")
        } else {
            None
        };
        if let Some(reason) = reason {
            self.stream_rest(reason);
        }
    }

    /// Notes that a demand read of spans `range` has `file_ahead` bytes of its file after it. A
    /// program that has read a file in order this far, with at least
    /// [`BulkConfig::large_file_bytes`] of it to come, reads the rest (a model's weights, an
    /// archive): the layer switches after an eighth of [`BulkConfig::sequential_bytes`] read
    /// in order (reason `file`) instead of all of it.
    pub fn note_file_read(self: &Arc<Self>, range: Range<usize>, file_ahead: u64) {
        let cfg = &self.fetcher.cfg.bulk;
        if cfg.large_file_bytes == 0
            || cfg.sequential_bytes == 0
            || file_ahead < cfg.large_file_bytes
            || range.is_empty()
            || !self.may_switch()
        {
            return;
        }
        if self.in_order_bytes(range) >= cfg.sequential_bytes / LARGE_FILE_IN_ORDER {
            self.stream_rest("file");
        }
    }

    /// Whether the layer may still switch to bulk: not streamed yet, and large enough.
    fn may_switch(&self) -> bool {
        !self.demand.started.load(Relaxed)
            && self.index.uncompressed_size >= self.fetcher.cfg.bulk.min_layer_bytes
    }

    /// Whether demand reads have covered `share` of the layer's spans (never for 0).
    fn read_share_reached(&self, share: f64) -> bool {
        let read = self.demand.count.load(Relaxed);
        share > 0.0 && read > 0 && read as f64 >= share * self.index.spans.len() as f64
    }

    /// Tells the layer that a workload reading it streams another layer of its image in bulk
    /// (a tar of /usr reads every layer, each in an order of its own: only the first one read
    /// in order switches on [`BulkConfig::sequential_bytes`], the others would wait for
    /// [`BulkConfig::share`] of their spans, read a few KiB at a time). From now on the layer
    /// switches at [`SIBLING_SHARE`] of that share, and does at once if its reads have covered
    /// it.
    pub fn sibling_streams(self: &Arc<Self>) {
        if self.demand.sibling_streams.swap(true, Relaxed) {
            return;
        }
        if self.may_switch() && self.read_share_reached(self.fetcher.cfg.bulk.share * SIBLING_SHARE)
        {
            self.stream_rest("image");
        }
    }

    /// Extends the run of in-order reads with `range` (or starts a new one); returns its
    /// uncompressed bytes.
    fn in_order_bytes(&self, range: Range<usize>) -> u64 {
        let gap = self.spans_in(IN_ORDER_GAP);
        let mut run = self.demand.in_order.lock().expect("in-order lock");
        if range.start >= run.start && range.start <= run.end.saturating_add(gap) && !run.is_empty()
        {
            run.end = run.end.max(range.end);
        } else {
            *run = range;
        }
        let (start, _) = self.index.span_range(run.start);
        let (_, end) = self.index.span_range(run.end - 1);
        end - start
    }

    /// Bytes the demand reads have used of this layer (whole spans).
    pub fn demanded_bytes(&self) -> u64 {
        self.demand.bytes.load(Relaxed)
    }

    /// Whether the layer is streamed in bulk (or has been).
    pub fn bulk_started(&self) -> bool {
        self.demand.started.load(Relaxed)
    }

    /// Waits until the bulk stream has waited for the reads to catch up `n` times in all.
    pub async fn bulk_parked(&self, n: u64) {
        let mut rx = self.demand.parked.subscribe();
        let _ = rx.wait_for(|p| *p >= n).await;
    }

    /// Waits until the layer's bulk stream has ended (at once if there is none).
    pub async fn bulk_ended(&self) {
        if !self.bulk_started() {
            return;
        }
        let mut rx = self.demand.ended.subscribe();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// Streams the spans of the layer no tier has, in the background (see the module); `reason`
    /// names why, for the log and the metric. Returns the task (its result: the uncompressed
    /// bytes it fetched), or `None` when the layer is streamed already. The task ends early when
    /// the layer's last reader goes.
    pub fn stream_rest(
        self: &Arc<Self>,
        reason: &'static str,
    ) -> Option<tokio::task::JoinHandle<u64>> {
        self.stream(reason, Ahead::WaitForReads)
    }

    /// Fetches the whole layer now, nobody reading (eager mode, at pull time): like
    /// [`LayerFetcher::stream_rest`], but a layer larger than half the node's cache is fetched
    /// only up to a quarter of the cache (the rest is read lazily), since no reads will come to
    /// let the stream go on.
    pub fn fetch_whole(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<u64>> {
        self.stream("eager", Ahead::Stop)
    }

    fn stream(
        self: &Arc<Self>,
        reason: &'static str,
        over: Ahead,
    ) -> Option<tokio::task::JoinHandle<u64>> {
        if self.demand.started.swap(true, Relaxed) {
            return None;
        }
        crate::metrics::bulk_started(reason);
        tracing::info!(
            layer = %self.index.layer,
            reason,
            read_mib = self.demanded_bytes() >> 20,
            layer_mib = self.index.uncompressed_size >> 20,
            "streaming the rest of the layer: the workload reads most of it"
        );
        let weak = Arc::downgrade(self);
        let (progress, ended) = (self.demand.progress.clone(), self.demand.ended.clone());
        let parked = self.demand.parked.clone();
        Some(tokio::spawn(async move {
            let streamed = stream(weak, progress, parked, over).await;
            ended.send_replace(true);
            streamed
        }))
    }
}

/// What a stream does once it is as far ahead of the reads as the cache allows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// Waits for the reads to catch up.
    WaitForReads,
    /// Ends (nobody reads: eager mode).
    Stop,
}

/// The bulk stream of one layer (see [`LayerFetcher::stream_rest`]).
async fn stream(
    weak: Weak<LayerFetcher>,
    progress: Arc<Notify>,
    parked: Arc<tokio::sync::watch::Sender<u64>>,
    over: Ahead,
) -> u64 {
    let Some(me) = weak.upgrade() else { return 0 };
    let started = Instant::now();
    let layer = me.index.layer;
    let n = me.index.spans.len();
    let from = me.demand.last.load(Relaxed).min(n);
    let size = me.index.uncompressed_size;
    let cap = me.fetcher.cache.local_capacity();
    // A layer that fits twice in the node's cache is streamed whole; a larger one at most a
    // quarter of the cache ahead of the reads.
    let ahead = match cap {
        0 => u64::MAX,
        c if size <= c / 2 => u64::MAX,
        c => c / 4,
    };
    // Runs of whole spans of up to `run_bytes` (at least one span), from where the reads are.
    let per_run = me.fetcher.cfg.bulk.run_bytes;
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (a, b) in [(from, n), (0, from)] {
        let mut i = a;
        while i < b {
            let mut e = i + 1;
            let mut bytes = me.span_len(i);
            while e < b && bytes + me.span_len(e) <= per_run {
                bytes += me.span_len(e);
                e += 1;
            }
            runs.push(i..e);
            i = e;
        }
    }
    let permits = me.fetcher.bulk.clone();
    // The reads before the switch used spans the stream does not fetch again.
    let base = me.demanded_bytes();
    drop(me);
    let mut tasks = tokio::task::JoinSet::new();
    let (mut streamed, mut requests, mut failed) = (0u64, 0usize, 0usize);
    'runs: for run in runs {
        // Within `ahead` of what the reads have used.
        loop {
            let notified = progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(me) = weak.upgrade() else {
                break 'runs;
            };
            let used = me.demanded_bytes().saturating_sub(base);
            if streamed <= used.saturating_add(ahead) {
                break;
            }
            if over == Ahead::Stop {
                tracing::warn!(
                    %layer,
                    layer_mib = size >> 20,
                    cache_mib = cap >> 20,
                    "the layer is larger than half of the node's cache: fetched only its first \
                     quarter-cache; the rest is read lazily"
                );
                break 'runs;
            }
            drop(me);
            parked.send_modify(|n| *n += 1);
            notified.await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let Some(me) = weak.upgrade() else { break };
        // The shared tier first: spans another node fetched come from it, not the registry.
        if me.fetcher.cache.has_shared() {
            let probes = run.clone().filter(|&i| !me.is_local(i)).map(|i| {
                let key = me.key(i);
                let cache = me.fetcher.cache.clone();
                async move { cache.probe(&key).await }
            });
            futures_util::future::join_all(probes).await;
        }
        let pieces = me.runs_of(me.claims.claim_free(run, |i| me.is_local(i)), u64::MAX);
        if pieces.is_empty() {
            continue;
        }
        for p in &pieces {
            let (s, _) = me.index.span_range(p[0].0);
            let (_, e) = me.index.span_range(p[p.len() - 1].0);
            streamed += e - s;
        }
        requests += pieces.len();
        tasks.spawn(async move {
            let mut lost = 0;
            for piece in pieces {
                let want = piece.len();
                if me.clone().fetch_run(piece, Permit::Held).await < want {
                    lost += 1;
                }
            }
            drop(permit);
            lost
        });
        while let Some(r) = tasks.try_join_next() {
            failed += r.unwrap_or(1);
        }
        if failed >= 3 {
            tracing::warn!(%layer, "bulk streaming stopped after {failed} failed runs; reads go on fetching what they need");
            break;
        }
    }
    while let Some(r) = tasks.join_next().await {
        failed += r.unwrap_or(1);
    }
    crate::metrics::bulk_streamed(streamed);
    tracing::info!(
        %layer,
        mib = streamed >> 20,
        requests,
        failed,
        seconds = started.elapsed().as_secs_f64(),
        "bulk streaming of the layer ended"
    );
    streamed
}
