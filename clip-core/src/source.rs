//! The blob-source seam: what the fetcher needs from a registry, and nothing else.
//!
//! [`BlobSource`] reads byte ranges of blobs and whole small blobs of one repository. The
//! registry client implements it ([`RegistrySource`]); [`fake::FakeSource`] is an in-memory
//! source with scripted faults for unit tests of the read path (no registry, no root).

use crate::digest::Digest;
use crate::reference::Reference;
use crate::registry::{Client, RegistryError};
use async_trait::async_trait;
use bytes::Bytes;

/// Blobs of one repository.
#[async_trait]
pub trait BlobSource: Send + Sync {
    /// Exactly bytes `[start, start + len)` of `blob`, in one request. The caller verifies the
    /// content; a source only guarantees the length.
    async fn read_range(&self, blob: &Digest, start: u64, len: u64)
        -> Result<Bytes, RegistryError>;

    /// Bytes `[start, start + len)` of `blob` sent into `tx` in order as they arrive, from one
    /// request (resumed where it broke off, where the source can). Returns early, without an
    /// error, when the receiver goes away; never sends more than `len` bytes. The default
    /// sends [`BlobSource::read_range`]'s answer whole.
    async fn read_range_into(
        &self,
        blob: &Digest,
        start: u64,
        len: u64,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        let b = self.read_range(blob, start, len).await?;
        let _ = tx.send(b).await;
        Ok(())
    }

    /// A whole blob of at most `max` bytes, verified against its digest.
    async fn read_blob(&self, blob: &Digest, max: u64) -> Result<Bytes, RegistryError>;

    /// Where the blobs come from, for messages (`host/repository`).
    fn describe(&self) -> String;

    /// An identity two sources share when they read the same blobs the same way (the same
    /// repository through the same client): readers of a layer on such sources share one
    /// fetcher. `None`: never shared.
    fn shared_origin(&self) -> Option<String> {
        None
    }
}

/// A repository on a registry, through the (retrying, authenticating) client.
pub struct RegistrySource {
    client: Client,
    reference: Reference,
}

impl RegistrySource {
    pub fn new(client: Client, reference: Reference) -> Self {
        RegistrySource { client, reference }
    }
}

