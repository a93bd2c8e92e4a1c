//! The tiered span cache: bounded memory -> bounded local disk -> (optional) shared remote tier.
//!
//! Spans are keyed by their sha256, so identical spans in different layers or images are stored
//! once. Everything put here has been verified against that digest; everything read from disk or
//! the remote tier is verified again before it is returned, so a damaged entry costs a refetch,
//! never a wrong byte. A hit in a lower tier fills the tiers above it.

pub mod disk;
pub mod files;
pub mod memory;
pub mod remote;

use crate::digest::Digest;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

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
    /// Bytes of whole files kept for FUSE passthrough, in `<disk_dir>/files` (default: a quarter
    /// of `disk_bytes`; 0 disables passthrough). Counted apart from the span files.
    pub files_bytes: Option<u64>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            memory_bytes: 256 << 20,
            disk_bytes: 10 << 30,
            disk_dir: None,
            remote: None,
            files_bytes: None,
        }
    }
}

/// What the cache and the reads through it did; also exported as metrics.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub memory_hits: AtomicU64,
    pub disk_hits: AtomicU64,
    pub remote_hits: AtomicU64,
    pub misses: AtomicU64,
    pub registry_requests: AtomicU64,
    pub registry_bytes: AtomicU64,
    pub inflated_bytes: AtomicU64,
    pub verify_failures: AtomicU64,
}

impl CacheStats {
    pub fn snapshot(&self) -> serde_json::Value {
        serde_json::json!({
            "memory_hits": self.memory_hits.load(Relaxed),
            "disk_hits": self.disk_hits.load(Relaxed),
            "remote_hits": self.remote_hits.load(Relaxed),
            "misses": self.misses.load(Relaxed),
            "registry_requests": self.registry_requests.load(Relaxed),
            "registry_bytes": self.registry_bytes.load(Relaxed),
            "inflated_bytes": self.inflated_bytes.load(Relaxed),
            "verify_failures": self.verify_failures.load(Relaxed),
        })
    }
}

pub struct TieredCache {
    memory: memory::MemoryTier,
    disk: Option<Arc<disk::DiskTier>>,
    files: Option<Arc<files::FileStore>>,
    remote: Option<remote::RemoteTier>,
    pub stats: CacheStats,
    /// Bounds the registry fetches in flight across every reader sharing this cache, and so the
    /// memory they hold (each run holds its compressed and inflated bytes).
    pub fetch_permits: Arc<tokio::sync::Semaphore>,
    permits_total: usize,
}

/// Registry fetches in flight at once for a memory-only cache of `bytes`: each fetch holds up to
/// a few MiB of compressed and inflated data, so in-flight memory scales with the memory budget
/// (one fetch per 32 MiB of cap, 2 to 8).
pub fn concurrent_fetches(memory_bytes: u64) -> usize {
    (memory_bytes / (32 << 20)).clamp(2, 8) as usize
}

