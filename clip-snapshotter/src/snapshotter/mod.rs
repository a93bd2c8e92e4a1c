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

pub mod discover;
pub mod meta;
pub mod trust;
pub use trust::{Trust, TrustPolicy};

use crate::os::{is_mounted, lazy_unmount, mounts_under};
use clip_core::cache::remote::RemoteTier;
use clip_core::digest::Digest;
use clip_core::image::{self, ImageError};
use clip_core::index::ImageView;
use clip_core::profile::{Profile, Recorder};
use clip_core::reader::{LayerReader, ReadPath};
use clip_core::reference::Reference;
use clip_core::registry::{Client, ResolvedImage};
use clip_core::store::Store;
use clip_fuse::handover::{Held, Keeper};
use containerd_snapshots::{api::types::Mount, tonic, Info, Kind as ApiKind, Usage};
use meta::{Kind, Meta, Record, Remote};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Set on the snapshots this snapshotter serves lazily.
pub const LABEL_REMOTE: &str = "containerd.io/snapshot/clip.remote";

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
    /// FUSE worker threads per mount.
    pub fuse_threads: usize,
    /// Smallest file served by FUSE passthrough once local.
    pub passthrough_min_size: u64,
    /// Largest file requested whole when opened cold (0: off).
    pub prefetch_on_open: u64,
    /// Bytes of a directory's files fetched on a guess after two cold opens in it (one, for a
    /// package's `__init__`) (0: off).
    pub speculate_siblings: u64,
    /// Opening a program or shared library starts fetching the libraries it needs; a mount no
    /// startup profile covers starts fetching the loader, the C library and the user databases.
    pub prefetch_libraries: bool,
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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            handover: true,
            index_on_demand: false,
            fuse_threads: clip_fuse::MountOptions::default().threads,
            passthrough_min_size: clip_fuse::DEFAULT_PASSTHROUGH_MIN_SIZE,
            prefetch_on_open: clip_fuse::DEFAULT_PREFETCH_ON_OPEN,
            speculate_siblings: clip_fuse::DEFAULT_SPECULATE_SIBLINGS,
            prefetch_libraries: true,
            profile_window: std::time::Duration::from_secs(20),
            publish_profiles: false,
            trust: TrustPolicy::default(),
            containerd: Some(PathBuf::from(DEFAULT_CONTAINERD)),
        }
    }
}

/// containerd's default socket.
pub const DEFAULT_CONTAINERD: &str = "/run/containerd/containerd.sock";

/// A live merged FUSE mount of a remote chain.
struct Mounted {
    session: clip_fuse::BackgroundSession,
}

