//! The read path against an in-memory blob source with scripted faults: no registry, no root.

use super::*;
use crate::cache::{memory::MemoryTier, Tier, TieredCache};
use crate::fetch::{FetchConfig, Fetcher};
use crate::source::fake::{FakeSource, Fault};
use crate::testutil::{layer, TestTier};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

struct Setup {
    source: Arc<FakeSource>,
    fetcher: Arc<Fetcher>,
    reader: Arc<LayerReader>,
    index: Arc<LayerIndex>,
    tar: Vec<u8>,
}

/// 16 files of 48 KiB in 16 KiB spans, read through `cache` with `fetch`; windows local
/// unless `remote_windows`; `reader` gets the index's span size.
fn build(
    cache: TieredCache,
    fetch: FetchConfig,
    reader: impl FnOnce(u64) -> ReaderConfig,
    remote_windows: bool,
) -> Setup {
    build_spans(16 << 10, cache, fetch, reader, remote_windows)
}

/// [`build`] with spans of `span` bytes.
fn build_spans(
    span: u64,
    cache: TieredCache,
    fetch: FetchConfig,
    reader: impl FnOnce(u64) -> ReaderConfig,
    remote_windows: bool,
) -> Setup {
    let (gz, index, windows, tar) = layer(16, 48 << 10, span);
    assert!(
        index.spans.len() >= if span <= 16 << 10 { 16 } else { 10 },
        "fixture has {} spans",
        index.spans.len()
    );
    let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows.clone()));
    let fetcher = Fetcher::new(Arc::new(cache), fetch);
    let reader = LayerReader::new(
        &fetcher,
        source.clone(),
        index.clone(),
        (!remote_windows).then_some(windows.into()),
        reader(index.span_size),
    );
    Setup {
        source,
        fetcher,
        reader,
        index,
        tar,
    }
}

/// Read-ahead of `readahead` spans, no locality.
fn setup_with(cache: TieredCache, readahead: usize, remote_windows: bool) -> Setup {
    let cfg = move |span: u64| ReaderConfig {
        readahead_bytes: readahead as u64 * span,
        locality_bytes: 0,
    };
    build(cache, FetchConfig::default(), cfg, remote_windows)
}

/// Read-ahead of `readahead` spans and locality of `locality` spans, memory only.
fn setup_guessing(readahead: u64, locality: u64) -> Setup {
    let cfg = move |span: u64| ReaderConfig {
        readahead_bytes: readahead * span,
        locality_bytes: locality * span,
    };
    build(
        TieredCache::memory_only(64 << 20),
        FetchConfig::default(),
        cfg,
        false,
    )
}

fn setup(readahead: usize) -> Setup {
    setup_with(TieredCache::memory_only(64 << 20), readahead, false)
}

/// A reader that reads only what it is asked for (no read-ahead, no locality).
const NO_GUESSING: ReaderConfig = ReaderConfig {
    readahead_bytes: 0,
    locality_bytes: 0,
};

/// A fetcher over a 64 MiB memory tier, default settings.
fn memory_fetcher() -> Arc<Fetcher> {
    Fetcher::new(
        Arc::new(TieredCache::memory_only(64 << 20)),
        FetchConfig::default(),
    )
}

impl Setup {
    /// What the tiers store span `i` of this layer under.
    fn span_key(&self, i: usize) -> crate::digest::Digest {
        crate::cache::SpanKey::new(self.index.layer, self.index.spans[i].digest).storage()
    }

    /// The last span starting less than `bytes` after span `first` starts (past `first`).
    fn last_within(&self, first: usize, bytes: u64) -> usize {
        let base = self.index.span_range(first).0;
        let last = (first..self.index.spans.len())
            .take_while(|&k| self.index.span_range(k).0 < base + bytes)
            .last()
            .unwrap();
        assert!(last > first);
        last
    }

    /// (offset, len) of spans `r` in the uncompressed stream.
    fn spans(&self, r: Range<usize>) -> (u64, u64) {
        let (s, _) = self.index.span_range(r.start);
        let (_, e) = self.index.span_range(r.end - 1);
        (s, e - s)
    }
    fn expect(&self, off: u64, len: u64) -> &[u8] {
        &self.tar[off as usize..(off + len) as usize]
    }
    /// Requests for the layer blob, as compressed (start, end).
    fn layer_requests(&self) -> Vec<(u64, u64)> {
        self.source
            .requests()
            .into_iter()
            .filter(|r| r.blob == self.index.layer)
            .map(|r| (r.start, r.start + r.len))
            .collect()
    }
    /// Requests for the windows blob.
    fn window_requests(&self) -> usize {
        self.source
            .requests()
            .iter()
            .filter(|r| r.blob == self.index.windows.digest)
            .count()
    }
    fn compressed(&self, r: Range<usize>) -> (u64, u64) {
        let (s, _) = self.index.span_compressed_range(r.start);
        let (_, e) = self.index.span_compressed_range(r.end - 1);
        (s, e)
    }
}

#[tokio::test]
async fn concurrent_readers_share_one_request() {
    let t = setup(0);
    t.source.script([Fault::Delay(Duration::from_millis(50))]);
    let (off, len) = t.spans(5..6);
    let readers: Vec<_> = (0..32)
        .map(|_| {
            let r = t.reader.clone();
            tokio::spawn(async move { r.read(off, len).await })
        })
        .collect();
    for r in readers {
        assert_eq!(&r.await.unwrap().unwrap()[..], t.expect(off, len));
    }
    assert_eq!(t.layer_requests(), vec![t.compressed(5..6)]);
}

/// A reader started at pull time (a profile's prefetch) and the mount's reader of the same
/// layer and repository share one flight per span; readers on sources that do not say they
/// are the same never share.
#[tokio::test]
async fn readers_of_a_layer_from_one_repository_share_their_flights() {
    for (origin, expected) in [(Some("registry/repo"), 1), (None, 2)] {
        let (gz, index, windows, tar) = layer(16, 48 << 10, 16 << 10);
        let mut source = FakeSource::new().with_blob(gz).with_blob(windows.clone());
        if let Some(o) = origin {
            source = source.with_origin(o);
        }
        let source = Arc::new(source);
        source.script([Fault::Delay(Duration::from_millis(100))]);
        let fetcher = Fetcher::new(
            Arc::new(TieredCache::memory_only(64 << 20)),
            FetchConfig::default(),
        );
        let reader = || {
            LayerReader::new(
                &fetcher,
                source.clone(),
                index.clone(),
                Some(windows.clone().into()),
                ReaderConfig {
                    readahead_bytes: 0,
                    locality_bytes: 0,
                },
            )
        };
        let (early, mount) = (reader(), reader());
        let (s, _) = index.span_range(5);
        let (_, e) = index.span_range(5);
        let prefetch = tokio::spawn(async move { early.prefetch_ranges(&[(s, e - s)]).await });
        // The mount reads once the prefetch's request is in flight (it is held 100 ms).
        let layer_requested = || source.requests().iter().any(|r| r.blob == index.layer);
        while !layer_requested() {
            tokio::task::yield_now().await;
        }
        let got = mount.read(s, e - s).await.unwrap();
        assert_eq!(&got[..], &tar[s as usize..e as usize]);
        prefetch.await.unwrap();
        let requests = source
            .requests()
            .into_iter()
            .filter(|r| r.blob == index.layer)
            .count();
        assert_eq!(requests, expected, "origin {origin:?}");
    }
}

