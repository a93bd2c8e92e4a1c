//! containerd's snapshotter semantics without containerd, FUSE or a registry: the snapshotter
//! over a temporary sled database and snapshot directories, its lazy layers from a scripted
//! [`Layers`] fake and its mounts recorded by a [`LazyMounts`] fake. Runs without root.

use super::idmap;
use super::layers::Layers;
use super::meta::{Kind, Meta, Remote};
use super::mounts::LazyMounts;
use super::{ClipSnapshotter, SnapshotError};
use crate::labels;
use clip_core::digest::Digest;
use containerd_snapshots::{api::types::Mount, tonic, Info, Kind as ApiKind, Snapshotter};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Mounts that are only noted: which snapshot ids are served, and every call.
#[derive(Default)]
struct FakeMounts {
    served: Mutex<HashSet<u64>>,
    /// `mount <id> <layers in the chain>` / `unmount <id>`.
    calls: Mutex<Vec<String>>,
    /// The layers of each chain mounted, bottom first.
    layers: Mutex<Vec<Vec<Digest>>>,
    fail: AtomicBool,
    /// What the kernel would say of id-mapping the mounts.
    idmap: AtomicBool,
}

#[tonic::async_trait]
impl LazyMounts for FakeMounts {
    async fn mount(
        &self,
        id: u64,
        name: &str,
        chain: &[super::meta::Record],
        _dir: &Path,
    ) -> Result<(), SnapshotError> {
        if self.served.lock().unwrap().contains(&id) {
            return Ok(());
        }
        if self.fail.load(Relaxed) {
            return Err(SnapshotError::Mount {
                name: name.into(),
                reason: "scripted failure".into(),
            });
        }
        self.calls
            .lock()
            .unwrap()
            .push(format!("mount {id} {}", chain.len()));
        self.layers.lock().unwrap().push(
            chain
                .iter()
                .filter_map(|r| r.remote.as_ref().map(|m| m.layer))
                .collect(),
        );
        self.served.lock().unwrap().insert(id);
        Ok(())
    }

    async fn check(&self, id: u64) -> bool {
        self.served.lock().unwrap().contains(&id)
    }

    fn idmappable(&self) -> Option<bool> {
        Some(self.idmap.load(Relaxed))
    }

    async fn unmount(&self, id: u64, _dir: &Path) {
        self.served.lock().unwrap().remove(&id);
        self.calls.lock().unwrap().push(format!("unmount {id}"));
    }
}

/// Layers served lazily by chain ID (the `containerd.io/snapshot.ref` a Prepare targets).
#[derive(Default)]
struct FakeLayers {
    by_target: Mutex<HashMap<String, (Remote, Digest)>>,
    committed: Mutex<Vec<Remote>>,
    /// What `admit` answers for a snapshot: another layer for it, or a refusal.
    admissions: Mutex<HashMap<String, Result<Remote, String>>>,
}

impl FakeLayers {
    /// Serves a layer with `diff_id` as chain `target` (its index states `diff_id`).
    fn serve(&self, target: &str, diff_id: Digest) -> Remote {
        let remote = Remote {
            layer: Digest::of(target.as_bytes()),
            reference: format!("registry.test/app@{}", Digest::of(b"manifest")),
        };
        self.by_target
            .lock()
            .unwrap()
            .insert(target.to_string(), (remote.clone(), diff_id));
        remote
    }
}

#[tonic::async_trait]
impl Layers for FakeLayers {
    async fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Option<(Remote, Digest)> {
        let target = labels.get(labels::TARGET)?;
        self.by_target.lock().unwrap().get(target).cloned()
    }

    async fn committed(&self, remote: &Remote, base: bool, _labels: &BTreeMap<String, String>) {
        if base {
            self.committed.lock().unwrap().push(remote.clone());
        }
    }

    async fn admit(
        &self,
        chain: &[(String, super::meta::Record)],
        _labels: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, Remote)>, SnapshotError> {
        let mut out = Vec::new();
        for (name, _) in chain {
            match self.admissions.lock().unwrap().get(name) {
                Some(Ok(r)) => out.push((name.clone(), r.clone())),
                Some(Err(e)) => return Err(SnapshotError::FailedPrecondition(e.clone())),
                None => {}
            }
        }
        Ok(out)
    }
}

