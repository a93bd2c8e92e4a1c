//! containerd's snapshotter semantics: Prepare, View, Commit, Remove, Stat, Update, Usage,
//! Mounts, Walk (list with filters) and Cleanup, as containerd's overlayfs snapshotter has them,
//! plus the remote handshake (a Prepare whose target layer can be served lazily is committed
//! here and answered AlreadyExists).
//!
//! Part of [`ClipSnapshotter`]. Uses the records ([`super::meta`]) and the two seams,
//! [`super::layers::Layers`] and [`super::mounts::LazyMounts`]; no registry, FUSE or containerd
//! of its own, so `tests.rs` runs it against fakes.

use super::idmap::IdMap;
use super::layers::Fallback;
use super::meta::{self, Kind, Meta, Record};
use super::{io_err, ClipSnapshotter, SnapshotError};
use crate::labels;
use crate::os::mounts_under;
use clip_core::digest::Digest;
use containerd_snapshots::{api::types::Mount, tonic, Info, Kind as ApiKind, Usage};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

impl ClipSnapshotter {
    /// Remounts every remote chain an active or view snapshot stands on.
    pub(super) async fn restore(&self) {
        let Ok(all) = self.meta.list() else {
            return;
        };
        for (name, r) in &all {
            if r.kind == Kind::Committed || r.parent.is_empty() {
                continue;
            }
            if let Err(e) = self.lowerdirs(&r.parent).await {
                tracing::warn!(snapshot = %name, "restoring its lower layers: {e}");
            }
        }
    }

