//! User-namespaced Kubernetes pods (`hostUsers: false`) on clip's lazy snapshots: containerd
//! 2.1's CRI asks for id-mapped mounts (clip's proxy plugin declares `remap-ids`, as
//! docs/containerd/config-v3.toml says); clip's FUSE mounts allow id-mapping, so the kernel maps
//! owners per container and nothing is copied or chowned. runc 1.3 (Debian's development
//! suite, on trixie's glibc: scripts/debian-runc.sh) runs the pods.

use crate::cri::{Cri, PodSandboxConfig};
use crate::dropin::{cri_fixture, CONTAINERD_2_1};
use crate::snapshotter::{Containerd, CriSettings, Node};
use std::path::Path;
use std::time::{Duration, Instant};

/// What each container prints: its user namespace, who it is, the owners of files the image
/// gives to root, to a group and to a user, and a byte of a file only root may read.
const SHOW: &str = "cat /proc/self/uid_map /proc/self/gid_map; id -u; id -g; \
                    stat -c '%u:%g %a %n' /etc/shadow /var/mail /usr/bin/python3.11 /tmp; \
                    head -c 5 /etc/shadow; echo";

/// A pod of its own with one container running [`SHOW`], started (not waited for).
struct Pod {
    id: String,
    container: String,
    logs: std::path::PathBuf,
}

fn start(cri: &Cri, node: &Node, config: &PodSandboxConfig, logs: &Path, image: &str) -> Pod {
    let log = || {
        format!(
            "containerd: {}\nsnapshotter: {}",
            std::fs::read_to_string(node.dir.join("containerd.log")).unwrap_or_default(),
            node.snapshotter_log()
        )
    };
    let id = cri
        .run_pod(config)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", log()));
    let container = cri
        .create_container(&id, config, "show", image, &["sh", "-c", SHOW])
        .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", log()));
    cri.start_container(&container)
        .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", log()));
    Pod {
        id,
        container,
        logs: logs.to_path_buf(),
    }
}

/// The container's output lines, once it has exited 0.
fn output(cri: &Cri, pod: &Pod) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        let s = cri
            .container_status(&pod.container)
            .expect("ContainerStatus");
        if s.state == crate::cri::EXITED {
            break s;
        }
        assert!(Instant::now() < deadline, "the container did not exit");
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = std::fs::read_to_string(pod.logs.join("show.log")).unwrap_or_default();
    assert_eq!(status.exit_code, 0, "{status:?}: {log}");
    // CRI log lines: TIME STREAM TAG LINE.
    log.lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

/// The host uid of the pod's sandbox process (pause), from containerd's task list.
fn sandbox_host_uid(node: &Node, pod_id: &str) -> u32 {
    let tasks = node.ctr_ok(&["-n", "k8s.io", "tasks", "ls"]);
    let pid = tasks
        .lines()
        .find(|l| l.starts_with(pod_id))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no task for pod {pod_id}: {tasks}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|u| u.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .unwrap()
}

/// Two pods with `hostUsers: false` and different mappings, at once, on the large image: inside,
/// every file has its image owner (root is root and reads root's files) as in a pod without a
/// user namespace; on the host the pods run as their mapped ids; one FUSE mount serves both;
/// the registry sends a small fraction of the image (no chown copy, which moves all of it).
#[test]
fn user_namespaced_pods_run_lazily_on_id_mapped_mounts() {
    let tmp = tempfile::tempdir().unwrap();
    // A pod's mapped root must be able to reach its root filesystem under containerd's state
    // directory, as under /run/containerd (0711): temporary directories are 0700.
    let search: std::fs::Permissions = std::os::unix::fs::PermissionsExt::from_mode(0o711);
    std::fs::set_permissions(tmp.path(), search.clone()).unwrap();
    let f = cri_fixture(tmp.path());
    let build = Containerd::debian(CONTAINERD_2_1)
        .with_runc_1_3()
        .with_cri(CriSettings {
            pause: f.pause.clone(),
            hosts_dir: f.hosts.clone(),
            disable_snapshot_annotations: true,
        });
    let node = Node::start_on(
        &tmp.path().join("node"),
        build,
        &["--hosts-dir", f.hosts.to_str().unwrap()],
    );
    std::fs::set_permissions(node.dir.join("containerd"), search).unwrap();
    let cri = Cri::connect(&node.dir.join("containerd.sock"));
    let logs = tmp.path().join("pod-logs");
    let configs: Vec<(u32, PodSandboxConfig)> = [100_000u32, 200_000]
        .iter()
        .map(|&base| {
            let name = format!("userns-{base}");
            let dir = logs.join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            (base, crate::cri::userns_pod_config(&name, &dir, base))
        })
        .collect();
    let image = cri
        .pull(&f.large.image, None, &configs[0].1)
        .expect("PullImage");
    let pulled = f.large.proxy.sent();

    // Both at once.
    let pods: Vec<Pod> = configs
        .iter()
        .map(|(base, c)| start(&cri, &node, c, &logs.join(format!("userns-{base}")), &image))
        .collect();
    let outputs: Vec<Vec<String>> = pods.iter().map(|p| output(&cri, p)).collect();
    let sent = f.large.proxy.sent() - pulled;
    let mounts = node.fuse_mounts();
    for ((base, _), (pod, out)) in configs.iter().zip(pods.iter().zip(&outputs)) {
        eprintln!("pod mapped to {base}: {out:?}");
        let map = format!("0 {base} 65536");
        assert_eq!(out[..2], [map.clone(), map], "the pod's user namespace");
        assert_eq!(out[2..4], ["0", "0"], "root inside");
        assert_eq!(
            out.last().map(String::as_str),
            Some("root:"),
            "root reads /etc/shadow"
        );
        assert_eq!(
            sandbox_host_uid(&node, &pod.id),
            *base,
            "the pod's host uid"
        );
    }
    assert_eq!(
        mounts.len(),
        1,
        "one FUSE mount serves both pods: {mounts:?}"
    );
    eprintln!(
        "two user-namespaced pods: PullImage {pulled} bytes, the pods' runs {sent} more ({:.2} % of {})",
        (pulled + sent) as f64 * 100.0 / f.large.bytes as f64,
        f.large.bytes
    );
    assert!(
        (pulled + sent) * 10 < f.large.bytes,
        "{} of {} bytes: a chown copy reads the whole image",
        pulled + sent,
        f.large.bytes
    );

    // The same files, from a pod without a user namespace: the same owners and modes.
    let plain_logs = logs.join("plain");
    std::fs::create_dir_all(&plain_logs).unwrap();
    let plain = crate::cri::pod_config("plain", &plain_logs, false);
    let p = start(&cri, &node, &plain, &plain_logs, &image);
    let plain_out = output(&cri, &p);
    assert_eq!(plain_out[0], "0 0 4294967295", "no user namespace");
    for out in &outputs {
        assert_eq!(out[2..], plain_out[2..], "owners seen through the mapping");
    }
    for pod in pods.iter().chain([&p]) {
        cri.stop_pod(&pod.id).expect("StopPodSandbox");
        cri.remove_pod(&pod.id).expect("RemovePodSandbox");
    }
}
