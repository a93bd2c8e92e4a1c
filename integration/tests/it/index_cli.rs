//! `clip index` / `clip inspect` against a real registry.

use crate::common::*;

#[test]
fn every_entry_type_image_indexes_merges_and_is_deterministic() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (_, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");

    let j = clip_json(
        &root,
        &["index", &image, "--span-size", "1MiB", "--json"],
        &[],
    );
    assert_eq!(j["layers"].as_array().unwrap().len(), 2);
    assert_eq!(j["built_layers"], 2);
    // The base layer holds ~31 MB of tar: several 1 MiB spans, windows for each.
    let base = &j["layers"][0];
    assert!(base["spans"].as_u64().unwrap() >= 8, "{base}"); // 24 MiB of zeros deflate into few, very long blocks
    assert!(base["checkpoint_bytes"].as_u64().unwrap() > 0);
    let uncompressed = j["uncompressed_bytes"].as_u64().unwrap();
    assert!(uncompressed > 30_000_000, "{uncompressed}");
    assert!(j["index_bytes"].as_u64().unwrap() < 20_000, "{j}");

    // Merged view: whiteouts, opaque dir, implied parents, replaced file, hard links.
    let inspect = |path: &str| clip_json(&root, &["inspect", &image, path, "--json"], &[]);
    let ping = inspect("/bin/ping");
    assert_eq!(ping["type"], "file");
    assert!(
        ping["xattrs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x == "security.capability"),
        "{ping}"
    );
    assert_eq!(inspect("/bin/su")["mode"], "4755");
    assert_eq!(inspect("/bin/sticky")["mode"], "1777");
    assert_eq!(inspect("/dev/null")["device"], "1:3");
    assert_eq!(inspect("/dev/loop9")["type"], "block-device");
    assert_eq!(inspect("/dev/fifo")["type"], "fifo");
    assert_eq!(
        inspect("/data/sub/link-to-config")["target"],
        "../../etc/config"
    );
    let cfg = inspect("/etc/config");
    assert_eq!(
        (cfg["layer"].as_u64(), cfg["size"].as_u64()),
        (Some(2), Some(13))
    );
    let random = inspect("/data/random.bin");
    assert_eq!(
        (
            random["uid"].as_u64(),
            random["gid"].as_u64(),
            random["size"].as_u64()
        ),
        (Some(123), Some(456), Some(6 << 20))
    );
    let spans = random["spans"].as_array().unwrap();
    assert!(
        spans[1].as_u64().unwrap() - spans[0].as_u64().unwrap() >= 6,
        "{random}"
    );
    let hard = inspect("/data/hard-d");
    assert_eq!(
        (hard["type"].as_str(), hard["data_layer"].as_u64()),
        (Some("hardlink"), Some(1))
    );
    assert_eq!(inspect("/implied/parent/dirs")["implied"], true);
    assert_eq!(inspect("/opq/new")["layer"], 2);
    for gone in ["/gone", "/gone/deep/file", "/opq/old", "/data/to-delete"] {
        let o = clip(&root, &["inspect", &image, gone], &[]);
        assert_eq!(
            o.status.code(),
            Some(1),
            "{gone} should be absent: {}",
            stdout(&o)
        );
        assert!(stderr(&o).contains("no such file"), "{}", stderr(&o));
    }

    // Stored: a second run builds nothing; --force rebuilds byte-identical indexes.
    let again = clip_json(&root, &["index", &image, "--json"], &[]);
    assert_eq!(again["built_layers"], 0);
    let other_root = tmp.path().join("root2");
    let forced = clip_json(
        &other_root,
        &["index", &image, "--span-size", "1MiB", "--json", "--force"],
        &[],
    );
    for i in 0..2 {
        assert_eq!(
            forced["layers"][i]["index_digest"], j["layers"][i]["index_digest"],
            "index must be deterministic"
        );
    }

    // Human output and progress do not break.
    let o = clip(&root, &["inspect", &image], &[]);
    assert!(
        o.status.success() && stdout(&o).contains("total:"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn push_then_a_fresh_node_finds_the_index_in_the_registry() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "latest", &["gen:busybox"]);
    reg.push_layout(&l, "latest", "tiny");
    let image = reg.image("tiny");
    let a = clip_json(
        &tmp.path().join("a"),
        &["index", &image, "--push", "--json"],
        &[],
    );
    let artifact = a["artifact"].as_str().expect("artifact digest").to_string();
    // Distribution 2.8 has no referrers API: the referrers tag must list the artifact.
    let manifest = a["manifest_digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let url = format!("http://{}/v2/tiny/manifests/sha256-{manifest}", reg.host);
    let listing: serde_json::Value = reqwest::blocking_get_json(&url);
    assert!(
        listing["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["digest"] == artifact.as_str()),
        "{listing}"
    );

    // A node with an empty store inspects without indexing anything.
    let b_root = tmp.path().join("b");
    let b = clip_json(&b_root, &["inspect", &image, "--json"], &[]);
    assert_eq!(b["index_bytes"], a["index_bytes"]);
    assert_eq!(b["files"], a["files"]);
    let f = clip_json(&b_root, &["inspect", &image, "/bin/busybox", "--json"], &[]);
    assert_eq!(f["type"], "file");
    // Pushing again is idempotent (same artifact, listed once).
    let again = clip_json(
        &tmp.path().join("a"),
        &["index", &image, "--push", "--json"],
        &[],
    );
    assert_eq!(again["artifact"], a["artifact"]);
    let listing: serde_json::Value = reqwest::blocking_get_json(&url);
    assert_eq!(listing["manifests"].as_array().unwrap().len(), 1);
    // Without a published index, inspect says what to do.
    let o = clip(
        &tmp.path().join("c"),
        &["inspect", &format!("{}:nope", reg.image("tiny"))],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
}

#[test]
fn hostile_and_broken_images_fail_cleanly() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("dotdot", "gen:dotdot", "'..' component"),
        ("absolute", "gen:absolute", "absolute path"),
        (
            "hardlink-forward",
            "gen:hardlink-forward",
            "appears later in the layer",
        ),
        (
            "huge-size",
            "gen:huge-size",
            "claims more bytes than the layer holds",
        ),
        ("corrupt", "corrupt:busybox", "corrupt gzip data"),
        ("truncated", "truncated:busybox", "truncated"),
        ("diffid", "diffid:busybox", "DiffID mismatch"),
    ];
    for (name, spec, _) in &cases {
        let l = layout(tmp.path(), name, &[spec]);
        reg.push_layout(&l, name, name);
    }
    for (name, _, want) in &cases {
        let root = tmp.path().join(format!("root-{name}"));
        let o = clip(
            &root,
            &["index", &format!("{}:{name}", reg.image(name))],
            &[],
        );
        assert_eq!(
            o.status.code(),
            Some(1),
            "{name}: expected a clean failure, got {:?}\n{}",
            o.status,
            stderr(&o)
        );
        assert!(
            stderr(&o).contains(want),
            "{name}: error should mention {want:?}: {}",
            stderr(&o)
        );
        assert!(!stderr(&o).contains("panicked"), "{name}: {}", stderr(&o));
        // Nothing half-built is kept: inspect still has no index.
        let o = clip(
            &root,
            &["inspect", &format!("{}:{name}", reg.image(name))],
            &[],
        );
        assert!(
            stderr(&o).contains("no clip index"),
            "{name}: {}",
            stderr(&o)
        );
    }
    // An unknown tag and an unreachable registry.
    let o = clip(
        &tmp.path().join("r"),
        &["index", &format!("{}:missing", reg.image("dotdot"))],
        &[],
    );
    assert!(
        o.status.code() == Some(1) && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
    let dead = format!("127.0.0.1:{}/x:y", free_port());
    let o = clip(
        &tmp.path().join("r"),
        &["index", &dead, "--registry-timeout", "2"],
        &[],
    );
    // Nothing listens there: one clear line at once, not retries until the deadline.
    assert!(
        o.status.code() == Some(1)
            && stderr(&o).contains("nothing answers there")
            && !stderr(&o).contains("gave up after"),
        "{}",
        stderr(&o)
    );
    let o = clip(&tmp.path().join("r"), &["index", "Not A Reference"], &[]);
    assert!(
        o.status.code() == Some(1) && stderr(&o).contains("invalid image reference"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn malformed_manifest_and_config_are_reported() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "ok", &["gen:busybox"]);
    reg.push_layout(&l, "ok", "bad");
    let http = reqwest::Client::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // A config blob that is not an image config.
    let config = b"this is not json".to_vec();
    let cd = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&config))
    );
    rt.block_on(async {
        let loc = http.post(format!("http://{}/v2/bad/blobs/uploads/", reg.host)).send().await.unwrap();
        let loc = loc.headers()["location"].to_str().unwrap().to_string();
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = http.put(format!("{loc}{sep}digest={cd}")).body(config.clone()).send().await.unwrap();
        assert!(put.status().is_success(), "{}", put.status());
        let manifest = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
            "layers": []});
        let put = http.put(format!("http://{}/v2/bad/manifests/badconfig", reg.host))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.to_string()).send().await.unwrap();
        assert!(put.status().is_success(), "{}", put.status());
    });
    let o = clip(
        tmp.path(),
        &["index", &format!("{}:badconfig", reg.image("bad"))],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid manifest"), "{}", stderr(&o));
}

