//! The containerd snapshotter (a proxy plugin): containerd's overlayfs semantics for ordinary
//! snapshots, plus *remote* snapshots: committed layers whose content is served lazily from their
//! clip index by one merged FUSE mount per chain of remote layers.
//!
//! Remote handshake: containerd's unpacker calls `Prepare(key, parent)` with the label
//! `containerd.io/snapshot.ref=<chain ID>` and the pull's labels (`containerd.io/snapshot/cri.*`:
//! image reference, manifest digest, layer digest). When the layer's index is in the local store
//! or published next to the image, we commit `<chain ID>` as a remote snapshot ourselves and
//! answer AlreadyExists, so containerd neither downloads nor unpacks the layer. Remote snapshots
//! only stack on remote snapshots (or nothing), so a chain is a run of remote layers at the
//! bottom with ordinary, unpacked layers above; the FUSE mount of the topmost remote snapshot is
//! the lowest lowerdir of every overlay above it.
//!
//! Anything without an index (no artifact, a non-gzip layer, a registry error) falls back to
//! an ordinary snapshot that containerd unpacks into: never a failure for lack of an index.
//!
//! One concern per file: this one holds the types and the construction; [`semantics`] is
//! containerd's snapshotter semantics (the trait impl: Prepare, View, Commit, Remove, Walk,
//! Cleanup, overlay mounts); [`mounts`] is the mounting seam and its FUSE implementation;
//! [`profiles`] startup profiles; [`layers`] layer resolution and trust; [`meta`] the records;
//! [`discover`] label-free discovery. The semantics see mounting and layers only through two
//! traits, so they are unit-tested with fakes (`tests.rs`).

pub mod discover;
pub mod idmap;
pub mod layers;
pub mod meta;
pub mod mounts;
pub mod profiles;
pub mod program;
mod semantics;
#[cfg(test)]
mod tests;

use crate::os::{is_mounted, lazy_unmount, mounts_under};
use crate::trust::TrustPolicy;
use clip_core::reader::ReadPath;
use clip_core::registry::Client;
use clip_core::store::Store;
use containerd_snapshots::tonic;
use layers::{Layers, RegistryLayers};
use meta::{Meta, Record};
use mounts::{FuseMounts, LazyMounts};
use profiles::Profiles;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0}: not found")]
    NotFound(String),
    #[error("snapshot {0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("snapshot metadata: {0}")]
    Db(#[from] sled::Error),
    #[error("snapshot metadata record {name}: {reason}")]
    Corrupt { name: String, reason: String },
    #[error("{context}: {error}")]
    Io {
        context: String,
        error: std::io::Error,
    },
    #[error("mounting the lazy layers of {name}: {reason}")]
    Mount { name: String, reason: String },
}

impl From<SnapshotError> for tonic::Status {
    fn from(e: SnapshotError) -> Self {
        let msg = e.to_string();
        match e {
            SnapshotError::NotFound(_) => tonic::Status::not_found(msg),
            SnapshotError::AlreadyExists(_) => tonic::Status::already_exists(msg),
            SnapshotError::FailedPrecondition(_) => tonic::Status::failed_precondition(msg),
            SnapshotError::InvalidArgument(_) => tonic::Status::invalid_argument(msg),
            _ => tonic::Status::internal(msg),
        }
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let context = context.into();
    move |error| SnapshotError::Io { context, error }
}

/// How the snapshotter serves lazy layers.
#[derive(Clone, Debug)]
pub struct Options {
    /// Index layers on demand when an image has no published index (streams each layer once).
    pub index_on_demand: bool,
    /// How lazy layers are mounted: FUSE threads, passthrough, and what opening a file
    /// fetches on a guess ([`clip_fuse::Guesses`]).
    pub fuse: clip_fuse::MountOptions,
    /// Hand FUSE connections to a keeper process so lazy mounts (and the containers reading
    /// them) survive a daemon restart.
    pub handover: bool,
    /// How long after its first read a lazy mount of an image without a startup profile records
    /// one (zero: never record).
    pub profile_window: std::time::Duration,
    /// Push recorded profiles to the image's registry (needs push access; otherwise they stay
    /// on this node).
    pub publish_profiles: bool,
    /// Which indexes to believe, per registry / repository.
    pub trust: TrustPolicy,
    /// containerd's socket, to find the layer of a Prepare that carries no pull labels (plain
    /// `ctr pull`, nerdctl, the CRI without snapshot annotations, the transfer service).
    pub containerd: Option<PathBuf>,
    /// containerd namespaces whose pulls fetch every lazy layer whole before the pull ends
    /// (eager mode for batch nodes; `clip pull --full` asks for it per pull).
    pub eager_namespaces: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            handover: true,
            index_on_demand: false,
            // Containers need setuid binaries and device nodes, as under overlayfs, and their
            // non-root users need the mount.
            fuse: clip_fuse::MountOptions {
                allow_other: true,
                suid_dev: true,
                ..clip_fuse::MountOptions::default()
            },
            profile_window: std::time::Duration::from_secs(20),
            publish_profiles: false,
            trust: TrustPolicy::default(),
            containerd: Some(PathBuf::from(crate::containerd::DEFAULT_ADDRESS)),
            eager_namespaces: Vec::new(),
        }
    }
}

