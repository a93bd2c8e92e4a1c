//! Lazy reads through the tiers (`clip cat`, `clip warm`), checked against an independent
//! extractor, with restarts, caps, faults, concurrency and a shared Redis.

use crate::common::*;
use crate::faults::{Fault, FaultProxy};
use std::path::Path;
use std::process::Command;

/// A node that resolves `image` and indexes it itself (library level, no push): its client,
/// the resolved image, its store (holding the windows) and the layer reports.
async fn index_here(
    image: &str,
    root: &Path,
) -> (
    clip_core::registry::Client,
    clip_core::registry::ResolvedImage,
    clip_core::store::Store,
    Vec<clip_core::image::LayerReport>,
) {
    let client = clip_core::registry::Client::new(Default::default());
    let resolved = client.resolve(&image.parse().unwrap()).await.unwrap();
    let store = clip_core::store::Store::open(root).unwrap();
    let reports = clip_core::image::index_image(
        &client,
        &store,
        &resolved,
        &Default::default(),
        std::sync::Arc::new(|_| {}),
        false,
        1,
    )
    .await
    .unwrap();
    (client, resolved, store, reports)
}

/// The file as Python's tarfile sees it in the layout.
fn reference_bytes(layout: &Path, path: &str) -> Vec<u8> {
    let o = Command::new("python3")
        .arg(workspace().join("integration/fixtures/extract.py"))
        .arg(layout)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "extract {path}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

/// Runs `clip cat --stats`; returns (file bytes, stats).
fn cat(root: &Path, image: &str, path: &str, extra: &[&str]) -> (Vec<u8>, serde_json::Value) {
    cat_with(root, &[], image, path, extra, &[])
}

#[test]
fn cat_matches_an_independent_extractor_and_restarts_reuse_the_disk_cache() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--push", "--json"], &[]);
    for path in [
        "/data/random.bin",
        "/etc/config",
        "/data/sub/hard-c",
        "/data/empty",
        "/bin/ping",
        "/data/zeros.bin",
    ] {
        let (got, _) = cat(&root, &image, path, &[]);
        assert!(
            got == reference_bytes(&l, path),
            "{path}: content differs from the image"
        );
    }
    // A fresh node, cold: bytes fetched ~ the file's compressed size, not the layer's.
    let fresh = tmp.path().join("fresh");
    let (got, s) = cat(&fresh, &image, "/data/random.bin", &[]);
    assert_eq!(got.len(), 6 << 20);
    let fetched = s["registry_bytes"].as_u64().unwrap();
    assert!(fetched < (6 << 20) + (2 << 20), "fetched {fetched}");
    assert!(s["registry_requests"].as_u64().unwrap() <= 3, "{s}");
    // Restart (a new process on the same root): served from disk, no registry bytes.
    let (again, s) = cat(&fresh, &image, "/data/random.bin", &[]);
    assert!(again == got);
    assert_eq!(
        (s["registry_bytes"].as_u64(), s["misses"].as_u64()),
        (Some(0), Some(0)),
        "{s}"
    );
    assert!(s["disk_hits"].as_u64().unwrap() >= 6, "{s}");
    // A node that built the index keeps its windows blob and reads it unhashed: damaged, it
    // costs a verification failure, then windows from elsewhere serve, and the bytes are right.
    let built = tmp.path().join("built");
    clip_json(&built, &["index", &image, "--json"], &[]);
    let mut damaged = 0;
    for w in std::fs::read_dir(built.join("windows")).unwrap() {
        let w = w.unwrap().path();
        let mut raw = std::fs::read(&w).unwrap();
        for b in raw.iter_mut() {
            *b ^= 0x5a;
        }
        std::fs::write(&w, raw).unwrap();
        damaged += 1;
    }
    assert!(damaged > 0);
    let (got, s) = cat(&built, &image, "/data/random.bin", &[]);
    assert!(got == reference_bytes(&l, "/data/random.bin"));
    assert!(s["verify_failures"].as_u64().unwrap() >= 1, "{s}");
    // The retry's window comes from the published windows, or is cut from the span before
    // when a concurrent run of the same read has delivered that one by then.
    let elsewhere =
        s["window_requests"].as_u64().unwrap() + s["windows_from_spans"].as_u64().unwrap();
    assert!(elsewhere >= 1, "{s}");
    // Errors: not a file, no such file.
    let o = clip(&fresh, &["cat", &image, "/dev/null"], &[]);
    assert!(
        o.status.code() == Some(1) && stderr(&o).contains("not a regular file"),
        "{}",
        stderr(&o)
    );
    let o = clip(&fresh, &["cat", &image, "/nope"], &[]);
    assert!(
        o.status.code() == Some(1) && stderr(&o).contains("no such file"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn caps_are_honoured_with_eviction_and_damaged_cache_files_are_refetched() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    let want = reference_bytes(&l, "/data/random.bin");
    let (got, s) = cat(
        &root,
        &image,
        "/data/random.bin",
        &["--disk-cap", "2MiB", "--memory-cap", "2MiB"],
    );
    assert!(got == want);
    assert!(s["disk_bytes"].as_u64().unwrap() <= 2 << 20, "{s}");
    assert!(s["memory_bytes"].as_u64().unwrap() <= 2 << 20, "{s}");
    assert!(
        s["disk_evictions"].as_u64().unwrap() > 0 && s["memory_evictions"].as_u64().unwrap() > 0,
        "{s}"
    );
    // Damage every cached span file: the next read refetches and still returns the right bytes.
    let cache = root.join("cache");
    let mut damaged = 0;
    for sub in std::fs::read_dir(&cache).unwrap().flatten() {
        for f in std::fs::read_dir(sub.path()).unwrap().flatten() {
            let mut b = std::fs::read(f.path()).unwrap();
            let n = b.len();
            b[n - 1] ^= 0xff;
            std::fs::write(f.path(), b).unwrap();
            damaged += 1;
        }
    }
    assert!(damaged > 0);
    let (got, s) = cat(
        &root,
        &image,
        "/data/random.bin",
        &["--disk-cap", "2MiB", "--memory-cap", "2MiB"],
    );
    assert!(got == want, "a damaged cache file was served");
    assert!(s["registry_bytes"].as_u64().unwrap() > 0, "{s}");
}

/// A full cache disk never fails a read: the disk tier lives on a 64 KiB tmpfs, every span write
/// there fails with ENOSPC, and the file still comes out right. The failure is said once, not
/// per span, and nothing half-written is left for a later read.
#[test]
fn a_full_cache_disk_never_fails_a_read_and_says_so_once() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    let want = reference_bytes(&l, "/data/random.bin");
    let full = tmp.path().join("full");
    std::fs::create_dir_all(&full).unwrap();
    let o = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&full)
        .output()
        .unwrap();
    assert!(o.status.success(), "mount tmpfs: {}", stderr(&o));
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(full.clone());
    let o = clip(
        &root,
        &[
            "cat",
            &image,
            "/data/random.bin",
            "--cache-dir",
            full.to_str().unwrap(),
            "--disk-cap",
            "1GiB",
            "--memory-cap",
            "1MiB",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == want, "the file's bytes");
    let said = stderr(&o)
        .matches("the disk cache cannot store spans")
        .count();
    assert_eq!(said, 1, "{}", stderr(&o));
    let left: Vec<_> = walk_files(&full)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

fn walk_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn range_reads_survive_faults_and_never_serve_corrupted_bytes() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, _) = everytype(&reg, tmp.path());
    let proxy = FaultProxy::start(&reg.host);
    let image = format!("{}/everytype:v1", proxy.host);
    let root = tmp.path().join("root");
    let j = clip_json(&root, &["index", &image, "--json"], &[]);
    let layer = format!("/blobs/{}", j["layers"][0]["digest"].as_str().unwrap());
    let want = reference_bytes(&l, "/data/random.bin");
    for f in [
        Fault::Status503,
        Fault::ResetMidBody,
        Fault::TooMany429,
        Fault::CorruptByte,
        Fault::Stall(20),
    ] {
        proxy.inject(&layer, f);
    }
    let (got, s) = cat(
        &root,
        &image,
        "/data/random.bin",
        &["--disk-cap", "0", "--stall-timeout", "2"],
    );
    assert!(got == want, "wrong bytes after faults");
    assert!(
        s["verify_failures"].as_u64().unwrap() >= 1,
        "the corrupted byte must have been caught: {s}"
    );
    assert!(
        proxy.faults.lock().unwrap().is_empty(),
        "every fault was exercised"
    );
    // A registry that keeps failing: a clear error after the deadline, no hang, no bytes.
    for _ in 0..100 {
        proxy.inject(&layer, Fault::Status503);
    }
    let o = clip(
        &root,
        &[
            "cat",
            &image,
            "/bin/ping",
            "--disk-cap",
            "0",
            "--registry-timeout",
            "3",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(o.stdout.is_empty());
    assert!(stderr(&o).contains("gave up after"), "{}", stderr(&o));
}

#[test]
fn concurrent_readers_of_a_cold_span_make_one_request() {
    use clip_core::reader::{LayerReader, ReadPath, ReaderConfig};
    use clip_core::registry::{Client, RegistryConfig};
    use clip_core::source::RegistrySource;
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (_, _) = everytype(&reg, tmp.path());
    // Publish directly (the proxy forwards only body-less requests), read through the proxy.
    clip_json(
        &tmp.path().join("root"),
        &[
            "index",
            &format!("{}:v1", reg.image("everytype")),
            "--push",
            "--json",
        ],
        &[],
    );
    let proxy = FaultProxy::start(&reg.host);
    let image = format!("{}/everytype:v1", proxy.host);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::new(RegistryConfig::default());
        let r: clip_core::Reference = image.parse().unwrap();
        let resolved = client.resolve(&r).await.unwrap();
        let store = clip_core::store::Store::open(&tmp.path().join("node")).unwrap();
        let reports = clip_core::image::load_indexes(&client, &store, &resolved)
            .await
            .unwrap();
        let reads = ReadPath::memory_only(64 << 20);
        let cfg = ReaderConfig {
            readahead_bytes: 0,
            locality_bytes: 0,
        };
        let reader = LayerReader::new(
            &reads.fetcher,
            std::sync::Arc::new(RegistrySource::new(client, resolved.reference.clone())),
            reports[0].index.clone(),
            None,
            cfg,
        );
        let layer = reports[0].index.layer.to_string();
        proxy.seen.lock().unwrap().clear();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let reader = reader.clone();
                tokio::spawn(
                    async move { reader.read(4096 + i * 100, 4096).await.map(|b| b.len()) },
                )
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), 4096);
        }
        let span_requests = proxy
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&layer))
            .count();
        assert_eq!(span_requests, 1, "{:#?}", proxy.seen.lock().unwrap());
        assert_eq!(
            reads
                .fetcher
                .stats
                .inflated_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            reports[0].index.span_range(0).1
        );
    });
}