/// Small helper so tests read like prose.
mod reqwest {
    pub use ::reqwest::*;
    pub fn blocking_get_json(url: &str) -> serde_json::Value {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let r = ::reqwest::Client::new()
                .get(url)
                .header("accept", "application/vnd.oci.image.index.v1+json")
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "GET {url}: {}", r.status());
            r.json().await.unwrap()
        })
    }
}

#[test]
fn hosts_toml_mirror_serves_reads() {
    // The image lives only on the mirror; the origin registry has never seen it.
    let origin = Registry::start(Auth::None);
    let mirror = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "latest", &["gen:busybox"]);
    mirror.push_layout(&l, "latest", "mirrored");
    let hosts = tmp.path().join("certs.d");
    std::fs::create_dir_all(hosts.join(&origin.host)).unwrap();
    std::fs::write(
        hosts.join(&origin.host).join("hosts.toml"),
        format!("server = \"http://{}\"\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n", origin.host, mirror.host),
    )
    .unwrap();
    let image = format!("{}:latest", origin.image("mirrored"));
    let hosts_arg = hosts.display().to_string();
    let j = clip_json(
        &tmp.path().join("r"),
        &["--hosts-dir", &hosts_arg, "index", &image, "--json"],
        &[],
    );
    assert_eq!(j["layers"].as_array().unwrap().len(), 1);
    // Without the hosts.toml the origin answers "not found".
    let o = clip(&tmp.path().join("r2"), &["index", &image], &[]);
    assert!(
        o.status.code() == Some(1) && stderr(&o).contains("not found"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn platform_is_selected_from_an_image_index() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("multi");
    let o = std::process::Command::new("python3")
        .arg(workspace().join("scripts/mkimage.py"))
        .args(["multiarch", out.to_str().unwrap(), "latest"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    reg.push_layout(&out, "latest", "multi");
    let image = reg.image("multi");
    let amd = clip_json(
        &tmp.path().join("a"),
        &["--platform", "linux/amd64", "index", &image, "--json"],
        &[],
    );
    assert_eq!(
        clip_json(
            &tmp.path().join("a"),
            &[
                "--platform",
                "linux/amd64",
                "inspect",
                &image,
                "/bin/busybox",
                "--json"
            ],
            &[]
        )["type"],
        "file"
    );
    let arm = clip_json(
        &tmp.path().join("b"),
        &["--platform", "linux/arm64", "index", &image, "--json"],
        &[],
    );
    assert_ne!(amd["manifest_digest"], arm["manifest_digest"]);
    assert_eq!(
        clip_json(
            &tmp.path().join("b"),
            &[
                "--platform",
                "linux/arm64",
                "inspect",
                &image,
                "/etc/arch",
                "--json"
            ],
            &[]
        )["type"],
        "file"
    );
    let o = clip(
        &tmp.path().join("c"),
        &["--platform", "linux/s390x", "index", &image],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("no manifest for platform linux/s390x")
            && e.contains("linux/arm64/v8")
            && e.contains("linux/amd64"),
        "{e}"
    );
}
