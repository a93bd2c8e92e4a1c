//! Read-most starts, end to end (issue "No regret: never slower than a full pull"): a container
//! that reads most of a layer gets the rest of it streamed (bulk mode), and `clip pull --full`
//! fetches every lazy layer before the pull ends (eager mode). Bytes and requests are asserted,
//! never times: docs/benchmarks.md has the times.

use crate::common::*;
use crate::snapshotter::{out, publish_index, Node};
use std::path::Path;

/// An image `repo:v1` of `layers` (mkimage.py sources), its index published, behind a proxy
/// that counts what the registry sends. Returns the image's name through the proxy.
fn indexed_behind_proxy(
    tmp: &Path,
    repo: &str,
    layers: &[&str],
) -> (Registry, CountingProxy, String) {
    let reg = Registry::start(Auth::None);
    let l = layout(tmp, "v1", layers);
    reg.push_layout(&l, "v1", repo);
    publish_index(tmp, &format!("{}:v1", reg.image(repo)));
    let proxy = CountingProxy::start(&reg.host);
    let image = format!("{}/{repo}:v1", proxy.host);
    (reg, proxy, image)
}

/// busybox and 2048 files of 16 KiB (32 MiB) in /data/mf: see [`indexed_behind_proxy`].
fn manyfiles(tmp: &Path) -> (Registry, CountingProxy, String) {
    indexed_behind_proxy(tmp, "mf", &["gen:busybox", "gen:manyfiles"])
}