    /// The lowerdirs of a snapshot on `parent`, topmost first; mounts the remote part.
    async fn lowerdirs(&self, parent: &str) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut out = Vec::new();
        let mut cur = parent.to_string();
        while !cur.is_empty() {
            let r = self.meta.must(&cur)?;
            if r.remote.is_some() {
                out.push(self.ensure_mounted(&cur, &r).await?);
                break;
            }
            out.push(self.path(r.id).join("fs"));
            cur = r.parent;
        }
        Ok(out)
    }

    /// The merged mount of the remote chain topped by `name`, mounted if it is not.
    async fn ensure_mounted(&self, name: &str, top: &Record) -> Result<PathBuf, SnapshotError> {
        let dir = self.path(top.id).join("fs");
        let chain = remote_chain(&self.meta, name, top)?;
        self.mounts.mount(top.id, name, &chain, &dir).await?;
        Ok(dir)
    }

    /// Whether the chain under `parent` has lazy layers (a FUSE mount among its lowerdirs).
    fn lazy_below(&self, parent: &str) -> Result<bool, SnapshotError> {
        Ok(self.remote_top(parent)?.is_some())
    }

    /// The id of the topmost remote snapshot of the chain under `parent` (its lazy layers'
    /// mount), if it has one.
    fn remote_top(&self, parent: &str) -> Result<Option<u64>, SnapshotError> {
        let mut cur = parent.to_string();
        while !cur.is_empty() {
            let r = self.meta.must(&cur)?;
            if r.remote.is_some() {
                return Ok(Some(r.id));
            }
            cur = r.parent;
        }
        Ok(None)
    }

    fn mounts_for(&self, r: &Record, lowers: &[PathBuf]) -> Vec<Mount> {
        // Validated when the snapshot was made.
        let Ok(Some(map)) = IdMap::from_labels(&r.labels) else {
            return self.plain_mounts_for(r, lowers, lowers);
        };
        // containerd id-maps an overlay's layers by cloning the mount at their longest common
        // parent directory (not recursively on containerd 2.1): for one layer, name it as
        // `DIR/.` so that the clone is of DIR itself, clip's FUSE mount when DIR is one (a
        // clone of its parent would hold the empty directory under the mount).
        let one: Vec<PathBuf> = lowers.iter().map(|l| l.join(".")).collect();
        let named = if lowers.len() == 1 { &one } else { lowers };
        let mut mounts = self.plain_mounts_for(r, lowers, named);
        for m in &mut mounts {
            m.options.extend(map.options());
        }
        mounts
    }

    /// The mounts of `r` on `lowers`, an overlay's lowerdirs written as `named`.
    fn plain_mounts_for(&self, r: &Record, lowers: &[PathBuf], named: &[PathBuf]) -> Vec<Mount> {
        let fs = self.path(r.id).join("fs");
        let bind = |src: &Path, rw: bool| Mount {
            r#type: "bind".into(),
            source: src.display().to_string(),
            target: String::new(),
            options: vec![if rw { "rw" } else { "ro" }.into(), "rbind".into()],
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                named
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(":")
            )
        };
        match (r.kind, lowers.len()) {
            (Kind::View, 0) => vec![bind(&fs, false)],
            (Kind::View, 1) => vec![bind(&lowers[0], false)],
            (Kind::View, _) => vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec!["index=off".into(), lowerdir()],
            }],
            (_, 0) => vec![bind(&fs, true)],
            _ => vec![Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", self.path(r.id).join("work").display()),
                    format!("upperdir={}", fs.display()),
                    lowerdir(),
                ],
            }],
        }
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument("empty snapshot key".into()));
        }
        let started = std::time::Instant::now();
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
        let idmap = IdMap::from_labels(&labels)?;
        let parent_rec = match parent.as_str() {
            "" => None,
            p => {
                let r = self.meta.must(p)?;
                if r.kind != Kind::Committed {
                    return Err(SnapshotError::FailedPrecondition(format!(
                        "parent {p} is not committed"
                    )));
                }
                Some(r)
            }
        };
        // Every image using the lazy layers below may read them under its trust policy
        // (verified where another repository's index would serve them), before anything is
        // mounted on them.
        if parent_rec.is_some() {
            self.admit(&parent, &labels).await?;
        }
        if kind == Kind::Active {
            if let Some(target) = labels.get(labels::TARGET) {
                if self.meta.get(target)?.is_some() {
                    return Err(SnapshotError::AlreadyExists(target.clone()));
                }
                let stackable = parent_rec.as_ref().is_none_or(|p| p.remote.is_some());
                let found = match stackable {
                    true => self.layers.remote_layer(&labels).await,
                    false => {
                        Fallback::new(
                            "unpacked parent",
                            format!("its parent {parent} was unpacked: a lazy layer stacks only on lazy layers"),
                        )
                        .report(target);
                        None
                    }
                };
                // The chain the layer is committed under must be the one its index's DiffID
                // gives on this parent: an index (or a config) cannot claim another layer's
                // place in the chains other images share.
                let found = found.filter(|(remote, diff_id)| {
                    let expected = chain_id(&parent, diff_id);
                    let ok = expected.as_ref() == Some(target);
                    if !ok {
                        Fallback::new(
                            "chain mismatch",
                            format!(
                                "the index of layer {} ({}) gives another chain ID than containerd asked for",
                                remote.layer, remote.reference
                            ),
                        )
                        .report(target);
                    }
                    ok
                });
                {
                    if let Some((remote, _)) = found {
                        let mut labels = labels.clone();
                        labels.insert(labels::REMOTE.into(), "true".into());
                        let t = meta::now();
                        let rec = Record {
                            id: self.meta.next_id()?,
                            kind: Kind::Committed,
                            parent: parent.clone(),
                            labels,
                            created: t,
                            updated: t,
                            remote: Some(remote),
                            size: 0,
                            inodes: 0,
                        };
                        self.meta.create(target, &rec)?;
                        // Durable before containerd hears of it: a kill -9 right after a pull
                        // must not lose the committed layer (containerd would unpack it again,
                        // from content a lazy pull never downloaded).
                        self.meta.flush().await?;
                        tracing::info!(snapshot = %target, layer = %rec.remote.as_ref().expect("set").layer, "remote snapshot");
                        if let Ok(chain) = remote_chain(&self.meta, target, &rec) {
                            self.mounts.ahead(rec.id, target, chain).await;
                        }
                        if let Some(r) = &rec.remote {
                            self.layers
                                .committed(r, parent.is_empty(), &rec.labels)
                                .await;
                        }
                        // containerd takes AlreadyExists as "the target exists, skip this layer".
                        return Err(SnapshotError::AlreadyExists(target.clone()));
                    }
                }
            }
        }
        let id = self.meta.next_id()?;
        let dir = self.path(id);
        make_snapshot_dirs(&dir).map_err(io_err(dir.display().to_string()))?;
        if let Some((uid, gid)) = idmap.as_ref().and_then(IdMap::root) {
            // The container's root owns its writable layer, as under containerd's overlayfs.
            let fs = dir.join("fs");
            if let Err(e) = std::os::unix::fs::lchown(&fs, Some(uid), Some(gid)) {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(io_err(fs.display().to_string())(e));
            }
        }
        let t = meta::now();
        let rec = Record {
            id,
            kind,
            parent: parent.clone(),
            labels,
            created: t,
            updated: t,
            remote: None,
            size: 0,
            inodes: 0,
        };
        if let Err(e) = self.meta.create(&key, &rec) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        self.meta.flush().await?;
        let lowers = match self.lowerdirs(&parent).await {
            Ok(l) => match idmap.is_some() {
                true => self.check_idmappable(&key, &parent, &l).map(|()| l),
                false => Ok(l),
            },
            Err(e) => Err(e),
        };
        let lowers = match lowers {
            Ok(l) => l,
            Err(e) => {
                let _ = self.meta.remove(&key);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let ms = started.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(%key, ?kind, ms, "created");
        // A hint: the snapshot is made whatever it finds.
        if kind == Kind::Active {
            if let Ok(Some(top)) = self.remote_top(&parent) {
                self.mounts.container_starting(top, &key).await;
            }
        }
        Ok(self.mounts_for(&rec, &lowers))
    }

    /// A user-namespaced container on lazy layers needs their FUSE mount id-mapped by the
    /// kernel. Where it cannot be, the snapshot is refused with what to do: never a root
    /// whose files belong to ids the container does not map.
    fn check_idmappable(
        &self,
        key: &str,
        parent: &str,
        lowers: &[PathBuf],
    ) -> Result<(), SnapshotError> {
        if !self.lazy_below(parent)? {
            return Ok(());
        }
        if lowers.len() > 1 {
            // containerd would clone their common parent without the FUSE mount in it.
            let why = format!(
                "snapshot {key} asks for a user namespace (id-mapped layers) on unpacked \
                 layers stacked over lazy ones, which containerd cannot id-map together; \
                 publish an index for every layer of the image (clip index --push), or run \
                 the pod without a user namespace"
            );
            tracing::error!("{why}");
            return Err(SnapshotError::FailedPrecondition(why));
        }
        if self.mounts.idmappable() == Some(true) {
            return Ok(());
        }
        let why = format!(
            "snapshot {key} asks for a user namespace (id-mapped layers) on lazy layers, and \
             this kernel cannot id-map clip's FUSE mounts (FUSE_ALLOW_IDMAP, Linux 6.12 or \
             later). Run such pods on a newer kernel, or remove \"remap-ids\" from \
             [proxy_plugins.clip] capabilities in containerd's configuration: containerd then \
             copies and chowns the image for each mapping (it reads all of it)"
        );
        tracing::error!("{why}");
        Err(SnapshotError::FailedPrecondition(why))
    }

    /// [`super::layers::Layers::admit`] for the remote snapshots under `parent`; a snapshot
    /// whose layer is replaced gets its new record, durable before anything mounts it.
    async fn admit(
        &self,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let mut chain = Vec::new();
        let mut cur = parent.to_string();
        while !cur.is_empty() {
            let r = self.meta.must(&cur)?;
            let next = r.parent.clone();
            if r.remote.is_some() {
                chain.push((cur, r));
            }
            cur = next;
        }
        if chain.is_empty() {
            return Ok(());
        }
        chain.reverse();
        let rebinds = self.layers.admit(&chain, labels).await?;
        for (name, remote) in rebinds {
            let mut r = self.meta.must(&name)?;
            r.remote = Some(remote);
            r.updated = meta::now();
            self.meta.put(&name, &r)?;
            self.meta.flush().await?;
        }
        Ok(())
    }

    fn matches(filters: &[String], name: &str, r: &Record) -> bool {
        if filters.is_empty() {
            return true;
        }
        // Each filter is a conjunction of `field==value` / `field!=value` / `field` terms;
        // the filters are alternatives.
        filters.iter().any(|f| {
            f.split(',').all(|term| {
                let (field, op, value) = if let Some((a, b)) = term.split_once("==") {
                    (a, "==", b)
                } else if let Some((a, b)) = term.split_once("!=") {
                    (a, "!=", b)
                } else {
                    (term, "", "")
                };
                let field = field.trim();
                let value = value.trim().trim_matches('"');
                let actual: Option<String> = match field {
                    "name" => Some(name.to_string()),
                    "parent" => Some(r.parent.clone()),
                    "kind" => Some(
                        match r.kind {
                            Kind::View => "view",
                            Kind::Active => "active",
                            Kind::Committed => "committed",
                        }
                        .to_string(),
                    ),
                    f => f
                        .strip_prefix("labels.")
                        .and_then(|k| r.labels.get(k.trim_matches('"')).cloned()),
                };
                match op {
                    "==" => actual.as_deref() == Some(value),
                    "!=" => actual.as_deref() != Some(value),
                    _ => actual.is_some(),
                }
            })
        })
    }
}