#[tokio::test]
async fn adjacent_misses_are_one_range_request() {
    let t = setup(0);
    let (off, len) = t.spans(2..6);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.layer_requests(), vec![t.compressed(2..6)]);
    // Only the misses are fetched: a read over cached spans 2..6 and new 6..8 asks for 6..8.
    let (off, len) = t.spans(3..8);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.layer_requests()[1], t.compressed(6..8));
}

#[tokio::test]
async fn corrupted_span_is_refetched_and_never_served() {
    let t = setup(0);
    t.source.script([Fault::Corrupt(100)]);
    let (off, len) = t.spans(4..5);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(
        t.layer_requests().len(),
        2,
        "fetched again after the bad bytes"
    );
    assert_eq!(t.fetcher.stats.verify_failures.load(Relaxed), 1);

    // A source that always corrupts: an error after the attempts, nothing cached or served.
    t.source.always(Some(Fault::Corrupt(100)));
    let (off, len) = t.spans(9..10);
    let e = t.reader.read(off, len).await.unwrap_err();
    assert!(e.to_string().contains("digest mismatch"), "{e}");
    assert_eq!(t.layer_requests().len(), 2 + 3, "three attempts");
    assert!(!t.reader.is_local(off, len));
    t.source.always(None);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
}

#[tokio::test]
async fn readahead_follows_sequential_reads_only() {
    // One file spans several spans: read it in 4 KiB steps from its start.
    let t = setup(2);
    let (base, size) = t
        .index
        .entries
        .iter()
        .find_map(|e| match e.kind {
            crate::index::EntryKind::File { offset, size } if size > 40 << 10 => {
                Some((offset, size))
            }
            _ => None,
        })
        .unwrap();
    let end = base + size;
    let first = t.index.spans_covering(base, 1).start;
    t.reader.read_within(base, 4096, end).await.unwrap();
    t.reader.read_within(base + 4096, 4096, end).await.unwrap();
    t.reader.fetcher.settled().await;
    let covering = t.index.spans_covering(base, 8192);
    let ahead = covering.end..(covering.end + 2).min(t.index.spans_covering(end - 1, 1).end);
    assert!(!ahead.is_empty());
    assert!(
        ahead.clone().all(|i| t.reader.fetcher.is_local(i)),
        "spans {ahead:?} after a sequential read were fetched ahead (first span {first})"
    );

    // Random reads far apart: only the spans read are fetched.
    let t = setup(2);
    for i in [12usize, 3, 8] {
        let (off, _) = t.spans(i..i + 1);
        t.reader.read_within(off, 512, u64::MAX).await.unwrap();
    }
    t.reader.fetcher.settled().await;
    let wanted: Vec<_> = [12usize, 3, 8]
        .iter()
        .map(|&i| t.compressed(i..i + 1))
        .collect();
    assert_eq!(t.layer_requests(), wanted);
}

#[tokio::test]
async fn failing_source_gives_a_clear_error_and_no_partial_bytes() {
    let t = setup(0);
    let (off, len) = t.spans(0..1);
    t.reader.read(off, len).await.unwrap();
    t.source
        .always(Some(Fault::Error("registry is down".into())));
    // Spans 0 (cached) and 1 (failing): the read fails as a whole.
    let (off, len) = t.spans(0..2);
    let e = t.reader.read(off, len).await.unwrap_err();
    assert!(e.to_string().contains("registry is down"), "{e}");
    assert!(!t.reader.fetcher.is_local(1));
    // A truncated answer is an error too, never short data.
    t.source.always(Some(Fault::Truncate(10)));
    let e = t.reader.read(off, len).await.unwrap_err();
    assert!(e.to_string().contains("ended after 10 of"), "{e}");
    // Once the source recovers, the same read succeeds.
    t.source.always(None);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
}

#[tokio::test]
async fn reply_does_not_wait_for_a_slow_tier_write() {
    // A second tier whose writes are held until the test lets them go.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let slow = Arc::new(TestTier {
        gate: Some(gate.clone()),
        local: true,
        ..Default::default()
    });
    let tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(MemoryTier::new(64 << 20)), slow.clone()];
    let t = setup_with(TieredCache::with_tiers(tiers), 0, false);
    let (off, len) = t.spans(3..5);
    let got = tokio::time::timeout(Duration::from_secs(5), t.reader.read(off, len))
        .await
        .expect("the reply waited for the slow tier's write");
    assert_eq!(&got.unwrap()[..], t.expect(off, len));
    assert_eq!(slow.puts.load(Relaxed), 0, "the write is still held");
    // Released, the write-back completes.
    gate.add_permits(100);
    t.fetcher.drain_writeback().await;
    assert_eq!(slow.puts.load(Relaxed), 2);
}

#[tokio::test]
async fn window_travels_with_its_data() {
    // Windows not on this node: each fetch asks for the window and the data concurrently (one
    // round trip), which the source sees as two requests in flight at once.
    let t = setup_with(TieredCache::memory_only(64 << 20), 0, true);
    let (off, len) = t.spans(6..7);
    assert!(t.index.spans[6].window_len > 0);
    t.source.hold_until_concurrent(2);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.source.request_count(), 2, "window + data");
    assert_eq!(t.source.max_in_flight(), 2);
    assert_eq!(t.fetcher.stats.window_requests.load(Relaxed), 1);
}

fn setup_prefetch(cfg: FetchConfig) -> Setup {
    let no_guessing = |_| NO_GUESSING;
    build(TieredCache::memory_only(64 << 20), cfg, no_guessing, false)
}

