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

pub mod auth;
pub mod hosts;
mod manifest;
pub mod session;

pub use manifest::{config_diff_ids, manifest_parts, LayerDescriptor, Platform, ResolvedImage};

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
    #[error("{what}: gave up after {attempts} attempts in {elapsed:?}: {last}")]
    DeadlineExceeded {
        what: String,
        attempts: u32,
        elapsed: Duration,
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

/// The outcome of one attempt.
enum Attempt {
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    Fatal(RegistryError),
}

impl From<RegistryError> for Attempt {
    fn from(e: RegistryError) -> Self {
        Attempt::Fatal(e)
    }
}

/// What each request needs to know.
#[derive(Clone)]
struct Target<'a> {
    registry: &'a str,
    api_host: &'a str,
    repository: &'a str,
    push: bool,
}

#[derive(Default)]
struct AuthState {
    /// Last challenge seen per endpoint (base URL): each host authenticates on its own.
    challenges: HashMap<String, Challenge>,
    /// Bearer tokens by (endpoint base URL, scope): a token goes back only where it was for.
    tokens: HashMap<(String, String), Token>,
    /// Per endpoint base: use plain HTTP (learned by fallback).
    plain_http: HashMap<String, bool>,
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

    /// A registry's credentials: given explicitly, else from the docker config's credential
    /// helper for it (`credHelpers`, `credsStore`), else its stored `auths`.
    async fn credentials(&self, registry: &str) -> Option<Credentials> {
        if let Some(c) = self.inner.cfg.credentials.get(registry) {
            return Some(c.clone());
        }
        let docker = &self.inner.docker;
        let Some(helper) = docker.helper_for(registry) else {
            return docker.auths.get(registry).cloned();
        };
        let fresh = |t: &Instant| t.elapsed() < Duration::from_secs(60);
        if let Some((t, c)) = self
            .inner
            .helped
            .lock()
            .expect("helper cache")
            .get(registry)
        {
            if fresh(t) {
                return c.clone();
            }
        }
        let c = auth::from_helper(helper, registry)
            .await
            .or_else(|| docker.auths.get(registry).cloned());
        self.inner
            .helped
            .lock()
            .expect("helper cache")
            .insert(registry.to_string(), (Instant::now(), c.clone()));
        c
    }

    /// The credentials an endpoint may receive: the registry's for the registry itself; for a
    /// mirror, only those configured for the mirror's own host.
    async fn credentials_for(&self, ep: &Endpoint, t: &Target<'_>) -> Option<Credentials> {
        if ep.is_server {
            if let Some(c) = self.inner.cfg.session.get(t.registry, t.repository) {
                return Some(c);
            }
            self.credentials(t.registry).await
        } else {
            self.credentials(ep.authority()).await
        }
    }

    /// Whether a token realm may receive the credentials of endpoint `ep`: on the endpoint's
    /// own host name, Docker Hub's auth server for Docker Hub, or configured; and never over
    /// plain HTTP unless that host is local or insecure-listed.
    fn realm_gets_credentials(&self, ep: &Endpoint, t: &Target, realm: &reqwest::Url) -> bool {
        let host = hosts::authority(realm.as_str());
        let name = hosts::hostname(host);
        let cfg = &self.inner.cfg;
        let listed = |list: &[String]| list.iter().any(|h| h == host || h == name);
        let trusted = name == hosts::hostname(ep.authority())
            || (t.registry == "docker.io" && name == "auth.docker.io")
            || listed(&cfg.token_realms);
        let transport_ok = realm.scheme() == "https"
            || (realm.scheme() == "http" && (hosts::is_local(host) || listed(&cfg.insecure)));
        trusted && transport_ok
    }

    /// How to reach a token realm: with the endpoint's TLS settings when it is the same host,
    /// else with the realm host's own (hosts.toml, insecure list), never the registry's
    /// `skip_verify`.
    fn realm_http(
        &self,
        ep: &Endpoint,
        realm: &reqwest::Url,
    ) -> Result<reqwest::Client, RegistryError> {
        let host = hosts::authority(realm.as_str());
        if hosts::hostname(host) == hosts::hostname(ep.authority()) {
            return self.http(ep);
        }
        let own = hosts::endpoints(
            host,
            host,
            self.inner.cfg.hosts_dir.as_deref(),
            &self.inner.cfg.insecure,
        )
        .pop()
        .expect("hosts::endpoints always ends with the host itself");
        self.http(&own)
    }

