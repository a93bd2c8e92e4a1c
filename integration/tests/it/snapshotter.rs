//! The containerd snapshotter end to end: Debian's containerd 1.6 with `clip snapshotter` as a
//! proxy plugin, runc, docker-registry, `clip pull` and `ctr run`.

use crate::common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A containerd build: Debian 12's (on PATH) or another Debian suite's, fetched by
/// `scripts/debian-tool.sh` into /var/cache/clip-peers (never installed over the system's).
#[derive(Clone, Debug)]
pub struct Containerd {
    /// The directory holding containerd, ctr and its runc shim; `None`: the system's.
    bin: Option<PathBuf>,
    /// Its configuration format (2: containerd 1.x, 3: containerd 2.x).
    pub config_version: u8,
    /// The Kubernetes CRI plugin on clip, or off.
    pub cri: Option<CriSettings>,
    /// Configured the way k3s renders docs/containerd/k3s-config-v3.toml.tmpl (2.x only).
    pub k3s: bool,
    /// The directory of the `runc` its shims run (`None`: the system's runc 1.1).
    runc: Option<PathBuf>,
}

/// The CRI plugin's settings a test chooses.
#[derive(Clone, Debug)]
pub struct CriSettings {
    /// The pod sandbox ("pause") image, from a local registry.
    pub pause: String,
    /// The registry hosts directory (`config_path`).
    pub hosts_dir: PathBuf,
    /// containerd's `disable_snapshot_annotations` (true by default: no pull labels).
    pub disable_snapshot_annotations: bool,
}

impl Containerd {
    /// Debian 12's containerd 1.6.
    pub fn system() -> Containerd {
        need("containerd");
        need("ctr");
        Containerd {
            bin: None,
            config_version: 2,
            cri: None,
            k3s: false,
            runc: None,
        }
    }

    /// Debian's containerd package `version` (e.g. 2.1.9+ds1-5 from the development suite,
    /// 1.7.24~ds1-6+deb13u1 from trixie), fetched at test time with `apt-get download`.
    pub fn debian(version: &str) -> Containerd {
        let o = Command::new("bash")
            .arg(workspace().join("scripts/debian-tool.sh"))
            .args(["containerd", version, "usr/bin/containerd"])
            .output()
            .expect("run scripts/debian-tool.sh");
        assert!(
            o.status.success(),
            "fetching containerd {version} from Debian's archive failed: {}",
            stderr(&o)
        );
        let dir = PathBuf::from(stdout(&o).trim()).join("usr/bin");
        Containerd {
            bin: Some(dir),
            config_version: if version.starts_with('1') { 2 } else { 3 },
            cri: None,
            k3s: false,
            runc: None,
        }
    }

    /// This build configured from the k3s template (a stand-in base, as k3s would render it).
    pub fn configured_like_k3s(mut self) -> Containerd {
        assert_eq!(
            self.config_version, 3,
            "k3s's template is for containerd 2.x"
        );
        self.k3s = true;
        self
    }

    /// This build with its CRI plugin on, `snapshotter = "clip"`.
    pub fn with_cri(mut self, cri: CriSettings) -> Containerd {
        self.cri = Some(cri);
        self
    }

    /// This build with runc 1.3 (Debian's development suite, run on trixie's glibc by
    /// scripts/debian-runc.sh): user-namespaced pods need runc >= 1.2.
    pub fn with_runc_1_3(mut self) -> Containerd {
        let o = Command::new("bash")
            .arg(workspace().join("scripts/debian-runc.sh"))
            .output()
            .expect("run scripts/debian-runc.sh");
        assert!(
            o.status.success(),
            "fetching runc 1.3 from Debian's archive failed: {}",
            stderr(&o)
        );
        self.runc = Some(PathBuf::from(stdout(&o).trim()));
        self
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        match &self.bin {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        }
    }

    /// PATH with this build's shim first (containerd starts `containerd-shim-runc-v2` from
    /// PATH; the shim must match the daemon).
    fn path(&self) -> std::ffi::OsString {
        let mut p = std::ffi::OsString::new();
        if let Some(w) = std::env::var_os("CLIP_SHIM_WRAP") {
            p.push(w);
            p.push(":");
        }
        for d in self.runc.iter().chain(self.bin.iter()) {
            p.push(d);
            p.push(":");
        }
        p.push(std::env::var_os("PATH").unwrap_or_default());
        p
    }

    /// The node's configuration: its own root, state and socket, the CRI off, clip as a
    /// proxy snapshotter (config v3 for 2.x: the transfer service unpacks into clip and
    /// overlayfs).
    /// The node's configuration: its own root, state and sockets, then the documented snippet
    /// for this version (docs/containerd/, the proxy plugin's address pointed at this node's
    /// snapshotter), then the CRI's node settings (pause image, registry hosts, CNI).
    fn config(&self, d: &Path) -> String {
        let v3 = self.config_version == 3;
        let disabled = match (&self.cri, v3) {
            (Some(_), _) => "",
            (None, false) => "\"io.containerd.grpc.v1.cri\"",
            (None, true) => "\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \"io.containerd.cri.v1.runtime\"",
        };
        let docs = workspace().join("docs/containerd");
        let read = |name: &str| std::fs::read_to_string(docs.join(name)).unwrap();
        let mut snippet = match (v3, self.k3s) {
            (false, _) => read("config-v2.toml"),
            (true, false) => read("config-v3.toml"),
            // What k3s renders with --snapshotter=clip: its base (a stand-in here: version 3,
            // the CRI on clip, overlayfs in the transfer service) and then the template.
            (true, true) => read("k3s-config-v3.toml.tmpl").replace(
                "{{ template \"base\" . }}",
                "version = 3\n\
                 [plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"clip\"\n\
                 [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"overlayfs\"\n",
            ),
        };
        snippet = snippet.replace(
            "/run/clip/snapshotter.sock",
            &d.join("clip.sock").display().to_string(),
        );
        if let Some(cri) = &self.cri {
            snippet = snippet.replace(
                "disable_snapshot_annotations = true",
                &format!(
                    "disable_snapshot_annotations = {}",
                    cri.disable_snapshot_annotations
                ),
            );
        }
        let d = d.display();
        let mut c = format!(
            "root = \"{d}/containerd/root\"\nstate = \"{d}/containerd/state\"\n\
             disabled_plugins = [{disabled}]\n{snippet}\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n"
        );
        if let Some(cri) = &self.cri {
            let (pause, hosts) = (&cri.pause, cri.hosts_dir.display());
            // The CRI gives pods and containers a negative oom_score_adj (the pause container
            // -998), which needs CAP_SYS_RESOURCE. Without it (this machine class runs as a
            // root lacking that capability) runc's nsexec fails writing oom_score_adj and runc
            // reports only "can't get final child's PID from pipe: EOF". containerd's fix for
            // such hosts: cap every score at its own.
            let restrict_oom = !has_capability(24);
            if !v3 {
                c.push_str(&format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{pause}\"\n  stream_server_port = \"0\"\n  restrict_oom_score_adj = {restrict_oom}\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{d}/cni\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{hosts}\"\n"
                ));
            } else {
                c.push_str(&format!(
                    "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"{pause}\"\n\
                     [plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"{hosts}\"\n\
                     [plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = {restrict_oom}\n\
                     [plugins.\"io.containerd.cri.v1.runtime\".cni]\n  bin_dirs = [\"/usr/lib/cni\"]\n  conf_dir = \"{d}/cni\"\n\
                     [plugins.\"io.containerd.grpc.v1.cri\"]\n  stream_server_port = \"0\"\n"
                ));
            }
        }
        c
    }
}

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << cap) != 0)
}

/// One node: its own containerd (own root, state and socket) and its own clip snapshotter.
pub struct Node {
    pub dir: PathBuf,
    pub containerd_build: Containerd,
    containerd: Option<Child>,
    snapshotter: Option<Child>,
    pub metrics_port: u16,
    extra_args: Vec<String>,
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ok() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

impl Node {
    pub fn start(dir: &Path) -> Node {
        Self::start_with(dir, &[])
    }

    /// `extra_args` go to `clip snapshotter` (e.g. --index-on-demand).
    pub fn start_with(dir: &Path, extra_args: &[&str]) -> Node {
        Self::start_on(dir, Containerd::system(), extra_args)
    }

