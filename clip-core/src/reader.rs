//! Lazy reads: a byte range of a layer's uncompressed stream, assembled from the spans that
//! cover it.
//!
//! The reader maps a range to spans, asks the layer's [`LayerFetcher`] for them (cache tiers
//! first, the registry on a miss: see [`crate::fetch`]), and cuts the reply out of them. A read
//! that continues where the previous one ended starts read-ahead of the next spans, never past
//! the end of the file being read.

use crate::cache::files::FileStore;
use crate::cache::{CacheConfig, CacheError, TieredCache};
pub use crate::fetch::ReadError;
use crate::fetch::{FetchConfig, Fetcher, LayerFetcher};
use crate::index::LayerIndex;
use crate::index::LocalWindows;
use crate::profile::Recorder;
use crate::reference::Reference;
use crate::registry::Client;
use crate::source::{BlobSource, RegistrySource};
use crate::store::Store;
use bytes::{Bytes, BytesMut};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How a layer reader behaves. Default: 4 MiB of read-ahead within a file, 256 KiB of locality.
#[derive(Clone, Debug)]
pub struct ReaderConfig {
    /// Uncompressed bytes (in whole spans) fetched ahead of a sequential reader (0: none).
    pub readahead_bytes: u64,
    /// A cold read also fetches the spans after it, up to this many bytes from its first span,
    /// in the same request: where no startup profile lists the read, neighbouring files are the
    /// best guess of what comes next (0: only what is read).
    pub locality_bytes: u64,
}

impl Default for ReaderConfig {
    fn default() -> Self {
        ReaderConfig {
            readahead_bytes: 4 << 20,
            // Twice the default span: 1 MiB fetched 3.6x the bytes of the spans read in the
            // seed scenario (50 scattered files) once spans became 128 KiB; 256 KiB keeps that
            // at 1.3x (docs/benchmarks.md, history at 9053815).
            locality_bytes: 256 << 10,
        }
    }
}

/// Reads one layer lazily.
pub struct LayerReader {
    /// The index this reader was given: its files are read where it says. The fetcher may be
    /// another reader's, of another index of the layer with the same span table; its entries
    /// are never used for this reader's files.
    index: Arc<LayerIndex>,
    /// The layer's fetcher (shared by every reader of the layer with the same span table).
    fetcher: Arc<LayerFetcher>,
    cfg: ReaderConfig,
    /// One past the last span of the previous read (for read-ahead).
    last_end: AtomicUsize,
    /// Notes the ranges read while a startup profile is being recorded.
    recorder: Option<Arc<Recorder>>,
}

impl LayerReader {
    /// A reader of the layer `index` describes, fetching through `fetcher` from `source`;
    /// `local_windows` is the layer's windows blob when it is on this node.
    pub fn new(
        fetcher: &Arc<Fetcher>,
        source: Arc<dyn BlobSource>,
        index: Arc<LayerIndex>,
        local_windows: Option<LocalWindows>,
        cfg: ReaderConfig,
    ) -> Arc<Self> {
        Arc::new(LayerReader {
            fetcher: fetcher.layer(source, index.clone(), local_windows),
            index,
            cfg,
            last_end: AtomicUsize::new(usize::MAX),
            recorder: None,
        })
    }

    /// This reader, noting what it reads in `recorder` (see [`crate::profile`]).
    pub fn recording(self: Arc<Self>, recorder: Arc<Recorder>) -> Arc<Self> {
        Arc::new(LayerReader {
            index: self.index.clone(),
            fetcher: self.fetcher.clone(),
            cfg: self.cfg.clone(),
            last_end: AtomicUsize::new(usize::MAX),
            recorder: Some(recorder),
        })
    }

    /// Starts fetches of the spans covering `[offset, offset + len)` that no local tier has,
    /// without waiting (must be called within the runtime).
    pub fn prefetch(&self, offset: u64, len: u64) {
        let spans = self.index().spans_covering(offset, len);
        self.fetcher.prefetch(spans);
    }