pub struct ClipSnapshotter {
    dir: PathBuf,
    meta: Meta,
    store: Arc<Store>,
    client: Client,
    reads: ReadPath,
    opts: Options,
    rt: tokio::runtime::Handle,
    /// Remote snapshot id -> its chain's FUSE mount. A tokio mutex: mounting is serialised.
    mounts: tokio::sync::Mutex<HashMap<u64, Mounted>>,
    /// Holds the FUSE connections across restarts (with `Options::handover`).
    keeper: Option<Arc<Keeper>>,
    /// Startup profile lookups by image manifest (started at Prepare, awaited at mount).
    profiles: Arc<ProfileLookups>,
    /// Finds the layer of a Prepare without pull labels in containerd's content store.
    discovery: Option<discover::Discovery>,
    /// Checks a candidate registry authority quickly (a short deadline, no long retries).
    probe: Client,
    /// Pinned images whose manifest a probe fetched lately: the other layers of the same pull
    /// need not probe again.
    probed: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// How long a successful probe of an authority stands for the rest of an image's layers.
const PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

type ProfileLookups =
    std::sync::Mutex<HashMap<Digest, Arc<tokio::sync::OnceCell<Option<Profile>>>>>;

/// The startup profile of image `manifest` (pinned `reference`): this node's, else the one
/// published next to the image. Looked up once per manifest (a lookup started by Prepare is
/// awaited, not repeated), waited for at most 5 s.
async fn lookup_profile(
    lookups: &ProfileLookups,
    store: &Arc<Store>,
    shared: Option<&RemoteTier>,
    client: &Client,
    manifest: Digest,
    reference: &str,
) -> Option<Profile> {
    let cell = lookups
        .lock()
        .expect("profiles lock")
        .entry(manifest)
        .or_default()
        .clone();
    let lookup = cell.get_or_init(|| async {
        if let Some(p) = store.get_profile(&manifest) {
            return Some(p);
        }
        if let Some(raw) = match shared {
            Some(s) => {
                s.get_doc(&profile_key(&manifest), clip_core::profile::MAX_ENCODED)
                    .await
            }
            None => None,
        } {
            match Profile::decode(&raw) {
                Ok(p) if p.manifest == manifest => {
                    tracing::info!(image = %reference, "found a startup profile in the shared tier");
                    let _ = store.put_profile(&p).await;
                    return Some(p);
                }
                Ok(_) => tracing::warn!(image = %reference, "the shared tier's profile is for another manifest"),
                Err(e) => tracing::warn!(image = %reference, "ignoring the shared tier's profile: {e}"),
            }
        }
        let r: Reference = reference.parse().ok()?;
        let image = client.resolve(&r).await.ok()?;
        match clip_core::artifact::fetch_profile(client, &image).await {
            Ok(Some(p)) => {
                tracing::info!(image = %reference, "found a published startup profile");
                let _ = store.put_profile(&p).await;
                Some(p)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(image = %reference, "ignoring its startup profile: {e}");
                None
            }
        }
    });
    tokio::time::timeout(std::time::Duration::from_secs(5), lookup)
        .await
        .ok()
        .and_then(|p| p.clone())
}

/// Where the shared (Redis) tier keeps an image's startup profile.
fn profile_key(manifest: &Digest) -> String {
    format!("clip:profile:{}", manifest.hex())
}

/// The manifest digest of a remote layer's pinned reference.
fn manifest_of(remote: &Remote) -> Option<Digest> {
    remote.reference.parse::<Reference>().ok()?.digest
}

/// A reader of `layer` from its stored index (with the index's windows when this node has
/// them), fetching from `reference`'s repository.
fn stored_reader(
    reads: &ReadPath,
    store: &Store,
    client: &Client,
    reference: &Reference,
    layer: &Digest,
) -> Result<Option<Arc<LayerReader>>, clip_core::store::StoreError> {
    let Some((ix, _)) = store.get_layer(layer)? else {
        return Ok(None);
    };
    let windows = store.windows_for_reads(&ix.windows);
    Ok(Some(reads.reader(client, reference, Arc::new(ix), windows)))
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
    if parent.is_empty() {
        return Some(diff_id.to_string());
    }
    let p: Digest = parent.parse().ok()?;
    Some(Digest::of(format!("{p} {diff_id}").as_bytes()).to_string())
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

/// The FUSE keeper (started if none runs) and the connections a previous daemon left with it.
/// Without one, lazy mounts work but do not outlive this daemon.
async fn connect_keeper(sock: &Path) -> (Option<Arc<Keeper>>, Vec<Held>) {
    let sock = sock.to_path_buf();
    let got = tokio::task::spawn_blocking(move || {
        Keeper::connect_or_start(&sock, &std::env::current_exe()?)
    })
    .await
    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    match got {
        Ok((k, held)) => (Some(k), held),
        Err(e) => {
            tracing::warn!("no FUSE keeper, lazy mounts will not survive a restart: {e}");
            (None, Vec::new())
        }
    }
}

impl ClipSnapshotter {
    /// Opens the snapshotter's state under `dir` (snapshot directories) and the store's sled
    /// database (metadata); detaches stale mounts a killed daemon left behind and remounts the
    /// lazy chains that ordinary snapshots stand on.
    pub async fn open(
        dir: &Path,
        store: Arc<Store>,
        client: Client,
        reads: ReadPath,
        opts: Options,
    ) -> Result<Arc<Self>, SnapshotError> {
        let snapshots = dir.join("snapshots");
        std::fs::create_dir_all(&snapshots).map_err(io_err(snapshots.display().to_string()))?;
        let meta = Meta::open(store.db().clone())?;
        let (keeper, held) = if opts.handover {
            connect_keeper(&dir.join("fuse-keeper.sock")).await
        } else {
            Keeper::release_all(&dir.join("fuse-keeper.sock"));
            (None, Vec::new())
        };
        let records: HashMap<u64, (String, Record)> = meta
            .list()?
            .into_iter()
            .map(|(n, r)| (r.id, (n, r)))
            .collect();
        let mut resumable = Vec::new();
        for h in held {
            let fs_dir = snapshots.join(h.id.to_string()).join("fs");
            let live =
                records.get(&h.id).is_some_and(|(_, r)| r.remote.is_some()) && is_mounted(&fs_dir);
            if live {
                resumable.push(h);
            } else if let Some(k) = &keeper {
                k.drop_connection(h.id);
            }
        }
        for stale in mounts_under(&snapshots) {
            let kept = resumable
                .iter()
                .any(|h| stale == snapshots.join(h.id.to_string()).join("fs"));
            if !kept {
                tracing::info!(path = %stale.display(), "detaching a mount left by a previous run");
                lazy_unmount(&stale);
            }
        }
        let discovery = opts.containerd.as_deref().map(|a| {
            let c = client.config();
            discover::Discovery::new(a, c.hosts_dir.as_deref(), &c.insecure)
        });
        let probe = Client::new(clip_core::registry::RegistryConfig {
            deadline: std::time::Duration::from_secs(10),
            ..client.config().clone()
        });
        let sn = Arc::new(ClipSnapshotter {
            discovery,
            probe,
            dir: dir.to_path_buf(),
            meta,
            store,
            client,
            reads,
            opts,
            rt: tokio::runtime::Handle::current(),
            mounts: tokio::sync::Mutex::new(HashMap::new()),
            keeper,
            profiles: Arc::new(std::sync::Mutex::new(HashMap::new())),
            probed: std::sync::Mutex::new(HashMap::new()),
        });
        for h in resumable {
            let (name, r) = records[&h.id].clone();
            if let Err(e) = sn.resume(&name, &r, h).await {
                tracing::warn!(snapshot = %name, "resuming its lazy mount failed, remounting: {e}");
                lazy_unmount(&sn.path(r.id).join("fs"));
            }
        }
        sn.restore().await;
        Ok(sn)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join("snapshots").join(id.to_string())
    }

    /// Remounts every remote chain an active or view snapshot stands on.
    async fn restore(&self) {
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

    /// The merged FUSE mount of the remote chain topped by `name`, mounted if it is not.
    async fn ensure_mounted(&self, name: &str, top: &Record) -> Result<PathBuf, SnapshotError> {
        let dir = self.path(top.id).join("fs");
        let mut mounts = self.mounts.lock().await;
        if mounts.contains_key(&top.id) {
            return Ok(dir);
        }
        let fail = |reason: String| SnapshotError::Mount {
            name: name.to_string(),
            reason,
        };
        let remote = top
            .remote
            .as_ref()
            .ok_or_else(|| fail("not a remote snapshot".into()))?;
        let manifest = manifest_of(remote);
        let profile = match manifest {
            Some(m) => {
                lookup_profile(
                    &self.profiles,
                    &self.store,
                    self.reads.shared.as_deref(),
                    &self.client,
                    m,
                    &remote.reference,
                )
                .await
            }
            None => None,
        };
        let record = profile.is_none() && !self.opts.profile_window.is_zero();
        // With a profile, the readers guess (locality, read-ahead, whole files on open) only
        // where the profile has no knowledge: see LayerReader.
        let (fs, opts, readers) = self.chain_fs(name, top, record)?;
        if profile.is_none() && opts.prefetch_libraries {
            fs.prefetch_startup_files(opts.prefetch_on_open);
        }
        match (&profile, manifest) {
            (Some(p), _) => self.replay_profile(name, p, &readers),
            (None, Some(m)) if record => self.record_profile(name, m, &remote.reference, &readers),
            _ => {}
        }
        std::fs::create_dir_all(&dir).map_err(io_err(dir.display().to_string()))?;
        if !mounts_under(&dir).is_empty() {
            lazy_unmount(&dir);
        }
        let (d, rt) = (dir.clone(), self.rt.clone());
        let handover = self
            .keeper
            .clone()
            .map(|keeper| clip_fuse::Handover { keeper, id: top.id });
        let session =
            tokio::task::spawn_blocking(move || clip_fuse::mount_with(fs, &d, rt, &opts, handover))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(e.to_string()))?;
        tracing::info!(snapshot = name, dir = %dir.display(), "mounted lazy layers");
        mounts.insert(top.id, Mounted { session });
        Ok(dir)
    }

    /// Serves again the mount of the remote chain topped by `name` that a previous daemon left
    /// with the keeper (running containers have been waiting on it).
    async fn resume(&self, name: &str, top: &Record, held: Held) -> Result<(), SnapshotError> {
        let fail = |reason: String| SnapshotError::Mount {
            name: name.to_string(),
            reason,
        };
        let keeper = self
            .keeper
            .clone()
            .ok_or_else(|| fail("no keeper".into()))?;
        let (fs, opts, _) = self.chain_fs(name, top, false)?;
        let (rt, id, opens) = (self.rt.clone(), top.id, held.opens.len());
        let handover = clip_fuse::Handover { keeper, id };
        let session =
            tokio::task::spawn_blocking(move || clip_fuse::resume(fs, held, rt, &opts, handover))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(e.to_string()))?;
        tracing::info!(
            snapshot = name,
            open_files = opens,
            "resumed a lazy mount kept across the restart"
        );
        self.mounts.lock().await.insert(id, Mounted { session });
        Ok(())
    }

    /// The filesystem of the remote chain topped by `top`, and how to mount it.
    /// With `record`, every layer's reads are noted for a startup profile. Also returns the
    /// readers, bottom layer first.
    fn chain_fs(
        &self,
        name: &str,
        top: &Record,
        record: bool,
    ) -> Result<
        (
            clip_fuse::ClipFs,
            clip_fuse::MountOptions,
            Vec<Arc<LayerReader>>,
        ),
        SnapshotError,
    > {
        let fail = |reason: String| SnapshotError::Mount {
            name: name.to_string(),
            reason,
        };
        // The chain, bottom layer first.
        let mut chain = vec![top.clone()];
        while !chain.last().expect("non-empty").parent.is_empty() {
            let p = self.meta.must(&chain.last().expect("non-empty").parent)?;
            if p.remote.is_none() {
                return Err(fail("a lazy layer stands on an unpacked one".into()));
            }
            chain.push(p);
        }
        chain.reverse();
        let mut indexes = Vec::new();
        let mut readers = Vec::new();
        for r in &chain {
            let remote = r.remote.as_ref().expect("checked");
            let reference: Reference =
                remote.reference.parse().map_err(|e| fail(format!("{e}")))?;
            let reader = stored_reader(
                &self.reads,
                &self.store,
                &self.client,
                &reference,
                &remote.layer,
            )
            .map_err(|e| fail(e.to_string()))?
            .ok_or_else(|| fail(format!("no index for layer {} in the store", remote.layer)))?;
            indexes.push(reader.index().clone());
            readers.push(reader);
        }
        let view = ImageView::build(indexes).map_err(|e| fail(e.to_string()))?;
        if record {
            let window = self.opts.profile_window;
            readers = readers
                .into_iter()
                .map(|r| r.recording(Arc::new(Recorder::new(window))))
                .collect();
        }
        let mut fs =
            clip_fuse::ClipFs::new(&view, readers.clone()).map_err(|e| fail(e.to_string()))?;
        if let Some(files) = &self.reads.files {
            fs = fs.with_passthrough(files.clone(), self.opts.passthrough_min_size);
        }
        let opts = clip_fuse::MountOptions {
            allow_other: true,
            suid_dev: true,
            threads: self.opts.fuse_threads,
            fsname: format!("clip:{name}"),
            passthrough: self.reads.files.is_some(),
            prefetch_on_open: self.opts.prefetch_on_open,
            speculate_siblings: self.opts.speculate_siblings,
            prefetch_libraries: self.opts.prefetch_libraries,
        };
        Ok((fs, opts, readers))
    }

    /// Starts looking up the startup profile of image `pinned` (if no lookup has started).
    fn start_profile_lookup(&self, pinned: &Reference) {
        let Some(manifest) = pinned.digest else {
            return;
        };
        if self
            .profiles
            .lock()
            .expect("profiles lock")
            .contains_key(&manifest)
        {
            return;
        }
        tokio::spawn(self.profile_lookup(manifest, pinned.to_string()));
    }

    /// [`lookup_profile`] of image `manifest` (pinned `reference`) as a task of its own.
    fn profile_lookup(
        &self,
        manifest: Digest,
        reference: String,
    ) -> impl std::future::Future<Output = Option<Profile>> + Send + 'static {
        let (lookups, store, client, reads) = (
            self.profiles.clone(),
            self.store.clone(),
            self.client.clone(),
            self.reads.clone(),
        );
        async move {
            lookup_profile(
                &lookups,
                &store,
                reads.shared.as_deref(),
                &client,
                manifest,
                &reference,
            )
            .await
        }
    }