/// Node a reads a file (from the registry, filling the remote tier); node b, with its own root,
/// reads it with zero registry bytes. Returns what the caller may check further.
fn two_nodes_share_a_remote_tier(
    redis: &[&str],
    env: &[(&str, &str)],
) -> (Registry, tempfile::TempDir, String) {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, image) = everytype(&reg, tmp.path());
    clip_json(
        &tmp.path().join("a"),
        &["index", &image, "--push", "--json"],
        &[],
    );
    let read = |node: &str| {
        let root = tmp.path().join(node);
        cat_with(&root, &[], &image, "/data/random.bin", redis, env)
    };
    let (a, sa) = read("a");
    assert!(sa["registry_bytes"].as_u64().unwrap() > 0);
    let (b, sb) = read("b");
    assert!(a == b && b == reference_bytes(&l, "/data/random.bin"));
    assert_eq!(sb["registry_bytes"], 0, "node b fetched span bytes: {sb}");
    assert!(sb["remote_hits"].as_u64().unwrap() >= 6, "{sb}");
    (reg, tmp, image)
}

#[test]
fn a_second_node_reads_through_a_shared_redis_without_the_registry() {
    let redis = RedisServer::start();
    let url = redis.url();
    let (_reg, tmp, image) = two_nodes_share_a_remote_tier(&["--redis", &url], &[]);
    // Plain TCP works, and says loudly that image content crosses the network in the clear.
    let o = clip(
        &tmp.path().join("b"),
        &["cat", &image, "/etc/config", "--redis", &url],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("travel in the clear"), "{}", stderr(&o));
    // An unreachable Redis is a clear error at start, not a hang.
    let dead = format!("redis://127.0.0.1:{}/", free_port());
    let o = clip(
        &tmp.path().join("c"),
        &["cat", &image, "/etc/config", "--redis", &dead],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("remote cache"), "{}", stderr(&o));
}

