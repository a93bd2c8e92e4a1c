//! Helpers: real registries, image layouts, running `clip`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The `clip` binary (built by `cargo build` before the tests; CLIP_BIN overrides).
pub fn clip_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CLIP_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("clip");
        if p.exists() {
            return p;
        }
    }
    panic!("the clip binary is not built: run `cargo build --workspace` before the integration tests (or set CLIP_BIN)");
}

pub fn need(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success());
    assert!(
        ok.unwrap_or(false),
        "{tool} is not installed: run scripts/install-deps.sh"
    );
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

pub fn wait_port(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status} before listening on port {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not listen on port {port} within 20 s");
}

/// A process killed (by pid) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub enum Auth {
    None,
    /// TLS with a self-signed certificate and htpasswd users.
    TlsHtpasswd,
    /// Token auth through the fixtures' token server; tokens live this many seconds.
    Token(u64),
}

pub const USER: &str = "clipuser";
pub const PASSWORD: &str = "s3cret-Pa55";

/// A real Debian `docker-registry` on loopback.
pub struct Registry {
    pub host: String,
    pub _dir: tempfile::TempDir,
    /// With TLS: the CA to trust.
    pub ca: Option<PathBuf>,
    pub token_port: Option<u16>,
    _procs: Vec<Proc>,
}

fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let key = dir.join(format!("{name}.key"));
    let cert = dir.join(format!("{name}.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        "openssl req",
    );
    (key, cert)
}

/// A CA and a server certificate for 127.0.0.1 signed by it: (server key, server cert, CA cert).
pub fn ca_and_server(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca) = self_signed(dir, "ca");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.pem");
    let ext = dir.join("server.ext");
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n").unwrap();
    run_ok(
        Command::new("openssl")
            .args([
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&csr),
        "openssl req (server)",
    );
    run_ok(
        Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
            .arg("-in")
            .arg(&csr)
            .arg("-CA")
            .arg(&ca)
            .arg("-CAkey")
            .arg(&ca_key)
            .arg("-extfile")
            .arg(&ext)
            .arg("-out")
            .arg(&cert),
        "openssl x509 (sign server)",
    );
    (key, cert, ca)
}

impl Registry {
    pub fn start(auth: Auth) -> Registry {
        need("docker-registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut procs = Vec::new();
        let mut ca = None;
        let mut token_port = None;
        let mut extra = String::new();
        match auth {
            Auth::None => {}
            Auth::TlsHtpasswd => {
                need("openssl");
                need("htpasswd");
                let (key, cert, ca_cert) = ca_and_server(dir.path());
                let out = run_ok(
                    Command::new("htpasswd").args(["-Bbn", USER, PASSWORD]),
                    "htpasswd",
                );
                std::fs::write(dir.path().join("htpasswd"), out.stdout).expect("write htpasswd");
                extra = format!(
                    "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: clip-test\n    path: {}\n",
                    cert.display(),
                    key.display(),
                    dir.path().join("htpasswd").display()
                );
                ca = Some(ca_cert);
            }
            Auth::Token(expiry) => {
                need("openssl");
                need("python3");
                let (key, cert) = self_signed(dir.path(), "token");
                let tport = free_port();
                let mut child = Command::new("python3")
                    .arg(workspace().join("integration/fixtures/token-server.py"))
                    .arg(tport.to_string())
                    .arg(&key)
                    .arg(&cert)
                    .args([USER, PASSWORD])
                    .arg(expiry.to_string())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start token server");
                wait_port(tport, "token server", &mut child);
                procs.push(Proc(child));
                extra = format!(
                    "auth:\n  token:\n    realm: http://127.0.0.1:{tport}/token\n    service: clip-test-registry\n    issuer: clip-test-issuer\n    rootcertbundle: {}\n",
                    cert.display()
                );
                token_port = Some(tport);
            }
        }
        let config = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {host}\n{extra}",
            dir.path().join("data").display()
        );
        std::fs::write(dir.path().join("config.yml"), config).expect("write config");
        // Its access log (stdout): one combined-format line per request.
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(std::fs::File::create(dir.path().join("access.log")).expect("access log"))
            .stderr(std::fs::File::create(dir.path().join("registry.log")).expect("log"))
            .spawn()
            .expect("start docker-registry");
        wait_port(port, "docker-registry", &mut child);
        procs.push(Proc(child));
        Registry {
            host,
            _dir: dir,
            ca,
            token_port,
            _procs: procs,
        }
    }