    /// A node on containerd `build`.
    pub fn start_on(dir: &Path, build: Containerd, extra_args: &[&str]) -> Node {
        need("runc");
        std::fs::create_dir_all(dir).unwrap();
        let mut n = Node {
            dir: dir.to_path_buf(),
            containerd_build: build,
            containerd: None,
            snapshotter: None,
            metrics_port: free_port(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        };
        n.start_snapshotter();
        std::fs::write(dir.join("containerd.toml"), n.containerd_build.config(dir)).unwrap();
        if n.containerd_build.cri.is_some() {
            n.write_cni_config();
        }
        let log = dir.join("containerd.log");
        let mut child = Command::new(n.containerd_build.tool("containerd"))
            .arg("--config")
            .arg(dir.join("containerd.toml"))
            .env("PATH", n.containerd_build.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start containerd");
        let sock = dir.join("containerd.sock");
        wait_for(
            "containerd",
            || {
                sock.exists()
                    && Command::new(n.containerd_build.tool("ctr"))
                        .arg("-a")
                        .arg(&sock)
                        .arg("version")
                        .output()
                        .is_ok_and(|o| o.status.success())
            },
            &mut child,
            &log,
        );
        n.containerd = Some(child);
        n
    }

    /// A pod network of Debian's CNI plugins (containernetworking-plugins): a bridge and a
    /// /24 of this node's own (named after its metrics port, unique among running tests), no
    /// masquerading (pods reach only the node).
    fn write_cni_config(&self) {
        need("/usr/lib/cni/bridge");
        let p = self.metrics_port;
        let conf = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": format!("clip-{p}"),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": format!("clipbr{p}"),
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "subnet": format!("10.{}.{}.0/24", 100 + (p >> 8) % 100, p & 0xff),
                        "dataDir": self.dir.join("cni-ipam"),
                        "routes": [{ "dst": "0.0.0.0/0" }],
                    }
                },
                { "type": "loopback" }
            ]
        });
        let dir = self.dir.join("cni");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("10-clip.conflist"), conf.to_string()).unwrap();
    }

    /// The running snapshotter's process id.
    pub fn snapshotter_pid(&self) -> u32 {
        self.snapshotter.as_ref().expect("snapshotter running").id()
    }

    pub fn clip_root(&self) -> PathBuf {
        self.dir.join("clip")
    }

    pub fn start_snapshotter(&mut self) {
        let sock = self.dir.join("clip.sock");
        let _ = std::fs::remove_file(&sock);
        let log = self.dir.join("snapshotter.log");
        let mut child = Command::new(clip_bin())
            .arg("--root")
            .arg(self.clip_root())
            .arg("--metrics-address")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .arg("snapshotter")
            .arg("--address")
            .arg(&sock)
            .arg("--containerd-address")
            .arg(self.dir.join("containerd.sock"))
            .args(&self.extra_args)
            .env("CLIP_LOG", "info,fuser=error")
            .env("HOME", &self.dir)
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("start clip snapshotter");
        wait_for(
            "clip snapshotter",
            || std::os::unix::net::UnixStream::connect(&sock).is_ok(),
            &mut child,
            &log,
        );
        self.snapshotter = Some(child);
        // After a restart containerd redials the socket with a backoff of a few seconds.
        if self.containerd.is_some() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self
                .ctr(&["snapshots", "--snapshotter", "clip", "ls"])
                .status
                .success()
            {
                assert!(Instant::now() < deadline, "containerd did not reconnect");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Stops the snapshotter with `sig` (SIGTERM: clean; SIGKILL: a crash).
    pub fn stop_snapshotter(&mut self, sig: i32) {
        if let Some(mut c) = self.snapshotter.take() {
            signal(&c, sig);
            let _ = c.wait();
        }
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(self.containerd_build.tool("ctr"))
            .arg("-a")
            .arg(self.dir.join("containerd.sock"))
            .args(args)
            .output()
            .expect("run ctr")
    }

    /// `ctr images pull --plain-http --snapshotter clip IMAGE`.
    pub fn ctr_pull(&self, image: &str) -> String {
        self.ctr_pull_in("default", image)
    }

    /// `ctr images pull` on the clip snapshotter in containerd namespace `ns`.
    pub fn ctr_pull_in(&self, ns: &str, image: &str) -> String {
        self.ctr_ok(&[
            "-n",
            ns,
            "images",
            "pull",
            "--plain-http",
            "--snapshotter",
            "clip",
            image,
        ])
    }

    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let o = self.ctr(args);
        assert!(
            o.status.success(),
            "ctr {args:?}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        stdout(&o)
    }

    /// `clip pull` into this node's containerd.
    pub fn pull(&self, image: &str) -> Output {
        Command::new(clip_bin())
            .arg("--root")
            .arg(self.clip_root()) // the daemon's own root: a pull does not open its database
            .args(["pull", image, "--address"])
            .arg(self.dir.join("containerd.sock"))
            .env("CLIP_LOG", "warn")
            .env("HOME", &self.dir)
            .output()
            .expect("run clip pull")
    }

    pub fn pull_ok(&self, image: &str) -> String {
        let o = self.pull(image);
        assert!(
            o.status.success(),
            "clip pull {image}: {}{}",
            stdout(&o),
            stderr(&o)
        );
        stderr(&o)
    }

    /// `ctr run --rm` on `snapshotter` (no-new-privileges off, so file capabilities apply as
    /// they do under Docker's defaults).
    pub fn run(&self, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) -> Output {
        self.run_in("default", snapshotter, image, id, cmd)
    }

    /// [`Self::run`] in containerd namespace `ns` (the CRI's is k8s.io).
    pub fn run_in(
        &self,
        ns: &str,
        snapshotter: &str,
        image: &str,
        id: &str,
        cmd: &[&str],
    ) -> Output {
        let runc = self.dir.join("runc");
        let fifo = self.dir.join("fifo");
        let mut args = vec![
            "-n".to_string(),
            ns.into(),
            "run".to_string(),
            "--rm".into(),
            "--snapshotter".into(),
            snapshotter.into(),
            "--runc-root".into(),
            runc.display().to_string(),
            "--fifo-dir".into(),
            fifo.display().to_string(),
            "--allow-new-privs".into(),
        ];
        args.push(image.into());
        args.push(id.into());
        args.extend(cmd.iter().map(|s| s.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr(&a)
    }

    /// `ctr run -d` on the clip snapshotter: a container left running.
    pub fn run_detached(&self, image: &str, id: &str, cmd: &[&str]) {
        let (runc, fifo) = (self.dir.join("runc"), self.dir.join("fifo"));
        let mut args = vec![
            "run",
            "-d",
            "--snapshotter",
            "clip",
            "--runc-root",
            runc.to_str().unwrap(),
            "--fifo-dir",
            fifo.to_str().unwrap(),
            image,
            id,
        ];
        args.extend_from_slice(cmd);
        self.ctr_ok(&args);
    }

    /// The snapshotter's log so far (for failure messages).
    pub fn snapshotter_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("snapshotter.log")).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        scrape(self.metrics_port)
    }

    /// FUSE mounts of this node's snapshotter.
    pub fn fuse_mounts(&self) -> Vec<String> {
        let root = self.clip_root().display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&root))
            .collect()
    }

    /// The clip snapshots containerd lists.
    pub fn snapshots(&self) -> Vec<String> {
        self.snapshots_in("default")
    }

    /// The clip snapshots containerd lists in namespace `ns`.
    pub fn snapshots_in(&self, ns: &str) -> Vec<String> {
        self.ctr_ok(&["-n", ns, "snapshots", "--snapshotter", "clip", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Pods first (a failed test leaves them running: their network namespaces and shims
        // outlive containerd), then running tasks in every namespace.
        if self.containerd.is_some() {
            if self.containerd_build.cri.is_some() {
                crate::cri::Cri::connect(&self.dir.join("containerd.sock")).remove_all_pods();
            }
            let namespaces = self.ctr(&["namespaces", "ls", "-q"]);
            for ns in stdout(&namespaces).lines() {
                let tasks = self.ctr(&["-n", ns, "tasks", "ls", "-q"]);
                for id in stdout(&tasks).lines() {
                    let _ = self.ctr(&["-n", ns, "tasks", "kill", "-s", "SIGKILL", id]);
                    std::thread::sleep(Duration::from_millis(200));
                    let _ = self.ctr(&["-n", ns, "tasks", "delete", "-f", id]);
                    let _ = self.ctr(&["-n", ns, "containers", "delete", id]);
                }
            }
        }
        self.stop_snapshotter(libc::SIGTERM);
        if let Some(mut c) = self.containerd.take() {
            signal(&c, libc::SIGTERM);
            let _ = c.wait();
        }
        if self.containerd_build.cri.is_some() {
            let _ = Command::new("ip")
                .args(["link", "del", &format!("clipbr{}", self.metrics_port)])
                .stderr(Stdio::null())
                .status();
        }
        let dir = self.dir.display().to_string();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
            .filter(|p| p.starts_with(&dir))
            .collect();
        for m in mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Indexes `image` on a separate publisher root and pushes the index artifact.
pub fn publish_index(tmp: &Path, image: &str) {
    let o = clip(&tmp.join("publisher"), &["index", "--push", image], &[]);
    assert!(o.status.success(), "clip index --push: {}", stderr(&o));
}

/// A registry holding a busybox + users image as `REPO:v1`, its index published.
pub fn indexed_busybox_users(tmp: &Path, repo: &str) -> (Registry, String) {
    let reg = Registry::start(Auth::None);
    let l = layout(tmp, "v1", &["gen:busybox", "gen:users"]);
    reg.push_layout(&l, "v1", repo);
    let image = format!("{}:v1", reg.image(repo));
    publish_index(tmp, &image);
    (reg, image)
}

pub fn out(o: &Output) -> String {
    assert!(
        o.status.success(),
        "command failed ({}): {}{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

#[test]
fn lazy_pull_runs_python_from_the_large_image_reading_a_fraction_of_it() {
    let tmp = tempfile::tempdir().unwrap();
    let large = crate::large_image::served(tmp.path());
    let (proxy, image) = (&large.proxy, large.image.clone());
    let node = Node::start(&tmp.path().join("node"));
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("4 lazy layer(s), 0 unpacked"), "{pulled}");
    let o = node.run("clip", &image, "py1", &["python3", "-c", "print(1)"]);
    assert_eq!(out(&o).trim(), "1");
    let image_bytes = large.bytes;
    let sent = proxy.sent();
    eprintln!(
        "large image: registry sent {sent} bytes for pull + python3 -c 'print(1)' ({:.2} % of {image_bytes})",
        sent as f64 * 100.0 / image_bytes as f64
    );
    assert!(sent * 10 < image_bytes, "{sent} of {image_bytes} bytes");
    let m = node.metrics();
    eprintln!(
        "snapshotter: {} registry bytes, {} bytes inflated, {} bytes served over FUSE",
        metric(&m, "clip_registry_bytes_total"),
        metric(&m, "clip_inflate_bytes_total"),
        metric(&m, "clip_fuse_read_bytes_total")
    );
    assert!(metric(&m, "clip_fuse_read_bytes_total") > 0.0, "{m}");
    // A second container on the same node: every span is cached, nothing more is fetched.
    let before = proxy.sent();
    let o = node.run("clip", &image, "py2", &["python3", "-c", "print(2)"]);
    assert_eq!(out(&o).trim(), "2");
    assert_eq!(proxy.sent(), before, "warm start fetched from the registry");
}

#[test]
fn images_without_an_index_work_like_overlayfs() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "v1", &["gen:busybox", "gen:users"]);
    reg.push_layout(&l, "v1", "noindex");
    let image = format!("{}:v1", reg.image("noindex"));
    let node = Node::start(&tmp.path().join("node"));
    // Plain `ctr pull` (no labels at all): containerd unpacks into clip's snapshots.
    node.ctr_pull(&image);
    let o = node.run("clip", &image, "plain", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
    assert!(
        node.fuse_mounts().is_empty(),
        "no lazy mount without an index"
    );
    node.ctr_ok(&["images", "rm", "--sync", &image]);
    // `clip pull` of an image without an index: every layer downloaded and unpacked.
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("0 lazy layer(s), 2 unpacked"), "{pulled}");
    // Every layer containerd unpacked for lack of an index was a warning naming the image and
    // the reason (the plain pull's base layer: no index; its top layer: an unpacked parent),
    // and is counted.
    let log = node.snapshotter_log();
    let warned = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("unpacking normally"))
        .filter(|l| l.contains("/noindex:v1@sha256:") && l.contains("no published index"))
        .count();
    assert!(warned >= 1, "{warned} warnings: {log}");
    assert!(
        log.contains("a lazy layer stacks only on lazy layers"),
        "{log}"
    );
    let m = node.metrics();
    assert!(
        metric(&m, "clip_snapshotter_full_unpacks_total") >= 2.0,
        "{m}"
    );
    let o = node.run(
        "clip",
        &image,
        "pulled",
        &["sha256sum", "/home/user/big.bin"],
    );
    let expected = {
        let o = Command::new("python3")
            .arg(workspace().join("scripts/mkimage.py"))
            .args(["gen", "users"])
            .arg(tmp.path().join("users.tar"))
            .output()
            .unwrap();
        assert!(o.status.success());
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "tar -xOf {} home/user/big.bin | sha256sum",
                tmp.path().join("users.tar").display()
            ))
            .output()
            .unwrap();
        stdout(&o).split_whitespace().next().unwrap().to_string()
    };
    assert!(out(&o).starts_with(&expected), "{}", stdout(&o));
}

