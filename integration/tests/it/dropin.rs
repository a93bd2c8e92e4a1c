//! clip as a drop-in snapshotter: containers start lazily whoever pulls (the CRI with either
//! annotation setting, containerd 2.x's transfer service, `clip pull`), on containerd 1.6
//! (Debian 12), 1.7 (Debian trixie) and 2.1 (Debian's development suite), the latter two
//! fetched at test time and never installed. Each node is configured with the snippets in
//! docs/containerd/.

use crate::common::*;
use crate::snapshotter::{
    indexed_busybox_users, out, publish_index, Containerd, CriSettings, Node,
};
use std::path::{Path, PathBuf};

const CONTAINERD_1_7: &str = "1.7.24~ds1-6+deb13u1";
pub(crate) const CONTAINERD_2_1: &str = "2.1.9+ds1-5";

/// A containerd-style hosts directory naming `authority` (a registry on a port of its own:
/// containerd records where an image came from without the port): plain HTTP, or TLS trusting
/// `ca`.
pub(crate) fn hosts_dir(tmp: &Path, authority: &str, ca: Option<&Path>) -> PathBuf {
    let dir = tmp.join("certs.d");
    std::fs::create_dir_all(dir.join(authority)).unwrap();
    let (scheme, ca) = match ca {
        Some(ca) => ("https", format!("  ca = \"{}\"\n", ca.display())),
        None => ("http", String::new()),
    };
    let server = format!("{scheme}://{authority}");
    std::fs::write(
        dir.join(authority).join("hosts.toml"),
        format!(
            "server = \"{server}\"\n{top_ca}[host.\"{server}\"]\n  capabilities = [\"pull\", \"resolve\"]\n{ca}",
            top_ca = ca.trim_start()
        ),
    )
    .unwrap();
    dir
}

fn remote_snapshots(node: &Node) -> usize {
    remote_snapshots_in(node, "default")
}

/// The lazy snapshots containerd lists in namespace `ns`.
pub(crate) fn remote_snapshots_in(node: &Node, ns: &str) -> usize {
    node.snapshots_in(ns)
        .iter()
        .filter(|s| {
            node.ctr_ok(&["-n", ns, "snapshots", "--snapshotter", "clip", "info", s])
                .contains("containerd.io/snapshot/clip.remote")
        })
        .count()
}