    /// Starts the startup-profile lookup of the image a remote layer belongs to (or joins the
    /// one started with its index) and prefetches what it lists, so that the mount finds it done.
    fn lookup_profile_soon(&self, remote: &Remote) {
        let Some(manifest) = manifest_of(remote) else {
            return;
        };
        let (store, client, reads) = (self.store.clone(), self.client.clone(), self.reads.clone());
        let reference = remote.reference.clone();
        let lookup = self.profile_lookup(manifest, reference.clone());
        tokio::spawn(async move {
            let profile = lookup.await;
            // Prefetch at pull time: the transfer overlaps containerd's container setup. The
            // mount's readers share these readers' fetchers (one flight per span).
            let (Some(profile), Ok(r)) = (profile, reference.parse::<Reference>()) else {
                return;
            };
            let mut layers = 0;
            for lp in &profile.layers {
                let Ok(Some(reader)) = stored_reader(&reads, &store, &client, &r, &lp.layer) else {
                    continue;
                };
                let ranges = lp.ranges.clone();
                layers += 1;
                tokio::spawn(async move {
                    reader.prefetch_ranges(&ranges).await;
                });
            }
            tracing::info!(image = %reference, layers, "prefetching its startup profile at pull time");
        });
    }

    /// Prefetches what `profile` lists for the chain's layers, in the background.
    fn replay_profile(&self, name: &str, profile: &Profile, readers: &[Arc<LayerReader>]) {
        let mut layers = 0;
        for r in readers {
            let Some(lp) = profile.layer(&r.index().layer) else {
                continue;
            };
            layers += 1;
            let (r, ranges) = (r.clone(), lp.ranges.clone());
            tokio::spawn(async move {
                r.prefetch_ranges(&ranges).await;
            });
        }
        tracing::info!(snapshot = name, layers, "prefetching a startup profile");
    }

