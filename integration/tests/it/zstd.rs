//! zstd layers, made by real producers: zstd:chunked by stargz-snapshotter's `ctr-remote image
//! convert --zstdchunked` (Debian's development suite, fetched at test time), indexed from their
//! table of contents and read lazily (`clip index`, `inspect`, `cat`, containers through the
//! snapshotter); plain zstd by skopeo (unpacked, and runs); a gzip base under a zstd:chunked top
//! (both lazy).

use crate::common::*;
use crate::snapshotter::{out, publish_index, Node};
use std::path::{Path, PathBuf};
use std::process::Command;

const STARGZ: &str = "0.14.3-7";

fn ctr_remote() -> PathBuf {
    let o = Command::new("bash")
        .arg(workspace().join("scripts/debian-tool.sh"))
        .args(["stargz-snapshotter", STARGZ, "usr/bin/ctr-remote"])
        .output()
        .expect("run scripts/debian-tool.sh");
    assert!(
        o.status.success(),
        "fetching stargz-snapshotter {STARGZ} from Debian's archive failed: {}",
        stderr(&o)
    );
    PathBuf::from(stdout(&o).trim()).join("usr/bin/ctr-remote")
}

/// `image` converted to zstd:chunked by ctr-remote in `node`'s containerd (namespace `convert`)
/// and pushed as `dest`.
fn convert(node: &Node, image: &str, dest: &str) {
    let tool = ctr_remote();
    let run = |args: &[&str]| {
        let o = Command::new(&tool)
            .arg("-a")
            .arg(node.dir.join("containerd.sock"))
            .args(["-n", "convert"])
            .args(args)
            .output()
            .expect("run ctr-remote");
        assert!(
            o.status.success(),
            "ctr-remote {args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
    };
    run(&["images", "pull", "--plain-http", image]);
    run(&["image", "convert", "--oci", "--zstdchunked", image, dest]);
    run(&["images", "push", "--plain-http", dest]);
}

/// The blob file docker-registry keeps for `digest` under `reg`'s storage.
fn blob_file(reg: &Registry, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    reg._dir
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// The layers of `image`'s manifest (digest, annotations).
fn layers(root: &Path, image: &str) -> Vec<serde_json::Value> {
    let j = clip_json(root, &["inspect", image, "--json"], &[]);
    j["layers"].as_array().unwrap().clone()
}

#[test]
fn zstd_chunked_images_are_indexed_from_their_toc_and_read_lazily() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let l = layout(tmp.path(), "v1", &["gen:busybox", "gen:users"]);
    reg.push_layout(&l, "v1", "app");
    let gzip = format!("{}:v1", reg.image("app"));
    let zstd = format!("{}:zc", reg.image("app"));
    let node = Node::start(&tmp.path().join("node"));
    convert(&node, &gzip, &zstd);

    // The command line: index (from the TOC only), inspect, cat.
    let root = tmp.path().join("cli");
    let j = clip_json(&root, &["index", &zstd, "--json"], &[]);
    eprintln!("clip index of the zstd:chunked image: {j}");
    assert_eq!(j["checkpoint_bytes"], 0, "no windows: {j}");
    let compressed = j["compressed_bytes"].as_u64().unwrap();
    assert!(j["index_bytes"].as_u64().unwrap() * 100 < compressed, "{j}");
    // The gzip original, indexed on its own root, is the reference.
    clip_json(&tmp.path().join("gz"), &["index", &gzip, "--json"], &[]);
    for path in ["/etc/public", "/bin/busybox", "/home/user/big.bin"] {
        let (z, stats) = cat_with(&root, &[], &zstd, path, &[], &[]);
        let (g, _) = cat_with(&tmp.path().join("gz"), &[], &gzip, path, &[], &[]);
        assert_eq!(
            z, g,
            "{path} differs between the gzip and zstd:chunked images"
        );
        eprintln!("cat {path}: {stats}");
    }
    let info = clip_json(&root, &["inspect", &zstd, "/etc/public", "--json"], &[]);
    assert_eq!(info["type"], "file", "{info}");

    // A corrupt chunk: that file fails with the layer and span named; others still read.
    let ls = layers(&root, &zstd);
    let top = ls.last().unwrap()["digest"].as_str().unwrap().to_string();
    let blob = blob_file(&reg, &top);
    let mut bytes = std::fs::read(&blob).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    let fresh = tmp.path().join("fresh");
    let o = clip(&fresh, &["cat", &zstd, "/home/user/big.bin"], &[]);
    assert!(!o.status.success(), "a corrupt chunk was served");
    let err = stderr(&o);
    assert!(err.contains(&top), "the error names the layer: {err}");
    eprintln!("corrupt chunk: {}", err.lines().last().unwrap_or(""));
    let o = clip(&fresh, &["cat", &zstd, "/etc/public"], &[]);
    assert_eq!(out(&o), "anyone\n");
    // Through a mount: EIO for that file, a log line naming the layer, other files read.
    let mroot = tmp.path().join("mount-root");
    let m = crate::fuse_mount::Mounted::start(&mroot, &zstd, &tmp.path().join("mnt"));
    let e = std::fs::read(m.dir.join("home/user/big.bin")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert_eq!(
        std::fs::read_to_string(m.dir.join("etc/public")).unwrap(),
        "anyone\n"
    );
    drop(m);
    let log = std::fs::read_to_string(mroot.with_extension("mount.log")).unwrap();
    assert!(log.contains(&top), "the mount's log names the layer: {log}");
    eprintln!(
        "mount log: {}",
        log.lines().find(|l| l.contains(&top)).unwrap_or("")
    );
    bytes[at] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();

    // A container through the snapshotter: every layer lazy, from the TOC alone.
    let pulled = node.pull_ok(&zstd);
    assert!(
        pulled.contains("2 lazy layer(s), 0 unpacked"),
        "{pulled}\n{}",
        node.snapshotter_log()
    );
    let o = node.run("clip", &zstd, "zc1", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
    let o = node.run("clip", &zstd, "zc2", &["sha256sum", "/home/user/big.bin"]);
    let (g, _) = cat_with(
        &tmp.path().join("gz"),
        &[],
        &gzip,
        "/home/user/big.bin",
        &[],
        &[],
    );
    let want = sha256_hex(&g);
    assert!(out(&o).starts_with(&want), "{} vs {want}", out(&o));

    // Mixed: the gzip base under the zstd:chunked top, its index published: both lazy.
    let o = Command::new("python3")
        .arg(workspace().join("integration/fixtures/mix-image.py"))
        .args([reg.host.as_str(), "app", "v1", "zc", "mixed"])
        .output()
        .unwrap();
    assert!(o.status.success(), "mix-image.py: {}", stderr(&o));
    let mixed = format!("{}:mixed", reg.image("app"));
    publish_index(tmp.path(), &mixed);
    let pulled = node.pull_ok(&mixed);
    assert!(pulled.contains("2 lazy layer(s), 0 unpacked"), "{pulled}");
    let o = node.run("clip", &mixed, "zm", &["sha256sum", "/home/user/big.bin"]);
    assert!(out(&o).starts_with(&want), "{}", out(&o));

    // Plain zstd (one stream per layer, as skopeo and BuildKit write it): unpacked, and runs.
    // Its layers' chains are the gzip original's: the base is the mixed image's lazy one
    // (pulled first, the plain image would have made it an unpacked one for both).
    let plain = format!("{}:zstd", reg.image("app"));
    skopeo_zstd(&l, "v1", &plain);
    let pulled = node.pull_ok(&plain);
    assert!(
        pulled.contains("no index, downloading") && pulled.contains("0 lazy layer(s), 1 unpacked"),
        "{pulled}"
    );
    let o = node.run("clip", &plain, "zp", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");

    // Plain zstd, indexed: checkpoints (a zstd dictionary per span) make it lazy. The image
    // has a 32 MiB layer of 2,048 files; the gzip original is the reference.
    // (Its base is busybox, whose chain is lazy here; a layer over the unpacked plain image's
    // chain would be unpacked too, since a lazy layer stacks only on lazy ones.)
    let l2 = layout(tmp.path(), "v2", &["gen:busybox", "gen:manyfiles"]);
    reg.push_layout(&l2, "v2", "many");
    let many_gz = format!("{}:v2", reg.image("many"));
    let many = format!("{}:zstd", reg.image("many"));
    skopeo_zstd(&l2, "v2", &many);
    let croot = tmp.path().join("plain-cli");
    let j = clip_json(&croot, &["index", &many, "--json"], &[]);
    eprintln!("clip index of the plain zstd image: {j}");
    assert!(j["checkpoint_bytes"].as_u64().unwrap() > 0, "{j}");
    let info = clip_json(&croot, &["inspect", &many, "/data/mf/1000", "--json"], &[]);
    assert_eq!(info["type"], "file", "{info}");
    let gz_root = tmp.path().join("many-gz");
    clip_json(&gz_root, &["index", &many_gz, "--json"], &[]);
    let (want_file, _) = cat_with(&gz_root, &[], &many_gz, "/data/mf/1000", &[], &[]);
    // A fresh node with the published index reads one file: one span, not the layer.
    publish_index(tmp.path(), &many);
    let (got, stats) = cat_with(
        &tmp.path().join("plain-fresh"),
        &[],
        &many,
        "/data/mf/1000",
        &[],
        &[],
    );
    assert!(
        got == want_file,
        "/data/mf/1000 differs from the gzip image's"
    );
    let fetched = stats["registry_bytes"].as_u64().unwrap();
    let top = layers(&croot, &many).last().unwrap()["compressed_bytes"]
        .as_u64()
        .unwrap();
    eprintln!("plain zstd: cat of one 16 KiB file fetched {fetched} of the layer's {top} bytes");
    assert!(fetched * 3 < top, "{fetched} of {top}: {stats}");
    // Through the snapshotter: the new layer is lazy, and the container reads right.
    let pulled = node.pull_ok(&many);
    assert!(
        pulled.contains("lazy layer(s), 0 unpacked") && !pulled.contains(" 0 lazy"),
        "{pulled}\n{}",
        node.snapshotter_log()
    );
    let o = node.run("clip", &many, "zq", &["sha256sum", "/data/mf/1000"]);
    let want_mf = sha256_hex(&want_file);
    assert!(out(&o).starts_with(&want_mf), "{} vs {want_mf}", out(&o));

    // trust = local takes no TOC: the node indexes the zstd:chunked image from its bytes (each
    // chunk a whole frame), and the plain zstd image with checkpoints; both lazy.
    drop(node);
    let local = Node::start_with(&tmp.path().join("local"), &["--trust", "local"]);
    for (image, name, path, want) in [
        (&zstd, "lz", "/home/user/big.bin", &want),
        (&many, "lm", "/data/mf/1000", &want_mf),
    ] {
        let pulled = local.pull_ok(image);
        assert!(
            pulled.contains("lazy layer(s), 0 unpacked") && !pulled.contains(" 0 lazy"),
            "{pulled}\n{}",
            local.snapshotter_log()
        );
        let o = local.run("clip", image, name, &["sha256sum", path]);
        assert!(out(&o).starts_with(want.as_str()), "{} vs {want}", out(&o));
    }
    assert!(
        local
            .snapshotter_log()
            .contains("trust = local: indexing on this node"),
        "{}",
        local.snapshotter_log()
    );
}

/// Copies the OCI layout's `tag` to `dest` with plain zstd layers, as skopeo writes them.
/// skopeo recompresses only uncompressed layers (it keeps gzip ones as they are), so the
/// layout goes through a decompressed `dir:` copy first; the layers are checked to be zstd.
fn skopeo_zstd(l: &Path, tag: &str, dest: &str) {
    let dir = l.with_extension(format!("{tag}.plain"));
    let o = Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-decompress"])
        .arg(format!("oci:{}:{tag}", l.display()))
        .arg(format!("dir:{}", dir.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", stderr(&o));
    let zl = l.with_extension(format!("{tag}.zstd"));
    let o = Command::new("skopeo")
        .args(["copy", "--quiet", "--format", "oci", "--dest-compress"])
        .args(["--dest-compress-format", "zstd"])
        .arg(format!("dir:{}", dir.display()))
        .arg(format!("oci:{}:{tag}", zl.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", stderr(&o));
    // Pushed as they are: skopeo would otherwise send the gzip blobs it knows of instead.
    let o = Command::new("skopeo")
        .args([
            "copy",
            "--quiet",
            "--preserve-digests",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci:{}:{tag}", zl.display()))
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    assert!(o.status.success(), "skopeo: {}", stderr(&o));
    let o = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{dest}"))
        .output()
        .unwrap();
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for layer in m["layers"].as_array().unwrap() {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd",
            "{m}"
        );
    }
}

fn sha256_hex(b: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(b).unwrap();
    let o = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