struct Node {
    dir: tempfile::TempDir,
    mounts: Arc<FakeMounts>,
    layers: Arc<FakeLayers>,
}

impl Node {
    fn new() -> Node {
        Node {
            dir: tempfile::tempdir().unwrap(),
            mounts: Arc::default(),
            layers: Arc::default(),
        }
    }

    /// The snapshotter over this node's directory and database (opened anew each time: a
    /// daemon start).
    async fn start(&self) -> Arc<ClipSnapshotter> {
        // The previous start's database lock goes with its last background task: under load
        // that can outlive the test's handle by a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::open(self.dir.path().join("db")) {
                Ok(db) => break db,
                // sled says so as ErrorKind::Other, in its message.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                Err(e) => panic!("opening the node's database: {e}"),
            }
        };
        ClipSnapshotter::open(
            self.dir.path(),
            Meta::open(db).unwrap(),
            self.mounts.clone(),
            self.layers.clone(),
        )
        .await
        .unwrap()
    }

    fn fs(&self, sn: &ClipSnapshotter, key_id: u64) -> PathBuf {
        sn.path(key_id).join("fs")
    }
}

fn no_labels() -> HashMap<String, String> {
    HashMap::new()
}

fn target(chain: &str) -> HashMap<String, String> {
    HashMap::from([(labels::TARGET.to_string(), chain.to_string())])
}

async fn id_of(sn: &ClipSnapshotter, key: &str) -> u64 {
    sn.meta.must(key).unwrap().id
}

async fn walk(sn: &ClipSnapshotter, filters: &[&str]) -> Vec<String> {
    let stream = sn
        .list(
            String::new(),
            filters.iter().map(|f| f.to_string()).collect(),
        )
        .await
        .unwrap();
    let mut names: Vec<String> = stream
        .map(|i: Result<Info, SnapshotError>| i.unwrap().name)
        .collect()
        .await;
    names.sort();
    names
}

/// An ordinary layer committed as `name` on no parent (prepared, then committed).
async fn unpacked_layer(sn: &ClipSnapshotter, name: &str) {
    let key = format!("extract-{name}");
    sn.prepare(key.clone(), String::new(), no_labels())
        .await
        .unwrap();
    sn.commit(name.into(), key, no_labels()).await.unwrap();
}

fn option<'a>(m: &'a Mount, prefix: &str) -> Option<&'a str> {
    m.options.iter().find_map(|o| o.strip_prefix(prefix))
}