    /// Collects what `readers` read in their first `profile_window` into this node's profile
    /// of `manifest` (and the registry's, when publishing).
    fn record_profile(
        &self,
        name: &str,
        manifest: Digest,
        reference: &str,
        readers: &[Arc<LayerReader>],
    ) {
        let recorders: Vec<(Digest, Arc<Recorder>)> = readers
            .iter()
            .filter_map(|r| Some((r.index().layer, r.recorder()?.clone())))
            .collect();
        let (store, client, publish) = (
            self.store.clone(),
            self.client.clone(),
            self.opts.publish_profiles,
        );
        let shared = self.reads.shared.clone();
        let window = self.opts.profile_window;
        let (name, reference) = (name.to_string(), reference.to_string());
        tracing::info!(snapshot = %name, "recording a startup profile");
        let cell = self
            .profiles
            .lock()
            .expect("profiles lock")
            .get(&manifest)
            .cloned();
        tokio::spawn(async move {
            // The window starts at each layer's first read; wait until every layer that was
            // read has closed (bounded: layers never read are not waited for).
            tokio::time::sleep(window).await;
            let deadline = tokio::time::Instant::now() + window;
            while recorders.iter().any(|(_, r)| r.started() && !r.done())
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            let mut p = Profile::new(manifest);
            for (layer, r) in &recorders {
                let ranges = r.ranges();
                if !ranges.is_empty() {
                    p.layers.push(clip_core::profile::LayerProfile {
                        layer: *layer,
                        ranges,
                    });
                }
            }
            if p.layers.is_empty() {
                return;
            }
            let mut merged = store
                .get_profile(&manifest)
                .unwrap_or_else(|| Profile::new(manifest));
            merged.merge(&p);
            if let Err(e) = store.put_profile(&merged).await {
                tracing::warn!(snapshot = %name, "storing the startup profile: {e}");
                return;
            }
            tracing::info!(snapshot = %name, layers = merged.layers.len(), "recorded a startup profile");
            if let Some(s) = &shared {
                s.put_doc(&profile_key(&manifest), &merged.encode()).await;
            }
            if let Some(c) = cell {
                let _ = c.set(Some(merged.clone()));
            }
            if publish {
                let Ok(r) = reference.parse::<Reference>() else {
                    return;
                };
                match client.resolve(&r).await {
                    Ok(img) => {
                        match clip_core::artifact::push_profile(&client, &img, &merged).await {
                            Ok(d) => {
                                tracing::info!(image = %r, artifact = %d, "published the startup profile")
                            }
                            Err(e) => {
                                tracing::warn!(image = %r, "publishing the startup profile: {e}")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(image = %r, "publishing the startup profile: {e}"),
                }
            }
        });
    }

    fn mounts_for(&self, r: &Record, lowers: &[PathBuf]) -> Vec<Mount> {
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
                lowers
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

    /// The layer behind a Prepare's labels, if it can be served lazily under the image's trust
    /// policy, with the DiffID its index states.
    async fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Option<(Remote, Digest)> {
        if !labels.contains_key(LABEL_LAYER) {
            return self.discovered_layer(labels.get(LABEL_TARGET)?).await;
        }
        let layer: Digest = labels.get(LABEL_LAYER)?.parse().ok()?;
        let manifest: Digest = labels.get(LABEL_MANIFEST)?.parse().ok()?;
        let image_ref: Reference = labels.get(LABEL_IMAGE_REF)?.parse().ok()?;
        self.serve_layer(layer, image_ref.with_digest(manifest))
            .await
    }

    /// A Prepare with only the chain ID: the layer and image found in containerd's content
    /// store, the registry authority checked by fetching the pinned manifest from it.
    async fn discovered_layer(&self, target: &str) -> Option<(Remote, Digest)> {
        let discovery = self.discovery.as_ref()?;
        let chain: Digest = target.parse().ok()?;
        let hits = match discovery.find(&chain).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(snapshot = %target, "no pull labels and containerd's content store is out of reach, unpacking normally: {e}");
                return None;
            }
        };
        if hits.is_empty() {
            tracing::info!(snapshot = %target, "no pull labels and no image in containerd gives this chain: unpacking normally");
        }
        // A chain shared by several images: the newest few are tried.
        for hit in hits.iter().take(3) {
            for (host, repo) in &hit.sources {
                for authority in discovery.authorities(host, repo).await {
                    let Ok(pinned) =
                        format!("{authority}/{repo}@{}", hit.manifest).parse::<Reference>()
                    else {
                        continue;
                    };
                    if !self.probe_ok(&pinned, &hit.manifest).await {
                        continue;
                    }
                    discovery.served(host, repo, &authority).await;
                    tracing::info!(snapshot = %target, image = %pinned, namespace = %hit.namespace, layer = %hit.layer, "no pull labels: found the layer in containerd's content store");
                    return self.serve_layer(hit.layer, pinned).await;
                }
            }
        }
        None
    }

    /// Whether `pinned`'s authority serves the image: its manifest fetched (or fetched for
    /// another layer of the same image within [`PROBE_TTL`]).
    async fn probe_ok(&self, pinned: &Reference, manifest: &Digest) -> bool {
        let key = pinned.to_string();
        if self
            .probed
            .lock()
            .expect("probed lock")
            .get(&key)
            .is_some_and(|at| at.elapsed() < PROBE_TTL)
        {
            return true;
        }
        if let Err(e) = self.probe.get_manifest(pinned, &manifest.to_string()).await {
            tracing::debug!(image = %pinned, "not served from here: {e}");
            return false;
        }
        let mut probed = self.probed.lock().expect("probed lock");
        if probed.len() >= 4096 {
            probed.retain(|_, at| at.elapsed() < PROBE_TTL);
        }
        probed.insert(key, std::time::Instant::now());
        true
    }

    /// `layer` of image `pinned`, if it can be served lazily under the image's trust policy,
    /// with the DiffID its index states.
    async fn serve_layer(&self, layer: Digest, pinned: Reference) -> Option<(Remote, Digest)> {
        let remote = Remote {
            layer,
            reference: pinned.to_string(),
        };
        let trust = self.opts.trust.for_image(&pinned);
        if let Some(d) = self.stored_diff_id(trust, &layer) {
            return Some((remote, d));
        }
        self.resolve_locally(&pinned).await;
        let image = match self.client.resolve(&pinned).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(image = %pinned, "cannot resolve the image, unpacking normally: {e}");
                return None;
            }
        };
        if !image
            .layers
            .iter()
            .any(|d| d.digest == layer && d.is_gzip())
        {
            return None;
        }
        // The image's startup profile is looked up alongside its index (one referrers listing
        // serves both, and the two artifacts are fetched at once): the mount finds it done.
        self.start_profile_lookup(&pinned);
        let loaded = match trust {
            Trust::Published => self.load_published(&pinned, &image).await,
            Trust::Signed => self.load_signed(&pinned, &image).await,
            // Never a published index: the node indexes the image from its own bytes. A layer
            // whose bytes do not match the image's claims fails here, and containerd's own
            // unpack refuses it too.
            Trust::Local => {
                tracing::info!(image = %pinned, "trust = local: indexing on this node");
                self.index_here(&pinned, &image).await
            }
        };
        if !loaded {
            return None;
        }
        self.stored_diff_id(trust, &layer).map(|d| (remote, d))
    }

