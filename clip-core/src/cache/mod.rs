//! The tiered span cache: bounded memory -> bounded local disk -> (optional) shared remote tier.
//!
//! A span is known by the layer it came from and its sha256 ([`SpanKey`]); tiers store it under a
//! digest of both. Identical spans within a layer are stored once; the same bytes in two layers
//! are two entries, so bytes one layer put here are never served for another layer's span,
//! whatever digest an index names (an index is its publisher's word: it may name any digest).
//! Everything put here has been verified against the span's digest; everything read from disk
//! or the remote tier is verified again before it is returned, so a damaged entry costs a
//! refetch, never a wrong byte. A hit in a lower tier fills the tiers above it.

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;
pub mod disk;
pub mod files;
pub mod ledger;
pub mod memory;
pub mod remote;

use crate::digest::Digest;
use async_trait::async_trait;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

/// One cache tier. Keys are span digests; a tier stores whatever it is given (already
/// verified) and may return anything: the composed [`TieredCache`] verifies what it reads.
#[async_trait]
pub trait Tier: Send + Sync {
    /// Metric and log label ("memory", "disk", "remote").
    fn name(&self) -> &'static str;
    async fn get(&self, key: &Digest) -> Option<Bytes>;
    async fn put(&self, key: &Digest, data: Bytes);
    /// Whether the tier holds `key`, answered without I/O; a tier that cannot tell says false.
    fn contains(&self, key: &Digest) -> bool;
    /// Drops an entry (one that failed verification).
    async fn remove(&self, _key: &Digest) {}
    /// Bytes returned were verified when put and cannot have changed since (process memory):
    /// reads need not hash them again.
    fn trusted(&self) -> bool {
        false
    }
    /// On this node (memory, disk) rather than shared over the network.
    fn local(&self) -> bool {
        true
    }
    /// Makes the tier's records durable.
    async fn flush(&self) {}
    /// (bytes held, entries, evictions so far)
    fn usage(&self) -> (u64, usize, u64) {
        (0, 0, 0)
    }
    /// The bytes of `key` when the tier can answer at once on this thread: from memory, or by
    /// a blocking read of a local file (for callers that may block: FUSE worker threads). `None`:
    /// not here, or the tier cannot answer so (the async [`Tier::get`] then asks).
    fn get_now(&self, _key: &Digest) -> Option<Bytes> {
        None
    }
    /// The most bytes the tier holds (0: not bounded by this node, or not known).
    fn capacity(&self) -> u64 {
        0
    }
}

/// Cache sizing and tiers. Defaults: 256 MiB memory, 10 GiB disk, no remote tier.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// Bytes of verified spans kept in memory.
    pub memory_bytes: u64,
    /// Bytes of span files kept on local disk (0 disables the disk tier).
    pub disk_bytes: u64,
    /// Where span files live (default: `<root>/cache`).
    pub disk_dir: Option<PathBuf>,
    /// A shared Redis tier, e.g. `redis://127.0.0.1:6379/` (`redis+cluster://h1,h2` for a cluster).
    pub remote: Option<String>,
    /// TLS material for a `rediss://` tier (CA, client certificate and key).
    pub remote_tls: remote::RedisTls,
    /// Bytes of whole files kept for FUSE passthrough, in `<disk_dir>/files` (default: a quarter
    /// of `disk_bytes`; 0 disables passthrough). Counted apart from the span files.
    pub files_bytes: Option<u64>,
}

/// Default memory tier: 256 MiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;
/// Default disk tier: 10 GiB.
pub const DEFAULT_DISK_BYTES: u64 = 10 << 30;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            disk_bytes: DEFAULT_DISK_BYTES,
            disk_dir: None,
            remote: None,
            remote_tls: remote::RedisTls::default(),
            files_bytes: None,
        }
    }
}

impl CacheConfig {
    /// The passthrough store's cap: `files_bytes`, else a quarter of the disk tier.
    pub fn files_cap(&self) -> u64 {
        self.files_bytes.unwrap_or(self.disk_bytes / 4)
    }
}

/// What the cache served; also exported as metrics.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub remote_hits: AtomicU64,
    pub misses: AtomicU64,
    /// Entries a tier returned that failed verification (dropped, never served).
    pub damaged: AtomicU64,
}

impl CacheStats {
    fn hit(&self, tier: &'static str) {
        let c = match tier {
            "memory" => &self.memory_hits,
            "disk" => &self.disk_hits,
            _ => &self.remote_hits,
        };
        c.fetch_add(1, Relaxed);
        crate::metrics::cache_hit(tier);
    }

    fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
        crate::metrics::cache_miss();
    }

    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "memory_hits": self.memory_hits.load(Relaxed),
            "disk_hits": self.disk_hits.load(Relaxed),
            "remote_hits": self.remote_hits.load(Relaxed),
            "misses": self.misses.load(Relaxed),
            "damaged_entries": self.damaged.load(Relaxed),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("disk cache {path}: {error}")]
    Disk { path: String, error: std::io::Error },
    #[error("remote cache: {0}")]
    Remote(String),
    #[error("cache records: {0}")]
    Db(#[from] sled::Error),
}