    pub fn image(&self, name: &str) -> String {
        format!("{}/{name}", self.host)
    }

    /// The access-log lines of requests whose User-Agent starts with `agent`.
    pub fn requests_from(&self, agent: &str) -> Vec<String> {
        std::fs::read_to_string(self._dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.ends_with('"') && l.rsplit('"').nth(1).is_some_and(|ua| ua.starts_with(agent))
            })
            .map(str::to_string)
            .collect()
    }

    /// Pushes an OCI layout with skopeo (an independent tool), as `name:tag`.
    pub fn push_layout(&self, layout: &Path, tag: &str, name: &str) {
        need("skopeo");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--all", "--quiet", "--dest-tls-verify=false"]);
        if self.ca.is_some() || self.token_port.is_some() {
            cmd.arg(format!("--dest-creds={USER}:{PASSWORD}"));
        }
        cmd.arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}:{tag}", self.image(name)));
        run_ok(&mut cmd, &format!("skopeo push of {name}"));
    }
}

/// Builds an OCI layout with scripts/mkimage.py.
pub fn layout(dir: &Path, tag: &str, layers: &[&str]) -> PathBuf {
    layout_with_cmd(dir, tag, layers, &["/bin/sh"])
}

/// [`layout`] with `cmd` as the image config's Cmd.
pub fn layout_with_cmd(dir: &Path, tag: &str, layers: &[&str], cmd: &[&str]) -> PathBuf {
    need("python3");
    let out = dir.join(format!("layout-{tag}"));
    run_ok(
        Command::new("python3")
            .arg(workspace().join("scripts/mkimage.py"))
            .arg("layout")
            .arg(&out)
            .arg(tag)
            .args(layers)
            .env("MKIMAGE_CMD", serde_json::to_string(cmd).unwrap()),
        "mkimage.py",
    );
    out
}

/// Runs `clip GLOBAL... cat IMAGE PATH --stats EXTRA...` with `env`; returns (file bytes, stats).
pub fn cat_with(
    root: &Path,
    global: &[&str],
    image: &str,
    path: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Vec<u8>, serde_json::Value) {
    let mut args = global.to_vec();
    args.extend_from_slice(&["cat", image, path, "--stats"]);
    args.extend_from_slice(extra);
    let o = clip(root, &args, env);
    assert!(o.status.success(), "clip cat {path}: {}", stderr(&o));
    let line = stderr(&o)
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no stats: {}", stderr(&o)))
        .to_string();
    (o.stdout, serde_json::from_str(&line).unwrap())
}