    fn http(&self, ep: &Endpoint) -> Result<reqwest::Client, RegistryError> {
        let key = (ep.skip_verify, ep.ca.clone());
        let mut clients = self.inner.clients.lock().expect("client cache lock");
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("clip/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(self.inner.cfg.stall_timeout)
            .redirect(reqwest::redirect::Policy::limited(5))
            .danger_accept_invalid_certs(ep.skip_verify);
        for ca in &ep.ca {
            let pem = std::fs::read(ca)
                .map_err(|e| RegistryError::Tls(format!("reading CA {}: {e}", ca.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| RegistryError::Tls(format!("parsing CA {}: {e}", ca.display())))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let c = b.build().map_err(|e| RegistryError::Tls(e.to_string()))?;
        clients.insert(key, c.clone());
        Ok(c)
    }

    fn endpoints(&self, t: &Target) -> Vec<Endpoint> {
        let mut eps = hosts::endpoints(
            t.registry,
            t.api_host,
            self.inner.cfg.hosts_dir.as_deref(),
            &self.inner.cfg.insecure,
        );
        // The last endpoint is the registry itself; `[host]` entries serve reads (pull
        // capability) or pushes (push capability).
        let server = eps
            .pop()
            .expect("hosts::endpoints always ends with the registry");
        eps.retain(|e| if t.push { e.push } else { e.mirror });
        eps.push(server);
        eps
    }

    fn base_url(&self, ep: &Endpoint) -> String {
        let plain = self
            .inner
            .state
            .lock()
            .expect("state lock")
            .plain_http
            .get(&ep.base)
            .copied()
            .unwrap_or(false);
        if plain {
            ep.base.replacen("https://", "http://", 1)
        } else {
            ep.base.clone()
        }
    }

    fn scope(t: &Target) -> String {
        format!(
            "repository:{}:{}",
            t.repository,
            if t.push { "pull,push" } else { "pull" }
        )
    }

    /// The Authorization header to send, fetching a bearer token first if one is needed.
    async fn authorization(
        &self,
        ep: &Endpoint,
        t: &Target<'_>,
        force: bool,
    ) -> Result<Option<String>, RegistryError> {
        let scope = Self::scope(t);
        let key = (ep.base.clone(), scope.clone());
        let challenge = {
            let mut st = self.inner.state.lock().expect("state lock");
            if force {
                st.tokens.remove(&key);
            } else if let Some(tok) = st.tokens.get(&key).filter(|t| t.fresh()) {
                return Ok(Some(format!("Bearer {}", tok.value)));
            }
            st.challenges.get(&ep.base).cloned()
        };
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => {
                Ok(self.credentials_for(ep, t).await.map(|c| c.basic_header()))
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let token = self
                    .fetch_token(ep, t, &realm, service.as_deref(), &scope)
                    .await?;
                let header = format!("Bearer {}", token.value);
                self.inner
                    .state
                    .lock()
                    .expect("state lock")
                    .tokens
                    .insert(key, token);
                Ok(Some(header))
            }
        }
    }

    async fn fetch_token(
        &self,
        ep: &Endpoint,
        t: &Target<'_>,
        realm: &str,
        service: Option<&str>,
        scope: &str,
    ) -> Result<Token, RegistryError> {
        let mut url = reqwest::Url::parse(realm).map_err(|e| RegistryError::Unauthorized {
            registry: t.registry.into(),
            detail: format!("bad token realm: {e}"),
        })?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", scope);
        }
        let http = self.realm_http(ep, &url)?;
        let what = format!("token for {}", t.registry);
        let creds = self.credentials_for(ep, t).await.filter(|_| {
            let ok = self.realm_gets_credentials(ep, t, &url);
            if !ok {
                tracing::warn!(
                    realm = %hosts::authority(url.as_str()),
                    registry = t.registry,
                    "token server on another host (or over plain HTTP): asking it without \
                     credentials (trust it with [registry] token_realms)"
                );
            }
            ok
        });
        self.retrying(&what, || {
            let mut req = http.get(url.clone());
            if let Some(c) = &creds {
                req = req.header(AUTHORIZATION, c.basic_header());
            }
            let registry = t.registry.to_string();
            async move {
                let resp = req.send().await.map_err(transport)?;
                let status = resp.status();
                if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                    return Err(Attempt::Fatal(RegistryError::Unauthorized {
                        registry,
                        detail: format!("token server answered {status}"),
                    }));
                }
                let resp = classify(resp, "token server").await?;
                let body = read_body(resp, Some(1 << 20), None).await?;
                let tr: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
                    Attempt::Fatal(RegistryError::Unauthorized {
                        registry: registry.clone(),
                        detail: format!("bad token response: {e}"),
                    })
                })?;
                tr.into_token().ok_or_else(|| {
                    Attempt::Fatal(RegistryError::Unauthorized {
                        registry,
                        detail: "token response without a token".into(),
                    })
                })
            }
        })
        .await
    }

    /// Runs `op` until it succeeds, fails fatally, or the deadline passes.
    async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let start = Instant::now();
        let deadline = start + self.inner.cfg.deadline;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = match tokio::time::timeout(remaining, op()).await {
                Ok(r) => r,
                Err(_) => Err(Attempt::Retry {
                    reason: "operation deadline reached".into(),
                    after: None,
                }),
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry { reason, after }) => {
                    let backoff = self
                        .inner
                        .cfg
                        .initial_backoff
                        .saturating_mul(1 << attempts.min(16))
                        .min(self.inner.cfg.max_backoff);
                    let jitter = Duration::from_millis(
                        rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1),
                    );
                    let delay = after.unwrap_or(backoff + jitter);
                    if Instant::now() + delay >= deadline {
                        return Err(RegistryError::DeadlineExceeded {
                            what: what.to_string(),
                            attempts,
                            elapsed: start.elapsed(),
                            last: reason,
                        });
                    }
                    tracing::debug!(what, attempts, ?delay, reason, "retrying");
                    crate::metrics::registry_retry();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends a request built by `build(base_url)` to each endpoint in turn with auth and retries,
    /// and hands the successful response to `consume` (inside the retry loop).
    async fn execute<T, B, C, Fut>(
        &self,
        t: Target<'_>,
        what: &str,
        build: B,
        consume: C,
    ) -> Result<T, RegistryError>
    where
        B: Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
        C: Fn(reqwest::Response) -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let eps = self.endpoints(&t);
        let mut last_err = None;
        for ep in &eps {
            let http = self.http(ep)?;
            let result = self
                .retrying(what, || async {
                    let mut force = false;
                    for _ in 0..2 {
                        let auth = self.authorization(ep, &t, force).await?;
                        let base = self.base_url(ep);
                        let mut req = build(&http, &base);
                        if let Some(a) = &auth {
                            req = req.header(AUTHORIZATION, a);
                        }
                        let sent = Instant::now();
                        let result = req.send().await;
                        let outcome = match &result {
                            Ok(r) if r.status().is_success() => "2xx",
                            Ok(r) if r.status().is_client_error() => "4xx",
                            Ok(r) if r.status().is_server_error() => "5xx",
                            Ok(_) => "other",
                            Err(_) => "transport-error",
                        };
                        crate::metrics::registry_request(outcome, sent.elapsed().as_secs_f64());
                        let resp = match result {
                            Ok(r) => r,
                            Err(e) if is_certificate_error(&e) => {
                                return Err(Attempt::Fatal(RegistryError::Tls(format!(
                                    "{}: certificate not trusted ({}); add its CA to hosts.toml (ca = \"...\") or mark the host with --insecure-registry",
                                    ep.base,
                                    error_chain(&e)
                                ))));
                            }
                            Err(e) if ep.http_fallback && base.starts_with("https://") && e.is_connect() => {
                                tracing::debug!(endpoint = %ep.base, "TLS connect failed, using plain HTTP");
                                self.inner.state.lock().expect("state lock").plain_http.insert(ep.base.clone(), true);
                                return Err(Attempt::Retry { reason: format!("TLS to {} failed: {e}", ep.base), after: Some(Duration::ZERO) });
                            }
                            Err(e) => return Err(transport(e)),
                        };
                        if resp.status() == StatusCode::UNAUTHORIZED {
                            let header = resp.headers().get("www-authenticate").and_then(|h| h.to_str().ok()).map(str::to_string);
                            let challenge = header.as_deref().and_then(auth::parse_challenge);
                            let Some(challenge) = challenge else {
                                return Err(Attempt::Fatal(RegistryError::Unauthorized {
                                    registry: t.registry.into(),
                                    detail: "401 without a usable WWW-Authenticate challenge".into(),
                                }));
                            };
                            let seen_before = {
                                let mut st = self.inner.state.lock().expect("state lock");
                                st.challenges.insert(ep.base.clone(), challenge.clone()) == Some(challenge.clone())
                            };
                            if force || (seen_before && auth.is_some() && matches!(challenge, Challenge::Basic)) {
                                let detail = if self.credentials_for(ep, &t).await.is_some() { "credentials rejected" } else { "no credentials for this host" };
                                return Err(Attempt::Fatal(RegistryError::Unauthorized { registry: t.registry.into(), detail: detail.into() }));
                            }
                            force = true;
                            continue;
                        }
                        if resp.status() == StatusCode::FORBIDDEN {
                            return Err(Attempt::Fatal(RegistryError::Denied { registry: t.registry.into(), what: what.into() }));
                        }
                        if resp.status() == StatusCode::NOT_FOUND {
                            return Err(Attempt::Fatal(RegistryError::NotFound { what: what.into() }));
                        }
                        let resp = classify(resp, what).await?;
                        return consume(resp).await;
                    }
                    unreachable!("the second pass returns")
                })
                .await;
            match result {
                Ok(v) => return Ok(v),
                // Reads fall through mirrors; for pushes, the first push-capable host answers.
                Err(e @ RegistryError::NotFound { .. }) if ep.mirror && !t.push => {
                    last_err = Some(e)
                }
                Err(e) if ep.mirror && !t.push => {
                    tracing::warn!(mirror = %ep.base, "mirror failed, trying the next endpoint: {e}");
                    last_err = Some(e)
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or_else(|| RegistryError::Other(format!("{what}: no endpoint"))))
    }

    fn target<'a>(r: &'a Reference, push: bool) -> Target<'a> {
        Target {
            registry: &r.registry,
            api_host: r.api_host(),
            repository: &r.repository,
            push,
        }
    }

    /// GETs a small JSON document (manifest, index, referrers list): its body and content type.
    async fn get_document(
        &self,
        r: &Reference,
        path: &str,
        what: &str,
        accept: &'static str,
    ) -> Result<(Bytes, String), RegistryError> {
        self.execute(
            Self::target(r, false),
            what,
            |http, base| http.get(format!("{base}{path}")).header(ACCEPT, accept),
            |resp| async move {
                let ct = resp
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let body = read_body(resp, Some(MAX_MANIFEST), None).await?;
                Ok((body, ct))
            },
        )
        .await
    }

    /// Fetches a manifest (by tag or digest); returns its bytes, media type and digest. A pinned
    /// digest is verified.
    pub async fn get_manifest(
        &self,
        r: &Reference,
        reference: &str,
    ) -> Result<(Bytes, String, Digest), RegistryError> {
        let path = format!("/v2/{}/manifests/{}", r.repository, reference);
        let what = format!("manifest {}@{}", r.repository, reference);
        let (body, media_type) = self.get_document(r, &path, &what, ACCEPT_MANIFESTS).await?;
        self.count_bytes(body.len());
        let digest = Digest::of(&body);
        if let Ok(expected) = reference.parse::<Digest>() {
            if expected != digest {
                return Err(RegistryError::DigestMismatch {
                    what,
                    expected,
                    actual: digest,
                });
            }
        }
        Ok((body, media_type, digest))
    }

    /// Fetches a whole (small) blob into memory and verifies its digest. Bytes that fail
    /// verification (damaged in transit) are fetched again until the deadline.
    pub async fn get_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        max: u64,
    ) -> Result<Bytes, RegistryError> {
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        let what = format!("blob {}@{}", r.repository, digest);
        let expected = *digest;
        let body = self
            .execute(
                Self::target(r, false),
                &what,
                |http, base| http.get(format!("{base}{path}")),
                |resp| async move {
                    let body = read_body(resp, Some(max), None).await?;
                    let actual = Digest::of(&body);
                    if actual != expected {
                        return Err(Attempt::Retry {
                            reason: format!("digest mismatch: expected {expected}, got {actual}"),
                            after: None,
                        });
                    }
                    Ok(body)
                },
            )
            .await?;
        self.count_bytes(body.len());
        Ok(body)
    }

    /// Reads bytes `[start, start + len)` of a blob with one range request. The caller verifies
    /// the content (span digests); this checks the server returned exactly that range.
    pub async fn get_blob_range(
        &self,
        r: &Reference,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        let what = format!("blob {}@{} bytes {}+{}", r.repository, digest, start, len);
        let range = format!("bytes={}-{}", start, start + len - 1);
        let body = self
            .execute(
                Self::target(r, false),
                &what,
                |http, base| {
                    http.get(format!("{base}{path}"))
                        .header(RANGE, range.clone())
                },
                |resp| async move {
                    let status = resp.status();
                    if status == StatusCode::PARTIAL_CONTENT {
                        check_content_range(resp.headers(), start, len)?;
                        read_body(resp, Some(len), Some(len)).await
                    } else {
                        // The server ignored the range: skip to the slice asked for and stop
                        // reading after it, holding no more than the slice.
                        read_slice(resp, start, len).await
                    }
                },
            )
            .await?;
        self.count_bytes(body.len());
        Ok(body)
    }

    /// Bytes `[start, start + len)` of a blob sent into `tx` in order as they arrive (see
    /// [`crate::source::BlobSource::read_range_into`]): a body that breaks off or stalls is
    /// resumed from where it stopped with a range request for the rest; a server that ignores
    /// ranges is read up to the slice and past nothing after it.
    pub async fn get_blob_range_into(
        &self,
        r: &Reference,
        digest: &Digest,
        start: u64,
        len: u64,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        use std::sync::atomic::Ordering::SeqCst;
        if len == 0 {
            return Ok(());
        }
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        let what = format!("blob {}@{} bytes {}+{}", r.repository, digest, start, len);
        // Bytes of the slice sent so far (survives retries).
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
        self.execute(
            Self::target(r, false),
            &what,
            |http, base| {
                let from = start + sent.load(SeqCst);
                http.get(format!("{base}{path}"))
                    .header(RANGE, format!("bytes={}-{}", from, start + len - 1))
            },
            |mut resp| {
                let (tx, sent, what) = (tx.clone(), sent.clone(), what.clone());
                let stall = self.inner.cfg.stall_timeout;
                async move {
                    let from = start + sent.load(SeqCst);
                    // Position in the blob of the body's first byte.
                    let mut pos = if resp.status() == StatusCode::PARTIAL_CONTENT {
                        check_content_range(resp.headers(), from, start + len - from)?;
                        from
                    } else {
                        0
                    };
                    let end = start + len;
                    while pos < end {
                        let Some(chunk) = next_chunk(&mut resp, stall).await? else {
                            return Err(Attempt::Retry {
                                reason: format!("{what}: body ended early"),
                                after: Some(Duration::ZERO),
                            });
                        };
                        let (c_start, c_end) = (pos, pos + chunk.len() as u64);
                        pos = c_end;
                        let want = start + sent.load(SeqCst);
                        let (lo, hi) = (want.max(c_start), end.min(c_end));
                        if lo >= hi {
                            continue;
                        }
                        let part = chunk.slice((lo - c_start) as usize..(hi - c_start) as usize);
                        sent.fetch_add(part.len() as u64, SeqCst);
                        self.count_bytes(part.len());
                        if tx.send(part).await.is_err() {
                            return Ok(()); // the reader went away
                        }
                    }
                    Ok(())
                }
            },
        )
        .await
    }

    fn count_bytes(&self, n: usize) {
        crate::metrics::registry_bytes(n as u64);
    }

    /// Streams a whole blob from `offset` into `tx`, resuming with range requests after failures.
    /// The receiver gets chunks in order; an error ends the stream.
    pub async fn stream_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        size: u64,
        tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    ) -> Result<(), RegistryError> {
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        let what = format!("blob {}@{}", r.repository, digest);
        let pos = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let result = self
            .execute(
                Self::target(r, false),
                &what,
                |http, base| {
                    let at = pos.load(std::sync::atomic::Ordering::SeqCst);
                    let req = http.get(format!("{base}{path}"));
                    if at > 0 {
                        req.header(RANGE, format!("bytes={at}-"))
                    } else {
                        req
                    }
                },
                |mut resp| {
                    let what = what.clone();
                    let tx = tx.clone();
                    let pos = pos.clone();
                    let stall = self.inner.cfg.stall_timeout;
                    async move {
                        let at = pos.load(std::sync::atomic::Ordering::SeqCst);
                        if at > 0 {
                            if resp.status() != StatusCode::PARTIAL_CONTENT {
                                return Err(Attempt::Fatal(RegistryError::Other(format!(
                                    "{what}: server cannot resume (no range support)"
                                ))));
                            }
                            check_content_range(resp.headers(), at, size - at)?;
                        }
                        while let Some(chunk) = next_chunk(&mut resp, stall).await? {
                            let now = pos
                                .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::SeqCst)
                                + chunk.len() as u64;
                            if now > size {
                                return Err(Attempt::Fatal(RegistryError::Other(format!(
                                    "{what}: longer than its descriptor's {size} bytes"
                                ))));
                            }
                            self.count_bytes(chunk.len());
                            if tx.send(Ok(chunk)).await.is_err() {
                                return Ok(()); // the reader went away
                            }
                        }
                        if pos.load(std::sync::atomic::Ordering::SeqCst) < size {
                            return Err(Attempt::Retry {
                                reason: "body ended early".into(),
                                after: Some(Duration::ZERO),
                            });
                        }
                        Ok(())
                    }
                },
            )
            .await;
        if let Err(e) = &result {
            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
        result
    }

    /// True if the repository has the blob.
    pub async fn blob_exists(
        &self,
        r: &Reference,
        digest: &Digest,
        push: bool,
    ) -> Result<bool, RegistryError> {
        let path = format!("/v2/{}/blobs/{}", r.repository, digest);
        match self
            .execute(
                Self::target(r, push),
                &format!("blob {digest}"),
                |http, base| http.head(format!("{base}{path}")),
                |_| async { Ok(()) },
            )
            .await
        {
            Ok(()) => Ok(true),
            Err(RegistryError::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob (monolithic upload) unless the repository already has it.
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), RegistryError> {
        if self.blob_exists(r, digest, true).await? {
            return Ok(());
        }
        let start = format!("/v2/{}/blobs/uploads/", r.repository);
        let what = format!("upload of {digest} to {}", r.repository);
        let location: String = self
            .execute(
                Self::target(r, true),
                &what,
                |http, base| {
                    http.post(format!("{base}{start}"))
                        .header(CONTENT_LENGTH, 0)
                },
                |resp| async move {
                    let loc = resp
                        .headers()
                        .get(LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .map(str::to_string);
                    let base = resp.url().clone();
                    let loc = loc.ok_or_else(|| {
                        Attempt::Fatal(RegistryError::Other("upload without Location".into()))
                    })?;
                    base.join(&loc).map(|u| u.to_string()).map_err(|e| {
                        Attempt::Fatal(RegistryError::Other(format!("bad Location: {e}")))
                    })
                },
            )
            .await?;
        let mut url =
            reqwest::Url::parse(&location).map_err(|e| RegistryError::Other(e.to_string()))?;
        url.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        self.execute(
            Self::target(r, true),
            &what,
            |http, _| {
                http.put(url.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, data.len())
                    .body(data.clone())
            },
            |_| async { Ok(()) },
        )
        .await
    }

    /// Uploads a manifest under `reference` (a tag or its digest).
    pub async fn push_manifest(
        &self,
        r: &Reference,
        reference: &str,
        media_type: &str,
        body: Bytes,
    ) -> Result<Digest, RegistryError> {
        let path = format!("/v2/{}/manifests/{}", r.repository, reference);
        let what = format!("manifest {}:{}", r.repository, reference);
        self.execute(
            Self::target(r, true),
            &what,
            |http, base| {
                http.put(format!("{base}{path}"))
                    .header(CONTENT_TYPE, media_type)
                    .body(body.clone())
            },
            |_| async { Ok(()) },
        )
        .await?;
        Ok(Digest::of(&body))
    }

    /// The referrers API (`GET /v2/<repo>/referrers/<digest>`); `Ok(None)` when the registry
    /// does not implement it.
    pub async fn referrers_api(
        &self,
        r: &Reference,
        subject: &Digest,
    ) -> Result<Option<Bytes>, RegistryError> {
        let path = format!("/v2/{}/referrers/{}", r.repository, subject);
        let what = format!("referrers of {subject}");
        match self.get_document(r, &path, &what, MEDIA_OCI_INDEX).await {
            Ok((body, ct)) if ct.starts_with(MEDIA_OCI_INDEX) => Ok(Some(body)),
            Ok(_) => Ok(None),
            Err(RegistryError::NotFound { .. }) => Ok(None),
            Err(RegistryError::Http {
                status: 400 | 405, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Resolves a reference to one image manifest for the configured platform, with its config.
    /// A reference pinned by digest is resolved once per client.
    pub async fn resolve(&self, r: &Reference) -> Result<ResolvedImage, RegistryError> {
        let key = r.digest.map(|d| repo_digest(r, d));
        if let Some(k) = &key {
            if let Some(hit) = self.inner.resolved.lock().expect("resolved").get(k) {
                return Ok(ResolvedImage {
                    reference: r.with_digest(hit.manifest_digest),
                    ..hit.clone()
                });
            }
        }
        let image = manifest::resolve(self, r).await?;
        if let Some(k) = key {
            remember(&self.inner.resolved, k, image.clone());
        }
        Ok(image)
    }

    /// Takes image `r` (pinned by digest) from its manifest and config obtained elsewhere
    /// (containerd's content store): checked as a registry's answer would be, then served by
    /// [`Client::resolve`] without a round trip.
    pub fn resolve_from(
        &self,
        r: &Reference,
        manifest: Bytes,
        config: Bytes,
    ) -> Result<ResolvedImage, RegistryError> {
        let image = manifest::from_documents(r, manifest, config)?;
        remember(
            &self.inner.resolved,
            repo_digest(r, image.manifest_digest),
            image.clone(),
        );
        Ok(image)
    }

    /// True if image `r` (pinned by digest) resolves without a round trip.
    pub fn is_resolved(&self, r: &Reference) -> bool {
        r.digest.is_some_and(|d| {
            self.inner
                .resolved
                .lock()
                .expect("resolved")
                .contains_key(&repo_digest(r, d))
        })
    }

    /// The referrers listing of `subject` (an OCI image index): from the referrers API, or
    /// the referrers tag `tag` on registries without it; `None` when there is none. Reused for
    /// a few seconds (an image's index and profile lookups share one).
    pub async fn referrers(
        &self,
        r: &Reference,
        subject: &Digest,
        tag: &str,
    ) -> Result<Option<Bytes>, RegistryError> {
        let key = repo_digest(r, *subject);
        // One lookup at a time per subject: concurrent callers (an image's index and profile
        // lookups) wait for it and share its answer.
        let flight = {
            let mut flights = self.inner.listing_flights.lock().expect("listing flights");
            flights.retain(|_, f| Arc::strong_count(f) > 1);
            flights.entry(key.clone()).or_default().clone()
        };
        let _turn = flight.lock().await;
        if let Some((at, listing)) = self.inner.listings.lock().expect("listings").get(&key) {
            if at.elapsed() < REFERRERS_TTL {
                return Ok(listing.clone());
            }
        }
        let api = self
            .inner
            .referrers_api
            .lock()
            .expect("referrers api")
            .get(&r.registry)
            .copied();
        let by_tag = async {
            match self.get_manifest(r, tag).await {
                Ok((b, _, _)) => Ok(Some(b)),
                Err(RegistryError::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        };
        let listing = match api {
            Some(true) => self.referrers_api(r, subject).await?,
            Some(false) => by_tag.await?,
            // Not known yet: ask both ways at once (one round trip, not two, on a registry
            // without the API), and remember which way answered.
            None => {
                let (from_api, from_tag) = tokio::join!(self.referrers_api(r, subject), by_tag);
                let from_api = from_api?;
                self.inner
                    .referrers_api
                    .lock()
                    .expect("referrers api")
                    .insert(r.registry.clone(), from_api.is_some());
                match from_api {
                    Some(b) => Some(b),
                    None => from_tag?,
                }
            }
        };
        remember(&self.inner.listings, key, (Instant::now(), listing.clone()));
        Ok(listing)
    }

    /// Forgets the cached referrers listing of `subject` (after pushing a referrer to it).
    pub fn forget_referrers(&self, r: &Reference, subject: &Digest) {
        self.inner
            .listings
            .lock()
            .expect("listings")
            .remove(&repo_digest(r, *subject));
    }
}

/// The error and its causes, joined (reqwest's Display alone hides the interesting part).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let s_str = s.to_string();
        if !out.contains(&s_str) {
            out.push_str(": ");
            out.push_str(&s_str);
        }
        cur = s.source();
    }
    out
}

/// A TLS certificate verification failure: retrying or falling back to HTTP cannot cure it.
fn is_certificate_error(e: &reqwest::Error) -> bool {
    let chain = error_chain(e).to_ascii_lowercase();
    chain.contains("certificate")
        || chain.contains("unknownissuer")
        || chain.contains("caUsedAsEndEntity".to_ascii_lowercase().as_str())
}

fn transport(e: reqwest::Error) -> Attempt {
    // Connection refused/reset, timeouts, broken bodies: all worth another try.
    Attempt::Retry {
        reason: error_chain(&e),
        after: None,
    }
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get("retry-after")?.to_str().ok()?.trim();
    v.parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(60)))
}

/// How much of an error response's body is read (for the message).
const MAX_ERROR_BODY: usize = 4096;

/// Turns non-success statuses into retry or failure.
async fn classify(resp: reqwest::Response, what: &str) -> Result<reqwest::Response, Attempt> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let after = retry_after(resp.headers());
    let url = resp.url().to_string();
    if status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
    {
        return Err(Attempt::Retry {
            reason: format!("{what}: HTTP {status}"),
            after,
        });
    }
    // Only the start of an error body is kept (for the message); the rest is not read.
    let mut resp = resp;
    let mut head = Vec::new();
    while head.len() < MAX_ERROR_BODY {
        match resp.chunk().await {
            Ok(Some(c)) => head.extend_from_slice(&c[..c.len().min(MAX_ERROR_BODY - head.len())]),
            _ => break,
        }
    }
    let body: String = String::from_utf8_lossy(&head).chars().take(300).collect();
    Err(Attempt::Fatal(RegistryError::Http {
        url,
        status: status.as_u16(),
        body,
    }))
}

/// Reads a body fully; refuses more than `max` bytes; with `exact`, anything else than that
/// many bytes is a (retryable) truncation.
async fn read_body(
    mut resp: reqwest::Response,
    max: Option<u64>,
    exact: Option<u64>,
) -> Result<Bytes, Attempt> {
    if let (Some(max), Some(len)) = (max, resp.content_length()) {
        if len > max {
            return Err(Attempt::Fatal(RegistryError::Other(format!(
                "response of {len} bytes exceeds the limit of {max}"
            ))));
        }
    }
    let declared = resp.content_length();
    let mut buf = bytes::BytesMut::with_capacity(
        declared
            .unwrap_or(0)
            .min(max.unwrap_or(u64::MAX))
            .min(64 << 20) as usize,
    );
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                buf.extend_from_slice(&c);
                if max.is_some_and(|m| buf.len() as u64 > m) {
                    return Err(Attempt::Fatal(RegistryError::Other(format!(
                        "response exceeds the limit of {} bytes",
                        max.unwrap_or(0)
                    ))));
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Attempt::Retry {
                    reason: format!("reading body: {e}"),
                    after: None,
                })
            }
        }
    }
    let got = buf.len() as u64;
    if let Some(want) = exact.or(declared) {
        if got != want {
            return Err(Attempt::Retry {
                reason: format!("body truncated: {got} of {want} bytes"),
                after: None,
            });
        }
    }
    Ok(buf.freeze())
}

