//! Docker Engine on clip: Debian's docker.io 28 (development suite, fetched at test time and never
//! installed) with the containerd image store, on a containerd 2.1 node that has clip as a proxy
//! snapshotter, configured exactly as docs/docker.md says (docs/docker/daemon.json).

use crate::common::*;
use crate::dropin::{hosts_dir, remote_snapshots_in, CONTAINERD_2_1};
use crate::snapshotter::{Containerd, Node};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's docker.io and docker-cli from the development suite.
const DOCKER: &str = "28.5.2+dfsg4-5";

/// Docker's containerd namespace.
const MOBY: &str = "moby";

fn fetch(package: &str, binary: &str) -> PathBuf {
    let o = Command::new("bash")
        .arg(workspace().join("scripts/debian-tool.sh"))
        .args([package, DOCKER, binary])
        .output()
        .expect("run scripts/debian-tool.sh");
    assert!(
        o.status.success(),
        "fetching {package} {DOCKER} from Debian's archive failed: {}",
        stderr(&o)
    );
    PathBuf::from(stdout(&o).trim())
}

/// A dockerd of its own (data root, exec root, socket) on a node's containerd.
pub struct Dockerd {
    dir: PathBuf,
    engine: PathBuf,
    cli: PathBuf,
    containerd_sock: PathBuf,
    child: Option<Child>,
}

impl Dockerd {
    /// Starts dockerd on `node`'s containerd with docs/docker/daemon.json.
    pub fn start(node: &Node) -> Dockerd {
        let engine = fetch("docker.io", "usr/sbin/dockerd");
        let cli = fetch("docker-cli", "usr/bin/docker").join("usr/bin/docker");
        // Short paths: dockerd's exec root holds unix sockets (108-byte limit).
        let dir = node.dir.join("d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            workspace().join("docs/docker/daemon.json"),
            dir.join("daemon.json"),
        )
        .unwrap();
        let mut d = Dockerd {
            dir,
            engine,
            cli,
            containerd_sock: node.dir.join("containerd.sock"),
            child: None,
        };
        d.restart();
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default()
    }

    /// Starts dockerd (again) and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let path = format!(
            "{}:{}:{}",
            self.engine.join("usr/sbin").display(),
            self.engine.join("usr/bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .unwrap();
        let d = &self.dir;
        let mut child = Command::new(self.engine.join("usr/sbin/dockerd"))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("x"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .arg("--containerd")
            .arg(&self.containerd_sock)
            // Off the host's network: no bridge, no iptables rules.
            .args(["--iptables=false", "--ip6tables=false", "--bridge=none"])
            .env("PATH", path)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("dockerd exited with {status}: {}", self.log());
            }
            if self.docker(&["version"]).status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "dockerd did not answer: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.child = Some(child);
    }

    /// Stops dockerd cleanly (SIGTERM) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let _ = c.wait();
        }
    }

    pub fn docker(&self, args: &[&str]) -> Output {
        Command::new(&self.cli)
            .arg("-H")
            .arg(format!("unix://{}", self.dir.join("docker.sock").display()))
            .args(args)
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .output()
            .expect("run docker")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.docker(args);
        assert!(
            o.status.success(),
            "docker {args:?}: {}{}\ndockerd log:\n{}",
            stdout(&o),
            stderr(&o),
            self.log()
        );
        stdout(&o)
    }

    /// `docker run --rm --network none IMAGE CMD...`: its output.
    pub fn run(&self, image: &str, cmd: &[&str]) -> String {
        let mut args = vec!["run", "--rm", "--network", "none", image];
        args.extend_from_slice(cmd);
        self.ok(&args)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let ids = stdout(&self.docker(&["ps", "-aq"]));
            for id in ids.lines() {
                let _ = self.docker(&["rm", "-f", id]);
            }
        }
        self.stop();
    }
}

/// The FUSE mounts the node's snapshotter serves.
fn fuse_mounts(node: &Node) -> usize {
    node.fuse_mounts().len()
}

