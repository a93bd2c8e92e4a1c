//! One request, retried: the endpoints to try (mirrors first), the HTTP client for each, the
//! loop that sends, classifies the outcome and retries with backoff within the operation's
//! deadline, and reading bodies (bounded, resumable).
//!
//! Part of [`Client`]; every operation goes through [`Client::execute`].

use super::*;

/// The outcome of one attempt.
pub(super) enum Attempt {
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
pub(super) struct Target<'a> {
    pub(super) registry: &'a str,
    pub(super) api_host: &'a str,
    pub(super) repository: &'a str,
    pub(super) push: bool,
}

impl Client {
    pub(super) fn http(&self, ep: &Endpoint) -> Result<reqwest::Client, RegistryError> {
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

    pub(super) fn endpoints(&self, t: &Target) -> Vec<Endpoint> {
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

    pub(super) fn base_url(&self, ep: &Endpoint) -> String {
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

    pub(super) fn scope(t: &Target) -> String {
        format!(
            "repository:{}:{}",
            t.repository,
            if t.push { "pull,push" } else { "pull" }
        )
    }

    /// Runs `op` until it succeeds, fails fatally, or the deadline passes.
    pub(super) async fn retrying<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, Attempt>>,
    {
        let start = Instant::now();
        let own = start + self.inner.cfg.deadline;
        // A caller that waits less than the registry timeout (containerd, for a request with a
        // deadline) gets an answer before it stops waiting.
        let (deadline, why) = match super::caller_deadline() {
            Some(c) if c < own => (
                c,
                format!(
                    "the caller's deadline, {:.0} s",
                    c.saturating_duration_since(start).as_secs_f64()
                ),
            ),
            _ => (
                own,
                format!(
                    "the registry timeout, {:.0} s",
                    self.inner.cfg.deadline.as_secs_f64()
                ),
            ),
        };
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
                            why,
                            last: reason,
                        });
                    }
                    // Said at warning level: someone waiting on a pull or a read sees why
                    // nothing happens, and for how long it can go on.
                    tracing::warn!(
                        "{what}: {reason}; retrying in {:.1} s (attempt {attempts}, giving up \
                         {:.0} s after the first: {why})",
                        delay.as_secs_f64(),
                        deadline.saturating_duration_since(start).as_secs_f64()
                    );
                    crate::metrics::registry_retry();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Sends a request built by `build(base_url)` to each endpoint in turn with auth and retries,
    /// and hands the successful response to `consume` (inside the retry loop).
    pub(super) async fn execute<T, B, C, Fut>(
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
                        let result = req.send().await.map_err(redact);
                        let outcome = match &result {
                            Ok(r) if r.status().is_success() => "2xx",
                            Ok(r) if r.status().is_client_error() => "4xx",
                            Ok(r) if r.status().is_server_error() => "5xx",
                            Ok(_) => "other",
                            Err(_) => "transport-error",
                        };
                        crate::metrics::registry_request(outcome, sent.elapsed().as_secs_f64());
                        let resp = match result {
                            Ok(r) => {
                                let mut st = self.inner.state.lock().expect("state lock");
                                if !st.reached.contains(&ep.base) && st.reached.len() < 4096 {
                                    st.reached.insert(ep.base.clone());
                                }
                                r
                            }
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
                            Err(e) if is_no_such_address(&e) && !self.inner.state.lock().expect("state lock").reached.contains(&ep.base) => {
                                return Err(Attempt::Fatal(RegistryError::Unreachable {
                                    endpoint: ep.base.clone(),
                                    detail: error_chain(&redact(e)),
                                }));
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

    pub(super) fn target<'a>(r: &'a Reference, push: bool) -> Target<'a> {
        Target {
            registry: &r.registry,
            api_host: r.api_host(),
            repository: &r.repository,
            push,
        }
    }
}

/// The error and its causes, joined (reqwest's Display alone hides the interesting part).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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
pub(super) fn is_certificate_error(e: &reqwest::Error) -> bool {
    let chain = error_chain(e).to_ascii_lowercase();
    chain.contains("certificate")
        || chain.contains("unknownissuer")
        || chain.contains("caUsedAsEndEntity".to_ascii_lowercase().as_str())
}

/// A connection refused, or a host name that does not resolve: on first contact, the address
/// is wrong (a timeout is not: the host may be slow or the path lossy).
pub(super) fn is_no_such_address(e: &reqwest::Error) -> bool {
    if !e.is_connect() {
        return false;
    }
    let chain = error_chain(e).to_ascii_lowercase();
    chain.contains("connection refused")
        || chain.contains("dns error")
        || chain.contains("failed to lookup address")
        || chain.contains("name or service not known")
}

pub(super) fn transport(e: reqwest::Error) -> Attempt {
    // Connection refused/reset, timeouts, broken bodies: all worth another try.
    Attempt::Retry {
        reason: error_chain(&redact(e)),
        after: None,
    }
}

/// `url` without its query and fragment. A registry may redirect a blob to object storage
/// with a presigned URL, whose query carries the signature: a bearer secret that must not reach
/// a log line or an error message.
pub(super) fn redacted(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    match url.query() {
        Some(_) => format!("{u}?<redacted>"),
        None => u.to_string(),
    }
}

/// `e` with the query of its URL (see [`redacted`]) removed: reqwest's errors print their URL.
pub(super) fn redact(mut e: reqwest::Error) -> reqwest::Error {
    if let Some(u) = e.url_mut() {
        if u.query().is_some() {
            u.set_query(Some("redacted"));
        }
        u.set_fragment(None);
    }
    e
}

pub(super) fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get("retry-after")?.to_str().ok()?.trim();
    v.parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(60)))
}

/// How much of an error response's body is read (for the message).
pub(super) const MAX_ERROR_BODY: usize = 4096;

/// Turns non-success statuses into retry or failure.
pub(super) async fn classify(
    resp: reqwest::Response,
    what: &str,
) -> Result<reqwest::Response, Attempt> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let after = retry_after(resp.headers());
    let url = redacted(resp.url());
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
        match resp.chunk().await.map_err(redact) {
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
pub(super) async fn read_body(
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
        match resp.chunk().await.map_err(redact) {
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
pub(super) async fn read_slice(
    mut resp: reqwest::Response,
    start: u64,
    len: u64,
) -> Result<Bytes, Attempt> {
    let status = resp.status();
    let mut pos = 0u64;
    let mut out = bytes::BytesMut::with_capacity(len.min(64 << 20) as usize);
    while (out.len() as u64) < len {
        let c = match resp.chunk().await.map_err(redact) {
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
pub(super) async fn next_chunk(
    resp: &mut reqwest::Response,
    stall: Duration,
) -> Result<Option<Bytes>, Attempt> {
    match tokio::time::timeout(stall, async { resp.chunk().await.map_err(redact) }).await {
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

pub(super) fn check_content_range(h: &HeaderMap, start: u64, len: u64) -> Result<(), Attempt> {
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
