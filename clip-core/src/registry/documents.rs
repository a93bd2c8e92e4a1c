//! Documents: manifests (get, push), resolution of a reference to one image (cached by digest),
//! and referrers listings (the API, or the referrers tag schema; single flight, reused briefly).
//!
//! Part of [`Client`]; uses the request loop and [`super::manifest`].

use super::*;

impl Client {
    /// GETs a small JSON document (manifest, index, referrers list): its body and content type.
    pub(super) async fn get_document(
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