/// Waits (up to two minutes) until `n` bulk streams have ended on `node`.
fn wait_streams_ended(node: &Node, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let log = without_colours(&node.snapshotter_log());
        if log.matches("bulk streaming of the layer ended").count() >= n {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{log}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Reads every file of /data/mf, the last one first (an order unrelated to the layer's, as a
/// classpath scan reads); prints the bytes read.
const READ_ALL_BACKWARDS: &str = "ls -r /data/mf | while read f; do cat /data/mf/$f; done | wc -c";
const ALL_BYTES: u64 = 2048 * 16384;

/// A node whose snapshotter runs with the configuration file `config`.
fn node_with(dir: &Path, config: &str) -> Node {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = dir.join("clip.toml");
    std::fs::write(&cfg, config).unwrap();
    Node::start_with(dir, &["--config", cfg.to_str().unwrap()])
}

fn blob_requests(proxy: &CountingProxy) -> usize {
    proxy.requests_for("/blobs/")
}

/// Runs READ_ALL_BACKWARDS on `node`; returns the registry's bytes and blob requests for it.
fn read_all(node: &Node, proxy: &CountingProxy, image: &str, id: &str) -> (u64, usize) {
    let (b0, q0) = (proxy.sent(), blob_requests(proxy));
    let o = node.run("clip", image, id, &["sh", "-c", READ_ALL_BACKWARDS]);
    assert_eq!(out(&o).trim(), ALL_BYTES.to_string(), "{}", stderr(&o));
    (proxy.sent() - b0, blob_requests(proxy) - q0)
}

#[test]
fn a_container_that_reads_most_of_a_layer_gets_the_rest_streamed() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, proxy, image) = manyfiles(tmp.path());
    // The control: bulk mode off. One request per span the reads miss.
    let off = node_with(
        &tmp.path().join("off"),
        "[bulk]\nshare = 0.0\nsequential = \"0\"\n",
    );
    off.pull_ok(&image);
    let (lazy_bytes, lazy_requests) = read_all(&off, &proxy, &image, "lazy");
    assert!(!off.snapshotter_log().contains("streaming the rest"));
    drop(off);
    // The default: after 40 % of the layer's spans, the rest is streamed in 8 MiB runs.
    let node = node_with(&tmp.path().join("default"), "");
    node.pull_ok(&image);
    let (bulk_bytes, bulk_requests) = read_all(&node, &proxy, &image, "bulk");
    let log = without_colours(&node.snapshotter_log());
    assert!(
        log.contains("streaming the rest of the layer") && log.contains("reason=\"share\""),
        "{log}"
    );
    let m = node.metrics();
    assert_eq!(metric(&m, "clip_bulk_layers_total"), 1.0, "{m}");
    assert!(
        metric(&m, "clip_bulk_bytes_total") > (ALL_BYTES / 2) as f64,
        "{m}"
    );
    eprintln!(
        "read all of a 32 MiB layer backwards: {lazy_requests} blob requests and {lazy_bytes} \
         bytes lazily, {bulk_requests} and {bulk_bytes} with bulk mode"
    );
    assert!(
        bulk_requests * 2 < lazy_requests,
        "{bulk_requests} requests with bulk mode, {lazy_requests} without"
    );
    assert!(
        bulk_bytes <= lazy_bytes + lazy_bytes / 10,
        "{bulk_bytes} bytes with bulk mode, {lazy_bytes} without"
    );
}

#[test]
fn clip_pull_full_fetches_every_layer_before_the_pull_ends() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, proxy, image) = manyfiles(tmp.path());
    // The control: a lazy pull fetches the image's documents, no layer bytes.
    let lazy = Node::start(&tmp.path().join("lazy"));
    let b0 = proxy.sent();
    let pulled = lazy.pull_ok(&image);
    assert!(!pulled.contains("fetched whole"), "{pulled}");
    let lazy_bytes = proxy.sent() - b0;
    assert!(
        lazy_bytes < 1 << 20,
        "a lazy pull fetched {lazy_bytes} bytes"
    );
    drop(lazy);
    // --full: every span is in the cache when the pull returns; the container then reads
    // every file with no request to the registry.
    let node = Node::start(&tmp.path().join("full"));
    let (b0, q0) = (proxy.sent(), blob_requests(&proxy));
    let o = std::process::Command::new(clip_bin())
        .arg("--root")
        .arg(node.clip_root())
        .args(["pull", "--full", &image, "--address"])
        .arg(node.dir.join("containerd.sock"))
        .env("HOME", &node.dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("lazy, fetched whole"), "{}", stderr(&o));
    let (pull_bytes, pull_requests) = (proxy.sent() - b0, blob_requests(&proxy) - q0);
    assert!(
        pull_bytes > ALL_BYTES / 2,
        "the pull fetched {pull_bytes} bytes"
    );
    let log = without_colours(&node.snapshotter_log());
    assert!(
        log.contains("fetched the whole layer at pull time (eager)"),
        "{log}"
    );
    let (run_bytes, run_requests) = read_all(&node, &proxy, &image, "after-full");
    assert_eq!(
        run_requests, 0,
        "{run_bytes} bytes fetched after a full pull"
    );
    eprintln!("clip pull --full: {pull_requests} blob requests, {pull_bytes} bytes");
    drop(node);

    // Per namespace, for any client's pull (containerd 2.1 says the namespace): a plain
    // `ctr pull` in namespace "batch" fetches whole; in "default", lazily.
    let hosts = crate::dropin::hosts_dir(tmp.path(), &proxy.host, None);
    let dir = tmp.path().join("ns");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("clip.toml");
    std::fs::write(&cfg, "[bulk]\neager_namespaces = [\"batch\"]\n").unwrap();
    let node = Node::start_on(
        &dir,
        crate::snapshotter::Containerd::debian(crate::dropin::CONTAINERD_2_1),
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--hosts-dir",
            hosts.to_str().unwrap(),
        ],
    );
    let pull = |ns: &str, image: &str| {
        let b0 = proxy.sent();
        node.ctr_pull_in(ns, image);
        proxy.sent() - b0
    };
    let eager = || {
        without_colours(&node.snapshotter_log())
            .matches("fetched the whole layer at pull time (eager)")
            .count()
    };
    // Another image in "default": lazily (its layers are not fetched).
    let (_reg2, other) = crate::snapshotter::indexed_busybox_users(tmp.path(), "users");
    pull("default", &other);
    assert_eq!(eager(), 0, "{}", node.snapshotter_log());
    // This one in "batch": whole.
    let sent = pull("batch", &image);
    assert!(eager() >= 1, "{}", node.snapshotter_log());
    assert!(
        sent > ALL_BYTES / 2,
        "a pull in the eager namespace fetched {sent} bytes"
    );
    let q0 = blob_requests(&proxy);
    let o = node.run_in(
        "batch",
        "clip",
        &image,
        "after-batch",
        &["sh", "-c", READ_ALL_BACKWARDS],
    );
    assert_eq!(out(&o).trim(), ALL_BYTES.to_string());
    assert_eq!(
        blob_requests(&proxy) - q0,
        0,
        "requests after an eager pull"
    );
}

