//! The shared remote tier on Redis (single node, or a cluster with `redis+cluster://h1,h2`).
//!
//! Keys are `clip:span:<hex>`, the hex of a span's [`super::SpanKey::storage`] (its layer and
//! its sha256): every node and every image with that layer shares one entry per span. The remote tier is an accelerator, never a dependency: a
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

/// TLS material for `rediss://` (all optional): a CA to trust instead of the system's, and a
/// client certificate and key for servers that require one.
#[derive(Clone, Debug, Default)]
pub struct RedisTls {
    pub ca: Option<std::path::PathBuf>,
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

impl RedisTls {
    fn certificates(&self) -> Result<Option<redis::TlsCertificates>, CacheError> {
        if self.ca.is_none() && self.cert.is_none() && self.key.is_none() {
            return Ok(None);
        }
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| CacheError::Remote(format!("{}: {e}", p.display())))
        };
        let client_tls = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read(c)?,
                client_key: read(k)?,
            }),
            (None, None) => None,
            _ => {
                return Err(CacheError::Remote(
                    "a Redis client certificate needs its key, and the key its certificate".into(),
                ))
            }
        };
        let root_cert = self.ca.as_deref().map(read).transpose()?;
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }
}

impl RemoteTier {
    /// Connects to `url`: `redis://[user:password@]host:port/` (plain), `rediss://...` (TLS),
    /// or a cluster as `redis+cluster://` / `rediss+cluster://[user:password@]h1:p1,h2:p2`.
    /// Username and password are Redis ACL credentials; they never appear in messages.
    pub async fn connect(url: &str, tls: &RedisTls) -> Result<Self, CacheError> {
        let err = |e: redis::RedisError| CacheError::Remote(format!("{}: {e}", redact(url)));
        let certs = tls.certificates()?;
        let cluster = url
            .strip_prefix("redis+cluster://")
            .map(|r| ("redis", r))
            .or_else(|| url.strip_prefix("rediss+cluster://").map(|r| ("rediss", r)));
        let conn = if let Some((scheme, rest)) = cluster {
            let (auth, hosts) = match rest.rsplit_once('@') {
                Some((a, h)) => (Some(a), h),
                None => (None, rest),
            };
            let nodes: Vec<String> = hosts
                .split(',')
                .map(|h| format!("{scheme}://{}", h.trim_end_matches('/')))
                .collect();
            let mut b = redis::cluster::ClusterClientBuilder::new(nodes);
            if let Some(a) = auth {
                let (user, pass) = a.split_once(':').unwrap_or(("", a));
                if !user.is_empty() {
                    b = b.username(user);
                }
                b = b.password(pass);
            }
            if let Some(c) = certs {
                b = b.certs(c);
            }
            let client = b.build().map_err(err)?;
            Conn::Cluster(
                tokio::time::timeout(TIMEOUT * 5, client.get_async_connection())
                    .await
                    .map_err(|_| CacheError::Remote(format!("{}: connect timed out", redact(url))))?
                    .map_err(err)?,
            )
        } else {
            let client = match certs {
                Some(c) => redis::Client::build_with_tls(url, c),
                None => redis::Client::open(url),
            }
            .map_err(err)?;
            Conn::Single(
                tokio::time::timeout(TIMEOUT * 5, redis::aio::ConnectionManager::new(client))
                    .await
                    .map_err(|_| CacheError::Remote(format!("{}: connect timed out", redact(url))))?
                    .map_err(err)?,
            )
        };
        if in_the_clear(url) {
            tracing::warn!(
                redis = %redact(url),
                "the shared Redis tier is plain TCP: image content, and the Redis password if \
                 there is one, travel in the clear; use rediss:// (TLS) unless this network is \
                 private to the nodes (docs/security.md, section 7)"
            );
        }
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
        self.fetch_key(key(d), crate::limits::MAX_SPAN as usize)
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

/// True for a Redis URL without TLS (`redis://`, `redis+cluster://`).
fn in_the_clear(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("redis+cluster://")
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