/// Content containerd is being sent by another writer under the ref `clip pull` would use for
/// it (`ctr content ingest` holding it open, half written): what a second pull of the same
/// image at the same moment meets. Returns the ingest, still writing.
fn hold_content_ref(node: &Node, digest: &str, data: &[u8]) -> Child {
    let reference = format!("clip-pull-{digest}");
    let mut ingest = Command::new("ctr")
        .arg("-a")
        .arg(node.dir.join("containerd.sock"))
        .args(["content", "ingest", "--expected-digest", digest])
        .arg(format!("--expected-size={}", data.len()))
        .arg(&reference)
        .stdin(Stdio::piped())
        .spawn()
        .expect("ctr content ingest");
    use std::io::Write;
    let stdin = ingest.stdin.as_mut().unwrap();
    stdin.write_all(&data[..data.len() / 2]).unwrap();
    stdin.flush().unwrap();
    wait_for(
        "the ingest to hold its ref",
        || stdout(&node.ctr(&["content", "active"])).contains(&reference),
        &mut ingest,
        &node.dir.join("containerd.log"),
    );
    ingest
}

/// Finishes [`hold_content_ref`]'s write.
fn release_content_ref(mut ingest: Child, data: &[u8]) {
    use std::io::Write;
    let mut stdin = ingest.stdin.take().unwrap();
    stdin.write_all(&data[data.len() / 2..]).unwrap();
    drop(stdin);
    let status = ingest.wait().unwrap();
    assert!(status.success(), "ctr content ingest: {status}");
}

/// `clip pull` waits while another writer holds the ref of content it must write (two pulls of
/// one image at once: containerd answers the second "ref ... locked"), then finds the content
/// written and goes on; for the image's config (lazy layers) and for a layer it unpacks.
#[test]
fn a_pull_waits_for_another_writer_of_the_same_content() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, image) = indexed_busybox_users(tmp.path(), "locked");
    let l = tmp.path().join("layout-v1");
    let (manifest, _) = layout_manifest_config(&l);
    let pull = |node: &Node, image: &str, digest: &str, expect: &str| {
        let data = layout_blob(&l, digest);
        let held = hold_content_ref(node, digest, &data);
        let mut child = Command::new(clip_bin())
            .arg("--root")
            .arg(node.clip_root())
            .args(["pull", image, "--address"])
            .arg(node.dir.join("containerd.sock"))
            .env("CLIP_LOG", "warn")
            .env("HOME", &node.dir)
            .stderr(Stdio::piped())
            .spawn()
            .expect("clip pull");
        // The pull says it waits; until then the other writer keeps its ref.
        let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut said = String::new();
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut err, &mut line).unwrap();
            said.push_str(&line);
            if n == 0 || line.contains("is being written by another pull") {
                break;
            }
        }
        assert!(
            said.contains(&format!(
                "content {digest} is being written by another pull"
            )),
            "clip pull did not wait for the other writer: {said}"
        );
        release_content_ref(held, &data);
        std::io::Read::read_to_string(&mut err, &mut said).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "clip pull {image}: {said}");
        assert!(said.contains(expect), "{said}");
        let o = node.run("clip", image, "c", &["cat", "/etc/public"]);
        assert_eq!(out(&o), "anyone\n");
    };
    let node = Node::start(&tmp.path().join("node"));
    let config = manifest["config"]["digest"].as_str().unwrap();
    pull(&node, &image, config, "2 lazy layer(s), 0 unpacked");
    // The same layers in a repository without an index, on a node of its own: downloaded and
    // unpacked.
    reg.push_layout(&l, "v1", "locked-plain");
    let plain = format!("{}:v1", reg.image("locked-plain"));
    let node = Node::start(&tmp.path().join("node2"));
    let top = manifest["layers"][1]["digest"].as_str().unwrap();
    pull(&node, &plain, top, "0 lazy layer(s), 2 unpacked");
}

/// The decoded-index memory budget: with `--index-memory` too small for an image's index, the
/// image is unpacked normally (a warning names the budget), its container runs, and the daemon
/// goes on serving; nothing of the budget stays charged by the refused index.
#[test]
fn an_index_over_the_memory_budget_fails_that_image_not_the_daemon() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "users");
    let node = Node::start_with(&tmp.path().join("node"), &["--index-memory", "1KiB"]);
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("0 lazy layer(s), 2 unpacked"), "{pulled}");
    let log = node.snapshotter_log();
    assert!(
        log.contains("unpacking normally") && log.contains("index_memory"),
        "{log}"
    );
    let o = node.run("clip", &image, "u", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
    assert!(node.fuse_mounts().is_empty());
    // The control: the same image under the default budget is lazy.
    let node = Node::start(&tmp.path().join("control"));
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("2 lazy layer(s)"), "{pulled}");
}

#[test]
fn non_root_users_and_file_capabilities_behave_as_under_overlayfs() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "users");
    let node = Node::start(&tmp.path().join("node"));
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("2 lazy layer(s)"), "{pulled}");
    node.ctr_ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "overlayfs",
        &image,
    ]);
    let script = "id; cat /etc/public; cat /etc/secret 2>&1; cat /home/user/notes 2>&1; \
                  ls -ln /home/user | grep -v ^total; sha256sum /home/user/big.bin; \
                  /opt/cap/busybox grep -E '^Cap(Prm|Eff)' /proc/self/status; \
                  grep -E '^Cap(Prm|Eff)' /proc/self/status; echo END";
    // `ctr run` can lose the tail of a short-lived container's output when the machine is
    // busy (its stdout is copied from a FIFO after the task exits): a run whose output lacks
    // the final END line is run again. The content is compared in full either way.
    let run = |snapshotter: &str, id: &str, cmd: &[&str]| {
        for attempt in 0..3 {
            let o = node.run(snapshotter, &image, &format!("{id}-{attempt}"), cmd);
            if !o.status.success() || stdout(&o).ends_with("END\n") {
                return o;
            }
            eprintln!("{id}: ctr lost the end of the output, running it again");
        }
        panic!("{id}: the output never arrived whole");
    };
    // ctr has no --user: root drops to the image's user 1000 with busybox su.
    for user in ["root", "user"] {
        let cmd = ["busybox", "su", "-s", "/bin/sh", user, "-c", script];
        let lazy = run("clip", &format!("clip-{user}"), &cmd);
        let overlay = run("overlayfs", &format!("ovl-{user}"), &cmd);
        assert_eq!(out(&lazy), out(&overlay), "user {user}: clip vs overlayfs");
        if user == "user" {
            let s = stdout(&lazy);
            assert!(s.contains("user's notes"), "{s}");
            assert!(s.contains("Permission denied"), "{s}");
            // The file capability took effect for the non-root user (cap_net_raw = bit 13).
            assert!(s.contains("CapPrm:\t0000000000002000"), "{s}");
        }
    }
}

#[test]
fn restarts_keep_snapshots_cache_and_new_containers_working() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, _upstream) = indexed_busybox_users(tmp.path(), "restart");
    let proxy = CountingProxy::start(&reg.host);
    let image = format!("{}/restart:v1", proxy.host);
    let mut node = Node::start(&tmp.path().join("node"));

    // Killed in the middle of a pull: the pull fails cleanly; after a restart it succeeds.
    let mut pull = Command::new(clip_bin())
        .arg("--root")
        .arg(node.clip_root())
        .args(["pull", &image, "--address"])
        .arg(node.dir.join("containerd.sock"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(30));
    node.stop_snapshotter(libc::SIGKILL);
    node.start_snapshotter();
    // The interrupted pull waits for the snapshotter to come back and finishes (or fails
    // cleanly); pulling again afterwards completes whatever is missing.
    let _ = pull.wait();
    node.pull_ok(&image);
    let sum = |node: &Node, id: &str| {
        out(&node.run("clip", &image, id, &["sha256sum", "/home/user/big.bin"]))
    };
    let first = sum(&node, "r1");

    // A long-running container, then SIGTERM and restart: new containers start and read right,
    // and spans cached before the restart are not fetched again.
    node.run_detached(&image, "sleeper", &["sleep", "600"]);
    let fetched = proxy.sent();
    node.stop_snapshotter(libc::SIGTERM);
    node.start_snapshotter();
    assert_eq!(sum(&node, "r2"), first);
    // kill -9, restart: the same.
    node.stop_snapshotter(libc::SIGKILL);
    node.start_snapshotter();
    assert_eq!(sum(&node, "r3"), first);
    // The image's two layers and the sleeper's active snapshot survived both restarts.
    assert!(node.snapshots().len() >= 3, "{:?}", node.snapshots());
    // Only manifest lookups went to the registry after the first read (no span refetched).
    let after = proxy.sent() - fetched;
    assert!(
        after < 64 << 10,
        "{after} bytes from the registry after restarts"
    );
    // The sleeper's lazy mount was handed over, not torn down and remounted.
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("resumed a lazy mount"), "{log}");
    assert!(
        !log.contains("detaching a mount left by a previous run"),
        "{log}"
    );
}