    /// Image `pinned` from containerd's content store, where the pull put its manifest and
    /// config: two registry round trips fewer before the index lookup. Anything missing or
    /// wrong there leaves the resolve to the registry.
    async fn resolve_locally(&self, pinned: &Reference) {
        let (Some(discovery), Some(digest)) = (&self.discovery, pinned.digest) else {
            return;
        };
        if self.client.is_resolved(pinned) {
            return;
        }
        let Some((manifest, config)) = discovery.image_documents(&digest).await else {
            return;
        };
        if let Err(e) = self
            .client
            .resolve_from(pinned, manifest.into(), config.into())
        {
            tracing::debug!(image = %pinned, "containerd's copy of the image documents is unusable: {e}");
        }
    }

    /// The DiffID of the stored index of `layer` that `trust` accepts: any (`published`), one
    /// this node built (`local`), or one built here or signed by a trusted key (`signed`).
    fn stored_diff_id(&self, trust: Trust, layer: &Digest) -> Option<Digest> {
        let found = match trust {
            Trust::Published => self.store.get_layer(layer),
            Trust::Local => self.store.get_verified_layer(layer),
            Trust::Signed => self.store.get_signed_layer(layer),
        };
        found.ok().flatten().map(|(ix, _)| ix.diff_id)
    }