/// containerd's snapshotter with lazy layers.
pub struct ClipSnapshotter {
    dir: PathBuf,
    meta: Meta,
    mounts: Arc<dyn LazyMounts>,
    layers: Arc<dyn Layers>,
}

impl ClipSnapshotter {
    /// The snapshot records (for collection: which layers snapshots are).
    pub(crate) fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The snapshotter of this node: its state under `dir` (snapshot directories) and the
    /// store's sled database (records), lazy layers from the registry through `reads`, mounted
    /// by FUSE. Mounts a previous daemon left with the keeper are served again, stale ones
    /// detached, and the lazy chains that ordinary snapshots stand on remounted. The mounts are
    /// returned too: the daemon shuts them down after the gRPC server stops.
    pub async fn open_on_node(
        dir: &Path,
        store: Arc<Store>,
        client: Client,
        reads: ReadPath,
        opts: Options,
    ) -> Result<(Arc<Self>, Arc<FuseMounts>), SnapshotError> {
        let snapshots = dir.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io_err(snapshots.display().to_string()))?;
        let meta = Meta::open(store.db().clone())?;
        let profiles = Profiles::new(
            store.clone(),
            client.clone(),
            reads.clone(),
            opts.profile_window,
            opts.publish_profiles,
        );
        let (fuse, held) = FuseMounts::open(
            &dir.join("fuse-keeper.sock"),
            opts.handover,
            store.clone(),
            client.clone(),
            reads.clone(),
            opts.fuse.clone(),
            profiles.clone(),
        )
        .await;
        if let Some(address) = &opts.containerd {
            fuse.watch_containers(address);
        }
        let records: HashMap<u64, (String, Record)> = meta
            .list()?
            .into_iter()
            .map(|(n, r)| (r.id, (n, r)))
            .collect();
        for h in held {
            let fs_dir = snapshot_path(dir, h.id).join("fs");
            let kept = records
                .get(&h.id)
                .filter(|(_, r)| r.remote.is_some() && is_mounted(&fs_dir));
            let Some((name, top)) = kept else {
                fuse.forget(h.id);
                continue;
            };
            let resumed = match semantics::remote_chain(&meta, name, top) {
                Ok(chain) => fuse.resume(name, &chain, &fs_dir, h).await,
                Err(e) => Err(e),
            };
            if let Err(e) = resumed {
                tracing::warn!(snapshot = %name, "resuming its lazy mount failed, remounting: {e}");
                lazy_unmount(&fs_dir);
            }
        }
        let layers = Arc::new(RegistryLayers::new(
            store,
            client,
            reads,
            opts.trust,
            opts.index_on_demand,
            opts.containerd.as_deref(),
            profiles,
            opts.eager_namespaces,
        ));
        let sn = Self::open(dir, meta, fuse.clone(), layers).await?;
        Ok((sn, fuse))
    }

    /// The snapshotter over `meta`'s records and the snapshot directories under `dir`, its
    /// lazy layers found by `layers` and mounted by `mounts`. Mounts under `dir` that `mounts`
    /// does not serve are stale (a killed daemon's) and detached; the lazy chains that active
    /// snapshots stand on are mounted again.
    pub async fn open(
        dir: &Path,
        meta: Meta,
        mounts: Arc<dyn LazyMounts>,
        layers: Arc<dyn Layers>,
    ) -> Result<Arc<Self>, SnapshotError> {
        let snapshots = dir.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io_err(snapshots.display().to_string()))?;
        for stale in mounts_under(&snapshots) {
            let id = stale
                .strip_prefix(&snapshots)
                .ok()
                .and_then(|p| p.components().next())
                .and_then(|c| c.as_os_str().to_str()?.parse::<u64>().ok());
            let served = match id {
                Some(id) => mounts.check(id).await,
                None => false,
            };
            if !served {
                tracing::info!(path = %stale.display(), "detaching a mount left by a previous run");
                lazy_unmount(&stale);
            }
        }
        let sn = Arc::new(ClipSnapshotter {
            dir: dir.to_path_buf(),
            meta,
            mounts,
            layers,
        });
        sn.restore().await;
        Ok(sn)
    }

    fn path(&self, id: u64) -> PathBuf {
        snapshot_path(&self.dir, id)
    }

    /// Makes the records durable (daemon shutdown; the mounts are the daemon's to stop).
    pub async fn shutdown(&self) {
        let _ = self.meta.flush().await;
    }
}

/// `dir/snapshots/<id>`.
fn snapshot_path(dir: &Path, id: u64) -> PathBuf {
    dir.join("snapshots").join(id.to_string())
}