/// `ctr tasks exec` of `cmd` in the running container `task`.
pub fn exec(node: &Node, task: &str, id: &str, cmd: &[&str]) -> Command {
    let mut c = Command::new(node.containerd_build.tool("ctr"));
    c.arg("-a")
        .arg(node.dir.join("containerd.sock"))
        .args(["tasks", "exec", "--exec-id", id, task])
        .args(cmd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn drop_page_cache() {
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches (root)");
}

#[test]
fn running_containers_keep_reading_across_daemon_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "live");
    let mut node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    let sum = &["sha256sum", "/home/user/big.bin", "/etc/public"];
    let want = out(&node.run("clip", &image, "ref", sum));
    node.run_detached(&image, "live", &["sleep", "600"]);
    let run_exec = |node: &Node, id: &str| {
        let o = exec(node, "live", id, sum).output().unwrap();
        out(&o)
    };
    assert_eq!(run_exec(&node, "e0"), want);

    // SIGTERM and restart: the running container's lazy root keeps working (not ENOTCONN),
    // read from scratch (kernel caches dropped) through the new daemon.
    node.stop_snapshotter(libc::SIGTERM);
    node.start_snapshotter();
    drop_page_cache();
    assert_eq!(run_exec(&node, "e1"), want);

    // kill -9; a reader that starts while no daemon runs waits (it neither fails nor gets
    // wrong bytes) and finishes once the next daemon serves the mount again.
    node.stop_snapshotter(libc::SIGKILL);
    drop_page_cache();
    let waiting = exec(&node, "live", "e2", sum).spawn().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let mut waiting = waiting;
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the reader did not wait for the daemon: {:?}",
        waiting.wait_with_output().map(|o| (stdout(&o), stderr(&o)))
    );
    node.start_snapshotter();
    let o = waiting.wait_with_output().unwrap();
    assert_eq!(out(&o), want);
    // And again after the second restart, with new containers too.
    drop_page_cache();
    assert_eq!(run_exec(&node, "e3"), want);
    assert_eq!(out(&node.run("clip", &image, "new", sum)), want);
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert_eq!(log.matches("resumed a lazy mount").count(), 2, "{log}");
}

/// With handover off (`--no-handover`) a restart tears the lazy mounts down, as before; a
/// daemon started that way also has an earlier run's keeper let go of its connections, so
/// readers of the old mounts fail promptly instead of waiting for a server that will not come.
#[test]
fn without_handover_a_restart_remounts_for_new_containers() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "nohand");
    let mut node = Node::start_with(&tmp.path().join("node"), &["--no-handover"]);
    node.pull_ok(&image);
    let sum = &["sha256sum", "/home/user/big.bin"];
    let want = out(&node.run("clip", &image, "a", sum));
    node.run_detached(&image, "sleeper", &["sleep", "600"]);
    node.stop_snapshotter(libc::SIGKILL);
    node.start_snapshotter();
    assert_eq!(out(&node.run("clip", &image, "b", sum)), want);
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(
        log.contains("detaching a mount left by a previous run"),
        "{log}"
    );
    assert!(!log.contains("FUSE keeper"), "{log}");

    // Switching handover off while a keeper holds a running container's mount.
    node.extra_args.clear();
    node.stop_snapshotter(libc::SIGTERM);
    node.start_snapshotter();
    node.run_detached(&image, "kept", &["sleep", "600"]);
    assert_eq!(out(&exec(&node, "kept", "e0", sum).output().unwrap()), want);
    node.stop_snapshotter(libc::SIGKILL);
    node.extra_args = vec!["--no-handover".into()];
    node.start_snapshotter();
    drop_page_cache();
    let mut reader = exec(&node, "kept", "e1", sum).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while reader.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = reader.kill();
            panic!("a reader of the released mount hangs");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!reader.wait_with_output().unwrap().status.success());
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("releasing a kept FUSE connection"), "{log}");
    assert_eq!(out(&node.run("clip", &image, "c", sum)), want);
}

#[test]
fn removing_the_image_leaves_no_snapshots_mounts_or_pinned_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "gone");
    let node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    let o = node.run("clip", &image, "once", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
    assert!(!node.fuse_mounts().is_empty());
    assert_eq!(node.snapshots().len(), 2);
    node.ctr_ok(&["images", "rm", "--sync", &image]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(node.snapshots().is_empty() && node.fuse_mounts().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "left behind: snapshots {:?}, mounts {:?}",
            node.snapshots(),
            node.fuse_mounts()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let dirs: Vec<_> = std::fs::read_dir(node.clip_root().join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(dirs.is_empty(), "snapshot directories left: {dirs:?}");
}

#[test]
fn mixed_chains_stack_unpacked_layers_on_lazy_ones() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    // The base image is indexed; the derived image (same base layer + one more) is not.
    let base = layout(tmp.path(), "base", &["gen:busybox"]);
    reg.push_layout(&base, "base", "base");
    let derived = layout(tmp.path(), "derived", &["gen:busybox", "gen:users"]);
    reg.push_layout(&derived, "derived", "derived");
    publish_index(tmp.path(), &format!("{}:base", reg.image("base")));
    let node = Node::start(&tmp.path().join("node"));
    let pulled = node.pull_ok(&format!("{}:base", reg.image("base")));
    assert!(pulled.contains("1 lazy layer(s), 0 unpacked"), "{pulled}");
    let image = format!("{}:derived", reg.image("derived"));
    let pulled = node.pull_ok(&image);
    assert!(
        pulled.contains("already present") && pulled.contains("0 lazy layer(s), 1 unpacked"),
        "{pulled}"
    );
    // The container's rootfs: the unpacked top layer over the lazy base.
    let o = node.run(
        "clip",
        &image,
        "mixed",
        &["sh", "-c", "cat /etc/hello.txt /etc/public; ls /opt/cap"],
    );
    assert_eq!(out(&o), "hello from clip\nanyone\nbusybox\n");
    assert_eq!(node.fuse_mounts().len(), 1, "{:?}", node.fuse_mounts());
}

#[test]
fn index_on_demand_makes_unindexed_images_lazy() {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "v1", &["gen:busybox", "gen:users"]);
    reg.push_layout(&l, "v1", "ondemand");
    let image = format!("{}:v1", reg.image("ondemand"));
    let node = Node::start_with(&tmp.path().join("node"), &["--index-on-demand"]);
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("2 lazy layer(s), 0 unpacked"), "{pulled}");
    let o = node.run(
        "clip",
        &image,
        "od",
        &["sh", "-c", "cat /etc/public; sha256sum /home/user/big.bin"],
    );
    assert!(out(&o).starts_with("anyone\n"), "{}", stdout(&o));
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("indexing on demand"), "{log}");
    // The indexing pass filled the disk cache: the container's reads fetched no span.
    let m = node.metrics();
    assert_eq!(metric(&m, "clip_cache_misses_total"), 0.0, "{m}");
    assert!(metric(&m, "clip_cache_hits_total") > 0.0, "{m}");
}