    /// A file at `[offset, offset + len)` was opened: starts fetching all of it (a program that
    /// opens a file reads it), unless a startup profile lists part of it, which means the profile
    /// knows which parts are read (a shared library, say, is mostly mapped, not read).
    /// The spans that follow it up to the reader's locality go in the same request (the read
    /// that follows the open would ask for them, in a request and a window of their own).
    pub fn prefetch_opened(&self, offset: u64, len: u64) {
        let spans = self.index().spans_covering(offset, len);
        if self.fetcher.profiled(spans.clone()) {
            return;
        }
        let spans = spans.start..self.fetcher.locality_end(spans, self.cfg.locality_bytes);
        self.fetcher.prefetch(spans);
    }

    /// True if a startup profile replayed on this layer lists any span of
    /// `[offset, offset + len)`.
    pub fn profiled(&self, offset: u64, len: u64) -> bool {
        self.fetcher
            .profiled(self.index().spans_covering(offset, len))
    }

    /// Fetches the spans of `ranges` on a guess, in the background, yielding to demand reads
    /// (see [`LayerFetcher::speculate`]). Returns the runs fetched.
    pub async fn speculate(self: &Arc<Self>, ranges: &[(u64, u64)]) -> usize {
        let spans = crate::profile::spans_of(self.index(), ranges);
        self.fetcher.speculate(&spans).await
    }

    /// The recorder this reader notes its reads in, if any.
    pub fn recorder(&self) -> Option<&Arc<Recorder>> {
        self.recorder.as_ref()
    }

    /// Fetches the spans a startup profile's `ranges` touch, ahead of the program, in large
    /// runs on the prefetch pool (demand reads go first). Returns the runs fetched.
    pub async fn prefetch_ranges(self: &Arc<Self>, ranges: &[(u64, u64)]) -> usize {
        let spans = crate::profile::spans_of(self.index(), ranges);
        self.fetcher.prefetch_spans(&spans).await
    }

    /// Fetches the whole layer now (eager mode: see
    /// [`crate::fetch::LayerFetcher::fetch_whole`]); `None` when it is streamed already.
    pub fn fetch_whole(&self) -> Option<tokio::task::JoinHandle<u64>> {
        self.fetcher.fetch_whole()
    }

    /// Whether the layer has switched to bulk streaming.
    pub fn bulk_started(&self) -> bool {
        self.fetcher.bulk_started()
    }

    /// See [`crate::fetch::LayerFetcher::sibling_streams`]. Call within the runtime's context.
    pub fn sibling_streams(&self) {
        self.fetcher.sibling_streams()
    }

    /// Waits until the layer's bulk stream has ended (at once if there is none).
    pub async fn bulk_ended(&self) {
        self.fetcher.bulk_ended().await
    }

    /// The index this reader reads files by (its own, whichever fetcher it shares).
    pub fn index(&self) -> &Arc<LayerIndex> {
        &self.index
    }

    /// True if every span covering `[offset, offset + len)` is in memory or on local disk.
    pub fn is_local(&self, offset: u64, len: u64) -> bool {
        self.index()
            .spans_covering(offset, len)
            .all(|i| self.fetcher.is_local(i))
    }

    /// Bytes `[offset, offset + len)` of the layer's uncompressed stream (clamped to its end).
    pub async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Bytes, ReadError> {
        self.read_within(offset, len, u64::MAX).await
    }

    /// Like [`LayerReader::read`], for a read inside a file whose bytes end at `end` in the
    /// layer: read-ahead never goes past the file (files are read one by one in an order
    /// unrelated to the tar order, so spans past the file are a guess, and usually wrong).
    pub async fn read_within(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        end: u64,
    ) -> Result<Bytes, ReadError> {
        let len = match self.clamp(offset, len)? {
            0 => return Ok(Bytes::new()),
            n => n,
        };
        let spans = self.before_read(offset, len, end);
        let parts = self
            .fetcher
            .spans_with(spans.clone(), self.cfg.locality_bytes)
            .await?;
        Ok(self.assemble(spans, &parts, offset, len))
    }

    /// [`LayerReader::read_within`] on this thread when every span it needs is local (memory,
    /// or a blocking read of the disk tier): no hop to the runtime and back, for FUSE worker
    /// threads. `None` when a span must be fetched (nothing is: the async read then does it).
    /// Call within the runtime's context (read-ahead and bulk streams start tasks).
    pub fn read_now(
        self: &Arc<Self>,
        offset: u64,
        len: u64,
        end: u64,
    ) -> Option<Result<Bytes, ReadError>> {
        let len = match self.clamp(offset, len) {
            Ok(0) => return Some(Ok(Bytes::new())),
            Ok(n) => n,
            Err(e) => return Some(Err(e)),
        };
        let spans = self.index.spans_covering(offset, len);
        let parts = self.fetcher.spans_now(spans.clone())?;
        self.before_read(offset, len, end);
        Some(Ok(self.assemble(spans, &parts, offset, len)))
    }

