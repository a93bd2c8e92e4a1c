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
//!
//! Files, one concern each: this one holds the configuration, the per-process [`Fetcher`] and
//! the demand path ([`LayerFetcher::spans`]); [`claims`] is single flight (a state machine);
//! [`run`] is one run's request, inflate, verify, delivery and write-back; [`window`] finds a
//! run's checkpoint window; [`background`] is work nobody waits for (profiles, guesses, fill).
//!
//! Uses the cache tiers, the index, the gzip inflater and a blob source; nothing above it (the
//! reader, the filesystem) is known here.

mod background;
mod bulk;
mod claims;
mod promote;
mod run;
mod window;

use crate::cache::{SpanKey, TieredCache};
use crate::digest::Digest;
use crate::index::{LayerIndex, LocalWindows};
use crate::registry::RegistryError;
use crate::source::BlobSource;
use bytes::Bytes;
use claims::{Claims, Wait};
use run::Permit;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

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
    /// When a layer switches to bulk streaming (see [`bulk`]).
    pub bulk: BulkConfig,
}

/// Bulk mode: once a workload is seen to read most of a layer, the rest of the layer is
/// streamed at the link's full rate, in parallel range requests inflated on every core. Defaults:
/// after 40 % of a layer's spans, 32 MiB read in order, or 4 MiB read in order inside a file
/// with 64 MiB or more still to come; layers of 16 MiB or more; 8 MiB runs, 4 in flight.
#[derive(Clone, Debug)]
pub struct BulkConfig {
    /// The share of a layer's spans read on demand after which the rest is streamed (0: never).
    pub share: f64,
    /// Bytes of a layer read in order (one large file, or files in the layer's order) after
    /// which the rest is streamed (0: never).
    pub sequential_bytes: u64,
    /// A read in order inside a file with at least this many bytes of it still to come switches
    /// the layer once 4 MiB have been read in order (a model's weights, an archive: the program
    /// reads the rest); 0: never.
    pub large_file_bytes: u64,
    /// Layers smaller than this (uncompressed) are never streamed in bulk.
    pub min_layer_bytes: u64,
    /// Uncompressed bytes (whole spans) per bulk range request.
    pub run_bytes: u64,
    /// Bulk range requests in flight at once, across every layer (a pool of their own: demand
    /// reads never wait for one).
    pub concurrency: usize,
}

impl Default for BulkConfig {
    fn default() -> Self {
        BulkConfig {
            share: 0.4,
            sequential_bytes: 32 << 20,
            large_file_bytes: 64 << 20,
            min_layer_bytes: 16 << 20,
            run_bytes: 8 << 20,
            concurrency: 4,
        }
    }
}