/// The remote chain topped by snapshot `name` (record `top`), bottom layer first. Remote
/// snapshots only stack on remote snapshots.
pub(super) fn remote_chain(
    meta: &Meta,
    name: &str,
    top: &Record,
) -> Result<Vec<Record>, SnapshotError> {
    let mut chain = vec![top.clone()];
    loop {
        let parent = &chain.last().expect("non-empty").parent;
        if parent.is_empty() {
            break;
        }
        let p = meta.must(parent)?;
        if p.remote.is_none() {
            return Err(SnapshotError::Mount {
                name: name.to_string(),
                reason: "a lazy layer stands on an unpacked one".into(),
            });
        }
        chain.push(p);
    }
    chain.reverse();
    Ok(chain)
}

/// `snapshots/<id>/{fs,work}`. The snapshot directory and `work` are private (0700, under the
/// private `snapshots/`); `fs` is 0755 as under containerd's overlayfs snapshotter: it is the
/// container's root directory when it is an upper or an unpacked base layer, and non-root users
/// in the container must be able to traverse it. Host users cannot reach it (`snapshots/` is
/// 0700).
fn make_snapshot_dirs(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let mut b = std::fs::DirBuilder::new();
    b.mode(0o700).recursive(true);
    b.create(dir.join("work"))?;
    let fs = dir.join("fs");
    b.create(&fs)?;
    std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o755))
}