    /// Loads the image's published index; without one, indexes it here with `index_on_demand`.
    async fn load_published(&self, pinned: &Reference, image: &ResolvedImage) -> bool {
        match image::load_indexes(&self.client, &self.store, image).await {
            Ok(_) => true,
            Err(ImageError::NoIndex { .. }) if self.opts.index_on_demand => {
                tracing::info!(image = %pinned, "no published index: indexing on demand");
                self.index_here(pinned, image).await
            }
            Err(ImageError::NoIndex { .. }) => {
                tracing::info!(image = %pinned, "no index: containerd unpacks it");
                false
            }
            Err(e) => {
                tracing::warn!(image = %pinned, "loading its index failed, unpacking normally: {e}");
                false
            }
        }
    }

    /// Loads an index signed by a trusted key; without one, the image is unpacked normally, or
    /// indexed here with `index_on_demand`.
    async fn load_signed(&self, pinned: &Reference, image: &ResolvedImage) -> bool {
        let keys = &self.opts.trust.keys;
        let Err(e) = image::load_signed_indexes(&self.client, &self.store, image, keys).await
        else {
            return true;
        };
        if !self.opts.index_on_demand {
            tracing::warn!(image = %pinned, "trust = signed: {e}; unpacking normally");
            return false;
        }
        tracing::info!(image = %pinned, "trust = signed: {e}; indexing on this node");
        self.index_here(pinned, image).await
    }