/// Puts verified bytes into the trusted (memory) tiers of `tiers`: synchronous under the hood,
/// so no await is needed.
fn put_trusted(tiers: &[Arc<dyn Tier>], key: &Digest, data: &Bytes) {
    for t in tiers.iter().filter(|t| t.trusted()) {
        futures_util::FutureExt::now_or_never(t.put(key, data.clone()));
    }
}

/// A span as the cache knows it: the layer whose bytes it is, and its sha256.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanKey {
    /// The (compressed) digest of the layer the span's bytes came from.
    pub layer: Digest,
    /// The sha256 of the span's uncompressed bytes.
    pub span: Digest,
}

impl SpanKey {
    pub fn new(layer: Digest, span: Digest) -> Self {
        SpanKey { layer, span }
    }

    /// What the tiers store the span under: sha256 of the layer digest and the span digest
    /// (their 64 raw bytes). A layer's span and another layer's span with the same bytes get
    /// different entries.
    pub fn storage(&self) -> Digest {
        let mut raw = [0u8; 64];
        raw[..32].copy_from_slice(self.layer.as_bytes());
        raw[32..].copy_from_slice(self.span.as_bytes());
        Digest::of(&raw)
    }
}

/// Which slower tiers [`TieredCache::put_slow`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The tiers on this node (disk): bytes other nodes can get elsewhere (indexing, which
    /// streams the whole layer anyway).
    ThisNode,
    /// Every tier, the shared one too: bytes fetched from the registry.
    Everywhere,
}

/// Tiers, fastest first. Reads verify in one place and fill faster tiers on a slower tier's hit.
pub struct TieredCache {
    tiers: Vec<Arc<dyn Tier>>,
    pub stats: CacheStats,
}

impl TieredCache {
    /// Memory and disk as `cfg` asks (the disk tier keeps its records in a tree of `db`, the
    /// node's sled database; without one there is no disk tier), then `shared`: the Redis tier for
    /// `cfg.remote`, connected by the caller, which also uses it for shared documents.
    pub async fn open(
        cfg: &CacheConfig,
        db: Option<&sled::Db>,
        shared: Option<Arc<remote::RemoteTier>>,
    ) -> Result<Self, CacheError> {
        let mut tiers: Vec<Arc<dyn Tier>> =
            vec![Arc::new(memory::MemoryTier::new(cfg.memory_bytes))];
        if let (Some(dir), Some(db)) = (&cfg.disk_dir, db) {
            if cfg.disk_bytes > 0 {
                let tree = db.open_tree("disk-cache")?;
                let (d, cap) = (dir.clone(), cfg.disk_bytes);
                let disk = tokio::task::spawn_blocking(move || disk::DiskTier::open(&d, tree, cap))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .map_err(|error| CacheError::Disk {
                        path: dir.display().to_string(),
                        error,
                    })?;
                tiers.push(Arc::new(disk));
            }
        }
        if let Some(r) = shared {
            tiers.push(r);
        }
        Ok(Self::with_tiers(tiers))
    }

    /// A cache over the given tiers, fastest first.
    pub fn with_tiers(tiers: Vec<Arc<dyn Tier>>) -> Self {
        TieredCache {
            tiers,
            stats: CacheStats::default(),
        }
    }

    /// A memory-only cache (tests, one-shot commands).
    pub fn memory_only(bytes: u64) -> Self {
        Self::with_tiers(vec![Arc::new(memory::MemoryTier::new(bytes))])
    }

    /// The verified bytes of `key` from the fastest tier that has them. A hit fills the local
    /// tiers above it (memory at once, disk in the background); an entry that fails
    /// verification is removed from its tier and the next tier is tried.
    pub async fn get(&self, key: &SpanKey) -> Option<Bytes> {
        let got = self.probe(key).await;
        if got.is_none() {
            self.stats.miss();
        }
        got
    }

    /// [`TieredCache::get`] without counting a miss (a look for bytes no reader asked for).
    pub async fn probe(&self, key: &SpanKey) -> Option<Bytes> {
        let stored = key.storage();
        for (i, tier) in self.tiers.iter().enumerate() {
            if tier.local() && !tier.contains(&stored) {
                continue;
            }
            let Some(data) = tier.get(&stored).await else {
                continue;
            };
            if !tier.trusted() && Digest::of(&data) != key.span {
                self.stats.damaged.fetch_add(1, Relaxed);
                tracing::warn!(layer = %key.layer, span = %key.span, tier = tier.name(), "cached bytes fail verification; dropping them");
                tier.remove(&stored).await;
                continue;
            }
            self.stats.hit(tier.name());
            if i > 0 {
                self.fill(&self.tiers[..i], &stored, &data);
            }
            return Some(data);
        }
        None
    }