#[tokio::test]
async fn a_profile_is_prefetched_in_large_runs_and_then_served_locally() {
    let t = setup(0);
    // Ranges as a recorder would note them: spans 10-11 first, then 3-6.
    let (o1, l1) = t.spans(10..12);
    let (o2, l2) = t.spans(3..7);
    let runs = t
        .reader
        .prefetch_ranges(&[(o1 + 5, l1 - 10), (o2, l2)])
        .await;
    assert_eq!(runs, 2);
    assert_eq!(
        t.layer_requests(),
        vec![t.compressed(10..12), t.compressed(3..7)],
        "one request per run, in first-read order"
    );
    for (o, l) in [(o1, l1), (o2, l2)] {
        assert_eq!(&t.reader.read(o, l).await.unwrap()[..], t.expect(o, l));
    }
    assert_eq!(
        t.layer_requests().len(),
        2,
        "reads after the prefetch are local"
    );
    // Ranges outside the layer (a stale profile) are ignored.
    let size = t.index.uncompressed_size;
    assert_eq!(
        t.reader
            .prefetch_ranges(&[(size, 10), (size + (1 << 30), 1)])
            .await,
        0
    );
}

#[tokio::test]
async fn prefetch_yields_to_demand_reads() {
    // One prefetch request at a time, one span each, each answered after 100 ms.
    let t = setup_prefetch(FetchConfig {
        prefetch_concurrency: 1,
        prefetch_run_bytes: 16 << 10,
        ..FetchConfig::default()
    });
    t.source
        .always(Some(Fault::Delay(Duration::from_millis(100))));
    let ranges: Vec<(u64, u64)> = (0..8).map(|i| t.spans(i..i + 1)).collect();
    let r = t.reader.clone();
    let prefetch = tokio::spawn(async move { r.prefetch_ranges(&ranges).await });
    // The program wants span 7, last in the profile: it must not wait for spans 0-6.
    while t.source.request_count() == 0 {
        tokio::task::yield_now().await;
    }
    let (off, len) = t.spans(7..8);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert!(
        !prefetch.is_finished(),
        "the demand read waited for the prefetch"
    );
    let at = t
        .layer_requests()
        .iter()
        .position(|r| *r == t.compressed(7..8))
        .unwrap();
    assert!(at <= 1, "span 7 was requested after {at} prefetch requests");
    assert_eq!(
        prefetch.await.unwrap(),
        7,
        "the prefetch left span 7 to the demand read"
    );
    assert_eq!(t.layer_requests().len(), 8, "no span fetched twice");
}

#[tokio::test]
async fn opening_a_file_requests_all_its_spans_at_once() {
    let t = setup(0);
    // A file over spans 2..9 (7 spans; runs of 4 MiB hold them all): one request, no wait.
    let (off, len) = t.spans(2..9);
    t.reader.prefetch(off + 10, len - 20);
    t.reader.fetcher.settled().await;
    assert_eq!(t.layer_requests(), vec![t.compressed(2..9)]);
    assert!((2..9).all(|i| t.reader.fetcher.is_local(i)));
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.layer_requests().len(), 1);
}

#[tokio::test]
async fn a_cold_read_takes_its_neighbours_in_the_same_request() {
    let t = setup_guessing(0, 4);
    let (off, _) = t.spans(5..6);
    let got = t.reader.read(off, 100).await.unwrap();
    assert_eq!(&got[..], t.expect(off, 100));
    // Spans 5.. up to `locality` bytes from span 5's start, in the read's one request.
    let last = t.last_within(5, 4 * t.index.span_size);
    assert_eq!(t.layer_requests(), vec![t.compressed(5..last + 1)]);
    t.reader.fetcher.settled().await;
    assert!((5..=last).all(|i| t.reader.fetcher.is_local(i)));
    // A warm read takes nothing more.
    t.reader.read(off, 100).await.unwrap();
    assert_eq!(t.layer_requests().len(), 1);
}

#[tokio::test]
async fn where_a_replayed_profile_lists_a_read_nothing_is_guessed_around_it() {
    let t = setup_guessing(2, 4);
    // The profile lists span 6, whose prefetch fails (the span stays cold), and span 2.
    t.source.script([Fault::Error("refused".into())]);
    let (o6, l6) = t.spans(6..7);
    t.reader.prefetch_ranges(&[(o6, l6)]).await;
    let (o2, _) = t.spans(2..3);
    t.reader.prefetch_ranges(&[(o2, 100)]).await;
    let profiled = vec![t.compressed(6..7), t.compressed(2..3)];
    assert_eq!(t.layer_requests(), profiled);

    // A cold read the profile lists takes only its span: no neighbours.
    assert_eq!(
        &t.reader.read(o6 + 10, 100).await.unwrap()[..],
        t.expect(o6 + 10, 100)
    );
    // Sequential reads it lists, in a file reaching span 5: no read-ahead.
    let (fo, fl) = t.spans(2..6);
    for k in 0..2 {
        let off = o2 + k * 4096;
        let got = t.reader.read_within(off, 4096, fo + fl).await.unwrap();
        assert_eq!(&got[..], t.expect(off, 4096));
    }
    // Opening a file part of which it lists: not fetched whole.
    let (oo, ol) = t.spans(1..4);
    t.reader.prefetch_opened(oo, ol);
    t.reader.fetcher.settled().await;
    assert_eq!(
        t.layer_requests(),
        [profiled.clone(), vec![t.compressed(6..7)]].concat()
    );

    // Where it says nothing, the guesses are made: a cold read takes its neighbours, and
    // opening a file fetches it whole.
    let (o12, _) = t.spans(12..13);
    t.reader.read(o12, 100).await.unwrap();
    let (oo, ol) = t.spans(9..11);
    t.reader.prefetch_opened(oo, ol);
    t.reader.fetcher.settled().await;
    let last = t.last_within(12, 4 * t.index.span_size);
    let after = &t.layer_requests()[3..];
    assert_eq!(after, [t.compressed(12..last + 1), t.compressed(9..11)]);
}

#[tokio::test]
async fn a_run_hands_out_each_span_as_its_bytes_arrive() {
    let t = setup(0);
    // One request for spans 0-7; the answer stops after the bytes of spans 0-2 until released.
    let (run_start, _) = t.compressed(0..8);
    let (_, end2) = t.compressed(2..3);
    t.source
        .script([Fault::StallAfter((end2 - run_start) as usize)]);
    let (off, len) = t.spans(0..8);
    t.reader.prefetch(off, len);
    let (off0, len0) = t.spans(0..1);
    let got = tokio::time::timeout(Duration::from_secs(5), t.reader.read(off0, len0))
        .await
        .expect("span 0 is served while the rest of its run is still on the wire")
        .unwrap();
    assert_eq!(&got[..], t.expect(off0, len0));
    let (off7, len7) = t.spans(7..8);
    assert!(!t.reader.is_local(off7, len7), "the run is still held");
    t.source.release_stalls();
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.layer_requests(), vec![t.compressed(0..8)]);
}