/// The chain ID of a layer with `diff_id` on the committed snapshot `parent` (named by its own
/// chain ID, as containerd names them); `None` when the parent's name is not a chain ID.
fn chain_id(parent: &str, diff_id: &Digest) -> Option<String> {
    let parent: Option<Digest> = match parent {
        "" => None,
        p => Some(p.parse().ok()?),
    };
    Some(clip_core::image::chain_id(parent.as_ref(), diff_id).to_string())
}

fn info(name: &str, r: &Record) -> Info {
    Info {
        kind: match r.kind {
            Kind::View => ApiKind::View,
            Kind::Active => ApiKind::Active,
            Kind::Committed => ApiKind::Committed,
        },
        name: name.to_string(),
        parent: r.parent.clone(),
        labels: r.labels.clone().into_iter().collect(),
        created_at: meta::time(r.created),
        updated_at: meta::time(r.updated),
    }
}

/// Bytes and inodes under `dir` (not following symlinks, each hard-linked inode once).
fn disk_usage(dir: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut size, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            inodes += 1;
            size += (m.blocks() * 512) as i64;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (size, inodes)
}

#[tonic::async_trait]
impl containerd_snapshots::Snapshotter for ClipSnapshotter {
    type Error = SnapshotError;

    async fn stat(&self, key: String) -> Result<Info, Self::Error> {
        let r = self.meta.must(&key)?;
        Ok(info(&key, &r))
    }

