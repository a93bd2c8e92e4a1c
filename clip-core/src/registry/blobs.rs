//! Blobs: whole (small, verified), ranges (read whole or streamed into a channel), streamed
//! whole with resumption, existence checks and pushes.
//!
//! Part of [`Client`]; uses the request loop.

use super::*;

impl Client {
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

    pub(super) fn count_bytes(&self, n: usize) {
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
}