#[tokio::test]
async fn prepare_commit_and_view_give_overlay_mounts_on_the_parent_chain() {
    let node = Node::new();
    let sn = node.start().await;
    let base = sn
        .prepare("a".into(), String::new(), no_labels())
        .await
        .unwrap();
    assert_eq!(base.len(), 1);
    assert_eq!(base[0].r#type, "bind");
    assert!(base[0].options.contains(&"rw".to_string()));
    let a = id_of(&sn, "a").await;
    std::fs::write(node.fs(&sn, a).join("file"), b"x").unwrap();
    sn.commit("A".into(), "a".into(), no_labels())
        .await
        .unwrap();
    assert_eq!(sn.stat("A".into()).await.unwrap().kind, ApiKind::Committed);
    assert!(matches!(
        sn.stat("a".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
    sn.prepare("b".into(), "A".into(), no_labels())
        .await
        .unwrap();
    sn.commit("B".into(), "b".into(), no_labels())
        .await
        .unwrap();
    let c = sn
        .prepare("c".into(), "B".into(), no_labels())
        .await
        .unwrap();
    assert_eq!(c[0].r#type, "overlay");
    let b = id_of(&sn, "B").await;
    let lower = format!(
        "{}:{}",
        node.fs(&sn, b).display(),
        node.fs(&sn, a).display()
    );
    assert_eq!(option(&c[0], "lowerdir="), Some(lower.as_str()));
    assert!(option(&c[0], "upperdir=").is_some());
    // A view of one layer is a read-only bind of it.
    let v = sn.view("v".into(), "A".into(), no_labels()).await.unwrap();
    assert_eq!(v[0].r#type, "bind");
    assert_eq!(v[0].source, node.fs(&sn, a).display().to_string());
    assert!(v[0].options.contains(&"ro".to_string()));
    assert_eq!(sn.mounts("c".into()).await.unwrap(), c);
    // The committed layer's usage was measured at commit.
    assert!(sn.usage("A".into()).await.unwrap().inodes >= 1);
    assert!(node.mounts.calls.lock().unwrap().is_empty(), "nothing lazy");
}

#[tokio::test]
async fn commit_needs_an_active_snapshot_and_prepare_a_committed_parent() {
    let sn = Node::new().start().await;
    sn.prepare("a".into(), String::new(), no_labels())
        .await
        .unwrap();
    let on_active = sn.prepare("b".into(), "a".into(), no_labels()).await;
    assert!(matches!(
        on_active,
        Err(SnapshotError::FailedPrecondition(_))
    ));
    sn.view("v".into(), String::new(), no_labels())
        .await
        .unwrap();
    let view = sn.commit("V".into(), "v".into(), no_labels()).await;
    assert!(matches!(view, Err(SnapshotError::FailedPrecondition(_))));
    let again = sn.prepare("a".into(), String::new(), no_labels()).await;
    assert!(matches!(again, Err(SnapshotError::AlreadyExists(_))));
    let missing = sn.prepare("x".into(), "nope".into(), no_labels()).await;
    assert!(matches!(missing, Err(SnapshotError::NotFound(_))));
    let empty = sn.prepare(String::new(), String::new(), no_labels()).await;
    assert!(matches!(empty, Err(SnapshotError::InvalidArgument(_))));
}

#[tokio::test]
async fn a_snapshot_with_children_is_not_removed_and_removing_deletes_its_directory() {
    let node = Node::new();
    let sn = node.start().await;
    unpacked_layer(&sn, "A").await;
    sn.prepare("b".into(), "A".into(), no_labels())
        .await
        .unwrap();
    let (a, b) = (id_of(&sn, "A").await, id_of(&sn, "b").await);
    let parent = sn.remove("A".into()).await;
    assert!(matches!(parent, Err(SnapshotError::FailedPrecondition(_))));
    assert!(sn.path(a).exists());
    sn.remove("b".into()).await.unwrap();
    assert!(!sn.path(b).exists());
    sn.remove("A".into()).await.unwrap();
    assert!(!sn.path(a).exists());
    assert!(walk(&sn, &[]).await.is_empty());
}

#[tokio::test]
async fn walk_filters_by_name_kind_parent_and_label() {
    let sn = Node::new().start().await;
    let labelled = HashMap::from([("team".to_string(), "blue".to_string())]);
    sn.prepare("a".into(), String::new(), labelled.clone())
        .await
        .unwrap();
    sn.commit("A".into(), "a".into(), labelled).await.unwrap();
    sn.prepare("b".into(), "A".into(), no_labels())
        .await
        .unwrap();
    sn.view("v".into(), "A".into(), no_labels()).await.unwrap();
    assert_eq!(walk(&sn, &[]).await, ["A", "b", "v"]);
    assert_eq!(walk(&sn, &["kind==committed"]).await, ["A"]);
    assert_eq!(walk(&sn, &["parent==A"]).await, ["b", "v"]);
    assert_eq!(walk(&sn, &["parent==A,kind==view"]).await, ["v"]);
    assert_eq!(walk(&sn, &["labels.team==blue"]).await, ["A"]);
    assert_eq!(walk(&sn, &["labels.\"team\""]).await, ["A"]);
    assert_eq!(walk(&sn, &["labels.team!=blue"]).await, ["b", "v"]);
    // Filters are alternatives.
    assert_eq!(walk(&sn, &["name==b", "kind==view"]).await, ["b", "v"]);
}

#[tokio::test]
async fn update_changes_only_the_labels_it_names() {
    let sn = Node::new().start().await;
    let l = HashMap::from([("a".to_string(), "1".to_string()), ("b".into(), "2".into())]);
    sn.prepare("s".into(), String::new(), l).await.unwrap();
    let mut info = sn.stat("s".into()).await.unwrap();
    info.labels = HashMap::from([("a".to_string(), "9".to_string())]);
    let got = sn
        .update(info, Some(vec!["labels.a".into(), "labels.b".into()]))
        .await
        .unwrap();
    assert_eq!(
        got.labels,
        HashMap::from([("a".to_string(), "9".to_string())])
    );
    let info = sn.stat("s".into()).await.unwrap();
    let refused = sn.update(info, Some(vec!["parent".into()])).await;
    assert!(matches!(refused, Err(SnapshotError::InvalidArgument(_))));
}

#[tokio::test]
async fn a_layer_that_can_be_served_lazily_is_committed_here_and_answered_already_exists() {
    let node = Node::new();
    let sn = node.start().await;
    let diff = Digest::of(b"base layer");
    let chain = diff.to_string();
    let remote = node.layers.serve(&chain, diff);
    let r = sn
        .prepare("extract-1".into(), String::new(), target(&chain))
        .await;
    assert!(matches!(r, Err(SnapshotError::AlreadyExists(ref t)) if *t == chain));
    let info = sn.stat(chain.clone()).await.unwrap();
    assert_eq!(info.kind, ApiKind::Committed);
    assert_eq!(
        info.labels.get(labels::REMOTE).map(String::as_str),
        Some("true")
    );
    assert!(matches!(
        sn.stat("extract-1".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
    assert_eq!(*node.layers.committed.lock().unwrap(), [remote]);
    // The second layer stacks on it, lazily too; its chain ID follows from the first.
    let diff2 = Digest::of(b"top layer");
    let chain2 = clip_core::image::chain_id(Some(&diff), &diff2).to_string();
    node.layers.serve(&chain2, diff2);
    let r = sn
        .prepare("extract-2".into(), chain.clone(), target(&chain2))
        .await;
    assert!(matches!(r, Err(SnapshotError::AlreadyExists(_))));
    // Nothing is mounted until a container stands on them: then one mount of both.
    assert!(node.mounts.calls.lock().unwrap().is_empty());
    let c = sn
        .prepare("ctr".into(), chain2.clone(), no_labels())
        .await
        .unwrap();
    let top = id_of(&sn, &chain2).await;
    assert_eq!(
        *node.mounts.calls.lock().unwrap(),
        [format!("mount {top} 2")]
    );
    assert_eq!(
        option(&c[0], "lowerdir="),
        Some(node.fs(&sn, top).to_str().unwrap())
    );
    // Removing the container, then the top layer, stops serving it.
    sn.remove("ctr".into()).await.unwrap();
    sn.remove(chain2).await.unwrap();
    assert!(!node.mounts.check(top).await);
}

#[tokio::test]
async fn a_lazy_layer_an_image_may_not_read_is_refused_or_replaced_before_anything_mounts_it() {
    let node = Node::new();
    let sn = node.start().await;
    let diff = Digest::of(b"base");
    let chain = diff.to_string();
    let first = node.layers.serve(&chain, diff);
    let _ = sn
        .prepare("extract".into(), String::new(), target(&chain))
        .await;
    // Refused: no snapshot, nothing mounted.
    node.layers.admissions.lock().unwrap().insert(
        chain.clone(),
        Err("not the layer its chain ID names".into()),
    );
    let r = sn.prepare("ctr".into(), chain.clone(), no_labels()).await;
    assert!(
        matches!(r, Err(SnapshotError::FailedPrecondition(_))),
        "{r:?}"
    );
    assert!(sn.meta.get("ctr").unwrap().is_none());
    let v = sn.view("v".into(), chain.clone(), no_labels()).await;
    assert!(v.is_err(), "a view is checked too");
    assert!(node.mounts.calls.lock().unwrap().is_empty());
    // Replaced: the record names the other layer, durably, before the mount.
    let other = Remote {
        layer: Digest::of(b"the layer the chain names"),
        reference: format!("registry.test/victim@{}", Digest::of(b"m2")),
    };
    node.layers
        .admissions
        .lock()
        .unwrap()
        .insert(chain.clone(), Ok(other.clone()));
    sn.prepare("ctr".into(), chain.clone(), no_labels())
        .await
        .unwrap();
    assert_eq!(*node.mounts.layers.lock().unwrap(), [vec![other.layer]]);
    assert_ne!(other, first);
    drop(sn);
    let sn = node.start().await;
    assert_eq!(sn.meta.must(&chain).unwrap().remote, Some(other));
}

#[tokio::test]
async fn an_index_that_gives_another_chain_than_containerd_asked_for_is_not_served() {
    let node = Node::new();
    let sn = node.start().await;
    let chain = Digest::of(b"what containerd computed").to_string();
    // The layer's index claims a DiffID whose chain is not the target.
    node.layers.serve(&chain, Digest::of(b"a lie"));
    let mounts = sn
        .prepare("extract".into(), String::new(), target(&chain))
        .await
        .unwrap();
    assert_eq!(
        mounts[0].r#type, "bind",
        "an ordinary snapshot to unpack into"
    );
    assert_eq!(
        sn.stat("extract".into()).await.unwrap().kind,
        ApiKind::Active
    );
    assert!(sn.meta.get(&chain).unwrap().is_none());
}

#[tokio::test]
async fn a_lazy_layer_is_never_stacked_on_an_unpacked_one() {
    let node = Node::new();
    let sn = node.start().await;
    unpacked_layer(&sn, "A").await;
    // Whatever the chain, a remote layer stacks only on remote layers.
    let chain = Digest::of(b"any").to_string();
    node.layers.serve(&chain, Digest::of(b"top"));
    let r = sn
        .prepare("extract".into(), "A".into(), target(&chain))
        .await;
    assert!(r.is_ok(), "unpacked normally: {r:?}");
    assert!(sn.meta.get(&chain).unwrap().is_none());
}

#[tokio::test]
async fn a_failed_mount_rolls_the_prepare_back() {
    let node = Node::new();
    let sn = node.start().await;
    let diff = Digest::of(b"base");
    let chain = diff.to_string();
    node.layers.serve(&chain, diff);
    let _ = sn
        .prepare("extract".into(), String::new(), target(&chain))
        .await;
    let before: Vec<_> = std::fs::read_dir(node.dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    node.mounts.fail.store(true, Relaxed);
    let r = sn.prepare("ctr".into(), chain.clone(), no_labels()).await;
    assert!(matches!(r, Err(SnapshotError::Mount { .. })), "{r:?}");
    assert!(sn.meta.get("ctr").unwrap().is_none(), "no record left");
    let after: Vec<_> = std::fs::read_dir(node.dir.path().join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(before, after, "no directory left");
    // Once mounting works, the same key prepares.
    node.mounts.fail.store(false, Relaxed);
    sn.prepare("ctr".into(), chain, no_labels()).await.unwrap();
}

#[tokio::test]
async fn a_restart_finds_the_recorded_snapshots_and_remounts_what_containers_stand_on() {
    let node = Node::new();
    let diff = Digest::of(b"base");
    let chain = diff.to_string();
    node.layers.serve(&chain, diff);
    {
        let sn = node.start().await;
        let _ = sn
            .prepare("extract".into(), String::new(), target(&chain))
            .await;
        sn.prepare("ctr".into(), chain.clone(), no_labels())
            .await
            .unwrap();
        sn.prepare("plain".into(), String::new(), no_labels())
            .await
            .unwrap();
        sn.shutdown().await;
    }
    // The daemon is gone, and with it what it served.
    node.mounts.served.lock().unwrap().clear();
    node.mounts.calls.lock().unwrap().clear();
    let sn = node.start().await;
    assert_eq!(walk(&sn, &[]).await, ["ctr", "plain", chain.as_str()]);
    assert_eq!(sn.stat("ctr".into()).await.unwrap().parent, chain);
    let top = id_of(&sn, &chain).await;
    // The container on the lazy layer finds its lower layer served again, before any call.
    assert_eq!(
        *node.mounts.calls.lock().unwrap(),
        [format!("mount {top} 1")]
    );
    // Ids keep growing: a new snapshot never reuses a recorded one's directory.
    sn.prepare("new".into(), String::new(), no_labels())
        .await
        .unwrap();
    let ids: HashSet<u64> = [chain.as_str(), "ctr", "plain", "new"]
        .iter()
        .map(|k| sn.meta.must(k).unwrap().id)
        .collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(sn.stat("ctr".into()).await.unwrap().kind, ApiKind::Active);
    assert_eq!(sn.meta.must("plain").unwrap().kind, Kind::Active);
}

#[tokio::test]
async fn cleanup_removes_only_directories_no_record_names() {
    let node = Node::new();
    let sn = node.start().await;
    sn.prepare("a".into(), String::new(), no_labels())
        .await
        .unwrap();
    let a = id_of(&sn, "a").await;
    let orphan = node.dir.path().join("snapshots").join("999");
    std::fs::create_dir_all(orphan.join("fs")).unwrap();
    let other = node.dir.path().join("snapshots").join("not-an-id");
    std::fs::create_dir_all(&other).unwrap();
    sn.clear().await.unwrap();
    assert!(!orphan.exists());
    assert!(sn.path(a).exists());
    assert!(other.exists(), "only snapshot directories are cleaned");
}

/// A user-namespaced container (containerd's `remap-ids` labels) on lazy layers: its mounts
/// carry the mapping for containerd to id-map every layer, its writable layer belongs to its
/// root, and the record keeps the mapping for `Mounts`. Where the kernel cannot id-map the
/// FUSE mounts, the snapshot is refused and nothing is left.
#[tokio::test]
async fn a_user_namespaced_snapshot_gets_id_mapped_mounts_or_a_clear_refusal() {
    let node = Node::new();
    let sn = node.start().await;
    let diff = Digest::of(b"base layer");
    let chain = diff.to_string();
    node.layers.serve(&chain, diff);
    let r = sn
        .prepare("extract-1".into(), String::new(), target(&chain))
        .await;
    assert!(matches!(r, Err(SnapshotError::AlreadyExists(_))));
    let userns = |uid: u32, gid: u32| {
        HashMap::from([
            (idmap::UID_LABEL.to_string(), format!("0:{uid}:65536")),
            (idmap::GID_LABEL.to_string(), format!("0:{gid}:65536")),
        ])
    };

    node.mounts.idmap.store(false, Relaxed);
    let e = sn
        .prepare("refused".into(), chain.clone(), userns(100_000, 100_000))
        .await
        .unwrap_err();
    assert!(
        matches!(e, SnapshotError::FailedPrecondition(_)) && e.to_string().contains("remap-ids"),
        "{e}"
    );
    assert!(matches!(
        sn.stat("refused".into()).await,
        Err(SnapshotError::NotFound(_))
    ));

    node.mounts.idmap.store(true, Relaxed);
    let m = sn
        .prepare("ctr".into(), chain.clone(), userns(100_000, 200_000))
        .await
        .unwrap();
    assert_eq!(m[0].r#type, "overlay");
    assert_eq!(option(&m[0], "uidmap="), Some("0:100000:65536"));
    assert_eq!(option(&m[0], "gidmap="), Some("0:200000:65536"));
    // Named so that containerd clones the FUSE mount itself, not the directory it is on.
    let top = node.fs(&sn, id_of(&sn, &chain).await);
    let lower = format!("{}/.", top.display());
    assert_eq!(option(&m[0], "lowerdir="), Some(lower.as_str()));
    let upper = node.fs(&sn, id_of(&sn, "ctr").await);
    let meta = std::fs::metadata(&upper).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((meta.uid(), meta.gid()), (100_000, 200_000));
    assert_eq!(sn.mounts("ctr".into()).await.unwrap(), m);
    // A container without a user namespace on the same layers: plain mounts.
    let plain = sn
        .prepare("plain".into(), chain.clone(), no_labels())
        .await
        .unwrap();
    assert_eq!(option(&plain[0], "uidmap="), None);
    // Unpacked layers over the lazy ones: containerd could not id-map them together.
    sn.prepare("unpack".into(), chain.clone(), no_labels())
        .await
        .unwrap();
    sn.commit("U".into(), "unpack".into(), no_labels())
        .await
        .unwrap();
    let e = sn
        .prepare("mixed".into(), "U".into(), userns(100_000, 100_000))
        .await
        .unwrap_err();
    assert!(matches!(e, SnapshotError::FailedPrecondition(_)), "{e}");
    assert!(matches!(
        sn.stat("mixed".into()).await,
        Err(SnapshotError::NotFound(_))
    ));
    // Hostile mappings are refused before anything is made.
    let bad = HashMap::from([(idmap::UID_LABEL.to_string(), "0:1:1".to_string())]);
    assert!(matches!(
        sn.prepare("bad".into(), chain, bad).await,
        Err(SnapshotError::InvalidArgument(_))
    ));
}