impl BulkConfig {
    /// Never switches.
    pub fn off() -> Self {
        BulkConfig {
            share: 0.0,
            sequential_bytes: 0,
            large_file_bytes: 0,
            ..Self::default()
        }
    }
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
            bulk: BulkConfig::default(),
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

/// Fetch permits, write-back budget and counters shared by every layer of a process.
pub struct Fetcher {
    cache: Arc<TieredCache>,
    cfg: FetchConfig,
    permits: Arc<Semaphore>,
    /// Permits of prefetch fetches.
    background: Arc<Semaphore>,
    /// Permits of bulk fetches.
    bulk: Arc<Semaphore>,
    /// Write-back budget in KiB.
    writeback: Arc<Semaphore>,
    pub stats: FetchStats,
    /// The live fetcher of each layer (by layer, windows blob and source, for one span table):
    /// every reader of a layer from the same repository shares one, so a span is in flight once whoever asks (a
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
            bulk: Arc::new(Semaphore::new(cfg.bulk.concurrency.max(1))),
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
        // Only a fetcher with the same span table: two indexes of one layer (a published one and
        // the one this node built in its place) may share the windows blob and still name other
        // spans, and a reader must verify against the index it was given.
        if let Some(live) = key
            .as_ref()
            .and_then(|k| layers.get(k))
            .and_then(std::sync::Weak::upgrade)
            .filter(|live| Arc::ptr_eq(&live.index, &index) || live.index.same_spans(&index))
        {
            return live;
        }
        let f = Arc::new(LayerFetcher {
            fetcher: self.clone(),
            source,
            local_windows,
            local_windows_bad: std::sync::atomic::AtomicBool::new(false),
            profiled: (0..index.spans.len().div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            claims: Claims::default(),
            demand: bulk::Demand::new(index.spans.len()),
            promotion: promote::Promotion::new(),
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
    /// The process's fetcher: permits, write-back budget, counters.
    fetcher: Arc<Fetcher>,
    source: Arc<dyn BlobSource>,
    index: Arc<LayerIndex>,
    local_windows: Option<LocalWindows>,
    /// Set once a run whose window came from `local_windows` failed verification: from then on
    /// the published windows are used (the local file is not hashed before use).
    local_windows_bad: std::sync::atomic::AtomicBool,
    /// One bit per span: a startup profile being replayed on this layer lists the span, so what
    /// the program reads around it is known and need not be guessed.
    profiled: Box<[AtomicU64]>,
    claims: Claims,
    /// What demand reads have asked of the layer, and whether it is streamed in bulk.
    demand: bulk::Demand,
    /// Local read-ahead, disk to memory.
    promotion: promote::Promotion,
}

impl Drop for LayerFetcher {
    fn drop(&mut self) {
        // A bulk stream waiting for the reads to catch up ends with the layer's last reader.
        self.demand.progress.notify_waiters();
    }
}

impl LayerFetcher {
    /// Waits until no fetch of this layer is in flight (claims made so far have completed).
    pub async fn settled(&self) {
        self.claims.settled().await
    }

    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// Whole spans in `bytes` of this layer (at least one). A zstd:chunked index has no span
    /// size (a span is a file's chunk): its spans' mean length stands in.
    pub fn spans_in(&self, bytes: u64) -> usize {
        (bytes / self.index.typical_span()).max(1) as usize
    }

    /// Span `i` as the cache knows it: bound to this layer, so only bytes of this layer are
    /// ever served for it, whatever digest the index names.
    fn key(&self, i: usize) -> SpanKey {
        SpanKey::new(self.index.layer, self.index.spans[i].digest)
    }

    /// The uncompressed length of span `i`, as the index states it.
    fn span_len(&self, i: usize) -> u64 {
        let (s, e) = self.index.span_range(i);
        e - s
    }

    /// True if a tier on this node has span `i`.
    pub fn is_local(&self, i: usize) -> bool {
        self.fetcher.cache.contains_local(&self.key(i))
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
            match self.fetcher.cache.get(&self.key(i)).await {
                // The bytes are this layer's and hash to the entry's digest, but an index can
                // name one span's digest for another span: only bytes of the entry's length
                // are its bytes.
                Some(b) if b.len() as u64 == self.span_len(i) => out[i - range.start] = Some(b),
                _ => missing.push(i),
            }
        }
        self.note_demand(range.clone());
        if !missing.is_empty() && !self.profiled(range.clone()) {
            missing.extend(range.end..self.locality_end(range.clone(), locality));
        }
        for (i, rx) in self.claim(&missing, Wait::ForAll) {
            if range.contains(&i) {
                out[i - range.start] = Some(claims::answer_of(rx).await?);
            }
        }
        out.into_iter()
            .map(|b| b.ok_or_else(|| ReadError::Internal("span not filled".into())))
            .collect()
    }

    /// The verified bytes of each span in `range` if the local tiers have them all, read on
    /// this thread (blocking on a local disk read if need be); `None` otherwise (nothing is
    /// fetched: [`LayerFetcher::spans_with`] then does). For FUSE worker threads.
    pub fn spans_now(self: &Arc<Self>, range: Range<usize>) -> Option<Vec<Bytes>> {
        let mut out = Vec::with_capacity(range.len());
        for i in range.clone() {
            match self.fetcher.cache.get_now(&self.key(i)) {
                Some(b) if b.len() as u64 == self.span_len(i) => out.push(b),
                _ => return None,
            }
        }
        self.note_demand(range);
        Some(out)
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
        self.claim(&missing, Wait::No);
    }

    /// Fetches the spans of `range` that no local tier has and waits for them.
    pub async fn fetch_missing(self: &Arc<Self>, range: Range<usize>) -> Result<(), ReadError> {
        let missing: Vec<usize> = range.filter(|&i| !self.is_local(i)).collect();
        for (_, rx) in self.claim(&missing, Wait::ForAll) {
            claims::answer_of(rx).await?;
        }
        Ok(())
    }

    /// Claims the free spans of `spans` and starts their fetches, in runs of adjacent spans;
    /// returns receivers for every span of `spans` when `wait` asks for them.
    fn claim(self: &Arc<Self>, spans: &[usize], wait: Wait) -> claims::Waits {
        let (mine, waits) = self.claims.claim(spans, wait);
        for run in self.runs_of(mine, self.fetcher.cfg.run_bytes) {
            let me = self.clone();
            tokio::spawn(async move { me.fetch_run(run, Permit::Demand).await });
        }
        waits
    }
}