/// A read the daemon is in the middle of serving (its range request stalled at the registry)
/// when it is killed: the kernel resends it to the next daemon (`FUSE_NOTIFY_RESEND`), which
/// answers it with the right bytes. Without the resend the reader would wait forever.
#[test]
fn a_read_in_flight_when_the_daemon_dies_is_answered_by_the_next_one() {
    use crate::faults::{Fault, FaultProxy};
    use sha2::Digest as _;
    let tmp = tempfile::tempdir().unwrap();
    let (reg, upstream) = indexed_busybox_users(tmp.path(), "inflight");
    // The reference, read on another root straight from the registry.
    let o = clip(
        &tmp.path().join("reference"),
        &["cat", &upstream, "/home/user/big.bin"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(o.stdout.len(), 4 << 20);
    let want = format!(
        "{}  /home/user/big.bin\n",
        hex::encode(sha2::Sha256::digest(&o.stdout))
    );
    let proxy = FaultProxy::start(&reg.host);
    let image = format!("{}/inflight:v1", proxy.host);
    let mut node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    node.run_detached(&image, "live", &["sleep", "600"]);
    // The next blob request stalls: the daemon will be inside a FUSE read when it dies.
    let seen_before = proxy.seen.lock().unwrap().len();
    proxy.inject("/blobs/", Fault::Stall(60));
    let mut reader = exec(&node, "live", "e1", &["sha256sum", "/home/user/big.bin"])
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !proxy.seen.lock().unwrap()[seen_before..]
        .iter()
        .any(|l| l.contains("/blobs/"))
    {
        assert!(
            Instant::now() < deadline,
            "the read never reached the registry"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    node.stop_snapshotter(libc::SIGKILL);
    assert!(reader.try_wait().unwrap().is_none(), "the reader failed");
    node.start_snapshotter();
    let deadline = Instant::now() + Duration::from_secs(60);
    while reader.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = reader.kill();
            panic!(
                "the read the dead daemon held was never answered: {}",
                std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = reader.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{}: {}{}{}",
        o.status,
        stdout(&o),
        stderr(&o),
        std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap_or_default()
    );
    assert_eq!(out(&o), want);
}

/// A file a running container holds open by FUSE passthrough across a `kill -9` of the daemon:
/// the next daemon continues that open (same registered backing file), so new opens of the
/// file work. The kernel refuses (EIO) a second backing file, or a page-cached open, for an inode
/// that is open by passthrough.
#[test]
fn files_open_by_passthrough_stay_usable_across_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "ptlive");
    let mut node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    let sum = &["sha256sum", "/home/user/big.bin"];
    // Read whole through the daemon; closing it makes the verified local copy.
    let want = out(&node.run("clip", &image, "first", sum));
    let files = node.clip_root().join("cache/files");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_dir(&files).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with("new."))
    }) {
        assert!(Instant::now() < deadline, "no passthrough copy");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A container that keeps the file open (by passthrough now).
    node.run_detached(
        &image,
        "holder",
        &[
            "sh",
            "-c",
            "exec 3</home/user/big.bin; echo yes > /opened; sleep 600",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exec(&node, "holder", "probe", &["cat", "/opened"])
        .status()
        .unwrap()
        .success()
    {
        assert!(
            Instant::now() < deadline,
            "the holder did not open the file"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let m = node.metrics();
    assert!(
        metric(&m, "clip_fuse_opens_total{mode=\"passthrough\"}") >= 1.0,
        "{m}"
    );
    node.stop_snapshotter(libc::SIGKILL);
    node.start_snapshotter();
    drop_page_cache();
    let o = exec(&node, "holder", "again", sum).output().unwrap();
    assert_eq!(out(&o), want);
    assert_eq!(out(&node.run("clip", &image, "second", sum)), want);
    let m = node.metrics();
    assert!(
        metric(&m, "clip_fuse_opens_total{mode=\"passthrough\"}") >= 2.0,
        "{m}"
    );
}

/// Startup profiles end to end: `clip profile` records what a command reads and publishes it
/// next to the index; a fresh node finds it at mount time and prefetches those ranges (counted
/// by `clip_prefetch_spans_total`) before the program asks, in no more data requests than a
/// node without it; a changed image (another manifest) does not use the old image's profile.
/// Before the runtime starts a container on a lazy mount no startup profile covers, the mount
/// starts fetching the files nearly every start reads (the user databases, the dynamic loader,
/// the C library): after a first container whose program (static busybox) never read them, a
/// second one reads the C library without asking the registry for anything; a file of the
/// same layer nothing fetched does cost requests.
#[test]
fn a_pull_fetches_the_loader_and_c_library_before_any_program_asks() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let src = tmp.path().join("startup");
    let libdir = src.join("lib/x86_64-linux-gnu");
    std::fs::create_dir_all(&libdir).unwrap();
    std::fs::create_dir_all(src.join("lib64")).unwrap();
    // Noise between them, so each file sits in spans of its own.
    let (loader, libc, other) = (noise(1, 200 << 10), noise(2, 1 << 20), noise(3, 1 << 20));
    std::fs::write(src.join("lib64/ld-linux-x86-64.so.2"), &loader).unwrap();
    std::fs::write(src.join("lib/noise"), noise(4, 1 << 20)).unwrap();
    std::fs::write(libdir.join("libc.so.6"), &libc).unwrap();
    std::fs::write(src.join("other"), &other).unwrap();
    let l = layout(
        tmp.path(),
        "v1",
        &[
            "gen:busybox",
            "gen:users",
            &format!("dir:{}", src.display()),
        ],
    );
    let (image, layer) = published_with_last_layer(tmp.path(), &reg, &l, "startup");
    let requests = || layer_requests(&reg, &layer);

    // The publisher downloaded the layer to index it.
    let published = requests();
    let node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    // The pull alone has the top layer's filesystem built and these files requested: no
    // container needs to be prepared first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while requests() == published {
        assert!(
            Instant::now() < deadline,
            "the pull fetched nothing ahead of a container"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    out(&node.run("clip", &image, "a", &["echo"]));
    // The fetches started at mount have ended (the gauge counts runs in flight).
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&node.metrics(), "clip_fetch_runs") != 0.0 {
        assert!(
            Instant::now() < deadline,
            "fetches still in flight: {}",
            node.metrics()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = requests();
    assert!(before > published, "the mount fetched nothing of the layer");
    let size = |path: &str| out(&node.run("clip", &image, "b", &["wc", "-c", path]));
    let lib = size("/lib/x86_64-linux-gnu/libc.so.6");
    assert!(lib.starts_with(&libc.len().to_string()), "{lib}");
    let ld = size("/lib64/ld-linux-x86-64.so.2");
    assert!(ld.starts_with(&loader.len().to_string()), "{ld}");
    assert_eq!(
        requests(),
        before,
        "the loader and the C library came from the cache"
    );
    let o = size("/other");
    assert!(o.starts_with(&other.len().to_string()), "{o}");
    assert!(
        requests() > before,
        "a file nothing fetched cost no request"
    );
}

/// Layout `l` pushed as `REPO:v1`, its index published: the image and its last layer's digest.
fn published_with_last_layer(tmp: &Path, reg: &Registry, l: &Path, repo: &str) -> (String, String) {
    reg.push_layout(l, "v1", repo);
    let image = format!("{}:v1", reg.image(repo));
    publish_index(tmp, &image);
    let manifest = layout_manifest_config(l).0;
    let layers = manifest["layers"].as_array().unwrap();
    let layer = layers.last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    (image, layer)
}

/// The requests clip made for blob `layer`.
fn layer_requests(reg: &Registry, layer: &str) -> usize {
    reg.requests_from("clip/")
        .iter()
        .filter(|l| l.contains(&format!("/blobs/{layer}")))
        .count()
}

/// A container's program is fetched as soon as containerd records the container, before any
/// task runs: found on the container's `PATH`, and, being a script, its interpreter too.
#[test]
fn a_containers_program_and_its_interpreter_are_fetched_before_it_starts() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let src = tmp.path().join("app");
    std::fs::create_dir_all(src.join("app/bin")).unwrap();
    let (tool, other) = (noise(5, 1 << 20), noise(6, 1 << 20));
    let exe = |p: &Path, data: &[u8]| {
        std::fs::write(p, data).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    exe(&src.join("app/bin/tool"), &tool);
    std::fs::write(src.join("app/noise"), noise(7, 1 << 20)).unwrap();
    exe(&src.join("app/start"), b"#!/app/bin/tool\n");
    std::fs::write(src.join("app/other"), &other).unwrap();
    let l = layout(
        tmp.path(),
        "v1",
        &["gen:busybox", &format!("dir:{}", src.display())],
    );
    let (image, layer) = published_with_last_layer(tmp.path(), &reg, &l, "program");
    let requests = || layer_requests(&reg, &layer);
    let node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    // A container recorded, never started: `start` is found on its PATH, then `#!` names
    // the interpreter.
    node.ctr_ok(&[
        "containers",
        "create",
        "--snapshotter",
        "clip",
        "--env",
        "PATH=/nowhere:/app:/bin",
        &image,
        "recorded",
        "start",
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = node.metrics();
        if metric(&m, "clip_fuse_programs_prefetched_total") >= 2.0
            && metric(&m, "clip_fetch_runs") == 0.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the program and its interpreter were not fetched: {m}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = requests();
    assert!(before > 0, "nothing of the program's layer was fetched");
    let size = |path: &str| out(&node.run("clip", &image, "b", &["wc", "-c", path]));
    let t = size("/app/bin/tool");
    assert!(t.starts_with(&tool.len().to_string()), "{t}");
    assert_eq!(requests(), before, "the interpreter came from the cache");
    let o = size("/app/other");
    assert!(o.starts_with(&other.len().to_string()), "{o}");
    assert!(
        requests() > before,
        "a file nothing fetched cost no request"
    );
}

#[test]
fn startup_profile_is_recorded_published_found_and_used() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, image) = indexed_busybox_users(tmp.path(), "prof");
    let sum = &["sha256sum", "/home/user/big.bin"];

    // A node before any profile exists: no prefetch; it records one locally.
    let a = Node::start(&tmp.path().join("a"));
    a.pull_ok(&image);
    let want = out(&a.run("clip", &image, "c", sum));
    let ma = a.metrics();
    assert_eq!(metric(&ma, "clip_prefetch_spans_total"), 0.0, "{ma}");
    let log = std::fs::read_to_string(a.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("recording a startup profile"), "{log}");

    // The publisher records and publishes one.
    let mut args = vec!["profile", image.as_str(), "--seconds", "30", "--"];
    args.extend(sum);
    let o = clip(&tmp.path().join("publisher"), &args, &[]);
    assert!(o.status.success(), "clip profile: {}", stderr(&o));
    let artifact = stdout(&o);
    assert!(artifact.trim().starts_with("sha256:"), "{artifact}");
    assert!(stderr(&o).contains("profile: "), "{}", stderr(&o));

    // A fresh node finds it and prefetches what the command reads.
    let b = Node::start(&tmp.path().join("b"));
    b.pull_ok(&image);
    assert_eq!(out(&b.run("clip", &image, "c", sum)), want);
    let mb = b.metrics();
    let log = std::fs::read_to_string(b.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("found a published startup profile"), "{log}");
    assert!(log.contains("prefetching a startup profile"), "{log}");
    // The 4 MiB file is 4+ spans: all of them come from the prefetch.
    assert!(metric(&mb, "clip_prefetch_spans_total") >= 4.0, "{mb}");
    // Data requests (one per run of spans; the profile's own manifest and blob are two
    // metadata requests more, and with windows cut from the span before, a node without a
    // profile no longer pays a window request per read).
    let runs = |m: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("clip_span_fetch_seconds_count"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (ra, rb) = (runs(&ma), runs(&mb));
    assert!(
        rb > 0.0 && rb <= ra,
        "with the profile {rb} range requests for data, without {ra}"
    );

    // Another image in the same repository (another manifest): the profile is not used.
    let l2 = layout(tmp.path(), "v2", &["gen:busybox", "gen:bigfile"]);
    reg.push_layout(&l2, "v2", "prof");
    let image2 = format!("{}:v2", reg.image("prof"));
    publish_index(tmp.path(), &image2);
    let c = Node::start(&tmp.path().join("c"));
    c.pull_ok(&image2);
    out(&c.run("clip", &image2, "c", &["ls", "/"]));
    let log = std::fs::read_to_string(c.dir.join("snapshotter.log")).unwrap();
    assert!(!log.contains("prefetching a startup profile"), "{log}");
    assert_eq!(metric(&c.metrics(), "clip_prefetch_spans_total"), 0.0);
}

/// A node sharing a Redis tier records a startup profile on its first start and shares it there;
/// a second node with the same Redis (and nothing published in the registry) finds it and
/// prefetches from it.
#[test]
fn startup_profiles_are_shared_through_the_redis_tier() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "profredis");
    let redis = RedisServer::start();
    let cfg = tmp.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cache]\nredis = \"{}\"\n[profiles]\nwindow_secs = 1\n",
            redis.url()
        ),
    )
    .unwrap();
    let cfg = cfg.display().to_string();
    let sum = &["sha256sum", "/home/user/big.bin"];
    let a = Node::start_with(&tmp.path().join("a"), &["--config", &cfg]);
    a.pull_ok(&image);
    let want = out(&a.run("clip", &image, "c", sum));
    // The profile is stored (locally and in Redis) once the window has closed.
    let log = a.dir.join("snapshotter.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("recorded a startup profile")
    {
        assert!(
            Instant::now() < deadline,
            "no profile recorded: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let b = Node::start_with(&tmp.path().join("b"), &["--config", &cfg]);
    b.pull_ok(&image);
    assert_eq!(out(&b.run("clip", &image, "c", sum)), want);
    let log = std::fs::read_to_string(b.dir.join("snapshotter.log")).unwrap();
    assert!(
        log.contains("found a startup profile in the shared tier"),
        "{log}"
    );
    assert!(log.contains("prefetching a startup profile"), "{log}");
    assert!(metric(&b.metrics(), "clip_prefetch_spans_total") >= 4.0);
}

/// An image whose top layer lists `tmp/kept` and then whites out the lower `tmp`: the merged
/// tree must keep `tmp` as a directory. Such a tree used to panic the daemon when mounted, and a
/// recorded snapshot on it then panicked every start.
#[test]
fn an_image_with_an_orphaned_entry_mounts_and_the_daemon_survives_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let l = layout(tmp.path(), "v1", &["gen:busybox", "gen:orphan-whiteout"]);
    reg.push_layout(&l, "v1", "orphan");
    let image = format!("{}:v1", reg.image("orphan"));
    publish_index(tmp.path(), &image);
    let mut node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    let cat = |node: &Node, id: &str| out(&node.run("clip", &image, id, &["cat", "/tmp/kept"]));
    assert_eq!(cat(&node, "o1"), "kept by its own layer\n");
    // An active snapshot on the chain stays recorded across restarts (remounted at start).
    node.ctr_ok(&[
        "containers",
        "create",
        "--snapshotter",
        "clip",
        &image,
        "held",
    ]);
    for sig in [libc::SIGKILL, libc::SIGTERM] {
        node.stop_snapshotter(sig);
        node.start_snapshotter();
        assert_eq!(cat(&node, "o2"), "kept by its own layer\n");
    }
}

/// Prepare, Commit and Remove are on disk when containerd hears they succeeded: a `kill -9`
/// right after (well inside sled's own flush interval) loses none of them.
#[test]
fn acknowledged_changes_survive_an_immediate_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::start(&tmp.path().join("node"));
    let snap = |node: &Node, args: &[&str]| {
        let mut a = vec!["snapshots", "--snapshotter", "clip"];
        a.extend_from_slice(args);
        node.ctr(&a)
    };
    for round in 0..3 {
        let (key, name) = (format!("active-{round}"), format!("committed-{round}"));
        assert!(snap(&node, &["prepare", &format!("{key}-gone"), ""])
            .status
            .success());
        assert!(snap(&node, &["prepare", &key, ""]).status.success());
        assert!(snap(&node, &["commit", &name, &key]).status.success());
        assert!(snap(&node, &["prepare", &format!("{key}-kept"), &name])
            .status
            .success());
        assert!(snap(&node, &["rm", &format!("{key}-gone")])
            .status
            .success());
        node.stop_snapshotter(libc::SIGKILL);
        node.start_snapshotter();
        let info = snap(&node, &["info", &name]);
        assert!(info.status.success(), "round {round}: {}", stderr(&info));
        assert!(stdout(&info).contains("Committed"), "{}", stdout(&info));
        assert!(snap(&node, &["info", &format!("{key}-kept")])
            .status
            .success());
        assert!(!snap(&node, &["info", &format!("{key}-gone")])
            .status
            .success());
    }
}

/// Nothing under the state root is open to host users: the root, snapshots, cache and
/// database are 0700/0600 from creation. Only each snapshot's `fs` is 0755 (it is a container's
/// root directory), and it sits under the private `snapshots/`. Containers' lazy mounts keep
/// setuid bits and device nodes, as under overlayfs.
#[test]
fn the_state_root_is_private_and_unprivileged_host_users_reach_nothing_under_it() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, image) = indexed_busybox_users(tmp.path(), "private");
    let node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&image);
    out(&node.run("clip", &image, "p1", &["cat", "/etc/secret"]));
    node.run_detached(&image, "held", &["sleep", "600"]);
    let root = node.clip_root();
    let mut seen = 0;
    let mut todo = vec![root.clone()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let mode = m.permissions().mode() & 0o7777;
        let is_fs = p.file_name().is_some_and(|n| n == "fs")
            && p.parent().and_then(|d| d.parent()) == Some(&root.join("snapshots"));
        seen += 1;
        if is_fs {
            assert_eq!(mode, 0o755, "{}", p.display());
            continue; // a container's root (or a lazy mount): the image's own modes inside
        }
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        if m.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(seen > 20, "only {seen} paths under the root");
    // As an unprivileged host user: nothing under the root can be listed, read or run.
    let mounts = node.fuse_mounts();
    let lazy = mounts
        .first()
        .expect("a lazy mount for the running container");
    for path in [
        root.display().to_string(),
        root.join("snapshots").display().to_string(),
        format!("{lazy}/etc/public"),
        format!("{lazy}/opt/cap/busybox"),
    ] {
        let o = as_nobody(&["cat", &path]);
        assert!(!o.status.success(), "nobody read {path}");
        assert!(
            stderr(&o).contains("Permission denied"),
            "{path}: {}",
            stderr(&o)
        );
    }
    let o = as_nobody(&[&format!("{lazy}/opt/cap/busybox"), "true"]);
    assert!(
        !o.status.success(),
        "nobody ran a binary from the lazy mount"
    );
    // The container's mount honours setuid bits and devices, as overlayfs does.
    let opts = mount_options(std::path::Path::new(lazy)).unwrap();
    assert!(
        !opts.contains("nosuid") && !opts.contains("nodev"),
        "{opts}"
    );
}