    /// `len` clamped to the layer's end, or an error for a read past it.
    fn clamp(&self, offset: u64, len: u64) -> Result<u64, ReadError> {
        let size = self.index.uncompressed_size;
        if offset > size {
            return Err(ReadError::OutOfRange { offset, len, size });
        }
        Ok(len.min(size - offset))
    }

    /// What every read of `[offset, offset + len)` inside a file ending at `end` does first:
    /// notes it for a profile being recorded, and reads ahead when reads are sequential.
    /// Returns the spans it covers.
    fn before_read(&self, offset: u64, len: u64, end: u64) -> Range<usize> {
        let index = self.index();
        let size = index.uncompressed_size;
        if let Some(r) = &self.recorder {
            r.note(offset, len);
        }
        let spans = index.spans_covering(offset, len);
        if end != u64::MAX {
            // How much of the file is still to come: a large file read in order switches the
            // layer to bulk early.
            let ahead = end.min(size).saturating_sub(offset + len);
            self.fetcher.note_file_read(spans.clone(), ahead);
        }
        let prev = self.last_end.swap(spans.end, Relaxed);
        // Sequential: this read starts where the last one ended (or re-reads its last span).
        let sequential = prev != usize::MAX
            && (prev == spans.start || prev == spans.start + 1 || prev == spans.end);
        // Not where a startup profile lists the read: it has what the program reads next.
        if self.cfg.readahead_bytes > 0
            && sequential
            && end > offset + len
            && !self.fetcher.profiled(spans.clone())
        {
            let last = index
                .spans_covering(end.min(size) - 1, 1)
                .end
                .min(index.spans.len());
            let n = self.fetcher.spans_in(self.cfg.readahead_bytes);
            let ahead = spans.end..(spans.end + n).min(last);
            if !ahead.is_empty() {
                self.fetcher.prefetch(ahead);
            }
        }
        // Local read-ahead (disk to memory) goes past the file: reads in the layer's order,
        // skipping a span or two (a file nobody reads), read the next files next.
        if prev != usize::MAX && prev <= spans.start + 1 && spans.start <= prev + 2 {
            self.fetcher.promote_ahead(spans.clone());
        }
        spans
    }

    /// Bytes `[offset, offset + len)` cut from the verified bytes of `spans`.
    fn assemble(&self, spans: Range<usize>, parts: &[Bytes], offset: u64, len: u64) -> Bytes {
        let index = self.index();
        if parts.len() == 1 {
            let base = index.spans[spans.start].uncompressed;
            let s = (offset - base) as usize;
            return parts[0].slice(s..s + len as usize);
        }
        let mut out = BytesMut::with_capacity(len as usize);
        let (start, end) = (offset, offset + len);
        for (i, part) in spans.zip(parts) {
            let (ps, _) = index.span_range(i);
            let lo = start.max(ps) - ps;
            let hi = (end - ps).min(part.len() as u64);
            out.extend_from_slice(&part[lo as usize..hi as usize]);
        }
        out.freeze()
    }

    /// The verified bytes of each span in `range`.
    pub async fn spans(self: &Arc<Self>, range: Range<usize>) -> Result<Vec<Bytes>, ReadError> {
        self.fetcher.spans(range).await
    }

    /// Fetches the spans of `range` that no local tier has, and waits for them.
    pub async fn fetch_missing(self: &Arc<Self>, range: Range<usize>) -> Result<(), ReadError> {
        self.fetcher.fetch_missing(range).await
    }

    /// Background fill of the whole layer: see [`LayerFetcher::fill`].
    pub async fn fill(
        self: &Arc<Self>,
        bytes_per_sec: u64,
        cancel: CancellationToken,
    ) -> Result<u64, ReadError> {
        self.fetcher.fill(bytes_per_sec, cancel).await
    }
}