    /// Puts verified bytes into `tiers` (those above the one that had them): the trusted
    /// (memory) ones now, the others in a background task.
    fn fill(&self, tiers: &[Arc<dyn Tier>], key: &Digest, data: &Bytes) {
        put_trusted(tiers, key, data);
        let slow: Vec<Arc<dyn Tier>> = tiers
            .iter()
            .filter(|t| !t.trusted() && t.local())
            .cloned()
            .collect();
        if !slow.is_empty() {
            let (key, data) = (*key, data.clone());
            tokio::spawn(async move {
                for t in slow {
                    t.put(&key, data.clone()).await;
                }
            });
        }
    }

    /// [`TieredCache::get`] on this thread, from the local tiers only, blocking on a local
    /// disk read if need be (FUSE worker threads: no hop to the runtime and back). Verified as
    /// `get` verifies; a disk hit fills memory. `None` (no miss counted): the async path asks.
    pub fn get_now(&self, key: &SpanKey) -> Option<Bytes> {
        let stored = key.storage();
        for (i, tier) in self.tiers.iter().enumerate() {
            if !tier.local() || !tier.contains(&stored) {
                continue;
            }
            let Some(data) = tier.get_now(&stored) else {
                continue;
            };
            if !tier.trusted() && Digest::of(&data) != key.span {
                // The async path drops it and says so.
                return None;
            }
            self.stats.hit(tier.name());
            if i > 0 {
                put_trusted(&self.tiers[..i], &stored, &data);
            }
            return Some(data);
        }
        None
    }

    /// Loads `key` from a slower local tier (disk) into the trusted ones (memory), verified as
    /// [`TieredCache::get_now`] verifies, blocking on the disk read; counts no hit (no reader
    /// asked yet). True if the span is now in the fastest local tier.
    pub fn promote_now(&self, key: &SpanKey) -> bool {
        let stored = key.storage();
        for (i, tier) in self.tiers.iter().enumerate() {
            if !tier.local() || !tier.contains(&stored) {
                continue;
            }
            if i == 0 {
                return true;
            }
            let Some(data) = tier.get_now(&stored) else {
                continue;
            };
            if !tier.trusted() && Digest::of(&data) != key.span {
                return false;
            }
            put_trusted(&self.tiers[..i], &stored, &data);
            return true;
        }
        false
    }

    /// Drops a span from this node's tiers (memory, disk); the shared tier keeps it for the
    /// other nodes.
    pub async fn forget_local(&self, key: &SpanKey) {
        let stored = key.storage();
        for tier in self.tiers.iter().filter(|t| t.local()) {
            tier.remove(&stored).await;
        }
    }

    /// True if a tier is shared with other nodes (the remote one).
    pub fn has_shared(&self) -> bool {
        self.tiers.iter().any(|t| !t.local())
    }

    /// True if a tier on this node has the span (no I/O).
    pub fn contains_local(&self, key: &SpanKey) -> bool {
        let stored = key.storage();
        self.tiers.iter().any(|t| t.local() && t.contains(&stored))
    }

    /// Stores verified bytes in the fast (memory) tiers; returns at once.
    pub fn put_fast(&self, key: &SpanKey, data: &Bytes) {
        put_trusted(&self.tiers, &key.storage(), data);
    }

    /// Stores verified bytes in the slower tiers `reach` names (disk; and the shared tier for
    /// [`Reach::Everywhere`]), waiting for the writes. Readers never wait for this: the fetcher
    /// calls it after they have their bytes.
    pub async fn put_slow(&self, key: &SpanKey, data: &Bytes, reach: Reach) {
        let stored = key.storage();
        for t in self.tiers.iter().filter(|t| !t.trusted()) {
            if t.local() || reach == Reach::Everywhere {
                t.put(&stored, data.clone()).await;
            }
        }
    }

    pub async fn flush(&self) {
        for t in &self.tiers {
            t.flush().await;
        }
    }

    fn tier(&self, name: &str) -> Option<&Arc<dyn Tier>> {
        self.tiers.iter().find(|t| t.name() == name)
    }

    /// The most span bytes this node's tiers hold (the largest local tier's cap: the disk
    /// tier holds what memory does, and more).
    pub fn local_capacity(&self) -> u64 {
        self.tiers
            .iter()
            .filter(|t| t.local())
            .map(|t| t.capacity())
            .max()
            .unwrap_or(0)
    }

    /// (memory bytes, disk bytes, memory evictions, disk evictions)
    pub fn usage(&self) -> (u64, u64, u64, u64) {
        let (mb, _, me) = self.tier("memory").map_or((0, 0, 0), |t| t.usage());
        let (db, _, de) = self.tier("disk").map_or((0, 0, 0), |t| t.usage());
        (mb, db, me, de)
    }
}

#[cfg(test)]
mod tests;
