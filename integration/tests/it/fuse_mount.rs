//! Real FUSE mounts (`clip mount`) compared with an independent extraction (`umoci unpack`).

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running `clip mount`, unmounted (SIGTERM) when dropped.
pub(crate) struct Mounted {
    child: std::process::Child,
    pub dir: PathBuf,
}

impl Mounted {
    pub(crate) fn start(root: &Path, image: &str, dir: &Path) -> Mounted {
        Self::start_with(root, image, dir, &[])
    }

    /// `args` go before the `mount` command (global options such as --metrics-address).
    fn start_with(root: &Path, image: &str, dir: &Path, args: &[&str]) -> Mounted {
        std::fs::create_dir_all(dir).unwrap();
        let mut child = Command::new(clip_bin())
            .arg("--root")
            .arg(root)
            .args(args)
            .args(["mount", image])
            .arg(dir)
            .env("CLIP_LOG", "warn,fuser=error")
            // A file, not a pipe: an unread pipe would block the daemon once it fills.
            .stderr(std::fs::File::create(root.with_extension("mount.log")).unwrap())
            .spawn()
            .expect("start clip mount");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
            if mounts
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(dir.to_str().unwrap()))
            {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                let err =
                    std::fs::read_to_string(root.with_extension("mount.log")).unwrap_or_default();
                panic!("clip mount exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "mount did not appear");
            std::thread::sleep(Duration::from_millis(50));
        }
        Mounted {
            child,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some(self.dir.to_str().unwrap_or("")))
        {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

fn umoci_unpack(layout: &Path, tag: &str, bundle: &Path) -> PathBuf {
    need("umoci");
    let o = Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
        .arg(bundle)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    bundle.join("rootfs")
}

fn treecmp(expected: &Path, actual: &Path) {
    let o = Command::new("python3")
        .arg(workspace().join("integration/fixtures/treecmp.py"))
        .arg(expected)
        .arg(actual)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    eprintln!("{}", out.lines().last().unwrap_or(""));
    assert!(
        o.status.success(),
        "the mount differs from umoci's extraction:\n{out}"
    );
}

#[test]
fn every_entry_type_mount_matches_umoci_unpack() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    let expected = umoci_unpack(&l, "v1", &tmp.path().join("bundle"));
    let m = Mounted::start(&root, &image, &tmp.path().join("mnt"));
    treecmp(&expected, &m.dir);
    // Read-only, and errors are errno: writes refused, missing names ENOENT.
    assert!(std::fs::write(m.dir.join("etc/config"), b"x").is_err());
    assert_eq!(
        std::fs::metadata(m.dir.join("nope")).unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}

#[test]
fn large_image_mount_matches_umoci_unpack_and_serves_parallel_readers() {
    let layout = crate::large_image::large_layout();
    let reg = Registry::start(Auth::None);
    reg.push_layout(&layout, "large", "large");
    let image = format!("{}:large", reg.image("large"));
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    let m = Mounted::start(&root, &image, &tmp.path().join("mnt"));
    // 8 parallel readers of different large files all finish (no serialisation deadlock).
    // The 8 largest regular files of the image (a walk of the mount: metadata only).
    let mut all = Vec::new();
    let mut stack = vec![m.dir.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let md = e.path().symlink_metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else if md.is_file() {
                all.push((md.len(), e.path()));
            }
        }
    }
    assert!(all.len() >= 30_000, "{} files", all.len());
    all.sort();
    let files: Vec<PathBuf> = all.iter().rev().take(8).map(|(_, p)| p.clone()).collect();
    let handles: Vec<_> = files
        .iter()
        .map(|f| {
            let p = f.clone();
            std::thread::spawn(move || {
                std::fs::read(&p)
                    .map(|b| b.len())
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            })
        })
        .collect();
    for h in handles {
        assert!(h.join().unwrap() > 0);
    }
    let expected = umoci_unpack(&layout, "large", &tmp.path().join("bundle"));
    treecmp(&expected, &m.dir);
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root)");
}

/// The content digest named by the store's one whole-file copy, once it exists.
fn wait_for_copy(root: &Path) -> PathBuf {
    let dir = root.join("cache/files");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.path())
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with("new."))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(p) = done.into_iter().next() {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no passthrough copy in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn passthrough_serves_wholly_cached_files_without_the_daemon() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    // A 6 MiB file (above the 1 MiB passthrough threshold) and a small one (below it).
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("data")).unwrap();
    let big: Vec<u8> = (0..6u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(src.join("data/big.bin"), &big).unwrap();
    std::fs::write(src.join("data/small.txt"), b"small file\n").unwrap();
    let (image, root) = indexed_dir(&reg, tmp.path(), &src, "pt");

    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = Mounted::start_with(
        &root,
        &image,
        &tmp.path().join("mnt"),
        &["--metrics-address", &addr],
    );
    let file = m.dir.join("data/big.bin");
    // Cold: through the daemon (bytes fetched, verified, cached); closing it starts the copy.
    assert!(std::fs::read(&file).unwrap() == big);
    let served = metric(&scrape(port), "clip_fuse_read_bytes_total");
    assert!(served >= big.len() as f64, "daemon served {served} bytes");
    let copy = wait_for_copy(&root);
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        big,
        "the copy holds the file's bytes"
    );
    // Warm, page cache dropped: the kernel reads the copy; the daemon serves no byte.
    drop_page_cache();
    assert!(std::fs::read(&file).unwrap() == big);
    let text = scrape(port);
    assert_eq!(metric(&text, "clip_fuse_read_bytes_total"), served);
    assert!(
        metric(&text, "clip_fuse_opens_total{mode=\"passthrough\"}") >= 1.0,
        "{text}"
    );
    // Files below the threshold stay on the daemon path.
    assert_eq!(
        std::fs::read(m.dir.join("data/small.txt")).unwrap(),
        b"small file\n"
    );
    // Two opens at once share the inode's passthrough mode (the kernel refuses mixed modes).
    let (a, b) = (
        std::fs::File::open(&file).unwrap(),
        std::fs::File::open(&file).unwrap(),
    );
    drop((a, b));
    drop(m);

    // After a restart a copy is hashed again before use: a damaged copy is dropped, never
    // served, and the file still reads right (from the span cache).
    let mut raw = std::fs::read(&copy).unwrap();
    raw[4096] ^= 0xff;
    std::fs::write(&copy, raw).unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let m = Mounted::start_with(
        &root,
        &image,
        &tmp.path().join("mnt"),
        &["--metrics-address", &addr],
    );
    let file = m.dir.join("data/big.bin");
    drop_page_cache();
    for _ in 0..3 {
        assert!(std::fs::read(&file).unwrap() == big);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(
        std::fs::read(wait_for_copy(&root)).unwrap(),
        big,
        "rewritten copy"
    );
    let text = scrape(port);
    // Every span came from the disk tier (the registry only answered the manifest lookup).
    assert_eq!(metric(&text, "clip_cache_misses_total"), 0.0, "{text}");
    assert!(metric(&text, "clip_cache_hits_total") > 0.0, "{text}");
    drop_page_cache();
    assert!(std::fs::read(&file).unwrap() == big);
}