/// Bytes `[start, start + len)` of a whole-body response, read as it streams: what comes before
/// is dropped, nothing after is read.
async fn read_slice(mut resp: reqwest::Response, start: u64, len: u64) -> Result<Bytes, Attempt> {
    let status = resp.status();
    let mut pos = 0u64;
    let mut out = bytes::BytesMut::with_capacity(len.min(64 << 20) as usize);
    while (out.len() as u64) < len {
        let c = match resp.chunk().await {
            Ok(Some(c)) => c,
            Ok(None) => {
                return Err(Attempt::Fatal(RegistryError::Other(format!(
                    "{status}: blob shorter than requested range"
                ))))
            }
            Err(e) => {
                return Err(Attempt::Retry {
                    reason: format!("reading body: {e}"),
                    after: None,
                })
            }
        };
        let (c_start, c_end) = (pos, pos + c.len() as u64);
        pos = c_end;
        let from = start.max(c_start);
        let to = (start + len).min(c_end);
        if from < to {
            out.extend_from_slice(&c[(from - c_start) as usize..(to - c_start) as usize]);
        }
    }
    Ok(out.freeze())
}

/// The next chunk of a body (`None` at its end); a stall of `stall` or a broken body is
/// retried (resumed by the caller).
async fn next_chunk(
    resp: &mut reqwest::Response,
    stall: Duration,
) -> Result<Option<Bytes>, Attempt> {
    match tokio::time::timeout(stall, resp.chunk()).await {
        Err(_) => Err(Attempt::Retry {
            reason: "body stalled".into(),
            after: Some(Duration::ZERO),
        }),
        Ok(Err(e)) => Err(Attempt::Retry {
            reason: format!("body: {e}"),
            after: Some(Duration::ZERO),
        }),
        Ok(Ok(c)) => Ok(c),
    }
}

fn check_content_range(h: &HeaderMap, start: u64, len: u64) -> Result<(), Attempt> {
    let Some(v) = h.get("content-range").and_then(|v| v.to_str().ok()) else {
        return Ok(()); // length is checked on the body
    };
    let expect = format!("bytes {}-{}/", start, start + len - 1);
    if v.starts_with(&expect) {
        Ok(())
    } else {
        Err(Attempt::Fatal(RegistryError::Other(format!(
            "server returned range {v:?}, asked for {expect}"
        ))))
    }
}

#[cfg(test)]
mod tests;
