//! `clip gc` on a live node: what the root holds and why, and that removing an image lets
//! everything of it be collected.

use crate::common::*;
use crate::snapshotter::{indexed_busybox_users, out, Node};

fn gc(node: &Node, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["gc", "--json"];
    all.extend_from_slice(args);
    clip_json(&node.clip_root(), &all, &[])
}

/// Items of `kind` in `report`, by state.
fn states(report: &serde_json::Value, kind: &str) -> Vec<String> {
    let mut v: Vec<String> = report["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["kind"] == kind)
        .map(|i| i["status"]["state"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// The case: an image pulled lazily, run, and removed (`ctr images rm --sync`, no
/// snapshot left). While it is pulled, its indexes, windows and image record are live (the
/// daemon answers `clip gc` on its admin socket: the store is its). Once removed they wait out
/// the grace period, then `clip gc --apply` removes them, and the root keeps only the bounded
/// caches and the database.
#[test]
fn removing_an_image_lets_clip_gc_collect_its_indexes_windows_and_records() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "gc");
    let node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    let o = node.run("clip", &image, "gc1", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");

    let r = gc(&node, &[]);
    assert_eq!(states(&r, "index"), ["live", "live"], "{r:#}");
    // A published index's windows are read from the registry by range, not kept here.
    assert!(states(&r, "windows").iter().all(|s| s == "live"), "{r:#}");
    assert!(states(&r, "image").iter().all(|s| s == "live"), "{r:#}");
    let windows = |r: &serde_json::Value| r["root_bytes"]["windows"].as_u64().unwrap();

    node.ctr_ok(&["images", "rm", "--sync", &image]);
    assert!(node.snapshots().is_empty(), "{:?}", node.snapshots());
    // Unused now: kept for the grace period, and an --apply within it removes nothing.
    let r = gc(&node, &["--apply"]);
    assert_eq!(states(&r, "index"), ["grace", "grace"], "{r:#}");
    assert!(states(&r, "image").iter().all(|s| s == "grace"), "{r:#}");
    // Past it: collected, with the windows and the image record.
    let r = gc(&node, &["--apply", "--grace", "0"]);
    assert_eq!(states(&r, "index"), ["collected", "collected"], "{r:#}");
    assert!(
        states(&r, "windows").iter().all(|s| s == "collected"),
        "{r:#}"
    );
    assert!(
        states(&r, "image").iter().all(|s| s == "collected"),
        "{r:#}"
    );
    let after = gc(&node, &[]);
    assert!(after["items"].as_array().unwrap().is_empty(), "{after:#}");
    assert_eq!(windows(&after), 4096, "only the windows directory itself");
    eprintln!("root after collection: {}", after["root_bytes"]);
    // The collected layers' spans left the disk cache with them.
    let cache = after["root_bytes"]["cache"].as_u64().unwrap();
    assert!(cache < 256 << 10, "{cache} bytes of span cache: {after:#}");

    // The image can be pulled and run again.
    node.pull_ok(&image);
    let o = node.run("clip", &image, "gc2", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
}