    async fn update(
        &self,
        new: Info,
        fieldpaths: Option<Vec<String>>,
    ) -> Result<Info, Self::Error> {
        let mut r = self.meta.must(&new.name)?;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() {
            r.labels = new.labels.into_iter().collect();
        } else {
            for p in paths {
                if p == "labels" {
                    r.labels = new.labels.clone().into_iter().collect();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match new.labels.get(k) {
                        Some(v) => r.labels.insert(k.to_string(), v.clone()),
                        None => r.labels.remove(k),
                    };
                } else {
                    return Err(SnapshotError::InvalidArgument(format!(
                        "cannot update field {p:?}"
                    )));
                }
            }
        }
        r.updated = meta::now();
        self.meta.put(&new.name, &r)?;
        self.meta.flush().await?;
        Ok(info(&new.name, &r))
    }

    async fn usage(&self, key: String) -> Result<Usage, Self::Error> {
        let r = self.meta.must(&key)?;
        if r.kind == Kind::Active {
            let fs = self.path(r.id).join("fs");
            let (size, inodes) = tokio::task::spawn_blocking(move || disk_usage(&fs))
                .await
                .unwrap_or((0, 0));
            return Ok(Usage { size, inodes });
        }
        Ok(Usage {
            size: r.size,
            inodes: r.inodes,
        })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Self::Error> {
        let r = self.meta.must(&key)?;
        if r.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is committed: it has no mounts"
            )));
        }
        let lowers = self.lowerdirs(&r.parent).await?;
        Ok(self.mounts_for(&r, &lowers))
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Self::Error> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Self::Error> {
        let r = self.meta.must(&key)?;
        if r.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let fs = self.path(r.id).join("fs");
        let (size, inodes) = tokio::task::spawn_blocking(move || disk_usage(&fs))
            .await
            .unwrap_or((0, 0));
        let t = meta::now();
        let mut labels: BTreeMap<String, String> = labels.into_iter().collect();
        if labels.is_empty() {
            labels = r.labels.clone();
        }
        let committed = Record {
            kind: Kind::Committed,
            labels,
            created: t,
            updated: t,
            size,
            inodes,
            ..r
        };
        self.meta.commit(&key, &name, &committed)?;
        self.meta.flush().await?;
        Ok(())
    }

    async fn remove(&self, key: String) -> Result<(), Self::Error> {
        let r = self.meta.must(&key)?;
        if self.meta.has_children(&key)? {
            return Err(SnapshotError::FailedPrecondition(format!(
                "cannot remove snapshot {key}: it has children"
            )));
        }
        let dir = self.path(r.id);
        if r.remote.is_some() || !mounts_under(&dir).is_empty() {
            self.mounts.unmount(r.id, &dir.join("fs")).await;
        }
        self.meta.remove(&key)?;
        self.meta.flush().await?;
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
            .await
            .ok()
            .and_then(Result::err)
            .filter(|e| e.kind() != std::io::ErrorKind::NotFound)
            .map_or(Ok(()), |e| {
                Err(io_err(format!("removing snapshot {key}"))(e))
            })
    }

    /// Removes snapshot directories no record names (left by a crash between steps).
    async fn clear(&self) -> Result<(), Self::Error> {
        let mut ids: std::collections::HashSet<u64> =
            self.meta.list()?.into_iter().map(|(_, r)| r.id).collect();
        match self.meta.unreadable_ids() {
            Some(more) => ids.extend(more),
            None => {
                tracing::warn!(
                    "cleanup skipped: an unreadable snapshot record may name a directory still in use"
                );
                return Ok(());
            }
        }
        let root = self.dir.join("snapshots");
        let rd = std::fs::read_dir(&root).map_err(io_err(root.display().to_string()))?;
        for e in rd.flatten() {
            let orphan = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| !ids.contains(&id));
            if orphan && mounts_under(&e.path()).is_empty() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        Ok(())
    }

    type InfoStream = futures_util::stream::Iter<std::vec::IntoIter<Result<Info, SnapshotError>>>;

    async fn list(
        &self,
        _snapshotter: String,
        filters: Vec<String>,
    ) -> Result<Self::InfoStream, Self::Error> {
        let items: Vec<Result<Info, SnapshotError>> = self
            .meta
            .list()?
            .into_iter()
            .filter(|(n, r)| Self::matches(&filters, n, r))
            .map(|(n, r)| Ok(info(&n, &r)))
            .collect();
        Ok(futures_util::stream::iter(items))
    }
}