#[test]
fn memory_cap_bounds_rss_reading_every_file_of_the_large_image() {
    let layout = crate::large_image::large_layout();
    let reg = Registry::start(Auth::None);
    reg.push_layout(&layout, "large", "large");
    let image = format!("{}:large", reg.image("large"));
    let tmp = tempfile::tempdir().unwrap();
    clip_json(tmp.path(), &["index", &image, "--json"], &[]);
    let o = clip(
        tmp.path(),
        &[
            "warm",
            &image,
            "--memory-cap",
            "64MiB",
            "--disk-cap",
            "0",
            "--stats",
        ],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stderr(&o)
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap()
        .to_string();
    let s: serde_json::Value = serde_json::from_str(&line).unwrap();
    eprintln!("warm large image, 64 MiB memory cap: {s}");
    let rss = s["peak_rss_bytes"].as_u64().unwrap();
    assert!(s["files"].as_u64().unwrap() >= 30_000);
    assert!(s["memory_bytes"].as_u64().unwrap() <= 64 << 20);
    assert!(
        rss <= (64 + 64) << 20,
        "peak RSS {rss} exceeds the memory cap + 64 MiB"
    );
}

#[test]
fn background_fill_keeps_to_its_rate_and_can_be_cancelled() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (_, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    let j = clip_json(&root, &["index", &image, "--json"], &[]);
    let compressed = j["compressed_bytes"].as_u64().unwrap();
    // 4 MiB/s over ~6.3 MB of layers cannot finish in under ~1.2 s.
    let start = std::time::Instant::now();
    let o = clip(&root, &["fill", &image, "--rate", "4MiB", "--stats"], &[]);
    let took = start.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", stderr(&o));
    let floor = (compressed as f64 * 0.8) / (4u64 << 20) as f64;
    assert!(
        took >= floor,
        "fill took {took:.2}s, the rate cap allows no less than {floor:.2}s"
    );
    // Everything is now cached: a read needs no registry bytes.
    let (_, s) = cat(&root, &image, "/data/random.bin", &[]);
    assert_eq!(s["registry_bytes"], 0, "{s}");
    // Cancellation (library level): a fill stopped early returns promptly with part of the layer.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use clip_core::reader::ReadPath;
        let (client, resolved, store, reports) = index_here(&image, &tmp.path().join("node")).await;
        let reads = ReadPath::memory_only(64 << 20);
        // Indexed here, not pushed: the windows are in the local store only.
        let windows = store.open_windows(&reports[0].index.windows);
        let reader = reads.reader(
            &client,
            &resolved.reference,
            reports[0].index.clone(),
            windows,
        );
        let cancel = tokio_util::sync::CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            c2.cancel();
        });
        let t = std::time::Instant::now();
        let fetched = reader.fill(1 << 20, cancel).await.unwrap();
        assert!(
            t.elapsed().as_secs_f64() < 2.0,
            "cancel was not prompt: {:?}",
            t.elapsed()
        );
        assert!(
            fetched < reports[0].index.compressed_size,
            "fetched {fetched}"
        );
    });
}