/// Runs clip with its own root under `root`.
pub fn clip(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(clip_bin());
    cmd.arg("--root")
        .arg(root)
        .args(args)
        .env_remove("DOCKER_CONFIG")
        .env("HOME", root)
        .env("CLIP_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run clip")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs clip and expects success; returns stdout parsed as JSON.
pub fn clip_json(root: &Path, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let o = clip(root, args, env);
    assert!(
        o.status.success(),
        "clip {args:?} failed:\n{}\n{}",
        stdout(&o),
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("clip {args:?}: bad JSON ({e}): {}", stdout(&o)))
}

/// The every-entry-type test image (two layers), pushed as `everytype:v1`: (layout, reference).
pub fn everytype(reg: &Registry, dir: &Path) -> (PathBuf, String) {
    let l = layout(dir, "v1", &["gen:everytype-base", "gen:everytype-top"]);
    reg.push_layout(&l, "v1", "everytype");
    (l, format!("{}:v1", reg.image("everytype")))
}

/// The Prometheus text served by a clip process started with `--metrics-address 127.0.0.1:PORT`.
pub fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// The sum of a metric's samples (every label set) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A TCP proxy that counts the bytes the upstream sends (what a registry really served,
/// headers included).
pub struct CountingProxy {
    pub host: String,
    pub bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// The request lines clients sent (`GET /v2/... HTTP/1.1`), in order.
    pub requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl CountingProxy {
    pub fn start(upstream: &str) -> CountingProxy {
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (b, up, log) = (bytes.clone(), upstream.to_string(), requests.clone());
        rt.spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (b, up, log) = (b.clone(), up.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&up).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up_task = tokio::spawn(async move {
                        // Registry clients send headers only (no bodies through here): every
                        // line that starts with a method is a request line.
                        let (mut buf, mut line) = (vec![0u8; 16 << 10], Vec::new());
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            for &c in &buf[..n] {
                                if c != b'\n' {
                                    line.push(c);
                                    continue;
                                }
                                let l = String::from_utf8_lossy(&line).trim_end().to_string();
                                if l.starts_with("GET ") || l.starts_with("HEAD ") {
                                    log.lock().unwrap().push(l);
                                }
                                line.clear();
                            }
                        }
                        let _ = sw.shutdown().await;
                    });
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                b.fetch_add(n as u64, Relaxed);
                                if cw.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = cw.shutdown().await;
                    up_task.abort();
                });
            }
        });
        CountingProxy {
            host,
            bytes,
            requests,
            _rt: rt,
        }
    }

    /// Requests whose line contains `what`.
    pub fn requests_for(&self, what: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }

    pub fn sent(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A single-node redis-server on a free loopback port, stopped when dropped.
pub struct RedisServer {
    pub port: u16,
    /// With TLS: the CA that signed the server's certificate.
    pub ca: Option<PathBuf>,
    _proc: Proc,
    _dir: tempfile::TempDir,
}

/// The ACL user and password of [`RedisServer::start_tls`] (the default user is disabled, and
/// this one may touch only clip's keys).
pub const REDIS_USER: &str = "clip";
pub const REDIS_PASSWORD: &str = "redis-s3cret";

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(false)
    }

    /// TLS only (no plain port), an ACL user limited to `clip:*` keys, the default user off.
    pub fn start_tls() -> RedisServer {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> RedisServer {
        need("redis-server");
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path());
        let mut ca = None;
        if tls {
            need("openssl");
            let (key, cert, c) = ca_and_server(dir.path());
            cmd.args(["--port", "0", "--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .arg("--tls-ca-cert-file")
                .arg(&c)
                .args(["--tls-auth-clients", "no"])
                .args(["--user", "default", "off"])
                .args(["--user", REDIS_USER, "on"])
                .arg(format!(">{REDIS_PASSWORD}"))
                .args(["~clip:*", "+@all"]);
            ca = Some(c);
        } else {
            cmd.args(["--port", &port.to_string()]);
        }
        let mut child = cmd
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server");
        wait_port(port, "redis-server", &mut child);
        RedisServer {
            port,
            ca,
            _proc: Proc(child),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        match self.ca {
            None => format!("redis://127.0.0.1:{}/", self.port),
            Some(_) => format!(
                "rediss://{REDIS_USER}:{REDIS_PASSWORD}@127.0.0.1:{}/",
                self.port
            ),
        }
    }
}

/// The per-mount options (`ro,nosuid,...`) of the mount at `path`, from /proc/self/mountinfo.
pub fn mount_options(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(4) == Some(&path.as_str())).then(|| f.get(5).map(|s| s.to_string()))?
        })
        .next_back()
}

/// Runs `cmd` as the unprivileged host user `nobody` (no supplementary groups).
pub fn as_nobody(cmd: &[&str]) -> Output {
    need("setpriv");
    Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        // Through a shell: setpriv's own execve still has root's path access (seen: it ran a
        // binary under a 0700 directory); the shell's does not.
        .args(["sh", "-c", "\"$@\"", "sh"])
        .args(cmd)
        .output()
        .expect("run setpriv")
}

/// A docker config directory (for DOCKER_CONFIG) with `user`:`password` for `host`.
pub fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> String {
    use base64::Engine;
    let d = dir.join("docker");
    std::fs::create_dir_all(&d).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        d.join("config.json"),
        format!(r#"{{"auths":{{"{host}":{{"auth":"{auth}"}}}}}}"#),
    )
    .unwrap();
    d.display().to_string()
}

/// `n` bytes that do not compress (a linear congruential sequence from `seed`).
pub fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// `log` without terminal colour codes (the daemons' logs are coloured).
pub fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut it = log.chars();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            it.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}