#[tokio::test]
async fn a_span_after_one_held_locally_needs_no_window_request() {
    // Spans of 64 KiB (each holds a whole 32 KiB window), windows only on the "registry".
    let no_guessing = |_| NO_GUESSING;
    let t = build_spans(
        64 << 10,
        TieredCache::memory_only(64 << 20),
        FetchConfig::default(),
        no_guessing,
        true,
    );
    let (off, len) = t.spans(3..4);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.window_requests(), 1);
    // Span 4's window is the end of span 3, which is in memory: no window request.
    let (off, len) = t.spans(4..5);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.window_requests(), 1);
    assert_eq!(t.fetcher.stats.windows_from_spans.load(Relaxed), 1);
    // Span 9 follows nothing local: its window is fetched.
    let (off, len) = t.spans(9..10);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.window_requests(), 2);
}

#[tokio::test]
async fn a_span_after_one_in_the_shared_tier_takes_its_window_from_there() {
    // Memory on this node, and a shared tier (another node's spans) holding span 5 only.
    let shared = Arc::new(TestTier {
        local: false,
        ..Default::default()
    });
    let tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(MemoryTier::new(64 << 20)), shared.clone()];
    let t = build_spans(
        64 << 10,
        TieredCache::with_tiers(tiers),
        FetchConfig::default(),
        |_| ReaderConfig {
            readahead_bytes: 0,
            locality_bytes: 0,
        },
        true,
    );
    let (off, len) = t.spans(5..6);
    let span5 = Bytes::copy_from_slice(t.expect(off, len));
    shared.map.lock().unwrap().insert(t.span_key(5), span5);
    // Span 6 is on no tier; its window is the end of span 5, read from the shared tier.
    let (off, len) = t.spans(6..7);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.window_requests(), 0);
    assert_eq!(t.layer_requests(), vec![t.compressed(6..7)]);
    // A damaged copy there is dropped (bytes from a tier are verified), and span 9's window
    // comes from the registry.
    let (off, len) = t.spans(8..9);
    let mut bad = t.expect(off, len).to_vec();
    let n = bad.len();
    bad[n - 100] ^= 1;
    shared
        .map
        .lock()
        .unwrap()
        .insert(t.span_key(8), Bytes::from(bad));
    let (off, len) = t.spans(9..10);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(t.window_requests(), 1);
}

#[tokio::test]
async fn a_run_that_fails_verification_midway_is_fetched_again_from_where_it_failed() {
    let t = setup(0);
    // A flipped byte in the middle of span 3's compressed bytes, in a request for spans 0-5:
    // spans 0-2 are delivered, and only spans 3-5 are asked for again.
    let (run_start, _) = t.compressed(0..6);
    let (s3, e3) = t.compressed(3..4);
    t.source
        .script([Fault::Corrupt(((s3 + e3) / 2 - run_start) as usize)]);
    let (off, len) = t.spans(0..6);
    assert_eq!(
        &t.reader.read(off, len).await.unwrap()[..],
        t.expect(off, len)
    );
    assert_eq!(
        t.layer_requests(),
        vec![t.compressed(0..6), t.compressed(3..6)]
    );
    assert_eq!(t.fetcher.stats.verify_failures.load(Relaxed), 1);
}

#[tokio::test]
async fn a_damaged_local_windows_blob_costs_one_retry_then_the_published_one_is_used() {
    // This node's windows blob is not hashed before use (`Store::windows_for_reads`).
    let (gz, index, windows, tar) = layer(16, 48 << 10, 16 << 10);
    let bad: Vec<u8> = windows.iter().map(|b| b ^ 0x5a).collect();
    let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
    let fetcher = memory_fetcher();
    let reader = LayerReader::new(
        &fetcher,
        source.clone(),
        index.clone(),
        Some(Bytes::from(bad).into()),
        NO_GUESSING,
    );
    let window_requests = || {
        source
            .requests()
            .iter()
            .filter(|r| r.blob == index.windows.digest)
            .count()
    };
    let read = |i: usize| {
        let (s, e) = index.span_range(i);
        let reader = reader.clone();
        async move { (reader.read(s, e - s).await.unwrap(), s as usize, e as usize) }
    };
    let (got, s, e) = read(5).await;
    assert_eq!(&got[..], &tar[s..e]);
    assert_eq!(fetcher.stats.verify_failures.load(Relaxed), 1);
    assert_eq!(window_requests(), 1);
    // From then on the published windows: no second failure.
    let (got, s, e) = read(9).await;
    assert_eq!(&got[..], &tar[s..e]);
    assert_eq!(fetcher.stats.verify_failures.load(Relaxed), 1);
    assert_eq!(window_requests(), 2);
}

#[tokio::test]
async fn a_reader_verifies_against_its_own_index_while_another_index_of_the_layer_is_live() {
    // A published index of a layer that names other spans than the layer has (here: another
    // layer's span table relabelled, sharing nothing but the layer and the windows blob) is
    // live in a running container's mount; the node then builds the layer's own index and a
    // new mount reads through it. The new reader must use its own span table, not the live
    // fetcher of the forged one.
    let (gz, honest, windows, tar) = layer(16, 48 << 10, 16 << 10);
    let (_, other, _, _) = layer(17, 48 << 10, 16 << 10);
    let mut forged = (*other).clone();
    forged.layer = honest.layer;
    forged.windows = honest.windows;
    forged.compressed_size = honest.compressed_size;
    let source = Arc::new(
        FakeSource::new()
            .with_blob(gz)
            .with_blob(windows.clone())
            .with_origin("registry/repo"),
    );
    let fetcher = memory_fetcher();
    let live = LayerReader::new(
        &fetcher,
        source.clone(),
        Arc::new(forged),
        None,
        NO_GUESSING,
    );
    let k = (1..honest.spans.len())
        .find(|&i| i >= other.spans.len() || honest.spans[i].digest != other.spans[i].digest)
        .unwrap_or(honest.spans.len() - 1);
    let (s, e) = honest.span_range(k);
    assert!(live.read(s, e - s).await.is_err(), "the forged span table");
    let mine = LayerReader::new(&fetcher, source.clone(), honest.clone(), None, NO_GUESSING);
    let got = mine.read(s, e - s).await.unwrap();
    assert_eq!(&got[..], &tar[s as usize..e as usize]);
    drop(live);
}