#[async_trait]
impl BlobSource for RegistrySource {
    async fn read_range(
        &self,
        blob: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Bytes, RegistryError> {
        self.client
            .get_blob_range(&self.reference, blob, start, len)
            .await
    }

    async fn read_range_into(
        &self,
        blob: &Digest,
        start: u64,
        len: u64,
        tx: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<(), RegistryError> {
        self.client
            .get_blob_range_into(&self.reference, blob, start, len, tx)
            .await
    }

    async fn read_blob(&self, blob: &Digest, max: u64) -> Result<Bytes, RegistryError> {
        self.client.get_blob(&self.reference, blob, max).await
    }

    fn shared_origin(&self) -> Option<String> {
        Some(self.describe())
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.reference.registry, self.reference.repository)
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod fake {
    //! An in-memory [`BlobSource`] with scripted faults and request counting, for tests (this
    //! crate's, and other crates' tests and examples with the `test-util` feature); never in a
    //! release build.

    use super::*;
    use std::collections::{HashMap, VecDeque};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// What happens to one request.
    #[derive(Clone, Debug)]
    pub enum Fault {
        /// The request fails with this message.
        Error(String),
        /// The request is answered after this long.
        Delay(Duration),
        /// The answer is cut to this many bytes.
        Truncate(usize),
        /// The byte at this position of the answer is flipped.
        Corrupt(usize),
        /// A streamed answer (`read_range_into`) stops after this many bytes until
        /// [`FakeSource::release_stalls`], then goes on.
        StallAfter(usize),
    }

    /// One request the source answered (or failed).
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Request {
        pub blob: Digest,
        pub start: u64,
        pub len: u64,
    }

    /// Blobs in memory. Faults are taken in order, one per request (`script`), after which
    /// requests get `always` (if set) or succeed.
    #[derive(Default)]
    pub struct FakeSource {
        blobs: HashMap<Digest, Bytes>,
        script: Mutex<VecDeque<Fault>>,
        always: Mutex<Option<Fault>>,
        log: Mutex<Vec<Request>>,
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
        /// Requests wait until this many are in flight at once (or 5 s pass).
        hold: Mutex<Option<(u64, Arc<tokio::sync::Notify>)>>,
        /// [`BlobSource::shared_origin`] (None: readers never share a fetcher).
        origin: Option<String>,
        /// Stalled answers wait for a permit here.
        stalls: Gate,
    }

    /// A semaphore that starts closed.
    struct Gate(tokio::sync::Semaphore);

    impl Default for Gate {
        fn default() -> Self {
            Gate(tokio::sync::Semaphore::new(0))
        }
    }

    impl FakeSource {
        pub fn new() -> Self {
            Self::default()
        }

        /// Adds a blob; returns its digest.
        pub fn with_blob(mut self, data: impl Into<Bytes>) -> Self {
            let data = data.into();
            self.blobs.insert(Digest::of(&data), data);
            self
        }

        /// Readers on this source share their layer's fetcher, as registry sources do.
        pub fn with_origin(mut self, origin: &str) -> Self {
            self.origin = Some(origin.to_string());
            self
        }

        /// Lets every stalled answer (one permit each, now or later) go on.
        pub fn release_stalls(&self) {
            self.stalls.0.add_permits(1 << 16);
        }

        /// Faults for the next requests, one each, in order.
        pub fn script(&self, faults: impl IntoIterator<Item = Fault>) {
            self.script.lock().expect("fake lock").extend(faults);
        }

        /// A fault for every request once the script is used up (None: succeed).
        pub fn always(&self, fault: Option<Fault>) {
            *self.always.lock().expect("fake lock") = fault;
        }

        /// Requests answered so far (failed ones included).
        pub fn requests(&self) -> Vec<Request> {
            self.log.lock().expect("fake lock").clone()
        }

        pub fn request_count(&self) -> usize {
            self.log.lock().expect("fake lock").len()
        }

        /// Most requests that were in flight at the same time.
        pub fn max_in_flight(&self) -> u64 {
            self.max_in_flight.load(Relaxed)
        }

        /// Makes each request wait until `n` requests are in flight together (a way to prove
        /// requests run concurrently: run one after another, they give up after 5 s instead).
        pub fn hold_until_concurrent(&self, n: u64) {
            *self.hold.lock().expect("fake lock") = Some((n, Arc::new(tokio::sync::Notify::new())));
        }

        async fn held(&self) {
            let hold = self.hold.lock().expect("fake lock").clone();
            let Some((n, notify)) = hold else {
                let now = self.in_flight.fetch_add(1, Relaxed) + 1;
                self.max_in_flight.fetch_max(now, Relaxed);
                return;
            };
            // Registered before counting, so a wake-up between the two is not lost.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.in_flight.fetch_add(1, Relaxed) + 1;
            self.max_in_flight.fetch_max(now, Relaxed);
            if now >= n {
                notify.notify_waiters();
            } else {
                let _ = tokio::time::timeout(Duration::from_secs(5), notified).await;
            }
        }

        fn next_fault(&self) -> Option<Fault> {
            if let Some(f) = self.script.lock().expect("fake lock").pop_front() {
                return Some(f);
            }
            self.always.lock().expect("fake lock").clone()
        }

        async fn answer(
            &self,
            blob: &Digest,
            start: u64,
            len: u64,
        ) -> Result<(Bytes, Option<usize>), RegistryError> {
            self.log.lock().expect("fake lock").push(Request {
                blob: *blob,
                start,
                len,
            });
            self.held().await;
            let out = self.respond(blob, start, len).await;
            self.in_flight.fetch_sub(1, Relaxed);
            out
        }

        async fn respond(
            &self,
            blob: &Digest,
            start: u64,
            len: u64,
        ) -> Result<(Bytes, Option<usize>), RegistryError> {
            let fault = self.next_fault();
            let data = self
                .blobs
                .get(blob)
                .ok_or_else(|| RegistryError::NotFound {
                    what: format!("blob {blob}"),
                })?;
            let end = start.checked_add(len).filter(|&e| e <= data.len() as u64);
            let Some(end) = end else {
                return Err(RegistryError::Other(format!(
                    "range {start}+{len} outside blob {blob} of {} bytes",
                    data.len()
                )));
            };
            let mut out = data.slice(start as usize..end as usize);
            let mut stall = None;
            match fault {
                None => {}
                Some(Fault::StallAfter(n)) => stall = Some(n),
                Some(Fault::Error(m)) => return Err(RegistryError::Other(m)),
                Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
                Some(Fault::Truncate(n)) => out = out.slice(..n.min(out.len())),
                Some(Fault::Corrupt(i)) => {
                    let mut v = out.to_vec();
                    if let Some(b) = v.get_mut(i) {
                        *b ^= 0x55;
                    }
                    out = Bytes::from(v);
                }
            }
            Ok((out, stall))
        }
    }

    #[async_trait]
    impl BlobSource for FakeSource {
        async fn read_range(
            &self,
            blob: &Digest,
            start: u64,
            len: u64,
        ) -> Result<Bytes, RegistryError> {
            let (got, _) = self.answer(blob, start, len).await?;
            // Like the registry client: a short answer is an error, never a short result.
            if got.len() as u64 != len {
                return Err(RegistryError::Other(format!(
                    "blob {blob}: got {} of {len} bytes",
                    got.len()
                )));
            }
            Ok(got)
        }

        /// The answer in 16 KiB chunks, as a body arrives; a truncated answer sends what it
        /// has, then fails (a body that ended early).
        async fn read_range_into(
            &self,
            blob: &Digest,
            start: u64,
            len: u64,
            tx: tokio::sync::mpsc::Sender<Bytes>,
        ) -> Result<(), RegistryError> {
            let (got, mut stall) = self.answer(blob, start, len).await?;
            let mut at = 0;
            while at < got.len() {
                let mut end = (at + (16 << 10)).min(got.len());
                if let Some(n) = stall.filter(|&n| n >= at) {
                    end = end.min(n);
                    if end == at {
                        let _ = self.stalls.0.acquire().await.map(|p| p.forget());
                        stall = None;
                        continue;
                    }
                }
                if tx.send(got.slice(at..end)).await.is_err() {
                    return Ok(());
                }
                at = end;
            }
            if got.len() as u64 != len {
                return Err(RegistryError::Other(format!(
                    "blob {blob}: body ended after {} of {len} bytes",
                    got.len()
                )));
            }
            Ok(())
        }

        async fn read_blob(&self, blob: &Digest, max: u64) -> Result<Bytes, RegistryError> {
            let size = self.blobs.get(blob).map_or(0, |b| b.len() as u64);
            if size > max {
                return Err(RegistryError::Other(format!(
                    "blob {blob}: {size} bytes, more than {max}"
                )));
            }
            let (got, _) = self.answer(blob, 0, size).await?;
            let actual = Digest::of(&got);
            if actual != *blob {
                return Err(RegistryError::DigestMismatch {
                    what: format!("blob {blob}"),
                    expected: *blob,
                    actual,
                });
            }
            Ok(got)
        }

        fn describe(&self) -> String {
            "fake".into()
        }

        fn shared_origin(&self) -> Option<String> {
            self.origin.clone()
        }
    }
}