/// Docker Engine as a user runs it: `docker pull` + `docker run` of the indexed large image is
/// lazy; two containers share one lazy root; a running container keeps reading across a clip
/// kill and restart; a dockerd restart brings containers back; `docker rmi` removes clip's
/// snapshots and a re-pull is lazy again; an image without an index is unpacked.
#[test]
fn docker_engine_runs_images_lazily_on_clip() {
    let tmp = tempfile::tempdir().unwrap();
    let large = crate::large_image::served(tmp.path());
    let (proxy, image) = (&large.proxy, large.image.clone());
    let hosts = hosts_dir(tmp.path(), &proxy.host, None);
    let mut node = Node::start_on(
        &tmp.path().join("node"),
        Containerd::debian(CONTAINERD_2_1),
        &["--hosts-dir", hosts.to_str().unwrap()],
    );
    let mut docker = Dockerd::start(&node);
    let info = docker.ok(&["info", "--format", "{{.Driver}} {{.DriverStatus}}"]);
    assert!(info.starts_with("clip "), "docker info: {info}");

    // The lazy run.
    docker.ok(&["pull", &image]);
    assert_eq!(
        remote_snapshots_in(&node, MOBY),
        4,
        "docker pull made every layer a lazy snapshot: {}",
        node.snapshotter_log()
    );
    assert_eq!(
        docker.run(&image, &["python3", "-c", "print(1)"]).trim(),
        "1"
    );
    let (sent, image_bytes) = (proxy.sent(), large.bytes);
    eprintln!(
        "docker pull + run: registry sent {sent} bytes ({:.2} % of {image_bytes}), {} blob requests",
        sent as f64 * 100.0 / image_bytes as f64,
        proxy.requests_for("/blobs/")
    );
    assert!(sent * 10 < image_bytes, "{sent} of {image_bytes} bytes");

    // Two containers of one image: both read, through one FUSE mount of the image's root.
    docker.ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "one",
        &image,
        "sleep",
        "600",
    ]);
    let mounts = fuse_mounts(&node);
    docker.ok(&[
        "run",
        "-d",
        "--network",
        "none",
        "--name",
        "two",
        &image,
        "sleep",
        "600",
    ]);
    assert_eq!(
        fuse_mounts(&node),
        mounts,
        "a second container of the image mounted again"
    );
    let before = proxy.sent();
    for c in ["one", "two"] {
        let o = docker.ok(&[
            "exec",
            c,
            "python3",
            "-c",
            "import json; print(json.dumps(2))",
        ]);
        assert_eq!(o.trim(), "2");
    }
    eprintln!(
        "two containers, import json in each: registry sent {} more bytes",
        proxy.sent() - before
    );

    // A clip kill and restart while the containers run: they keep reading, bytes not yet read.
    node.stop_snapshotter(libc::SIGKILL);
    node.start_snapshotter();
    let o = docker.ok(&[
        "exec",
        "one",
        "python3",
        "-c",
        "import email.mime.text; print(3)",
    ]);
    assert_eq!(
        o.trim(),
        "3",
        "a running container reads after a clip restart"
    );

    // A dockerd restart: Docker stops its containers; they start again on clip's snapshots.
    docker.restart();
    docker.ok(&["start", "one"]);
    let o = docker.ok(&["exec", "one", "python3", "-c", "import decimal; print(4)"]);
    assert_eq!(o.trim(), "4", "a container restarted with dockerd reads");

    // docker rmi: containerd's collector removes clip's snapshots; a re-pull is lazy again.
    docker.ok(&["rm", "-f", "one", "two"]);
    docker.ok(&["rmi", &image]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.snapshots_in(MOBY).is_empty() {
        assert!(
            Instant::now() < deadline,
            "clip's snapshots outlived the image: {:?}",
            node.snapshots_in(MOBY)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = proxy.sent();
    docker.ok(&["pull", &image]);
    assert_eq!(remote_snapshots_in(&node, MOBY), 4);
    assert_eq!(
        docker.run(&image, &["python3", "-c", "print(5)"]).trim(),
        "5"
    );
    let again = proxy.sent() - before;
    eprintln!("docker rmi, pull + run again: registry sent {again} bytes");
    assert!(again * 10 < image_bytes, "{again} of {image_bytes} bytes");

    // An image without an index: unpacked into clip's snapshots, as overlayfs would.
    let reg = Registry::start(Auth::None);
    let l = layout(tmp.path(), "v1", &["gen:busybox", "gen:users"]);
    reg.push_layout(&l, "v1", "plain");
    let plain = format!("{}:v1", reg.image("plain"));
    docker.ok(&["pull", &plain]);
    assert_eq!(docker.run(&plain, &["cat", "/etc/public"]), "anyone\n");
    assert_eq!(
        remote_snapshots_in(&node, MOBY),
        4,
        "the plain image's layers were unpacked, not lazy"
    );
}
