//! An OCI distribution client built for lazy reads.
//!
//! Every request goes through one loop ([`Client::execute`]): pick an endpoint (mirrors from
//! containerd's `hosts.toml` first, then the registry), attach credentials (cached bearer token,
//! or basic), send, and classify the outcome. `401` runs the challenge (`WWW-Authenticate`: basic,
//! or the bearer-token flow with the user's credentials) and retries once; `429`, `5xx`, resets,
//! stalls and truncated bodies are retried with exponential backoff and jitter (`Retry-After`
//! honoured) until the operation's deadline; anything else fails at once with a clear error.
//! Bodies are read inside the loop, so a connection that dies mid-body is retried too, and long
//! blob streams resume from the last byte received with a range request.
//!
//! Nothing read is trusted: manifests and configs are checked against their digests; whole blobs
//! are checked by their consumers (the index builder hashes every byte); ranges are checked by the
//! index's span digests. Secrets never reach logs or error messages.
//!
//! Files: this one holds the client, its configuration and errors; `request.rs` the request
//! loop (endpoints, retries, bodies); `authorize.rs` credentials, challenges and tokens;
//! `blobs.rs` and `documents.rs` the operations (blobs; manifests, resolution, referrers);
//! `manifest.rs` parsing and checking image documents; `auth.rs`, `hosts.rs` and `session.rs`
//! credentials from Docker's config, `hosts.toml`, and Kubernetes pull secrets.

pub mod auth;
mod authorize;
mod blobs;
mod documents;
pub mod hosts;
mod manifest;
mod request;
pub mod session;

pub use manifest::{
    config_diff_ids, manifest_parts, LayerDescriptor, Platform, ResolvedImage, TocPosition,
};

use crate::digest::Digest;
use crate::reference::Reference;
use auth::{Challenge, Credentials, Token, TokenResponse};
use bytes::Bytes;
use hosts::Endpoint;
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, RANGE,
};
use reqwest::StatusCode;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

tokio::task_local! {
    /// When the caller of the operation in progress stops waiting (a gRPC request's deadline).
    static CALLER_DEADLINE: Instant;
}

/// Runs `fut` so that the registry operations it makes give up (with a clear error) by
/// `deadline` when that comes before the registry timeout: a containerd request with a
/// deadline gets an answer while it still waits. `None` leaves the registry timeout alone.
pub async fn within_caller_deadline<F: std::future::Future>(
    deadline: Option<Instant>,
    fut: F,
) -> F::Output {
    match deadline {
        Some(d) => CALLER_DEADLINE.scope(d, fut).await,
        None => fut.await,
    }
}

fn caller_deadline() -> Option<Instant> {
    CALLER_DEADLINE.try_with(|d| *d).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error("{registry}: authentication failed ({detail}); check credentials (docker login, or ~/.docker/config.json)")]
    Unauthorized { registry: String, detail: String },
    #[error("{registry}: access denied to {what}")]
    Denied { registry: String, what: String },
    #[error("not found: {what}")]
    NotFound { what: String },
    #[error("{url}: HTTP {status}: {body}")]
    Http {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{what}: gave up after {attempts} attempts in {elapsed:?} ({why}): {last}")]
    DeadlineExceeded {
        what: String,
        attempts: u32,
        elapsed: Duration,
        /// Whose deadline ended it: the client's own, or the caller's (a gRPC request's).
        why: String,
        last: String,
    },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("invalid manifest {what}: {reason}")]
    InvalidManifest { what: String, reason: String },
    #[error("no manifest for platform {platform} in {what} (available: {available})")]
    NoMatchingPlatform {
        what: String,
        platform: String,
        available: String,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// Nothing answered at the registry's address on first contact (connection refused, or a
    /// host name that does not resolve): a wrong host or port, not a failure worth retrying.
    #[error("{endpoint}: {detail} (nothing answers there: check the registry's host and port)")]
    Unreachable { endpoint: String, detail: String },
    #[error("{0}")]
    Other(String),
}