/// Connects to a unix socket (`kind`: "seqpacket" or "stream"), sends `hex`-encoded bytes and
/// prints what comes back as hex ("" when the server closed the connection at once).
const SOCKET_PROBE: &str = r#"
import socket, sys
kind = socket.SOCK_SEQPACKET if sys.argv[2] == "seqpacket" else socket.SOCK_STREAM
s = socket.socket(socket.AF_UNIX, kind)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(bytes.fromhex(sys.argv[3]))
    print(s.recv(4096).hex())
except (ConnectionResetError, BrokenPipeError):
    print("")
"#;

fn probe(nobody: bool, path: &Path, kind: &str, send: &[u8]) -> String {
    let hex: String = send.iter().map(|b| format!("{b:02x}")).collect();
    let p = path.to_str().unwrap();
    let cmd = ["python3", "-c", SOCKET_PROBE, p, kind, &hex];
    let o = if nobody {
        as_nobody(&cmd)
    } else {
        Command::new(cmd[0]).args(&cmd[1..]).output().unwrap()
    };
    assert!(o.status.success(), "probe: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// The keeper's and the daemon's sockets answer only root (and the daemon's own user): even
/// with the socket opened to everyone, another local user's connection is closed unanswered.
#[test]
fn sockets_refuse_other_local_users() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let open = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    open(tmp.path(), 0o755);
    // The keeper: created 0600 (no window with a wider mode), peers checked.
    let sock = tmp.path().join("keeper.sock");
    let mut keeper = Command::new(clip_bin())
        .args(["fuse-keeper", "--socket"])
        .arg(&sock)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "no keeper socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    open(&sock, 0o666);
    assert_eq!(
        probe(true, &sock, "seqpacket", b"L"),
        "",
        "nobody got an answer"
    );
    assert_eq!(
        probe(false, &sock, "seqpacket", b"L"),
        "45",
        "root gets the list's end"
    );
    // The root client was the keeper's first: with it gone and nothing held, the keeper exits.
    assert!(keeper.wait().unwrap().success());
    let mut err = String::new();
    std::io::Read::read_to_string(keeper.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("refused a client with uid 65534"), "{err}");

    // The daemon's gRPC socket: an HTTP/2 preface and an empty SETTINGS frame.
    let node = Node::start(&tmp.path().join("node"));
    open(&node.dir, 0o755);
    let sock = node.dir.join("clip.sock");
    open(&sock, 0o666);
    let preface = [
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0, 0, 0, 4, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert_eq!(
        probe(true, &sock, "stream", &preface),
        "",
        "nobody got an answer"
    );
    let answer = probe(false, &sock, "stream", &preface);
    assert!(
        answer.len() >= 18 && &answer[6..8] == "04",
        "no SETTINGS frame for root: {answer}"
    );
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(
        log.contains("refused a connection from another user"),
        "{log}"
    );
}

/// A blob of an OCI layout.
fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    std::fs::read(
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )
    .unwrap()
}

fn put_layout_blob(layout: &Path, data: &[u8]) -> (String, usize) {
    let d = clip_core::Digest::of(data);
    std::fs::write(layout.join("blobs/sha256").join(d.hex()), data).unwrap();
    (d.to_string(), data.len())
}

/// The layout's manifest (JSON) and config (JSON).
fn layout_manifest_config(layout: &Path) -> (serde_json::Value, serde_json::Value) {
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let m = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&layout_blob(layout, m)).unwrap();
    let c = manifest["config"]["digest"].as_str().unwrap();
    let config = serde_json::from_slice(&layout_blob(layout, c)).unwrap();
    (manifest, config)
}

/// An attacker's edit: the image config claims `diff_ids` for the layers it has.
fn lie_about_diff_ids(layout: &Path, diff_ids: &serde_json::Value) {
    let (mut manifest, mut config) = layout_manifest_config(layout);
    config["rootfs"]["diff_ids"] = diff_ids.clone();
    let (cd, cs) = put_layout_blob(layout, &serde_json::to_vec(&config).unwrap());
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = put_layout_blob(layout, &serde_json::to_vec(&manifest).unwrap());
    let path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    index["manifests"][0]["digest"] = md.into();
    index["manifests"][0]["size"] = ms.into();
    std::fs::write(&path, serde_json::to_vec(&index).unwrap()).unwrap();
}

/// The attacker publishes, for its own layer, an index claiming the DiffID the lying config
/// claims (the index format's checksum is no obstacle: anyone can encode one).
fn publish_forged_index(image: &str, layout: &Path, diff_id: &str) {
    let (manifest, _) = layout_manifest_config(layout);
    let mut built = build_index(layout, manifest["layers"][0]["digest"].as_str().unwrap());
    built.index.diff_id = diff_id.parse().unwrap();
    push_indexes(image, &[&built]);
}

/// The index of the layer `digest` of `layout`, built here.
fn build_index(layout: &Path, digest: &str) -> clip_core::index::BuiltLayer {
    let layer = layout_blob(layout, digest);
    clip_core::index::build_layer_index(
        &layer[..],
        &clip_core::index::BuildOptions::default(),
        |_| {},
    )
    .unwrap()
}