    /// [`Self::index_now`], a failure reported: the image is then unpacked normally.
    async fn index_here(&self, pinned: &Reference, image: &ResolvedImage) -> bool {
        match self.index_now(image).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(image = %pinned, "indexing on this node failed, unpacking normally: {e}");
                false
            }
        }
    }

    /// Indexes every gzip layer of `image` (one pass over each, filling the disk cache with every
    /// span on the way) and records the image.
    async fn index_now(&self, image: &ResolvedImage) -> Result<(), ImageError> {
        let opts = clip_core::index::builder::BuildOptions::default();
        let mut reports = Vec::new();
        for d in &image.layers {
            let progress: image::Progress = Arc::new(|_| {});
            // A stored index this node did not build itself is built again from the bytes.
            let rebuild = !matches!(self.store.get_verified_layer(&d.digest), Ok(Some(_)));
            reports.push(
                image::index_layer_filling(
                    &self.client,
                    &self.store,
                    image,
                    d,
                    &opts,
                    progress,
                    rebuild,
                    Some(self.reads.cache().clone()),
                )
                .await?,
            );
        }
        image::record_image(&self.store, image, &reports, None).await
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
        let labels: BTreeMap<String, String> = labels.into_iter().collect();
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
        if kind == Kind::Active {
            if let Some(target) = labels.get(LABEL_TARGET) {
                if self.meta.get(target)?.is_some() {
                    return Err(SnapshotError::AlreadyExists(target.clone()));
                }
                let stackable = parent_rec.as_ref().is_none_or(|p| p.remote.is_some());
                let found = match stackable {
                    true => self.remote_layer(&labels).await,
                    false => None,
                };
                // The chain the layer is committed under must be the one its index's DiffID
                // gives on this parent: an index (or a config) cannot claim another layer's
                // place in the chains other images share.
                let found = found.filter(|(remote, diff_id)| {
                    let expected = chain_id(&parent, diff_id);
                    let ok = expected.as_ref() == Some(target);
                    if !ok {
                        tracing::warn!(
                            layer = %remote.layer,
                            asked = %target,
                            "the layer's index gives another chain ID than containerd asked for: unpacking normally"
                        );
                    }
                    ok
                });
                {
                    if let Some((remote, _)) = found {
                        let mut labels = labels.clone();
                        labels.insert(LABEL_REMOTE.into(), "true".into());
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
                        if parent.is_empty() {
                            if let Some(r) = &rec.remote {
                                self.lookup_profile_soon(r);
                            }
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
            Ok(l) => l,
            Err(e) => {
                let _ = self.meta.remove(&key);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        Ok(self.mounts_for(&rec, &lowers))
    }

    /// Daemon shutdown. With a keeper the lazy mounts stay (the next daemon serves them; readers
    /// wait meanwhile); without one they are unmounted (busy ones detached lazily).
    pub async fn shutdown(&self) {
        let mut mounts = self.mounts.lock().await;
        if self.keeper.is_some() {
            for (_, m) in mounts.drain() {
                // Dropping the session would unmount it: leave it to the process exit.
                std::mem::forget(m.session);
            }
        }
        for (id, m) in mounts.drain() {
            let dir = self.path(id).join("fs");
            drop(m.session);
            if !mounts_under(&dir).is_empty() {
                lazy_unmount(&dir);
            }
        }
        let _ = self.meta.flush().await;
        self.reads.flush().await;
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
        if let Some(m) = self.mounts.lock().await.remove(&r.id) {
            if let Some(k) = &self.keeper {
                k.drop_connection(r.id);
            }
            drop(m.session);
        }
        let dir = self.path(r.id);
        if !mounts_under(&dir).is_empty() {
            lazy_unmount(&dir.join("fs"));
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
