//! The large test image (debootstrap minbase + python3/numpy + gcc/g++ + perl/scipy, 4 layers,
//! ~257 MiB gzip, >30k files), built by scripts/build-large-image.sh. Its absence is a failure.

use crate::common::*;
use std::path::PathBuf;

pub fn large_layout() -> PathBuf {
    let p = std::env::var_os("CLIP_LARGE_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/clip-test-images/large"));
    assert!(
        p.join("index.json").exists(),
        "the large test image is missing at {}: run scripts/build-large-image.sh (the README's test command does)",
        p.display()
    );
    p
}

/// The large image in a registry of its own with its index published, behind a proxy counting
/// what the registry sends.
pub struct Served {
    pub reg: Registry,
    pub proxy: CountingProxy,
    /// `PROXY/large:large`.
    pub image: String,
    /// The compressed size of its layers.
    pub bytes: u64,
}

pub fn served(tmp: &std::path::Path) -> Served {
    let layout = large_layout();
    let reg = Registry::start(Auth::None);
    reg.push_layout(&layout, "large", "large");
    crate::snapshotter::publish_index(tmp, &format!("{}:large", reg.image("large")));
    let proxy = CountingProxy::start(&reg.host);
    Served {
        image: format!("{}/large:large", proxy.host),
        bytes: layer_bytes(&layout),
        reg,
        proxy,
    }
}

/// The config digest of an OCI layout's first manifest.
pub fn config_digest(layout: &std::path::Path) -> String {
    first_manifest(layout)["config"]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The digest of an OCI layout's first manifest.
pub fn manifest_digest(layout: &std::path::Path) -> String {
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn first_manifest(layout: &std::path::Path) -> serde_json::Value {
    let digest = manifest_digest(layout).replace("sha256:", "");
    serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(digest)).unwrap())
        .unwrap()
}

/// The compressed size of an OCI layout's layers (its first manifest's).
pub fn layer_bytes(layout: &std::path::Path) -> u64 {
    first_manifest(layout)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum()
}

#[test]
fn large_image_index_fits_the_mount_time_budget() {
    let layout = large_layout();
    let reg = Registry::start(Auth::None);
    reg.push_layout(&layout, "large", "large");
    let image = format!("{}:large", reg.image("large"));
    let tmp = tempfile::tempdir().unwrap();
    let j = clip_json(tmp.path(), &["index", &image, "--json"], &[]);
    let compressed = j["compressed_bytes"].as_u64().unwrap();
    let index = j["index_bytes"].as_u64().unwrap();
    let files = j["files"].as_u64().unwrap();
    eprintln!(
        "large image: {} layers, {files} files, {compressed} compressed, {} uncompressed, index {index} ({:.3}%), windows {}, {:.1}s",
        j["layers"].as_array().unwrap().len(),
        j["uncompressed_bytes"],
        100.0 * index as f64 / compressed as f64,
        j["checkpoint_bytes"],
        j["seconds"].as_f64().unwrap()
    );
    assert!(
        compressed >= 250 << 20,
        "the large image must be >= 250 MiB gzip, is {compressed}"
    );
    assert!(
        files >= 30_000,
        "the large image must hold >= 30k files, has {files}"
    );
    assert!(j["layers"].as_array().unwrap().len() >= 4);
    // The mount-time part must stay within 0.5 % of the compressed image.
    assert!(
        index * 200 <= compressed,
        "index {index} bytes exceeds 0.5% of {compressed}"
    );
    // Real files resolve through the merged view.
    let py = clip_json(
        tmp.path(),
        &["inspect", &image, "/usr/bin/python3", "--json"],
        &[],
    );
    assert_eq!(py["type"], "symlink");
    let libc = clip_json(
        tmp.path(),
        &[
            "inspect",
            &image,
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
            "--json",
        ],
        &[],
    );
    assert_eq!(libc["data_layer"], 1, "{libc}");
    assert!(libc["size"].as_u64().unwrap() > 1 << 20);
}
