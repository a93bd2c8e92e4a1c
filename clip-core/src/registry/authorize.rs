//! Authorizing a request: which credentials go to which host (the registry's own, a mirror's,
//! a token server's only when trusted), the `WWW-Authenticate` challenge, and bearer tokens
//! cached per endpoint and scope.
//!
//! Part of [`Client`]; uses [`super::auth`] for the credential and token types.

use super::*;

impl Client {
    /// A registry's credentials: given explicitly, else from the docker config's credential
    /// helper for it (`credHelpers`, `credsStore`), else its stored `auths`.
    pub(super) async fn credentials(&self, registry: &str) -> Option<Credentials> {
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
    pub(super) async fn credentials_for(
        &self,
        ep: &Endpoint,
        t: &Target<'_>,
    ) -> Option<Credentials> {
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
    pub(super) fn realm_gets_credentials(
        &self,
        ep: &Endpoint,
        t: &Target,
        realm: &reqwest::Url,
    ) -> bool {
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
    pub(super) fn realm_http(
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

    /// The Authorization header to send, fetching a bearer token first if one is needed.
    pub(super) async fn authorization(
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

    pub(super) async fn fetch_token(
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
}