#[test]
fn a_layer_read_in_bulk_has_the_images_other_read_layers_streamed_too() {
    // A tar of /usr reads every layer, each in an order of its own: one layer switches on
    // reads in its order (here a large file's), the others would wait for 40 % of their spans,
    // read a few KiB at a time. Once a container has read 32 MiB of a layer streamed in bulk,
    // every other layer it has read a tenth of is streamed as well.
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, proxy, image) = indexed_behind_proxy(
        tmp.path(),
        "mix",
        &["gen:busybox", "gen:bigfile", "gen:manyfiles"],
    );
    let node = node_with(&tmp.path().join("node"), "");
    node.pull_ok(&image);
    // 320 of the 2048 files (about 16 % of their layer), then the 128 MiB file start to end.
    let some_then_big =
        "ls /data/mf | head -320 | while read f; do cat /data/mf/$f; done | wc -c; \
                         cat /data/big.bin | wc -c";
    let o = node.run("clip", &image, "mixed", &["sh", "-c", some_then_big]);
    assert_eq!(
        out(&o).split_whitespace().collect::<Vec<_>>(),
        [(320 * 16384).to_string(), (128u64 << 20).to_string()],
        "{}",
        stderr(&o)
    );
    // Both streams end in the background.
    wait_streams_ended(&node, 2);
    let log = without_colours(&node.snapshotter_log());
    // The 128 MiB file, read from its start, switches its layer (the large-file rule).
    assert!(log.contains("reason=\"file\""), "{log}");
    assert!(log.contains("reason=\"image\""), "{log}");
    let m = node.metrics();
    assert_eq!(
        metric(&m, "clip_bulk_layers_total{reason=\"image\"}"),
        1.0,
        "{m}"
    );
    // Every file of the other layer is local now: reading them all asks the registry nothing.
    let (bytes, requests) = read_all(&node, &proxy, &image, "all");
    assert_eq!(
        requests, 0,
        "{bytes} bytes in {requests} requests after the layer was streamed"
    );
}

#[test]
fn a_large_file_read_in_order_has_its_layer_streamed_early() {
    // A model's weights, read from the start: 12 MiB of a 128 MiB file read in order is short of
    // the 32 MiB that reads in the layer's order need, but with 64 MiB or more of the file still
    // to come the layer is streamed after 4 MiB (reason "file"). Afterwards the whole file reads
    // with no request to the registry. The control, the rule off, never switches.
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, proxy, image) =
        indexed_behind_proxy(tmp.path(), "big", &["gen:busybox", "gen:bigfile"]);
    let head = ["sh", "-c", "head -c 12582912 /data/big.bin | wc -c"];

    let off = node_with(&tmp.path().join("off"), "[bulk]\nlarge_file = \"0\"\n");
    off.pull_ok(&image);
    let o = off.run("clip", &image, "head-off", &head);
    assert_eq!(out(&o).trim(), "12582912", "{}", stderr(&o));
    let log = without_colours(&off.snapshotter_log());
    assert!(!log.contains("streaming the rest"), "{log}");
    drop(off);

    let node = node_with(&tmp.path().join("default"), "");
    node.pull_ok(&image);
    let o = node.run("clip", &image, "head", &head);
    assert_eq!(out(&o).trim(), "12582912", "{}", stderr(&o));
    wait_streams_ended(&node, 1);
    let m = node.metrics();
    assert_eq!(
        metric(&m, "clip_bulk_layers_total{reason=\"file\"}"),
        1.0,
        "{m}"
    );
    assert!(
        metric(&m, "clip_bulk_bytes_total") > (100u64 << 20) as f64,
        "{m}"
    );
    let (b0, q0) = (proxy.sent(), blob_requests(&proxy));
    let dd = [
        "sh",
        "-c",
        "dd if=/data/big.bin of=/dev/null bs=1M 2>&1 | head -1",
    ];
    let o = node.run("clip", &image, "whole", &dd);
    assert_eq!(out(&o).trim(), "128+0 records in", "{}", stderr(&o));
    assert_eq!(
        blob_requests(&proxy) - q0,
        0,
        "{} bytes fetched reading the file after its layer was streamed",
        proxy.sent() - b0
    );
}
