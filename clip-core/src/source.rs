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

pub mod fake {
    //! An in-memory [`BlobSource`] with scripted faults and request counting.

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
        bytes: AtomicU64,
        in_flight: AtomicU64,
        max_in_flight: AtomicU64,
        /// Requests wait until this many are in flight at once (or 5 s pass).
        hold: Mutex<Option<(u64, Arc<tokio::sync::Notify>)>>,
        /// [`BlobSource::shared_origin`] (None: readers never share a fetcher).
        origin: Option<String>,
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

        /// Bytes sent so far.
        pub fn bytes_sent(&self) -> u64 {
            self.bytes.load(Relaxed)
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
        ) -> Result<Bytes, RegistryError> {
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
        ) -> Result<Bytes, RegistryError> {
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
            match fault {
                None => {}
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
            self.bytes.fetch_add(out.len() as u64, Relaxed);
            Ok(out)
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
            let got = self.answer(blob, start, len).await?;
            // Like the registry client: a short answer is an error, never a short result.
            if got.len() as u64 != len {
                return Err(RegistryError::Other(format!(
                    "blob {blob}: got {} of {len} bytes",
                    got.len()
                )));
            }
            Ok(got)
        }

        async fn read_blob(&self, blob: &Digest, max: u64) -> Result<Bytes, RegistryError> {
            let size = self.blobs.get(blob).map_or(0, |b| b.len() as u64);
            if size > max {
                return Err(RegistryError::Other(format!(
                    "blob {blob}: {size} bytes, more than {max}"
                )));
            }
            let got = self.answer(blob, 0, size).await?;
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