#[tokio::test]
async fn a_reader_reads_files_where_its_own_index_says_while_a_forged_one_is_live() {
    // A published index of a layer with the layer's own span table but one file's entry
    // pointed at another file's bytes is live in a running container's mount; the node then
    // builds the layer's own index and a new mount reads through it. The two share a fetcher
    // (same spans); the new reader must still read its files where its own index says.
    let (gz, honest, windows, tar) = layer(16, 48 << 10, 16 << 10);
    let files: Vec<(usize, u64, u64)> = honest
        .entries
        .iter()
        .enumerate()
        .filter_map(|(i, e)| match e.kind {
            crate::index::EntryKind::File { offset, size } if size > 0 => Some((i, offset, size)),
            _ => None,
        })
        .collect();
    let (victim, offset, size) = files[0];
    let (_, other, _) = files[1];
    let mut forged = (*honest).clone();
    forged.entries[victim].kind = crate::index::EntryKind::File {
        offset: other,
        size,
    };
    let source = Arc::new(
        FakeSource::new()
            .with_blob(gz)
            .with_blob(windows)
            .with_origin("registry/repo"),
    );
    let fetcher = memory_fetcher();
    let live = LayerReader::new(
        &fetcher,
        source.clone(),
        Arc::new(forged),
        None,
        NO_GUESSING,
    );
    let mine = LayerReader::new(&fetcher, source.clone(), honest.clone(), None, NO_GUESSING);
    assert_eq!(
        mine.index().entries,
        honest.entries,
        "the reader's own entries"
    );
    let crate::index::EntryKind::File {
        offset: at,
        size: n,
    } = mine.index().entries[victim].kind
    else {
        panic!("a file")
    };
    assert_eq!((at, n), (offset, size));
    let got = mine.read(at, n).await.unwrap();
    assert_eq!(&got[..], &tar[offset as usize..(offset + size) as usize]);
    drop(live);
}

#[tokio::test]
async fn a_span_one_layer_put_in_the_cache_is_never_served_for_another_layers_index() {
    // The content-substitution attack: a publisher's index for layer B is its own layer A's
    // index relabelled, so it names, for B's spans, the digests (and lengths) of A's spans,
    // which its container read into the node's cache first. The cache binds spans to their
    // layer, so B's read misses and fetches B's own bytes, which fail verification: an error,
    // never A's bytes.
    let (gz_a, a, windows_a, tar_a) = layer(16, 48 << 10, 16 << 10);
    let (gz_b, b, windows_b, _) = layer(17, 48 << 10, 16 << 10);
    assert_ne!(a.layer, b.layer);
    let source = Arc::new(
        FakeSource::new()
            .with_blob(gz_a)
            .with_blob(windows_a)
            .with_blob(gz_b)
            .with_blob(windows_b),
    );
    let fetcher = memory_fetcher();
    let reader_a = LayerReader::new(&fetcher, source.clone(), a.clone(), None, NO_GUESSING);
    // A span of A that B's own bytes at the same place do not match.
    let k = (1..a.spans.len())
        .find(|&i| i >= b.spans.len() || a.spans[i].digest != b.spans[i].digest)
        .unwrap_or(a.spans.len() - 1);
    let (s, e) = a.span_range(k);
    let theirs = reader_a.read(s, e - s).await.unwrap();
    assert_eq!(&theirs[..], &tar_a[s as usize..e as usize]);
    let mut forged = (*a).clone();
    forged.layer = b.layer;
    forged.compressed_size = b.compressed_size;
    let reader_b = LayerReader::new(
        &fetcher,
        source.clone(),
        Arc::new(forged),
        None,
        NO_GUESSING,
    );
    let got = reader_b.read(s, e - s).await;
    assert!(
        !matches!(got, Ok(ref bytes) if *bytes == theirs),
        "layer A's bytes were served for layer B"
    );
    assert!(got.is_err(), "B's own bytes cannot match A's digests");
}

#[tokio::test]
async fn a_cached_span_whose_length_is_not_the_index_entrys_is_not_served() {
    // An index that names one of its layer's span digests for a longer span of the same layer
    // (a rearrangement within the layer): the cached bytes are the layer's, but shorter than
    // this entry says. Served, the read would be cut past their end.
    let t = setup(0);
    let len = |i: usize| {
        let (s, e) = t.index.span_range(i);
        e - s
    };
    let n = t.index.spans.len();
    let (long, short) = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .find(|&(i, j)| len(i) > len(j))
        .expect("spans of two lengths");
    let (ss, se) = t.index.span_range(short);
    t.reader.read(ss, se - ss).await.unwrap();
    let mut forged = (*t.index).clone();
    forged.spans[long].digest = t.index.spans[short].digest;
    let reader = LayerReader::new(
        &t.fetcher,
        t.source.clone(),
        Arc::new(forged),
        None,
        ReaderConfig {
            readahead_bytes: 0,
            locality_bytes: 0,
        },
    );
    let (ls, le) = t.index.span_range(long);
    let got = reader.read(ls, le - ls).await;
    assert!(
        matches!(got, Err(ref e) if e.to_string().contains("digest mismatch")),
        "{:?}",
        got.map(|b| b.len())
    );
}

/// A fetcher over a memory tier of `cap` bytes whose layers switch to bulk streaming as `bulk`
/// says.
fn bulk_fetcher(cap: u64, bulk: crate::fetch::BulkConfig) -> Arc<Fetcher> {
    Fetcher::new(
        Arc::new(TieredCache::memory_only(cap)),
        FetchConfig {
            bulk,
            ..FetchConfig::default()
        },
    )
}

/// Bulk settings scaled to the 3 MiB test layer: switch after 40 % of its spans, 512 KiB read
/// in order, or 64 KiB in order inside a file with 1 MiB still to come; 256 KiB runs.
fn small_bulk() -> crate::fetch::BulkConfig {
    crate::fetch::BulkConfig {
        share: 0.4,
        sequential_bytes: 512 << 10,
        large_file_bytes: 1 << 20,
        min_layer_bytes: 1 << 20,
        run_bytes: 256 << 10,
        concurrency: 4,
    }
}