#[test]
fn mount_daemon_runs_in_the_background_until_clip_umount() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (l, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    let dir = tmp.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    let o = clip(
        &root,
        &["mount", &image, dir.to_str().unwrap(), "--daemon"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let said = stderr(&o);
    let pid: i32 = said
        .split("(pid ")
        .nth(1)
        .and_then(|t| t.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {said:?}"));
    // The command returned with the mount up and serving; the mount outlives the command.
    let expected = umoci_unpack(&l, "v1", &tmp.path().join("bundle"));
    treecmp(&expected, &dir);
    // `clip umount` ends the background process too.
    let o = clip(&root, &["umount", dir.to_str().unwrap()], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let deadline = Instant::now() + Duration::from_secs(30);
    // Gone, or a zombie waiting for whoever reaps orphans.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|t| !t.trim_start().starts_with('Z'))
        })
    };
    while alive(pid) {
        assert!(
            Instant::now() < deadline,
            "the background mount did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(root.join("mount.log")).unwrap();
    assert!(log.contains("was unmounted"), "{log}");
    // A mount that cannot come up reports the background process's error.
    let o = clip(
        &root,
        &[
            "mount",
            &format!("{}/nothing:here", reg.host),
            dir.to_str().unwrap(),
            "--daemon",
        ],
        &[],
    );
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("the background mount exited"),
        "{}",
        stderr(&o)
    );
}

/// A user's `clip mount` ignores setuid bits and device nodes unless asked (`--suid-dev`): an
/// image must not hand host users root or raw devices. The files still show their modes.
#[test]
fn clip_mount_is_nosuid_nodev_unless_asked() {
    use std::os::unix::fs::PermissionsExt;
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let (_, image) = everytype(&reg, tmp.path());
    let root = tmp.path().join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    let dir = tmp.path().join("mnt");
    std::fs::create_dir_all(&dir).unwrap();
    for (extra, nosuid) in [(None, true), (Some("--suid-dev"), false)] {
        let mut args = vec!["mount", &image, dir.to_str().unwrap(), "--daemon"];
        args.extend(extra);
        let o = clip(&root, &args, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        let opts = mount_options(&dir).expect("mounted");
        assert_eq!(opts.contains("nosuid"), nosuid, "{extra:?}: {opts}");
        assert_eq!(opts.contains("nodev"), nosuid, "{extra:?}: {opts}");
        let su = std::fs::metadata(dir.join("bin/su")).unwrap();
        assert_eq!(su.permissions().mode() & 0o7777, 0o4755);
        let o = clip(&root, &["umount", dir.to_str().unwrap()], &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
}

/// A program that loads two modules from a directory loads more: on the second cold open in a
/// directory, the files next to it of the same kind are fetched in the background, so reading
/// them afterwards asks the registry for nothing; files of another kind are left alone.
/// Pushes directory `src` as the one-layer image `repo:v1` and indexes it into `tmp/root`:
/// (image, root).
fn indexed_dir(reg: &Registry, tmp: &Path, src: &Path, repo: &str) -> (String, PathBuf) {
    let l = layout(tmp, "v1", &[&format!("dir:{}", src.display())]);
    reg.push_layout(&l, "v1", repo);
    let image = format!("{}:v1", reg.image(repo));
    let root = tmp.join("root");
    clip_json(&root, &["index", &image, "--json"], &[]);
    (image, root)
}

/// Polls the mount's metrics (served on `port`) until `done` holds for them, for at most 30 s;
/// then fails with `what`, the metrics and the mount's log.
fn wait_for_metrics(port: u16, root: &Path, what: &str, done: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done(&scrape(port)) {
        assert!(
            Instant::now() < deadline,
            "{what}: {}\n{}",
            scrape(port),
            std::fs::read_to_string(root.with_extension("mount.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn closing_files_costs_the_daemon_no_flush_round_trips() {
    // close() waits for a FLUSH answer; a read-only image has nothing to flush, so the first
    // FLUSH is refused (ENOSYS) and the kernel sends no more on the connection.
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    for k in 0..40 {
        std::fs::write(src.join(format!("etc/f{k}.conf")), format!("file {k}\n")).unwrap();
    }
    let (image, root) = indexed_dir(&reg, tmp.path(), &src, "flush");
    let port = free_port();
    let m = Mounted::start_with(
        &root,
        &image,
        &tmp.path().join("mnt"),
        &["--metrics-address", &format!("127.0.0.1:{port}")],
    );
    for round in 0..2 {
        for k in 0..40 {
            let got = std::fs::read_to_string(m.dir.join(format!("etc/f{k}.conf"))).unwrap();
            assert_eq!(got, format!("file {k}\n"), "round {round}");
        }
    }
    let text = scrape(port);
    let opens = metric(&text, "clip_fuse_requests_total{op=\"open\"}");
    assert!(opens >= 40.0, "{opens} opens answered\n{text}");
    let flushes = metric(&text, "clip_fuse_requests_total{op=\"flush\"}");
    assert!(
        flushes <= 1.0,
        "{flushes} FLUSH round trips for {opens} opens\n{text}"
    );
}

#[test]
fn small_local_files_are_stored_in_the_page_cache_as_they_are_opened() {
    // A READ is a round trip; a small file whose bytes are local is written into the kernel's
    // page cache as it is opened, so reading it asks the daemon nothing.
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("lib")).unwrap();
    let body = |k: u32| noise(u64::from(k) + 7, 3000 + 997 * k as usize);
    for k in 0..30 {
        std::fs::write(src.join(format!("lib/m{k}.py")), body(k)).unwrap();
    }
    let total: usize = (0..30).map(|k| body(k).len()).sum();
    let (image, root) = indexed_dir(&reg, tmp.path(), &src, "store");
    let port = free_port();
    let m = Mounted::start_with(
        &root,
        &image,
        &tmp.path().join("mnt"),
        &["--metrics-address", &format!("127.0.0.1:{port}")],
    );
    let read_all = |round: &str| {
        for k in 0..30 {
            let got = std::fs::read(m.dir.join(format!("lib/m{k}.py"))).unwrap();
            assert!(got == body(k), "m{k}.py, {round}");
        }
    };
    let counts = || {
        let t = scrape(port);
        (
            metric(&t, "clip_fuse_requests_total{op=\"read\"}"),
            metric(&t, "clip_fuse_stored_bytes_total"),
            t,
        )
    };
    // Cold: the files after the first two are fetched on a guess, and most are stored.
    read_all("cold");
    let (reads, stored, _) = counts();
    // The page cache dropped twice: the daemon cannot tell, so a file it stored is READ once
    // (which tells it), and stored at its next open. Over the two rounds each file is READ
    // once and stored once; without storing, each would be READ twice.
    drop_page_cache();
    read_all("warm, first");
    drop_page_cache();
    read_all("warm, second");
    let (reads2, stored2, text) = counts();
    assert_eq!(reads2 - reads, 30.0, "READs over two warm rounds\n{text}");
    assert_eq!(stored2 - stored, total as f64, "{text}");
    // Hot: the pages are cached; nothing is read. A file READ in the last round is stored
    // once more (the daemon cannot know that the READ refilled the cache); after that, an open
    // costs nothing more than the OPEN.
    read_all("hot");
    let (reads3, stored3, text) = counts();
    assert_eq!(reads3, reads2, "{text}");
    read_all("hot again");
    let (reads4, stored4, text) = counts();
    assert_eq!((reads4, stored4), (reads3, stored3), "{text}");
}

#[test]
fn a_second_cold_open_in_a_directory_fetches_the_files_of_its_kind_next_to_it() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("pkg")).unwrap();
    // Noise, so the layer has a checkpoint every span.
    let body = |k: u32, n: usize| noise(u64::from(k) + 1, n);
    // m0.pyc, m0x.dat, m1.pyc, ...: 1 MiB of another kind between modules, so no module is
    // fetched as a neighbour of another.
    for k in 0..6 {
        std::fs::write(src.join(format!("pkg/m{k}.pyc")), body(k, 300 << 10)).unwrap();
        std::fs::write(src.join(format!("pkg/m{k}x.dat")), body(100 + k, 1 << 20)).unwrap();
    }
    let (image, root) = indexed_dir(&reg, tmp.path(), &src, "sib");
    let mut guessed = std::collections::BTreeSet::new();
    for k in 2..6 {
        let f = format!("/pkg/m{k}.pyc");
        let spans = clip_json(&root, &["inspect", &image, &f, "--json"], &[])["spans"].clone();
        guessed.extend(spans[0].as_u64().unwrap()..spans[1].as_u64().unwrap());
    }
    let port = free_port();
    let m = Mounted::start_with(
        &root,
        &image,
        &tmp.path().join("mnt"),
        &["--metrics-address", &format!("127.0.0.1:{port}")],
    );
    let read = |k: u32| std::fs::read(m.dir.join(format!("pkg/m{k}.pyc"))).unwrap();
    assert!(read(0) == body(0, 300 << 10));
    assert!(read(1) == body(1, 300 << 10));
    // The guess lands in the background; the counter counts spans once they are fetched.
    wait_for_metrics(port, &root, "the siblings were not fetched", |m| {
        metric(m, "clip_speculate_spans_total") >= guessed.len() as f64
    });
    let blob_requests = || {
        reg.requests_from("clip/")
            .iter()
            .filter(|l| l.contains("/blobs/"))
            .count()
    };
    let before = blob_requests();
    for k in 2..6 {
        assert!(read(k) == body(k, 300 << 10), "m{k}.pyc");
    }
    assert_eq!(blob_requests(), before, "the modules came from the cache");
    let other = std::fs::read(m.dir.join("pkg/m4x.dat")).unwrap();
    assert!(other == body(104, 1 << 20));
    assert!(
        blob_requests() > before,
        "another kind of file was not guessed"
    );
}

#[test]
fn opening_a_program_fetches_the_libraries_it_needs_before_the_loader_asks() {
    // A real program and one of its real libraries (python and libm, from this machine), laid
    // out as Debian does (merged /usr, a soname link), with 1 MiB of noise between them so the
    // library shares no span with the program. libm is big enough (about 900 KB) that reading
    // its headers does not fetch all of it.
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    let lib = std::fs::canonicalize(format!("/lib/{triplet}/libm.so.6")).unwrap();
    let program = std::fs::canonicalize("/usr/bin/python3").unwrap();
    let lib_name = lib.file_name().unwrap().to_str().unwrap().to_string();
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let libdir = src.join(format!("usr/lib/{triplet}"));
    std::fs::create_dir_all(&libdir).unwrap();
    std::fs::create_dir_all(src.join("usr/bin")).unwrap();
    std::fs::copy(&program, src.join("usr/bin/python3")).unwrap();
    let noise = noise(7, 1 << 20);
    std::fs::write(src.join("usr/bin/zz-noise.dat"), &noise).unwrap();
    std::fs::copy(&lib, libdir.join(&lib_name)).unwrap();
    if lib_name != "libm.so.6" {
        std::os::unix::fs::symlink(&lib_name, libdir.join("libm.so.6")).unwrap();
    }
    std::os::unix::fs::symlink("usr/lib", src.join("lib")).unwrap();
    // The loader's cache, after more noise, read by the loader before any library.
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/aa-noise.dat"), &noise).unwrap();
    let ld_cache = std::fs::read("/etc/ld.so.cache").unwrap();
    std::fs::write(src.join("etc/ld.so.cache"), &ld_cache).unwrap();
    let (image, root) = indexed_dir(&reg, tmp.path(), &src, "prog");
    let port = free_port();
    let m = Mounted::start_with(
        &root,
        &image,
        &tmp.path().join("mnt"),
        &["--metrics-address", &format!("127.0.0.1:{port}")],
    );
    // Counted by clip as each response arrives, so a fetch whose bytes were read is counted.
    let requests = || metric(&scrape(port), "clip_registry_requests_total");
    // What an exec does first: open the program and read its header.
    let mut head = [0u8; 64];
    std::io::Read::read_exact(
        &mut std::fs::File::open(m.dir.join("usr/bin/python3")).unwrap(),
        &mut head,
    )
    .unwrap();
    assert_eq!(&head[..4], b"\x7fELF");
    // The library's fetch starts once the program's headers are read (the counter counts it
    // once its spans are claimed); then wait for every fetch in flight to end.
    wait_for_metrics(port, &root, "the library was not fetched", |m| {
        metric(m, "clip_fuse_libraries_prefetched_total") >= 1.0
            && metric(m, "clip_fetch_runs") == 0.0
    });
    let before = requests();
    // The loader's open, through the soname link and the merged /usr.
    let got = std::fs::read(m.dir.join(format!("lib/{triplet}/libm.so.6"))).unwrap();
    assert!(got == std::fs::read(&lib).unwrap(), "libm's bytes");
    assert!(std::fs::read(m.dir.join("etc/ld.so.cache")).unwrap() == ld_cache);
    assert_eq!(
        requests(),
        before,
        "the library and the loader's cache were fetched before they were opened"
    );
    // The noise between them was not guessed: reading it costs requests.
    assert!(std::fs::read(m.dir.join("usr/bin/zz-noise.dat")).unwrap() == noise);
    assert!(requests() > before, "the noise was fetched on a guess");
    assert_eq!(
        metric(&scrape(port), "clip_fuse_libraries_prefetched_total"),
        1.0,
        "libm only (libc and the others are not in the image)"
    );
}