#[test]
fn redis_cluster_mode_is_supported() {
    need("redis-server");
    need("redis-cli");
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes = Vec::new();
    for p in &ports {
        let d = dir.path().join(p.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let mut child = Command::new("redis-server")
            .args([
                "--port",
                &p.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&d)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_port(*p, "redis-server (cluster node)", &mut child);
        nodes.push(Proc(child));
    }
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let o = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    // Wait for the cluster to agree that it is up.
    for _ in 0..100 {
        let info = Command::new("redis-cli")
            .args(["-p", &ports[0].to_string(), "cluster", "info"])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let url = format!("redis+cluster://{}", addrs.join(","));
    let _ = two_nodes_share_a_remote_tier(&["--redis", &url], &[]);
    // The spans are spread over the cluster's nodes.
    let holding = ports
        .iter()
        .filter(|p| {
            let o = Command::new("redis-cli")
                .args(["-p", &p.to_string(), "dbsize"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                > 0
        })
        .count();
    assert!(
        holding >= 2,
        "spans should hash to several cluster nodes, found on {holding}"
    );
}

#[test]
fn sequential_reads_trigger_read_ahead() {
    use clip_core::reader::{LayerReader, ReadPath, ReaderConfig};
    use clip_core::source::RegistrySource;
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (_, image) = everytype(&reg, tmp.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (client, resolved, store, reports) = index_here(&image, &tmp.path().join("node")).await;
        let ix = reports[0].index.clone();
        assert!(ix.spans.len() >= 8);
        let reads = ReadPath::memory_only(256 << 20);
        let cache = reads.cache().clone();
        let cfg = ReaderConfig {
            readahead_bytes: 3 * ix.span_size,
            locality_bytes: 0,
        };
        // Built here, not pushed: the windows come from the local store.
        let windows = store.open_windows(&ix.windows);
        assert!(windows.is_some());
        let reader = LayerReader::new(
            &reads.fetcher,
            std::sync::Arc::new(RegistrySource::new(client, resolved.reference.clone())),
            ix.clone(),
            windows,
            cfg,
        );
        // A random read: no read-ahead.
        let (s3, e3) = ix.span_range(3);
        reader.read(s3, e3 - s3).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        assert!(
            !cache.contains_local(&clip_core::cache::SpanKey::new(
                ix.layer,
                ix.spans[4].digest
            )),
            "read-ahead after a single random read"
        );
        // Two sequential reads: the next 3 spans arrive without being asked for.
        let (s0, e0) = ix.span_range(0);
        reader.read(s0, e0 - s0).await.unwrap();
        let (s1, e1) = ix.span_range(1);
        reader.read(s1, e1 - s1).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(2..5).all(|i| {
            cache.contains_local(&clip_core::cache::SpanKey::new(
                ix.layer,
                ix.spans[i].digest,
            ))
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "read-ahead did not fetch spans 2..5"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            !cache.contains_local(&clip_core::cache::SpanKey::new(
                ix.layer,
                ix.spans[6].digest
            )),
            "read-ahead went further than configured"
        );
    });
}

/// The shared tier passes the conformance suite every cache tier passes (the memory and disk
/// tiers in clip-core's unit tests), against a real redis-server.
#[test]
fn the_redis_tier_conforms() {
    use clip_core::cache::conformance;
    with_redis_tier(|tier| async move {
        conformance::check(std::sync::Arc::new(tier)).await;
    });
}

/// Values in a shared Redis are written by every node that shares it: a read is bounded by
/// what the key may legitimately hold (a span at most 32 MiB, a profile 4 MiB), not by what a
/// neighbour stored there.
#[test]
fn oversized_values_in_the_shared_tier_are_misses_not_allocations() {
    use clip_core::cache::Tier;
    with_redis_tier(|tier| async move {
        let (small, big) = (
            clip_core::Digest::of(b"small"),
            clip_core::Digest::of(b"big"),
        );
        tier.put(&small, bytes::Bytes::from(vec![7u8; 1024])).await;
        tier.put(&big, bytes::Bytes::from(vec![7u8; 40 << 20]))
            .await;
        assert_eq!(tier.get(&small).await.unwrap().len(), 1024);
        assert!(
            tier.get(&big).await.is_none(),
            "a 40 MiB span value was returned"
        );
        tier.put_doc("clip:profile:x", &vec![1u8; 5 << 20]).await;
        assert!(tier.get_doc("clip:profile:x", 4 << 20).await.is_none());
        assert!(tier.get_doc("clip:profile:x", 8 << 20).await.is_some());
    });
}

/// Runs `f` with a Redis tier on a fresh redis-server.
fn with_redis_tier<F, Fut>(f: F)
where
    F: FnOnce(clip_core::cache::remote::RemoteTier) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let redis = RedisServer::start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let tier = clip_core::cache::remote::RemoteTier::connect(&redis.url(), &Default::default())
            .await
            .unwrap();
        f(tier).await;
    });
}

/// The shared tier over TLS with an ACL user (Debian's redis-server, TLS port only, default user
/// off): two nodes share spans through it; without the CA, with a wrong password or over plain
/// TCP the tier does not connect, with a clear error that never shows the password.
#[test]
fn the_shared_tier_works_over_tls_with_an_acl_user() {
    let redis = RedisServer::start_tls();
    let (url, ca) = (redis.url(), redis.ca.clone().unwrap());
    let ca = ca.to_str().unwrap();
    // The password stays off the command line: CLIP_REDIS carries the URL.
    let env = [("CLIP_REDIS", url.as_str())];
    let (_reg, tmp, image) = two_nodes_share_a_remote_tier(&["--redis-ca", ca], &env);
    let o = clip(
        &tmp.path().join("b"),
        &["cat", &image, "/etc/config", "--redis-ca", ca],
        &env,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("in the clear"), "{}", stderr(&o));
    // On the command line it is refused before anything is read, and never echoed.
    let o = clip(
        &tmp.path().join("c"),
        &[
            "cat",
            &image,
            "/etc/config",
            "--redis",
            &url,
            "--redis-ca",
            ca,
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("CLIP_REDIS"), "{}", stderr(&o));
    assert!(!stderr(&o).contains(REDIS_PASSWORD), "{}", stderr(&o));
    let wrong_password = url.replace(REDIS_PASSWORD, "not-the-password");
    let plain = url.replace("rediss://", "redis://");
    for (n, (redis, ca)) in [
        (url.as_str(), "/etc/ssl/certs/ca-certificates.crt"),
        (wrong_password.as_str(), ca),
        (plain.as_str(), ca),
    ]
    .into_iter()
    .enumerate()
    {
        let args = ["cat", &image, "/etc/config", "--redis-ca", ca];
        let o = clip(
            &tmp.path().join(format!("bad{n}")),
            &args,
            &[("CLIP_REDIS", redis)],
        );
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        assert!(e.contains("remote cache"), "{args:?}: {e}");
        assert!(
            !e.contains(REDIS_PASSWORD) && !e.contains("not-the-password"),
            "{e}"
        );
    }
}