/// Publishes `layers` (one per layer of `image`, in order) as `image`'s index artifact.
fn push_indexes(image: &str, layers: &[&clip_core::index::BuiltLayer]) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = clip_core::registry::Client::new(Default::default());
        let resolved = client.resolve(&image.parse().unwrap()).await.unwrap();
        let published: Vec<_> = layers
            .iter()
            .map(|b| clip_core::artifact::PublishedLayer {
                index: &b.index,
                encoded: clip_core::index::format::encode(&b.index).into(),
                windows: b.windows.clone().into(),
            })
            .collect();
        clip_core::artifact::push(&client, &resolved, &published)
            .await
            .unwrap();
    });
}

/// Chain-ID poisoning: an attacker's image whose config claims the DiffID of a popular base
/// layer for its own layer, with an index that agrees, pulled on a node; and a victim image on
/// that base layer. Under the default (`owner`), whichever is pulled first, the victim's
/// containers read the victim's files: pulled first, the attacker's layer is committed under
/// the base layer's chain ID, and the victim's first container on that chain has the node check
/// it (it is not the layer the chain ID names) and give the chain the victim's layer, verified.
/// Under `trust = local` the attacker's pull is refused. Under `published` (the control) the
/// attack works, which is what that setting documents. And an index stored for the attacker's
/// layer from an honest image of it cannot be committed in the base layer's place (the chain
/// ID check).
#[test]
fn an_image_cannot_take_another_images_layer_under_the_multi_tenant_trust() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, victim_layout, victim) = indexed_victim(tmp.path());
    let (_, victim_config) = layout_manifest_config(&victim_layout);
    let base_diff = victim_config["rootfs"]["diff_ids"].clone();
    // The attacker's honest image and its lying twin (same layer blob).
    let honest_layout = layout(tmp.path(), "honest", &["gen:busybox-pwned"]);
    reg.push_layout(&honest_layout, "honest", "attacker");
    let honest = format!("{}:honest", reg.image("attacker"));
    publish_index(tmp.path(), &honest);
    let liar_layout = layout(tmp.path(), "liar", &["gen:busybox-pwned"]);
    lie_about_diff_ids(&liar_layout, &base_diff);
    reg.push_layout(&liar_layout, "liar", "attacker");
    let liar = format!("{}:liar", reg.image("attacker"));
    publish_forged_index(&liar, &liar_layout, base_diff[0].as_str().unwrap());

    let hello =
        |node: &Node, id: &str| stdout(&node.run("clip", &victim, id, &["cat", "/etc/hello.txt"]));
    // The attacker's pull is refused, then the victim's container reads its own file.
    let refused_then_victim_intact = |node: &Node, id: &str| {
        let o = node.pull(&liar);
        assert!(
            !o.status.success(),
            "the lying image was pulled: {}",
            stderr(&o)
        );
        node.pull_ok(&victim);
        assert_eq!(hello(node, id), "hello from clip\n");
    };
    // The default, the attacker first: its own containers read its own layer; the victim's
    // read the victim's.
    let node = Node::start(&tmp.path().join("owner"));
    node.pull_ok(&liar);
    let own = node.run("clip", &liar, "a0", &["cat", "/etc/hello.txt"]);
    assert_eq!(stdout(&own), "pwned\n");
    node.pull_ok(&victim);
    assert_eq!(hello(&node, "v-owner"), "hello from clip\n");
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(
        log.contains("is not the one its chain ID names")
            && log.contains("the snapshot now holds this image's layer"),
        "{log}"
    );
    // The victim's layer was read from its own bytes once; later containers need nothing.
    assert_eq!(hello(&node, "v-owner2"), "hello from clip\n");
    drop(node);
    // The default, the victim first: the attacker's image changes nothing for it.
    let node = Node::start(&tmp.path().join("owner-victim-first"));
    node.pull_ok(&victim);
    assert_eq!(hello(&node, "v-first"), "hello from clip\n");
    node.pull_ok(&liar);
    assert_eq!(hello(&node, "v-first2"), "hello from clip\n");
    drop(node);

    // Control: under `published`, the forged index takes the base layer's chain.
    let node = Node::start_with(&tmp.path().join("published"), &["--trust", "published"]);
    node.pull_ok(&liar);
    node.pull_ok(&victim);
    assert_eq!(
        hello(&node, "v0"),
        "pwned\n",
        "the attack did not work: no control"
    );
    drop(node);

    // `published`, but the index comes from the honest image of the attacker's layer: the
    // chain ID check refuses to commit it in the base layer's place.
    let node = Node::start(&tmp.path().join("chain"));
    node.pull_ok(&honest);
    refused_then_victim_intact(&node, "v1");
    drop(node);

    // The multi-tenant setting: the attacker's pull fails; the victim sees its own files.
    let node = Node::start_with(&tmp.path().join("local"), &["--trust", "local"]);
    refused_then_victim_intact(&node, "v2");
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("indexing on this node failed"), "{log}");
}

/// The same image (one manifest) pushed to a second repository whose owner publishes a forged
/// index for it: the file's entry points at another file's bytes of the same layer. Pulled
/// first, that index is the node's; the victim's pull of its own repository's copy then has
/// the node verify the layer before the victim's container reads it (the manifest's source
/// label names both repositories). Under `published` the victim reads the forged arrangement
/// (the control).
#[test]
fn a_forged_index_of_the_same_image_in_another_repository_is_verified_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, victim_layout, victim) = indexed_victim(tmp.path());
    reg.push_layout(&victim_layout, "victim", "attacker");
    let copy = format!("{}:victim", reg.image("attacker"));
    let (vm, _) = layout_manifest_config(&victim_layout);
    let mut forged = build_index(&victim_layout, vm["layers"][0]["digest"].as_str().unwrap());
    let file_at = |ix: &clip_core::index::LayerIndex, path: &[u8]| {
        ix.entries
            .iter()
            .position(|e| e.path == path)
            .unwrap_or_else(|| panic!("{} in the layer", String::from_utf8_lossy(path)))
    };
    let hello = file_at(&forged.index, b"etc/hello.txt");
    let other = forged
        .index
        .entries
        .iter()
        .find_map(|e| match e.kind {
            clip_core::index::EntryKind::File { offset, size } if size >= 64 => Some(offset),
            _ => None,
        })
        .expect("a file of 64 bytes or more");
    if let clip_core::index::EntryKind::File { offset, .. } = &mut forged.index.entries[hello].kind
    {
        *offset = other;
    }
    push_indexes(&copy, &[&forged]);
    let read =
        |node: &Node, id: &str| out(&node.run("clip", &victim, id, &["cat", "/etc/hello.txt"]));

    let node = Node::start(&tmp.path().join("owner"));
    node.pull_ok(&copy);
    // The attacker's container first: the node has seen the manifest as the attacker's only.
    let own = node.run("clip", &copy, "a", &["cat", "/etc/hello.txt"]);
    assert_ne!(out(&own), "hello from clip\n", "its own forged arrangement");
    node.pull_ok(&victim);
    let victims = read(&node, "v");
    let log = without_colours(&node.snapshotter_log());
    assert_eq!(victims, "hello from clip\n", "{log}");
    assert!(log.contains("layer verified"), "{log}");
    drop(node);

    let node = Node::start_with(&tmp.path().join("published"), &["--trust", "published"]);
    node.pull_ok(&copy);
    node.pull_ok(&victim);
    assert_ne!(
        read(&node, "v"),
        "hello from clip\n",
        "no control: the forgery did not take"
    );
}

/// A referrers listing is its writer's word (under the referrers tag schema, whoever can push a
/// tag): an artifact listed as a clip index whose own manifest says it is something else (here a
/// startup profile's type, with index blobs inside) is not used: the image is unpacked
/// normally. The control: the same blobs in a manifest that says it is an index are used.
#[test]
fn an_artifact_is_used_as_an_index_only_if_its_own_manifest_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, image) = indexed_busybox_users(tmp.path(), "typed");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = clip_core::registry::Client::new(Default::default());
        let r: clip_core::reference::Reference = image.parse().unwrap();
        let resolved = client.resolve(&r).await.unwrap();
        let tag = format!("sha256-{}", resolved.manifest_digest.hex());
        let (listing, _, _) = client.get_manifest(&r, &tag).await.unwrap();
        let mut listing: serde_json::Value = serde_json::from_slice(&listing).unwrap();
        let honest = listing["manifests"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string();
        let (body, media, _) = client.get_manifest(&r, &honest).await.unwrap();
        let mut m: serde_json::Value = serde_json::from_slice(&body).unwrap();
        m["artifactType"] = clip_core::artifact::PROFILE_ARTIFACT_TYPE.into();
        let body = bytes::Bytes::from(serde_json::to_vec(&m).unwrap());
        let relabelled = clip_core::Digest::of(&body);
        client
            .push_manifest(&r, &relabelled.to_string(), &media, body)
            .await
            .unwrap();
        // The listing still says "index", and names only the relabelled manifest.
        listing["manifests"][0]["digest"] = relabelled.to_string().into();
        listing["manifests"][0]["size"] = serde_json::to_vec(&m).unwrap().len().into();
        let b = bytes::Bytes::from(serde_json::to_vec(&listing).unwrap());
        client
            .push_manifest(&r, &tag, "application/vnd.oci.image.index.v1+json", b)
            .await
            .unwrap();
    });
    let node = Node::start(&tmp.path().join("node"));
    let pulled = node.pull_ok(&image);
    assert!(pulled.contains("0 lazy layer(s), 2 unpacked"), "{pulled}");
    let log = without_colours(&node.snapshotter_log());
    assert!(
        log.contains(&format!(
            "it is not a {} artifact",
            clip_core::artifact::ARTIFACT_TYPE
        )),
        "{log}"
    );
    assert_eq!(
        out(&node.run("clip", &image, "t", &["cat", "/etc/public"])),
        "anyone\n"
    );
    let _ = reg;
}