/// The 3 MiB test layer read through a memory tier of `cap` bytes with [`small_bulk`].
struct BulkLayer {
    source: Arc<FakeSource>,
    fetcher: Arc<Fetcher>,
    reader: Arc<LayerReader>,
    index: Arc<LayerIndex>,
    tar: Vec<u8>,
}

fn bulk_layer(cap: u64) -> BulkLayer {
    let (gz, index, windows, tar) = layer(64, 48 << 10, 16 << 10);
    let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
    let fetcher = bulk_fetcher(cap, small_bulk());
    let reader = LayerReader::new(&fetcher, source.clone(), index.clone(), None, NO_GUESSING);
    BulkLayer {
        source,
        fetcher,
        reader,
        index,
        tar,
    }
}

/// The files of a layer's index: (offset, size), in the layer's order.
fn files_of(index: &LayerIndex) -> Vec<(u64, u64)> {
    index
        .entries
        .iter()
        .filter_map(|e| match e.kind {
            crate::index::EntryKind::File { offset, size } if size > 0 => Some((offset, size)),
            _ => None,
        })
        .collect()
}

/// Reads file `(offset, size)` in 16 KiB reads, checking its bytes.
async fn read_file(reader: &Arc<LayerReader>, tar: &[u8], file: (u64, u64)) {
    read_file_with(reader, tar, file, |_| {}).await
}

/// [`read_file`], calling `after` with the bytes of the file read so far after each read.
async fn read_file_with(
    reader: &Arc<LayerReader>,
    tar: &[u8],
    (offset, size): (u64, u64),
    mut after: impl FnMut(u64),
) {
    let mut at = offset;
    while at < offset + size {
        let n = (16 << 10).min(offset + size - at);
        let got = reader.read_within(at, n, offset + size).await.unwrap();
        assert_eq!(&got[..], &tar[at as usize..(at + n) as usize]);
        at += n;
        after(at - offset);
    }
}

#[tokio::test]
async fn reading_a_layer_in_order_switches_it_to_bulk_streaming() {
    // A tar of a directory: every file, in the layer's order. Lazily, one request per span
    // read (no guessing); once 512 KiB have been read in order, the rest is streamed in 256 KiB
    // runs, so the whole layer costs a few dozen requests and its compressed size, once.
    let (gz, index, windows, tar) = layer(64, 48 << 10, 16 << 10);
    let files = files_of(&index);
    let spans = index.spans.len();
    let run = |bulk: crate::fetch::BulkConfig| {
        let (gz, windows, index, tar, files) = (
            gz.clone(),
            windows.clone(),
            index.clone(),
            tar.clone(),
            files.clone(),
        );
        async move {
            let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
            let fetcher = bulk_fetcher(64 << 20, bulk);
            let reader = LayerReader::new(&fetcher, source.clone(), index, None, NO_GUESSING);
            let mut switched_after = None;
            for (k, f) in files.iter().enumerate() {
                read_file(&reader, &tar, *f).await;
                if reader.bulk_started() && switched_after.is_none() {
                    switched_after = Some(k + 1);
                    reader.bulk_ended().await;
                }
            }
            reader.fetcher.settled().await;
            (
                switched_after,
                source.request_count(),
                fetcher.stats.registry_bytes.load(Relaxed),
            )
        }
    };
    let (never, lazy_requests, lazy_bytes) = run(crate::fetch::BulkConfig::off()).await;
    assert_eq!(never, None);
    assert!(
        lazy_requests >= spans / 2,
        "{lazy_requests} requests for {spans} spans"
    );
    let (switched, bulk_requests, bulk_bytes) = run(small_bulk()).await;
    // 512 KiB in order: the 11th 48 KiB file.
    assert_eq!(switched, Some(11), "switched after {switched:?} files");
    assert!(
        bulk_requests * 2 < lazy_requests,
        "bulk {bulk_requests} requests, lazy {lazy_requests}"
    );
    // Each compressed byte about once (runs overlap by their checkpoint's last bits; a run whose
    // span before is not local yet fetches its 32 KiB window).
    let windows = 40u64 << 10;
    assert!(
        bulk_bytes <= gz.len() as u64 + (bulk_requests as u64) * windows,
        "bulk fetched {bulk_bytes} of a {} byte layer",
        gz.len()
    );
    assert!(bulk_bytes >= lazy_bytes / 2);
}

#[tokio::test]
async fn a_layer_read_mostly_out_of_order_switches_on_its_share() {
    // A JVM-like start: files opened in an order unrelated to the layer's (here from the last
    // one back), so never 512 KiB in order; after 40 % of the spans the rest is streamed.
    let BulkLayer {
        source,
        reader,
        index,
        tar,
        ..
    } = bulk_layer(64 << 20);
    let files = files_of(&index);
    let n = index.spans.len() as f64;
    let mut touched = std::collections::BTreeSet::new();
    for f in files.iter().rev().step_by(2) {
        let before = touched.len() as f64;
        read_file(&reader, &tar, *f).await;
        touched.extend(index.spans_covering(f.0, f.1));
        if reader.bulk_started() {
            assert!(before < 0.4 * n && touched.len() as f64 >= 0.4 * n);
            break;
        }
        assert!((touched.len() as f64) < 0.4 * n, "no switch at {touched:?}");
    }
    assert!(reader.bulk_started());
    reader.bulk_ended().await;
    reader.fetcher.settled().await;
    let before = source.request_count();
    for f in &files {
        read_file(&reader, &tar, *f).await;
    }
    assert_eq!(source.request_count(), before, "the rest was streamed");
}

#[tokio::test]
async fn a_layer_told_its_image_streams_switches_at_a_quarter_of_the_share() {
    // Scattered reads of 12-20 % of the spans: no switch (the share is 40 %). Told that a
    // sibling layer streams, the layer switches at once when its reads have covered 10 %, and
    // the rest is streamed.
    let BulkLayer {
        source,
        reader,
        index,
        tar,
        ..
    } = bulk_layer(64 << 20);
    let files = files_of(&index);
    let n = index.spans.len() as f64;
    let mut touched = std::collections::BTreeSet::new();
    for f in files.iter().rev().step_by(3) {
        if touched.len() as f64 >= 0.12 * n {
            break;
        }
        touched.extend(index.spans_covering(f.0, f.1));
        read_file(&reader, &tar, *f).await;
    }
    assert!((touched.len() as f64) < 0.4 * n);
    reader.fetcher.settled().await;
    assert!(
        !reader.bulk_started(),
        "switched on {} of {n} spans",
        touched.len()
    );
    reader.sibling_streams();
    assert!(
        reader.bulk_started(),
        "told after {} of {n} spans",
        touched.len()
    );
    reader.bulk_ended().await;
    reader.fetcher.settled().await;
    let before = source.request_count();
    for f in &files {
        read_file(&reader, &tar, *f).await;
    }
    assert_eq!(source.request_count(), before, "the rest was streamed");
}

