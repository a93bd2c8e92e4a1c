//! The shared remote tier on Redis (single node, or a cluster with `redis+cluster://h1,h2`).
//!
//! Keys are `clip:span:<sha256>`: spans are content-addressed, so every node and every image that
//! has the same bytes shares one entry. The remote tier is an accelerator, never a dependency: a
//! slow or unreachable Redis is a miss (each call is bounded by a short timeout), and bytes read
//! from it are verified by the caller like any other.

use super::{CacheError, Tier};
use crate::digest::Digest;
use async_trait::async_trait;
use bytes::Bytes;
use redis::AsyncCommands;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(2);
/// Entries expire after a week without being written again.
const TTL_SECS: u64 = 7 * 24 * 3600;

enum Conn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

pub struct RemoteTier {
    conn: Conn,
}

fn key(d: &Digest) -> String {
    format!("clip:span:{}", d.hex())
}

impl RemoteTier {
    pub async fn connect(url: &str) -> Result<Self, CacheError> {
        let err = |e: redis::RedisError| CacheError::Remote(format!("{}: {e}", redact(url)));
        let conn = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = rest
                .split(',')
                .map(|h| format!("redis://{}", h.trim_end_matches('/')))
                .collect();
            let client = redis::cluster::ClusterClient::new(nodes).map_err(err)?;
            Conn::Cluster(
                tokio::time::timeout(TIMEOUT * 5, client.get_async_connection())
                    .await
                    .map_err(|_| CacheError::Remote(format!("{}: connect timed out", redact(url))))?
                    .map_err(err)?,
            )
        } else {
            let client = redis::Client::open(url).map_err(err)?;
            Conn::Single(
                tokio::time::timeout(TIMEOUT * 5, redis::aio::ConnectionManager::new(client))
                    .await
                    .map_err(|_| CacheError::Remote(format!("{}: connect timed out", redact(url))))?
                    .map_err(err)?,
            )
        };
        Ok(RemoteTier { conn })
    }

    /// A small shared document by key (startup profiles: `clip:profile:<manifest hex>`); like
    /// spans, bounded by a short timeout, and a miss when Redis is slow or down. The caller
    /// validates what it gets.
    pub async fn get_doc(&self, k: &str, max: usize) -> Option<Bytes> {
        self.fetch_key(k.to_string(), max).await
    }

    /// Stores a small shared document (expires like spans).
    pub async fn put_doc(&self, k: &str, data: &[u8]) {
        self.store_key(k.to_string(), data).await
    }

    async fn fetch(&self, d: &Digest) -> Option<Bytes> {
        self.fetch_key(key(d), crate::index::limits::MAX_SPAN as usize)
            .await
    }

    /// The value at `k` if it is at most `max` bytes. Values are written by every node sharing
    /// the tier, so the read itself is bounded: GETRANGE returns at most `max + 1` bytes, and a
    /// longer value is a miss. (A missing key reads as empty, also a miss.)
    async fn fetch_key(&self, k: String, max: usize) -> Option<Bytes> {
        let to = max as isize; // at most max + 1 bytes: [0, max]
        let r: Result<Vec<u8>, redis::RedisError> = match &self.conn {
            Conn::Single(c) => tokio::time::timeout(TIMEOUT, c.clone().getrange(&k, 0, to))
                .await
                .ok()?,
            Conn::Cluster(c) => tokio::time::timeout(TIMEOUT, c.clone().getrange(&k, 0, to))
                .await
                .ok()?,
        };
        match r {
            Ok(v) if v.is_empty() => None,
            Ok(v) if v.len() > max => {
                tracing::warn!(key = %k, "remote cache value over {max} bytes ignored");
                None
            }
            Ok(v) => Some(Bytes::from(v)),
            Err(e) => {
                tracing::debug!("remote cache get failed: {e}");
                None
            }
        }
    }

    async fn store(&self, d: &Digest, data: &Bytes) {
        self.store_key(key(d), data).await
    }

    async fn store_key(&self, k: String, data: &[u8]) {
        let r: Result<Result<(), redis::RedisError>, _> = match &self.conn {
            Conn::Single(c) => {
                tokio::time::timeout(TIMEOUT, c.clone().set_ex(&k, data, TTL_SECS)).await
            }
            Conn::Cluster(c) => {
                tokio::time::timeout(TIMEOUT, c.clone().set_ex(&k, data, TTL_SECS)).await
            }
        };
        if !matches!(r, Ok(Ok(()))) {
            tracing::debug!(key = %k, "remote cache put failed or timed out");
        }
    }
}

#[async_trait]
impl Tier for RemoteTier {
    fn name(&self) -> &'static str {
        "remote"
    }
    async fn get(&self, key: &Digest) -> Option<Bytes> {
        self.fetch(key).await
    }
    async fn put(&self, key: &Digest, data: Bytes) {
        self.store(key, &data).await
    }
    /// A damaged entry is deleted so no node is served it again.
    async fn remove(&self, key: &Digest) {
        let k = self::key(key);
        let r: Result<Result<(), redis::RedisError>, _> = match &self.conn {
            Conn::Single(c) => tokio::time::timeout(TIMEOUT, c.clone().del(k)).await,
            Conn::Cluster(c) => tokio::time::timeout(TIMEOUT, c.clone().del(k)).await,
        };
        if !matches!(r, Ok(Ok(()))) {
            tracing::debug!(span = %key, "remote cache delete failed or timed out");
        }
    }
    /// Redis cannot be asked without a round trip: the remote tier never claims a key.
    fn contains(&self, _key: &Digest) -> bool {
        false
    }
    fn local(&self) -> bool {
        false
    }
}

/// A Redis URL without its password, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            format!("{}://<credentials>@{}", &url[..s], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