fn dir_name(cfg: &CacheConfig) -> String {
    cfg.disk_dir
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("disk cache {path}: {error}")]
    Disk { path: String, error: std::io::Error },
    #[error("remote cache: {0}")]
    Remote(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

impl TieredCache {
    /// A cache with the given tiers; the disk tiers keep their records in `store`'s sled
    /// database (without a store there is no disk tier).
    pub async fn open(
        cfg: &CacheConfig,
        store: Option<&crate::store::Store>,
    ) -> Result<Self, CacheError> {
        let mut disk = None;
        let mut files = None;
        if let (Some(dir), Some(store)) = (&cfg.disk_dir, store) {
            if cfg.disk_bytes > 0 {
                let (spans, file_recs, names) = (
                    store.tree("disk-cache")?,
                    store.tree("file-cache")?,
                    store.tree("file-names")?,
                );
                let (dir, cap) = (dir.clone(), cfg.disk_bytes);
                let files_cap = cfg.files_bytes.unwrap_or(cap / 4);
                let opened = tokio::task::spawn_blocking(move || {
                    let d = disk::DiskTier::open(&dir, spans, cap)?;
                    let f = match files_cap {
                        0 => None,
                        c => Some(files::FileStore::open(
                            &dir.join("files"),
                            file_recs,
                            names,
                            c,
                        )?),
                    };
                    Ok::<_, std::io::Error>((d, f))
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r)
                .map_err(|error| CacheError::Disk {
                    path: dir_name(cfg),
                    error,
                })?;
                disk = Some(Arc::new(opened.0));
                files = opened.1.map(Arc::new);
            }
        }
        let remote = match &cfg.remote {
            Some(url) => Some(remote::RemoteTier::connect(url).await?),
            None => None,
        };
        let mut c = Self::with_tiers(cfg.memory_bytes, disk, remote);
        c.files = files;
        Ok(c)
    }

    /// A memory-only cache (tests, one-shot commands).
    pub fn memory_only(bytes: u64) -> Self {
        Self::with_tiers(bytes, None, None)
    }

    fn with_tiers(
        memory_bytes: u64,
        disk: Option<Arc<disk::DiskTier>>,
        remote: Option<remote::RemoteTier>,
    ) -> Self {
        let permits = concurrent_fetches(memory_bytes);
        TieredCache {
            memory: memory::MemoryTier::new(memory_bytes),
            disk,
            files: None,
            remote,
            stats: CacheStats::default(),
            fetch_permits: Arc::new(tokio::sync::Semaphore::new(permits)),
            permits_total: permits,
        }
    }

    pub async fn get(&self, key: &Digest) -> Option<Bytes> {
        if let Some(b) = self.memory.get(key) {
            self.stats.memory_hits.fetch_add(1, Relaxed);
            crate::metrics::cache_hit("memory");
            return Some(b);
        }
        if let Some(disk) = &self.disk {
            let (d, k) = (disk.clone(), *key);
            if disk.contains(key) {
                if let Ok(Some(b)) = tokio::task::spawn_blocking(move || d.get(&k)).await {
                    self.stats.disk_hits.fetch_add(1, Relaxed);
                    crate::metrics::cache_hit("disk");
                    self.memory.put(*key, b.clone());
                    return Some(b);
                }
            }
        }
        if let Some(remote) = &self.remote {
            if let Some(b) = remote.get(key).await {
                if Digest::of(&b) == *key {
                    self.stats.remote_hits.fetch_add(1, Relaxed);
                    crate::metrics::cache_hit("remote");
                    self.fill_local(key, &b).await;
                    return Some(b);
                }
                self.stats.verify_failures.fetch_add(1, Relaxed);
                tracing::warn!(span = %key, "remote cache returned bytes that fail verification; ignoring them");
            }
        }
        self.stats.misses.fetch_add(1, Relaxed);
        crate::metrics::cache_miss();
        None
    }

    /// True if memory or disk has the span (no I/O).
    pub fn contains_local(&self, key: &Digest) -> bool {
        self.memory.contains(key) || self.disk.as_ref().is_some_and(|d| d.contains(key))
    }

    async fn fill_local(&self, key: &Digest, data: &Bytes) {
        self.memory.put(*key, data.clone());
        if let Some(disk) = &self.disk {
            let (d, k, b) = (disk.clone(), *key, data.clone());
            match tokio::task::spawn_blocking(move || d.put(&k, &b)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(span = %key, "disk cache write failed: {e}"),
                Err(e) => tracing::warn!(span = %key, "disk cache task failed: {e}"),
            }
        }
    }

    /// Stores a span in the disk tier only (bulk fills that should not evict the memory tier's
    /// hot spans); nothing without a disk tier.
    pub async fn put_disk(&self, key: &Digest, data: Bytes) {
        if let Some(disk) = &self.disk {
            let (d, k) = (disk.clone(), *key);
            match tokio::task::spawn_blocking(move || d.put(&k, &data)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(span = %key, "disk cache write failed: {e}"),
                Err(e) => tracing::warn!(span = %key, "disk cache task failed: {e}"),
            }
        }
    }

    /// Stores a verified span in every tier.
    pub async fn put(&self, key: &Digest, data: &Bytes) {
        self.fill_local(key, data).await;
        if let Some(remote) = &self.remote {
            remote.put(key, data).await;
        }
    }

    pub async fn flush(&self) {
        if let Some(d) = &self.disk {
            d.flush().await;
        }
    }

    /// The whole-file store for FUSE passthrough, when there is a disk tier and it is enabled.
    pub fn files(&self) -> Option<&Arc<files::FileStore>> {
        self.files.as_ref()
    }

    /// How many registry fetches may run at once through this cache.
    pub fn fetch_permits_total(&self) -> usize {
        self.permits_total
    }

    /// (memory bytes, disk bytes, memory evictions, disk evictions)
    pub fn usage(&self) -> (u64, u64, u64, u64) {
        let (mb, _, me) = self.memory.usage();
        let (db, _, de) = self.disk.as_ref().map(|d| d.usage()).unwrap_or((0, 0, 0));
        (mb, db, me, de)
    }
}