/// What a process reads layers through: the cache tiers and the fetcher in front of them, and
/// the passthrough file store (handed to the filesystem, not part of the cache). Cloning shares
/// them.
#[derive(Clone)]
pub struct ReadPath {
    pub fetcher: Arc<Fetcher>,
    pub files: Option<Arc<FileStore>>,
    /// The shared Redis tier, when configured: also carries startup profiles between nodes.
    pub shared: Option<Arc<crate::cache::remote::RemoteTier>>,
}

impl ReadPath {
    /// The tiers `cfg` asks for (the disk tier's and the file store's records in `store`); layers
    /// switch to bulk streaming as `bulk` says.
    pub async fn open(
        cfg: &CacheConfig,
        bulk: crate::fetch::BulkConfig,
        store: &Store,
    ) -> Result<Self, CacheError> {
        let shared = match &cfg.remote {
            Some(url) => Some(Arc::new(
                crate::cache::remote::RemoteTier::connect(url, &cfg.remote_tls).await?,
            )),
            None => None,
        };
        let cache = Arc::new(TieredCache::open(cfg, Some(store.db()), shared.clone()).await?);
        Ok(ReadPath {
            fetcher: Fetcher::new(
                cache,
                FetchConfig {
                    bulk,
                    ..FetchConfig::for_memory(cfg.memory_bytes)
                },
            ),
            files: FileStore::open_for(cfg, store.db()).await?,
            shared,
        })
    }

    /// Memory only, nothing on disk (one-shot commands, tests).
    pub fn memory_only(bytes: u64) -> Self {
        ReadPath {
            fetcher: Fetcher::new(
                Arc::new(TieredCache::memory_only(bytes)),
                FetchConfig::for_memory(bytes),
            ),
            files: None,
            shared: None,
        }
    }

    pub fn cache(&self) -> &Arc<TieredCache> {
        self.fetcher.cache()
    }

    /// A reader of one layer of `reference`'s repository, from the registry on a miss.
    pub fn reader(
        &self,
        client: &Client,
        reference: &Reference,
        index: Arc<LayerIndex>,
        local_windows: Option<LocalWindows>,
    ) -> Arc<LayerReader> {
        self.reader_with(
            client,
            reference,
            index,
            local_windows,
            ReaderConfig::default(),
        )
    }

    /// A reader of `layer` from its index in `store` (with the layer's windows blob when this
    /// node has it), fetching from `reference`'s repository; `None` when the store has no index
    /// of the layer.
    pub fn stored_reader(
        &self,
        store: &Store,
        client: &Client,
        reference: &Reference,
        layer: &crate::digest::Digest,
    ) -> Result<Option<Arc<LayerReader>>, crate::store::StoreError> {
        let Some((ix, _)) = store.get_layer(layer)? else {
            return Ok(None);
        };
        let windows = store.windows_for_reads(&ix.windows);
        Ok(Some(self.reader(client, reference, Arc::new(ix), windows)))
    }

    /// [`ReadPath::reader`] with its own read-ahead and locality settings.
    pub fn reader_with(
        &self,
        client: &Client,
        reference: &Reference,
        index: Arc<LayerIndex>,
        local_windows: Option<LocalWindows>,
        cfg: ReaderConfig,
    ) -> Arc<LayerReader> {
        LayerReader::new(
            &self.fetcher,
            Arc::new(RegistrySource::new(client.clone(), reference.clone())),
            index,
            local_windows,
            cfg,
        )
    }

    /// Waits for pending write-back and makes the disk records durable.
    pub async fn flush(&self) {
        self.fetcher.drain_writeback().await;
        self.cache().flush().await;
    }

    /// Hits, misses, registry and inflate counters, and sizes, as one JSON object.
    pub fn stats(&self) -> serde_json::Value {
        let mut j = self.cache().stats.snapshot();
        let (mb, db, me, de) = self.cache().usage();
        if let (Some(o), Some(f)) = (j.as_object_mut(), self.fetcher.stats.snapshot().as_object()) {
            o.extend(f.clone());
            o.insert("memory_bytes".into(), mb.into());
            o.insert("disk_bytes".into(), db.into());
            o.insert("memory_evictions".into(), me.into());
            o.insert("disk_evictions".into(), de.into());
        }
        j
    }
}

#[cfg(test)]
mod tests;