/// How to reach registries. Every field has a sane default.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// Hosts that may be reached over plain HTTP or with unverified TLS (localhost always may
    /// use plain HTTP).
    pub insecure: Vec<String>,
    /// containerd's host configuration directory (`hosts.toml` per registry); `None` = none.
    pub hosts_dir: Option<PathBuf>,
    /// Docker config file for credentials; `None` = `$DOCKER_CONFIG` or `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Credentials given explicitly, by registry host; they win over the docker config.
    pub credentials: HashMap<String, Credentials>,
    /// Token servers on another host than the registry that may receive the registry's
    /// credentials (`host` or `host:port`). A token realm on the registry's own host name, and
    /// Docker Hub's `auth.docker.io`, need no entry; any other gets no credentials.
    pub token_realms: Vec<String>,
    /// Credentials held only in memory (a Kubernetes PullImage's), per registry and
    /// repository; they win over every other source. Shared by clones of this config.
    pub session: Arc<session::SessionCredentials>,
    /// The platform to pick from multi-platform images.
    pub platform: Platform,
    /// How long one operation (including all its retries) may take.
    pub deadline: Duration,
    /// How long a single attempt may wait for response headers, or for the next body chunk.
    pub stall_timeout: Duration,
    /// First retry delay; doubled each attempt up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            insecure: Vec::new(),
            hosts_dir: Some(PathBuf::from("/etc/containerd/certs.d")).filter(|p| p.is_dir()),
            docker_config: None,
            credentials: HashMap::new(),
            token_realms: Vec::new(),
            session: Arc::default(),
            platform: Platform::host(),
            deadline: Duration::from_secs(120),
            stall_timeout: Duration::from_secs(30),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

pub const MEDIA_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";
/// Manifests and configs larger than this are refused (the distribution spec suggests 4 MiB).
const MAX_MANIFEST: u64 = 8 << 20;

use request::*;

#[derive(Default)]
struct AuthState {
    /// Last challenge seen per endpoint (base URL): each host authenticates on its own.
    challenges: HashMap<String, Challenge>,
    /// Bearer tokens by (endpoint base URL, scope): a token goes back only where it was for.
    tokens: HashMap<(String, String), Token>,
    /// Per endpoint base: use plain HTTP (learned by fallback).
    plain_http: HashMap<String, bool>,
    /// Endpoints (base URLs) that have answered once: a refused connection there later is a
    /// restart worth waiting for, not a wrong address.
    reached: std::collections::HashSet<String>,
}

#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RegistryConfig,
    docker: auth::DockerConfig,
    /// What credential helpers answered, by registry, kept in memory for a minute.
    helped: Mutex<HashMap<String, (Instant, Option<Credentials>)>>,
    clients: Mutex<HashMap<(bool, Vec<PathBuf>), reqwest::Client>>,
    state: Mutex<AuthState>,
    /// Images resolved by digest (immutable): a second resolve costs no round trip.
    resolved: Mutex<HashMap<RepoDigest, ResolvedImage>>,
    /// Referrers listings by (registry, repository, subject), kept for `REFERRERS_TTL`: the
    /// index and the startup profile of an image are found with one listing.
    listings: Mutex<HashMap<RepoDigest, (Instant, Option<Bytes>)>>,
    /// Per registry, whether its referrers API answered (true) or not (false): later listings
    /// use only the way that works.
    referrers_api: Mutex<HashMap<String, bool>>,
    /// Per subject, the lock a referrers lookup holds (single flight).
    listing_flights: Mutex<HashMap<RepoDigest, Arc<tokio::sync::Mutex<()>>>>,
}

/// (registry, repository, digest).
type RepoDigest = (String, String, Digest);

/// How long a referrers listing is reused.
const REFERRERS_TTL: Duration = Duration::from_secs(10);
/// Resolved images (and listings) kept; beyond this the cache starts over.
const MAX_CACHED: usize = 256;

/// The cache key of `digest` in `r`'s repository.
fn repo_digest(r: &Reference, digest: Digest) -> RepoDigest {
    (r.registry.clone(), r.repository.clone(), digest)
}

/// Inserts into a cache of at most [`MAX_CACHED`] entries (beyond that it starts over).
fn remember<V>(cache: &Mutex<HashMap<RepoDigest, V>>, key: RepoDigest, value: V) {
    let mut cache = cache.lock().expect("client cache lock");
    if cache.len() >= MAX_CACHED {
        cache.clear();
    }
    cache.insert(key, value);
}

impl Client {
    pub fn new(cfg: RegistryConfig) -> Self {
        let docker = cfg
            .docker_config
            .clone()
            .or_else(auth::docker_config_path)
            .map(|p| auth::load_docker_config(&p))
            .unwrap_or_default();
        Client {
            inner: Arc::new(Inner {
                cfg,
                docker,
                helped: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
                state: Mutex::new(AuthState::default()),
                resolved: Mutex::new(HashMap::new()),
                listings: Mutex::new(HashMap::new()),
                referrers_api: Mutex::new(Default::default()),
                listing_flights: Mutex::new(HashMap::new()),
            }),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.inner.cfg
    }
}

#[cfg(test)]
mod tests;