#[tokio::test]
async fn a_layer_told_its_image_streams_waits_for_a_tenth_of_it_read() {
    // Told before any read: nothing is streamed until the reads cover 10 % of the spans.
    let BulkLayer {
        reader, index, tar, ..
    } = bulk_layer(64 << 20);
    reader.sibling_streams();
    assert!(!reader.bulk_started());
    let files = files_of(&index);
    let n = index.spans.len() as f64;
    let mut touched = std::collections::BTreeSet::new();
    for f in files.iter().rev().step_by(3) {
        let before = touched.len() as f64;
        touched.extend(index.spans_covering(f.0, f.1));
        read_file(&reader, &tar, *f).await;
        if reader.bulk_started() {
            assert!(before < 0.1 * n && touched.len() as f64 >= 0.1 * n);
            break;
        }
    }
    assert!(reader.bulk_started());
}

#[tokio::test]
async fn reading_a_layer_in_order_loads_the_next_spans_from_disk_into_memory() {
    // Every span on "disk", none in memory: reads in the layer's order have the spans after
    // them loaded into memory in the background, so the later reads find them there.
    let (gz, index, windows, tar) = layer(64, 48 << 10, 16 << 10);
    let files = files_of(&index);
    let key = |i: usize| crate::cache::SpanKey::new(index.layer, index.spans[i].digest).storage();
    let slow = Arc::new(TestTier {
        local: true,
        ..Default::default()
    });
    for i in 0..index.spans.len() {
        let (s, e) = index.span_range(i);
        let bytes = Bytes::copy_from_slice(&tar[s as usize..e as usize]);
        slow.map.lock().unwrap().insert(key(i), bytes);
    }
    let mem = Arc::new(MemoryTier::new(64 << 20));
    let tiers: Vec<Arc<dyn Tier>> = vec![mem.clone(), slow.clone()];
    let cache = Arc::new(TieredCache::with_tiers(tiers));
    let fetcher = Fetcher::new(cache.clone(), FetchConfig::default());
    let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
    let reader = LayerReader::new(&fetcher, source.clone(), index.clone(), None, NO_GUESSING);
    read_file(&reader, &tar, files[0]).await;
    read_file(&reader, &tar, files[1]).await;
    // The whole 3 MiB layer is within the 8 MiB loaded ahead.
    let last = key(index.spans.len() - 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !mem.contains(&last) {
        assert!(
            std::time::Instant::now() < deadline,
            "the last span was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let disk_hits = cache.stats.disk_hits.load(Relaxed);
    for f in &files[2..] {
        read_file(&reader, &tar, *f).await;
    }
    assert_eq!(
        cache.stats.disk_hits.load(Relaxed),
        disk_hits,
        "a later read went to disk"
    );
    assert_eq!(source.request_count(), 0, "nothing was fetched");
}

#[tokio::test]
async fn a_partial_read_never_switches_to_bulk() {
    // A start that reads a part of the layer (under 40 % of its spans), scattered: lazy, and
    // only the spans it reads.
    let BulkLayer {
        fetcher,
        reader,
        index,
        tar,
        ..
    } = bulk_layer(64 << 20);
    let files = files_of(&index);
    let mut touched = std::collections::BTreeSet::new();
    for f in files.iter().rev().step_by(7) {
        touched.extend(index.spans_covering(f.0, f.1));
        read_file(&reader, &tar, *f).await;
    }
    assert!((touched.len() as f64) < 0.4 * index.spans.len() as f64);
    reader.fetcher.settled().await;
    assert!(!reader.bulk_started());
    let spans: u64 = touched
        .iter()
        .map(|&i| index.span_range(i).1 - index.span_range(i).0)
        .sum();
    assert_eq!(fetcher.stats.inflated_bytes.load(Relaxed), spans);
}

#[tokio::test]
async fn a_layer_larger_than_half_the_cache_is_streamed_only_a_quarter_of_it_ahead() {
    // A 3 MiB layer and a 2 MiB cache: streaming it whole would evict what the reads have not
    // used yet. The stream stays within 512 KiB (a quarter of the cache) of what has been read,
    // and goes on as the reads do.
    let BulkLayer {
        fetcher,
        reader,
        index,
        tar,
        ..
    } = bulk_layer(2 << 20);
    let files = files_of(&index);
    let mut k = 0;
    while !reader.bulk_started() {
        read_file(&reader, &tar, files[k]).await;
        k += 1;
    }
    // The stream waits for the reads (or, were it not bounded, streams the whole layer).
    tokio::select! {
        _ = reader.fetcher.bulk_parked(1) => {}
        _ = reader.fetcher.bulk_ended() => {}
    }
    reader.fetcher.settled().await;
    let used = reader.fetcher.demanded_bytes();
    let inflated = fetcher.stats.inflated_bytes.load(Relaxed);
    // What the reads used before the switch, a quarter of the cache, and the run that
    // crossed it.
    let run = 256 << 10;
    let biggest = (0..index.spans.len())
        .map(|i| index.span_range(i).1 - index.span_range(i).0)
        .max()
        .unwrap();
    let bound = used + (512 << 10) + run + biggest;
    assert!(
        inflated <= bound,
        "{inflated} bytes inflated for {used} read"
    );
    assert!(inflated < index.uncompressed_size / 2);
    // The reads go on; so does the stream; every file reads right.
    for f in &files[k..] {
        read_file(&reader, &tar, *f).await;
    }
    assert!(reader.fetcher.bulk_started());
    drop(reader);
}

#[tokio::test]
async fn a_bulk_stream_takes_what_the_shared_tier_has_before_the_registry() {
    // Another node read the whole layer into the shared tier: this node's reads, and the bulk
    // stream they set off, take every span from it; the registry is asked for nothing.
    let (gz, index, windows, tar) = layer(64, 48 << 10, 16 << 10);
    let shared = Arc::new(TestTier {
        local: false,
        ..Default::default()
    });
    for i in 0..index.spans.len() {
        let (s, e) = index.span_range(i);
        let key = crate::cache::SpanKey::new(index.layer, index.spans[i].digest).storage();
        let bytes = Bytes::copy_from_slice(&tar[s as usize..e as usize]);
        shared.map.lock().unwrap().insert(key, bytes);
    }
    let tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(MemoryTier::new(64 << 20)), shared];
    let fetcher = Fetcher::new(
        Arc::new(TieredCache::with_tiers(tiers)),
        FetchConfig {
            bulk: small_bulk(),
            ..FetchConfig::default()
        },
    );
    let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
    let reader = LayerReader::new(&fetcher, source.clone(), index.clone(), None, NO_GUESSING);
    let files = files_of(&index);
    let mut k = 0;
    while !reader.bulk_started() {
        read_file(&reader, &tar, files[k]).await;
        k += 1;
    }
    reader.bulk_ended().await;
    reader.fetcher.settled().await;
    assert!((0..index.spans.len()).all(|i| reader.fetcher.is_local(i)));
    assert_eq!(source.request_count(), 0, "the registry was asked");
}

#[tokio::test]
async fn a_read_of_local_bytes_is_answered_on_the_calling_thread() {
    // Memory first, then a disk tier behind it (untrusted: verified on read). Local bytes are
    // read on the caller's thread; bytes that must be fetched are not (None, nothing fetched);
    // bytes damaged on disk are left to the async path, which drops them and refetches.
    let disk = Arc::new(TestTier {
        local: true,
        ..Default::default()
    });
    let tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(MemoryTier::new(64 << 20)), disk.clone()];
    let t = setup_with(TieredCache::with_tiers(tiers), 0, false);
    let (off, len) = t.spans(3..5);
    assert!(t.reader.read_now(off, len, u64::MAX).is_none(), "cold");
    assert_eq!(t.source.request_count(), 0, "read_now fetched");
    t.reader.read(off, len).await.unwrap();
    t.reader.fetcher.settled().await;
    t.fetcher.drain_writeback().await;
    let requests = t.source.request_count();
    let got = t.reader.read_now(off, len, u64::MAX).unwrap().unwrap();
    assert_eq!(&got[..], t.expect(off, len));
    // From the disk tier alone (a fresh memory tier), then with the disk copy damaged.
    let fresh = || {
        let tiers: Vec<Arc<dyn Tier>> = vec![Arc::new(MemoryTier::new(64 << 20)), disk.clone()];
        let fetcher = Fetcher::new(
            Arc::new(TieredCache::with_tiers(tiers)),
            FetchConfig::default(),
        );
        let r = LayerReader::new(
            &fetcher,
            t.source.clone(),
            t.index.clone(),
            None,
            NO_GUESSING,
        );
        (fetcher, r)
    };
    let (fetcher, r) = fresh();
    let got = r.read_now(off, len, u64::MAX).unwrap().unwrap();
    assert_eq!(&got[..], t.expect(off, len));
    let (off9, len9) = t.spans(9..10);
    r.read(off9, len9).await.unwrap();
    r.fetcher.settled().await;
    fetcher.drain_writeback().await;
    let (_fetcher, r) = fresh();
    disk.damage.store(true, Relaxed);
    assert!(
        r.read_now(off9, len9, u64::MAX).is_none(),
        "damaged bytes served"
    );
    disk.damage.store(false, Relaxed);
    assert!(t.source.request_count() > requests);
}

/// [`small_bulk`] for a file larger than the test layer's: never on share; 2 MiB read in order
/// switch the layer, or 256 KiB inside a file with 1 MiB still to come (about five of the test
/// layer's spans: more than one read covers).
fn file_bulk(large_file_bytes: u64) -> crate::fetch::BulkConfig {
    crate::fetch::BulkConfig {
        share: 0.0,
        sequential_bytes: 2 << 20,
        large_file_bytes,
        ..small_bulk()
    }
}

#[tokio::test]
async fn reading_a_large_file_in_order_switches_its_layer_early() {
    // One 4 MiB file (a model's weights) read from its start in 16 KiB reads: with 1 MiB or more
    // of the file still to come, 256 KiB read in order switch the layer (an eighth of the 2 MiB
    // that reads in the layer's order need); without the large-file rule, the switch waits for
    // those 2 MiB, the spans before it fetched as they are read.
    let (gz, index, windows, tar) = layer(1, 4 << 20, 16 << 10);
    let file = files_of(&index)[0];
    let run = |large_file_bytes: u64| {
        let (gz, windows, index, tar) = (gz.clone(), windows.clone(), index.clone(), tar.clone());
        async move {
            let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
            let fetcher = bulk_fetcher(64 << 20, file_bulk(large_file_bytes));
            let reader = LayerReader::new(&fetcher, source.clone(), index, None, NO_GUESSING);
            let mut switched_at = None;
            read_file_with(&reader, &tar, file, |done| {
                if reader.bulk_started() && switched_at.is_none() {
                    switched_at = Some(done);
                }
            })
            .await;
            reader.bulk_ended().await;
            (switched_at, source.request_count())
        }
    };
    let (late, late_requests) = run(0).await;
    let late = late.expect("2 MiB in order switch the layer");
    // Whole spans are counted: the last one read may reach past the reads.
    assert!(
        late >= (2 << 20) - (128 << 10),
        "switched after {late} bytes without the rule"
    );
    let (early, early_requests) = run(1 << 20).await;
    let early = early.expect("the large file switches its layer");
    assert!(
        early <= 384 << 10,
        "switched after {early} bytes of a 4 MiB file read in order"
    );
    assert!(
        early_requests < late_requests,
        "{early_requests} requests with the rule, {late_requests} without"
    );
}

#[tokio::test]
async fn a_large_file_read_out_of_order_does_not_switch_its_layer() {
    // The same file read in scattered 16 KiB pieces (a program seeking through an archive's
    // members): nothing is in order, so it never switches on the file, however large.
    let (gz, index, windows, tar) = layer(1, 4 << 20, 16 << 10);
    let (offset, size) = files_of(&index)[0];
    let source = Arc::new(FakeSource::new().with_blob(gz).with_blob(windows));
    let fetcher = bulk_fetcher(64 << 20, file_bulk(1 << 20));
    let reader = LayerReader::new(&fetcher, source, index, None, NO_GUESSING);
    // Every 8th piece, from the end of the file backwards.
    let pieces = size / (16 << 10);
    for k in (0..pieces).rev().step_by(8) {
        let at = offset + k * (16 << 10);
        let got = reader
            .read_within(at, 16 << 10, offset + size)
            .await
            .unwrap();
        assert_eq!(&got[..], &tar[at as usize..at as usize + (16 << 10)]);
    }
    assert!(!reader.bulk_started());
}