/// Plain `ctr images pull --snapshotter clip` of the large image through containerd 2.x's
/// transfer service (configured as docs/containerd/config-v3.toml says) and `ctr run`: python's output, with the registry sending a small
/// fraction of the image; then the same across a snapshotter restart, and `clip pull` of
/// another image on the same node.
fn plain_pull_is_lazy_on(build: Containerd) {
    let tmp = tempfile::tempdir().unwrap();
    let large = crate::large_image::served(tmp.path());
    let (proxy, image) = (&large.proxy, large.image.clone());
    let hosts = hosts_dir(tmp.path(), &proxy.host, None);
    let mut node = Node::start_on(
        &tmp.path().join("node"),
        build,
        &["--hosts-dir", hosts.to_str().unwrap()],
    );
    node.ctr_pull(&image);
    assert_eq!(
        remote_snapshots(&node),
        4,
        "every layer is a lazy snapshot: {}",
        node.snapshotter_log()
    );
    let o = node.run("clip", &image, "py", &["python3", "-c", "print(1)"]);
    assert_eq!(out(&o).trim(), "1");
    let (sent, image_bytes) = (proxy.sent(), large.bytes);
    eprintln!(
        "plain ctr pull + run: registry sent {sent} bytes ({:.2} % of {image_bytes})",
        sent as f64 * 100.0 / image_bytes as f64
    );
    assert!(sent * 10 < image_bytes, "{sent} of {image_bytes} bytes");

    node.stop_snapshotter(libc::SIGTERM);
    node.start_snapshotter();
    let o = node.run("clip", &image, "py2", &["python3", "-c", "print(2)"]);
    assert_eq!(out(&o).trim(), "2");

    let (_reg2, other) = indexed_busybox_users(tmp.path(), "users");
    node.pull_ok(&other);
    let o = node.run("clip", &other, "users", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
    assert_eq!(remote_snapshots(&node), 6);
}

#[test]
fn transfer_service_pull_is_lazy_on_containerd_2_1() {
    plain_pull_is_lazy_on(Containerd::debian(CONTAINERD_2_1));
}

/// containerd 1.7: `clip pull` is lazy; a running container keeps reading across a snapshotter
/// kill and restart, and new containers start; plain `ctr images pull` (which downloads every
/// layer before any snapshotter is asked, on containerd 1.x) still works, unpacked.
#[test]
fn clip_pull_restarts_and_plain_pulls_on_containerd_1_7() {
    let tmp = tempfile::tempdir().unwrap();
    let large = crate::large_image::served(tmp.path());
    let (reg, proxy, image) = (&large.reg, &large.proxy, large.image.clone());
    let mut node = Node::start_on(
        &tmp.path().join("node"),
        Containerd::debian(CONTAINERD_1_7),
        &[],
    );
    node.pull_ok(&image);
    node.run_detached(&image, "sleeper", &["sleep", "600"]);
    let o = node.run("clip", &image, "py", &["python3", "-c", "print(1)"]);
    assert_eq!(out(&o).trim(), "1");
    let image_bytes = large.bytes;
    assert!(
        proxy.sent() * 10 < image_bytes,
        "{} of {image_bytes}",
        proxy.sent()
    );

    node.stop_snapshotter(libc::SIGKILL);
    node.start_snapshotter();
    let o = crate::snapshotter::exec(&node, "sleeper", "e1", &["python3", "-c", "print(3)"])
        .output()
        .unwrap();
    assert_eq!(
        out(&o).trim(),
        "3",
        "the running container reads after a restart"
    );
    let o = node.run("clip", &image, "py2", &["python3", "-c", "print(2)"]);
    assert_eq!(out(&o).trim(), "2");

    let l = layout(tmp.path(), "v1", &["gen:busybox", "gen:users"]);
    reg.push_layout(&l, "v1", "plain");
    let plain = format!("{}:v1", reg.image("plain"));
    node.ctr_pull(&plain);
    let o = node.run("clip", &plain, "plain", &["cat", "/etc/public"]);
    assert_eq!(out(&o), "anyone\n");
}

/// With 100 images in containerd's store, a Prepare without labels reads each manifest once:
/// a later pull reads only its own manifest, and concurrent pulls are both lazy.
#[test]
fn label_less_lookups_read_each_manifest_once_with_100_images_and_concurrent_pulls() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start(Auth::None);
    let images: Vec<String> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|w| {
                let (reg, tmp) = (&reg, tmp.path());
                s.spawn(move || {
                    (w..100)
                        .step_by(4)
                        .map(|i| {
                            let l = layout(
                                &tmp.join(format!("l{i}")),
                                "v1",
                                &[&format!("gen:note-{i}")],
                            );
                            reg.push_layout(&l, "v1", &format!("filler{i}"));
                            format!("{}:v1", reg.image(&format!("filler{i}")))
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    let (base_reg, base) = indexed_busybox_users(tmp.path(), "base");
    let tops: Vec<String> = ["b", "c"]
        .iter()
        .map(|n| {
            let l = layout(
                &tmp.path().join(format!("top-{n}")),
                "v1",
                &["gen:busybox", "gen:users", &format!("gen:note-{n}")],
            );
            reg.push_layout(&l, "v1", &format!("top-{n}"));
            let image = format!("{}:v1", reg.image(&format!("top-{n}")));
            publish_index(tmp.path(), &image);
            image
        })
        .collect();
    // Two registries on 127.0.0.1: containerd's source labels cannot tell them apart (it
    // drops the port); the one that serves each manifest is found.
    let hosts = hosts_dir(tmp.path(), &reg.host, None);
    hosts_dir(tmp.path(), &base_reg.host, None);
    // The CRI without snapshot annotations (its default): Prepare carries no pull labels.
    let build = Containerd::system().with_cri(CriSettings {
        pause: "none".into(),
        hosts_dir: hosts.clone(),
        disable_snapshot_annotations: true,
    });
    let node = Node::start_on(
        &tmp.path().join("node"),
        build,
        &["--hosts-dir", hosts.to_str().unwrap()],
    );
    // 100 images in the default namespace, unpacked by overlayfs.
    for i in &images {
        node.ctr_ok(&["images", "pull", "--plain-http", i]);
    }
    let read = || metric(&node.metrics(), "clip_discovery_manifests_read_total");
    let cri = crate::cri::Cri::connect(&node.dir.join("containerd.sock"));
    let pod = crate::cri::pod_config("p", tmp.path(), false);

    cri.pull(&base, None, &pod).expect("PullImage");
    assert_eq!(remote_snapshots_in(&node, "k8s.io"), 2);
    let first = read();
    assert!(
        first >= 101.0,
        "the first lookup reads every manifest of every namespace: {first}"
    );

    // Two pulls at once, each with a new top layer on the shared base.
    std::thread::scope(|s| {
        for image in &tops {
            let (sock, pod) = (node.dir.join("containerd.sock"), &pod);
            s.spawn(move || {
                crate::cri::Cri::connect(&sock)
                    .pull(image, None, pod)
                    .expect("PullImage")
            });
        }
    });
    assert_eq!(
        remote_snapshots_in(&node, "k8s.io"),
        4,
        "both top layers are lazy"
    );
    let later = read() - first;
    let m = node.metrics();
    eprintln!(
        "label-less lookups with 101 images: first read {first} manifests; two concurrent pulls read {later} more; {} refreshes took {:.3} s in all",
        metric(&m, "clip_discovery_refresh_seconds_count"),
        metric(&m, "clip_discovery_refresh_seconds_sum")
    );
    assert!(
        (2.0..=4.0).contains(&later),
        "later pulls read only their own manifests (at most twice, if read while their pull was writing them): {later}"
    );
    for (n, image) in ["b", "c"].iter().zip(&tops) {
        let o = node.run_in(
            "k8s.io",
            "clip",
            image,
            &format!("top-{n}"),
            &["cat", "/etc/note"],
        );
        assert_eq!(out(&o), format!("{n}\n"));
    }
}

/// A registry with the CRI's pause image (busybox sleeping) and the large image with its
/// index, behind a counting proxy; a hosts directory for the proxy.
pub(crate) struct CriFixture {
    pub large: crate::large_image::Served,
    pub hosts: PathBuf,
    pub pause: String,
}

/// The CRI's pause image: busybox sleeping, pushed to `reg` as `pause:3.6`.
fn push_pause(tmp: &Path, reg: &Registry) {
    let l = layout_with_cmd(
        &tmp.join("pause"),
        "3.6",
        &["gen:busybox"],
        &["/bin/sleep", "2147483647"],
    );
    reg.push_layout(&l, "3.6", "pause");
}

pub(crate) fn cri_fixture(tmp: &Path) -> CriFixture {
    let large = crate::large_image::served(tmp);
    push_pause(tmp, &large.reg);
    CriFixture {
        pause: format!("{}/pause:3.6", large.proxy.host),
        hosts: hosts_dir(tmp, &large.proxy.host, None),
        large,
    }
}

/// What the kubelet does for a pod with one container running python from the large image:
/// PullImage, RunPodSandbox, CreateContainer, StartContainer, ContainerStatus until it exits;
/// the container's log shows python's output and the registry sent a small fraction of the
/// image.
fn cri_pod_runs_python_lazily(build: Containerd, disable_snapshot_annotations: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let f = cri_fixture(tmp.path());
    let build = build.with_cri(CriSettings {
        pause: f.pause.clone(),
        hosts_dir: f.hosts.clone(),
        disable_snapshot_annotations,
    });
    let node = Node::start_on(
        &tmp.path().join("node"),
        build,
        &["--hosts-dir", f.hosts.to_str().unwrap()],
    );
    let cri = crate::cri::Cri::connect(&node.dir.join("containerd.sock"));
    let v = cri.version().expect("CRI Version");
    eprintln!("CRI: {} {}", v.runtime_name, v.runtime_version);
    let logs = tmp.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = crate::cri::pod_config("py", &logs, false);
    let image_ref = cri.pull(&f.large.image, None, &pod).expect("PullImage");
    let pulled = f.large.proxy.sent();
    // containerd fetched the image's manifest and config; the snapshotter read containerd's
    // copies instead of fetching them again. Without labels (when the CRI honours the setting;
    // 2.x's passes labels anyway), one probe of the manifest found the registry for every layer.
    let layout = crate::large_image::large_layout();
    let config = crate::large_image::config_digest(&layout);
    let manifest = crate::large_image::manifest_digest(&layout);
    let proxy = &f.large.proxy;
    let (configs, manifests) = (
        proxy.requests_for(&format!("GET /v2/large/blobs/{config} ")),
        proxy.requests_for(&format!("GET /v2/large/manifests/{manifest} ")),
    );
    assert!(
        configs == 1 && manifests <= 1 + usize::from(disable_snapshot_annotations),
        "{configs} config and {manifests} manifest fetches: {:#?}",
        proxy.requests.lock().unwrap()
    );
    let pod_id = cri.run_pod(&pod).unwrap_or_else(|e| {
        panic!(
            "RunPodSandbox: {e}\ncontainerd: {}",
            std::fs::read_to_string(node.dir.join("containerd.log")).unwrap_or_default()
        )
    });
    // The pod's own network (CNI bridge): python prints its address.
    let script = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                  s.connect(('10.0.0.1', 9)); print('hello from clip', s.getsockname()[0])";
    let id = cri
        .create_container(
            &pod_id,
            &pod,
            "python",
            &image_ref,
            &["python3", "-c", script],
        )
        .expect("CreateContainer");
    cri.start_container(&id).expect("StartContainer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        let s = cri.container_status(&id).expect("ContainerStatus");
        if s.state == crate::cri::EXITED {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the container did not exit: {s:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(logs.join("python.log")).unwrap_or_default();
    assert_eq!(status.exit_code, 0, "{status:?}: {log}");
    assert!(
        log.contains("stdout F hello from clip 10."),
        "container log: {log:?}"
    );
    let sent = f.large.proxy.sent();
    eprintln!(
        "CRI pod (disable_snapshot_annotations = {disable_snapshot_annotations}): PullImage fetched {pulled} bytes, the pod's run {} more ({:.2} % of {})",
        sent - pulled,
        sent as f64 * 100.0 / f.large.bytes as f64,
        f.large.bytes
    );
    assert!(
        sent * 10 < f.large.bytes,
        "{sent} of {} bytes",
        f.large.bytes
    );
    // Without labels, the layer is looked for only among the caller's namespace's images
    // where containerd says which (1.7 and later forward the namespace to proxy plugins).
    let found: Vec<String> = node
        .snapshotter_log()
        .lines()
        .filter(|l| l.contains("found the layer in containerd's content store"))
        .map(without_colours)
        .collect();
    let says = !v.runtime_version.starts_with("1.6") && !v.runtime_version.starts_with("v1.6");
    if v.runtime_version.starts_with("1.7") {
        assert!(!found.is_empty(), "1.7's CRI sends no pull labels here");
    }
    for l in &found {
        eprintln!("discovered ({}): {l}", v.runtime_version);
        if says {
            assert!(l.contains("request_namespace=\"k8s.io\""), "{l}");
        }
    }
    cri.stop_pod(&pod_id).expect("StopPodSandbox");
    cri.remove_pod(&pod_id).expect("RemovePodSandbox");
}

#[test]
fn cri_pod_runs_lazily_without_snapshot_annotations_on_containerd_1_6() {
    cri_pod_runs_python_lazily(Containerd::system(), true);
}

#[test]
fn cri_pod_runs_lazily_with_snapshot_annotations_on_containerd_1_6() {
    cri_pod_runs_python_lazily(Containerd::system(), false);
}

#[test]
fn cri_pod_runs_lazily_on_containerd_1_7() {
    cri_pod_runs_python_lazily(Containerd::debian(CONTAINERD_1_7), true);
}

#[test]
fn cri_pod_runs_lazily_on_containerd_2_1() {
    cri_pod_runs_python_lazily(Containerd::debian(CONTAINERD_2_1), true);
}

#[test]
fn cri_pod_runs_lazily_on_containerd_2_1_configured_like_k3s() {
    cri_pod_runs_python_lazily(
        Containerd::debian(CONTAINERD_2_1).configured_like_k3s(),
        true,
    );
}

/// Kubernetes pull secrets: the registry needs a password that exists only in the CRI
/// PullImage request (no docker config anywhere). The kubelet's image service is clip's
/// (`--cri-address`), which forwards to containerd and keeps the credentials in memory for the
/// lazy reads: the pod runs python with the registry sending a small fraction of the image,
/// the password is on no file under clip's root nor in its log, and RemoveImage drops it.
/// Creates and starts container `name` in the pod, waits (up to 120 s) until it exits and
/// returns its log.
pub(crate) fn run_to_exit(
    runtime: &crate::cri::Cri,
    pod_id: &str,
    pod: &crate::cri::PodSandboxConfig,
    logs: &Path,
    name: &str,
    image_ref: &str,
    cmd: &[&str],
) -> String {
    let id = runtime
        .create_container(pod_id, pod, name, image_ref, cmd)
        .expect("CreateContainer");
    runtime.start_container(&id).expect("StartContainer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while runtime
        .container_status(&id)
        .expect("ContainerStatus")
        .state
        != crate::cri::EXITED
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the container did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default()
}

#[test]
fn cri_pull_secrets_reach_lazy_reads_through_clips_image_service() {
    let tmp = tempfile::tempdir().unwrap();
    let layout = crate::large_image::large_layout();
    let secret = Registry::start(Auth::TlsHtpasswd);
    secret.push_layout(&layout, "large", "large");
    let proxy = CountingProxy::start(&secret.host);
    let hosts = hosts_dir(tmp.path(), &proxy.host, secret.ca.as_deref());
    let image = format!("{}/large:large", proxy.host);
    // The publisher has the credentials; the node never does.
    let publisher = docker_config(tmp.path(), &proxy.host, USER, PASSWORD);
    let o = clip(
        &tmp.path().join("publisher"),
        &[
            "--hosts-dir",
            hosts.to_str().unwrap(),
            "index",
            "--push",
            &image,
        ],
        &[("DOCKER_CONFIG", &publisher)],
    );
    assert!(o.status.success(), "clip index --push: {}", stderr(&o));
    let published = proxy.sent();
    // The pause image: an open registry, as a cluster's mirror of it would be.
    let open = Registry::start(Auth::None);
    push_pause(tmp.path(), &open);
    let hosts_open = hosts_dir(tmp.path(), &open.host, None);
    assert_eq!(hosts_open, hosts);

    let cri_sock = tmp.path().join("node").join("cri.sock");
    let build = Containerd::system().with_cri(CriSettings {
        pause: format!("{}/pause:3.6", open.host),
        hosts_dir: hosts.clone(),
        disable_snapshot_annotations: true,
    });
    let node = Node::start_on(
        &tmp.path().join("node"),
        build,
        &[
            "--hosts-dir",
            hosts.to_str().unwrap(),
            "--cri-address",
            cri_sock.to_str().unwrap(),
        ],
    );
    let images = crate::cri::Cri::connect(&cri_sock);
    let runtime = crate::cri::Cri::connect(&node.dir.join("containerd.sock"));
    let logs = tmp.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = crate::cri::pod_config("secret", &logs, false);
    let auth = crate::cri::AuthConfig {
        username: USER.into(),
        password: PASSWORD.into(),
        server_address: format!("https://{}", proxy.host),
    };
    let image_ref = images
        .pull(&image, Some(auth), &pod)
        .unwrap_or_else(|e| panic!("PullImage through clip: {e}\n{}", node.snapshotter_log()));
    assert_eq!(
        remote_snapshots_in(&node, "k8s.io"),
        4,
        "every layer is lazy: {}",
        node.snapshotter_log()
    );
    let pod_id = runtime.run_pod(&pod).expect("RunPodSandbox");
    let log = run_to_exit(
        &runtime,
        &pod_id,
        &pod,
        &logs,
        "python",
        &image_ref,
        &["python3", "-c", "print('pulled with a secret')"],
    );
    assert!(log.contains("stdout F pulled with a secret"), "{log}");
    let sent = proxy.sent() - published;
    let image_bytes = crate::large_image::layer_bytes(&layout);
    eprintln!(
        "pull secret via clip's CRI image service: registry sent {sent} bytes ({:.2} % of {image_bytes})",
        sent as f64 * 100.0 / image_bytes as f64
    );
    assert!(sent * 10 < image_bytes, "{sent} of {image_bytes}");

    // Another tenant pulls the same image with a wrong password: its pull fails and takes back
    // only the credentials it brought. This pod's next reads (numpy's files, never read yet)
    // still reach the registry with the first pull's credentials.
    let wrong = crate::cri::AuthConfig {
        username: USER.into(),
        password: "not-the-password".into(),
        server_address: format!("https://{}", proxy.host),
    };
    assert!(
        images.pull(&image, Some(wrong), &pod).is_err(),
        "a wrong password pulled the image"
    );
    let log = run_to_exit(
        &runtime,
        &pod_id,
        &pod,
        &logs,
        "numpy",
        &image_ref,
        &["python3", "-c", "import numpy; print('still reading')"],
    );
    assert!(
        log.contains("stdout F still reading"),
        "{log}\n{}",
        node.snapshotter_log()
    );

    // Never on disk, never logged: no file under clip's root (database, indexes, cache,
    // snapshots; not into the lazy mounts, which are the image) nor its log holds the password.
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"find "$1" -xdev -type f -print0 | xargs -0 grep -l -a -F "$2" -- "$3""#)
        .args(["sh"])
        .arg(node.clip_root())
        .arg(PASSWORD)
        .arg(node.dir.join("snapshotter.log"))
        .output()
        .unwrap();
    // xargs: 123 when grep found nothing in every file; a read error shows on stderr. A
    // temporary renamed or removed between find and grep (a passthrough copy being committed)
    // is not one.
    let errors: String = stderr(&o)
        .lines()
        .filter(|l| !l.ends_with("No such file or directory"))
        .collect();
    assert_eq!(
        (o.status.code(), errors),
        (Some(123), String::new()),
        "the pull secret is in: {}",
        stdout(&o)
    );

    runtime.stop_pod(&pod_id).expect("StopPodSandbox");
    runtime.remove_pod(&pod_id).expect("RemovePodSandbox");
    images.remove_image(&image_ref).expect("RemoveImage");
    assert!(
        node.snapshotter_log()
            .contains("image removed: its pull credentials are dropped"),
        "{}",
        node.snapshotter_log()
    );
}