/// A startup profile is its publisher's word: one that names another image's layer (here the
/// victim's, already on the node) is not prefetched for, and the node says so.
#[test]
fn a_startup_profile_prefetches_only_layers_of_its_own_image() {
    let tmp = tempfile::tempdir().unwrap();
    // The victim's image is one busybox layer; the other image one layer of its own (users),
    // with a profile naming the victim's layer.
    let (reg, victim_layout, victim) = indexed_victim(tmp.path());
    let (vm, _) = layout_manifest_config(&victim_layout);
    let victim_layer: clip_core::Digest =
        vm["layers"][0]["digest"].as_str().unwrap().parse().unwrap();
    let other_layout = layout(tmp.path(), "other", &["gen:users"]);
    reg.push_layout(&other_layout, "other", "other");
    let other = format!("{}:other", reg.image("other"));
    publish_index(tmp.path(), &other);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = clip_core::registry::Client::new(Default::default());
        let resolved = client.resolve(&other.parse().unwrap()).await.unwrap();
        let own = resolved.layers[0].digest;
        let mut p = clip_core::profile::Profile::new(resolved.manifest_digest);
        for layer in [victim_layer, own] {
            p.layers.push(clip_core::profile::LayerProfile {
                layer,
                ranges: vec![(0, 4096)],
            });
        }
        clip_core::artifact::push_profile(&client, &resolved, &p)
            .await
            .unwrap();
    });
    let node = Node::start(&tmp.path().join("node"));
    node.pull_ok(&victim);
    node.pull_ok(&other);
    // The pull-time prefetch says when it has gone through the profile.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node
        .snapshotter_log()
        .contains("prefetching its startup profile at pull time")
    {
        assert!(Instant::now() < deadline, "{}", node.snapshotter_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = without_colours(&node.snapshotter_log());
    assert!(
        log.contains("its startup profile names a layer it does not have")
            && log.contains("layers=1"),
        "{log}"
    );
}

/// Publishes, as `image`'s index artifact, the honest index of its top layer and, for its base
/// layer, a forged one: the top layer's index relabelled as the base layer's (its layer digest,
/// DiffID and size), so every span of the base layer is named by a span digest of the top one.
fn publish_substituting_index(image: &str, layout: &Path) {
    let (manifest, config) = layout_manifest_config(layout);
    let layers = manifest["layers"].as_array().unwrap();
    let (base, top) = (&layers[0], &layers[1]);
    let honest = build_index(layout, top["digest"].as_str().unwrap());
    let mut forged = build_index(layout, top["digest"].as_str().unwrap());
    forged.index.layer = base["digest"].as_str().unwrap().parse().unwrap();
    forged.index.diff_id = config["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    forged.index.compressed_size = base["size"].as_u64().unwrap();
    push_indexes(image, &[&forged, &honest]);
}

/// A registry with the victim's image (one busybox layer holding /etc/hello.txt), its index
/// published: the registry, the image's layout and its reference.
fn indexed_victim(tmp: &Path) -> (Registry, PathBuf, String) {
    let reg = Registry::start(Auth::None);
    let victim_layout = layout(tmp, "victim", &["gen:busybox"]);
    reg.push_layout(&victim_layout, "victim", "victim");
    let victim = format!("{}:victim", reg.image("victim"));
    publish_index(tmp, &victim);
    (reg, victim_layout, victim)
}

/// The content-substitution attack through a shared base layer: the attacker's image shares
/// the victim's base layer and adds a layer of its own; its index artifact carries a forged
/// index for the base layer that names, for the base layer's spans, the digests of its own
/// layer's spans. Its container reads its own layer, which puts those spans in the node's
/// cache. The victim's container then reads the base layer: it must never get the attacker's
/// bytes, whichever image came first. Under the default (`owner`) it reads its own file either
/// way: the first container of another repository on the base layer has the node index that
/// layer from its bytes, and the forged index is gone. Under `published` the forged index
/// stays (a publisher who pulls first decides a shared layer's index there), and the read
/// fails verification rather than returning the attacker's bytes. `clip cat` on a root the
/// attacker's image used follows the default's rule.
#[test]
fn a_forged_index_for_a_shared_layer_never_serves_another_layers_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let (reg, victim_layout, victim) = indexed_victim(tmp.path());
    let attacker_layout = layout(
        tmp.path(),
        "attacker",
        &["gen:busybox", "gen:busybox-pwned"],
    );
    let (vm, _) = layout_manifest_config(&victim_layout);
    let (am, _) = layout_manifest_config(&attacker_layout);
    assert_eq!(
        vm["layers"][0]["digest"], am["layers"][0]["digest"],
        "one shared base layer"
    );
    reg.push_layout(&attacker_layout, "attacker", "attacker");
    let attacker = format!("{}:attacker", reg.image("attacker"));
    publish_substituting_index(&attacker, &attacker_layout);
    let hello = |node: &Node, image: &str, id: &str| {
        node.run("clip", image, id, &["cat", "/etc/hello.txt"])
    };

    // `clip cat` on a root where the attacker's image stored its forged index first.
    let root = tmp.path().join("cli-root");
    let cat = |image: &str| {
        Command::new(clip_bin())
            .arg("--root")
            .arg(&root)
            .args(["cat", image, "/etc/hello.txt"])
            .output()
            .unwrap()
    };
    assert_eq!(stdout(&cat(&attacker)), "pwned\n");
    let o = cat(&victim);
    assert_eq!(stdout(&o), "hello from clip\n", "{}", stderr(&o));

    // The default, the attacker first.
    let node = Node::start(&tmp.path().join("owner"));
    node.pull_ok(&attacker);
    assert_eq!(stdout(&hello(&node, &attacker, "a0")), "pwned\n");
    node.pull_ok(&victim);
    let o = hello(&node, &victim, "v0");
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert_eq!(stdout(&o), "hello from clip\n", "{}\n{log}", stderr(&o));
    assert!(log.contains("layer verified"), "{log}");
    drop(node);

    // `published`, the attacker first: its forged index is the node's only index of the base
    // layer.
    let node = Node::start_with(
        &tmp.path().join("attacker-first"),
        &["--trust", "published"],
    );
    node.pull_ok(&attacker);
    assert_eq!(stdout(&hello(&node, &attacker, "a1")), "pwned\n");
    node.pull_ok(&victim);
    let o = hello(&node, &victim, "v1");
    assert!(
        !stdout(&o).contains("pwned"),
        "the victim's container read the attacker's bytes"
    );
    assert!(
        !o.status.success(),
        "the forged index gave the victim a file: {}",
        stdout(&o)
    );
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("verification failure"), "{log}");
    drop(node);

    // The victim first: its index stays the node's, and the attacker's does not replace it
    // (a restart without handover mounts the base layer anew, from the stored index).
    let mut node = Node::start_with(&tmp.path().join("victim-first"), &["--no-handover"]);
    node.pull_ok(&victim);
    assert_eq!(stdout(&hello(&node, &victim, "v2")), "hello from clip\n");
    node.pull_ok(&attacker);
    assert_eq!(stdout(&hello(&node, &attacker, "a2")), "pwned\n");
    node.stop_snapshotter(libc::SIGTERM);
    node.start_snapshotter();
    assert_eq!(stdout(&hello(&node, &victim, "v3")), "hello from clip\n");
}

/// cosign 3.1.1 from Debian's development suite (fetched and unpacked, never installed).
fn cosign() -> PathBuf {
    let o = Command::new("bash")
        .arg(workspace().join("scripts/debian-tool.sh"))
        .args(["cosign", "3.1.1-2", "usr/bin/cosign"])
        .output()
        .unwrap();
    assert!(o.status.success(), "fetching cosign: {}", stderr(&o));
    PathBuf::from(stdout(&o).trim()).join("usr/bin/cosign")
}

/// `cosign generate-key-pair` in `dir`; returns the public key's path.
fn cosign_keys(cosign: &Path, dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let o = Command::new(cosign)
        .arg("generate-key-pair")
        .current_dir(dir)
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "cosign generate-key-pair: {}",
        stderr(&o)
    );
    dir.join("cosign.pub")
}

/// `cosign sign --key` on `target` (repo@digest), offline: no transparency log.
fn cosign_sign(cosign: &Path, keys: &Path, target: &str) {
    let o = Command::new(cosign)
        .args(["sign", "--key"])
        .arg(keys.join("cosign.key"))
        .args([
            "--use-signing-config=false",
            "--tlog-upload=false",
            "--allow-insecure-registry",
            "--yes",
            target,
        ])
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(o.status.success(), "cosign sign: {}", stderr(&o));
}

/// Under `trust = signed`, a published index is used only when its artifact carries a cosign
/// signature by a configured key: a signed image starts lazily; an unsigned one and one signed
/// by another key are unpacked normally (and still run).
#[test]
fn signed_trust_uses_only_indexes_signed_with_a_configured_key() {
    let cosign = cosign();
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let ours = cosign_keys(&cosign, &tmp.path().join("ours"));
    cosign_keys(&cosign, &tmp.path().join("theirs"));
    let mut images = Vec::new();
    for (name, signer) in [
        ("signed", Some("ours")),
        ("unsigned", None),
        ("other", Some("theirs")),
    ] {
        let note = format!("gen:note-{name}");
        let l = layout(tmp.path(), name, &["gen:busybox", &note]);
        reg.push_layout(&l, name, name);
        let image = format!("{}:{name}", reg.image(name));
        let j = clip_json(
            &tmp.path().join("publisher"),
            &["index", "--push", &image, "--json"],
            &[],
        );
        let artifact = j["artifact"].as_str().unwrap().to_string();
        if let Some(s) = signer {
            cosign_sign(
                &cosign,
                &tmp.path().join(s),
                &format!("{}@{artifact}", reg.image(name)),
            );
        }
        images.push(image);
    }
    let node = Node::start_with(
        &tmp.path().join("node"),
        &["--trust", "signed", "--trust-key", ours.to_str().unwrap()],
    );
    // The first image brings the shared busybox layer; each has a layer of its own on top.
    let expect = [
        "2 lazy layer(s), 0 unpacked",
        "0 lazy layer(s), 1 unpacked",
        "0 lazy layer(s), 1 unpacked",
    ];
    for (image, expect) in images.iter().zip(expect) {
        let said = node.pull_ok(image);
        assert!(said.contains(expect), "{image}: {said}");
        let id = image.rsplit(':').next().unwrap();
        assert_eq!(
            out(&node.run("clip", image, id, &["cat", "/etc/note"])),
            format!("{id}\n")
        );
    }
    let log = std::fs::read_to_string(node.dir.join("snapshotter.log")).unwrap();
    assert!(log.contains("not signed by a trusted key"), "{log}");
    // A node configured for signatures without a key refuses to start.
    let o = Command::new(clip_bin())
        .args(["--root"])
        .arg(tmp.path().join("keyless"))
        .args(["snapshotter", "--trust", "signed", "--address"])
        .arg(tmp.path().join("keyless.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("needs at least one public key"),
        "{}",
        stderr(&o)
    );
}
