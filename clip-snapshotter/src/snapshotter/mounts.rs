//! Mounting lazy layers: the [`LazyMounts`] seam the snapshotter's containerd semantics use,
//! and [`FuseMounts`], the real one: one merged FUSE mount per chain of remote layers, its
//! connection held by the keeper so that it outlives the daemon.
//!
//! The seam has three methods and stays at three (stargz's `FileSystem { Mount, Check,
//! Unmount }` is the model; a seam that grows stops being one). Everything FUSE-specific (the
//! keeper, resuming a kept connection, shutting down) is a method of [`FuseMounts`] that only
//! the daemon calls.
//!
//! Uses the store and the read path of clip-core, clip-fuse, [`super::profiles`] (a mount
//! replays its image's startup profile, or records one) and the OS helpers.

use super::meta::Record;
use super::profiles::Profiles;
use super::SnapshotError;
use crate::os::{lazy_unmount, mounts_under};
use clip_core::digest::Digest;
use clip_core::index::ImageView;
use clip_core::reader::{LayerReader, ReadPath};
use clip_core::reference::Reference;
use clip_core::registry::Client;
use clip_core::store::Store;
use clip_fuse::handover::{Held, Keeper};
use containerd_snapshots::tonic;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the lazy layers of remote snapshots are served.
#[tonic::async_trait]
pub trait LazyMounts: Send + Sync {
    /// Serves the merged lazy layers of `chain` (bottom layer first; the top one is snapshot
    /// `id`, named `name`) at `dir`, unless they are served already.
    async fn mount(
        &self,
        id: u64,
        name: &str,
        chain: &[Record],
        dir: &Path,
    ) -> Result<(), SnapshotError>;
    /// Whether this process serves snapshot `id`'s mount.
    async fn check(&self, id: u64) -> bool;
    /// Stops serving snapshot `id`'s mount, if it is served, and unmounts `dir`.
    async fn unmount(&self, id: u64, dir: &Path);
    /// Remote snapshot `id` (named `name`, topping `chain`, bottom layer first) was just
    /// committed by a pull. If it is its image's top layer, the filesystem its mount will
    /// serve may be built now, in the background, and the files every start reads fetched:
    /// the link and the cores are idle until containerd prepares a container on it.
    async fn ahead(&self, _id: u64, _name: &str, _chain: Vec<Record>) {}
    /// A container is about to start on the mount of snapshot `id`: its root is snapshot
    /// `key` (as containerd names it). The mount may fetch the container's program before the
    /// runtime execs it (see [`super::program`]). Returns at once.
    async fn container_starting(&self, _id: u64, _key: &str) {}
    /// Whether the mounts served can be id-mapped (user-namespaced containers on them);
    /// `None`: not known until a mount has been made.
    fn idmappable(&self) -> Option<bool>;
}

struct Mounted {
    session: clip_fuse::BackgroundSession,
    dir: PathBuf,
    /// The layers and the sha256 of the stored index each was mounted with (empty: not known,
    /// a mount resumed after a restart).
    identity: Vec<(Digest, Option<Digest>)>,
    /// The filesystem served (its guesses run after the mount too).
    fs: Arc<clip_fuse::ClipFs>,
    /// Whether a container's program is fetched as it starts: no startup profile covers the
    /// mount, and guesses are on.
    guess_program: bool,
}

/// A mount's filesystem, built (and its guesses started), not yet mounted.
struct Built {
    fs: clip_fuse::ClipFs,
    opts: clip_fuse::MountOptions,
    readers: Vec<Arc<LayerReader>>,
    profile: Option<clip_core::profile::Profile>,
    /// Whether the readers record a startup profile.
    record: bool,
    /// What the store held when it was built (see [`FuseMounts::identity`]).
    identity: Vec<(Digest, Option<Digest>)>,
}

/// Filesystems built ahead of their mount at most (each holds its image's tree).
const AHEAD_MAX: usize = 8;
/// A filesystem built ahead that no container mounted within this long is dropped.
const AHEAD_TTL: std::time::Duration = std::time::Duration::from_secs(120);

/// A build ahead of a mount: the mount waits for it to end, then takes what it built (`None`:
/// it failed, and the mount builds again).
type AheadSlot = Arc<tokio::sync::Mutex<Option<Built>>>;

/// Lazy layers as FUSE mounts of this process.
pub struct FuseMounts {
    store: Arc<Store>,
    client: Client,
    reads: ReadPath,
    /// How to mount (threads, passthrough, guesses); the name is set per mount.
    fuse: clip_fuse::MountOptions,
    profiles: Arc<Profiles>,
    rt: tokio::runtime::Handle,
    /// Snapshot id -> its chain's mount. A tokio mutex: mounting is serialised.
    mounts: tokio::sync::Mutex<HashMap<u64, Mounted>>,
    /// Holds the FUSE connections across restarts (with handover on).
    keeper: Option<Arc<Keeper>>,
    /// containerd's API, where containers' commands are read (unset: not configured).
    containerd: std::sync::OnceLock<containerd_client::tonic::transport::Channel>,
    /// Snapshot id -> its filesystem built as the pull ended (see [`LazyMounts::ahead`]).
    built_ahead: std::sync::Mutex<HashMap<u64, (std::time::Instant, AheadSlot)>>,
    /// This value's own `Arc` (background builds hold it).
    me: std::sync::Weak<FuseMounts>,
}

impl FuseMounts {
    /// Mounts served as `fuse` says. With `handover`, the keeper on `keeper_socket` (started if
    /// none runs) holds their connections; the connections a previous daemon left with it are
    /// returned (see [`FuseMounts::resume`]). Without, a keeper from an earlier run is told to
    /// let go of what it holds.
    pub async fn open(
        keeper_socket: &Path,
        handover: bool,
        store: Arc<Store>,
        client: Client,
        reads: ReadPath,
        fuse: clip_fuse::MountOptions,
        profiles: Arc<Profiles>,
    ) -> (Arc<Self>, Vec<Held>) {
        let (keeper, held) = match handover {
            true => connect_keeper(keeper_socket).await,
            false => {
                Keeper::release_all(keeper_socket);
                (None, Vec::new())
            }
        };
        let mounts = |me: &std::sync::Weak<FuseMounts>| FuseMounts {
            store,
            client,
            reads,
            fuse,
            profiles,
            rt: tokio::runtime::Handle::current(),
            mounts: tokio::sync::Mutex::new(HashMap::new()),
            keeper,
            containerd: std::sync::OnceLock::new(),
            built_ahead: std::sync::Mutex::new(HashMap::new()),
            me: me.clone(),
        };
        (Arc::new_cyclic(mounts), held)
    }

    /// Reads the commands of containers starting on these mounts from containerd at
    /// `address` (see [`LazyMounts::container_starting`]).
    pub fn watch_containers(&self, address: &Path) {
        let _ = self
            .containerd
            .set(crate::containerd::connect_lazy(address));
    }

    /// Serves again, at `dir`, the mount of `chain` (topped by snapshot `name`) that a previous
    /// daemon left with the keeper: running containers have been waiting on it.
    pub async fn resume(
        &self,
        name: &str,
        chain: &[Record],
        dir: &Path,
        held: Held,
    ) -> Result<(), SnapshotError> {
        let fail = mount_error(name);
        let keeper = self
            .keeper
            .clone()
            .ok_or_else(|| fail("no keeper".into()))?;
        let (fs, opts, _) = self.chain_fs(name, chain, false)?;
        let fs = Arc::new(fs);
        let guess_program = opts.guesses.prefetch_program;
        let (rt, id, opens, served) = (self.rt.clone(), held.id, held.opens.len(), fs.clone());
        let handover = clip_fuse::Handover { keeper, id };
        let session = tokio::task::spawn_blocking(move || {
            clip_fuse::resume(served, held, rt, &opts, handover)
        })
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
        tracing::info!(
            snapshot = name,
            open_files = opens,
            "resumed a lazy mount kept across the restart"
        );
        let dir = dir.to_path_buf();
        self.mounts.lock().await.insert(
            id,
            Mounted {
                session,
                dir,
                identity: self.identity(chain),
                fs,
                guess_program,
            },
        );
        Ok(())
    }

    /// Each layer of `chain` with the sha256 of the index the store holds for it now.
    fn identity(&self, chain: &[Record]) -> Vec<(Digest, Option<Digest>)> {
        chain
            .iter()
            .filter_map(|r| r.remote.as_ref())
            .map(|m| {
                let p = self.store.provenance(&m.layer).ok().flatten();
                (m.layer, p.map(|p| *p.digest()))
            })
            .collect()
    }

    /// Tells the keeper to let go of connection `id` (no snapshot uses it any more).
    pub fn forget(&self, id: u64) {
        if let Some(k) = &self.keeper {
            k.drop_connection(id);
        }
    }

    /// Daemon shutdown. With a keeper the mounts stay (the next daemon serves them; readers
    /// wait meanwhile); without one they are unmounted (busy ones detached lazily). Pending
    /// cache writes are flushed.
    pub async fn shutdown(&self) {
        let mut mounts = self.mounts.lock().await;
        if self.keeper.is_some() {
            for (_, m) in mounts.drain() {
                // Dropping the session would unmount it: leave it to the process exit.
                std::mem::forget(m.session);
            }
        }
        for (_, m) in mounts.drain() {
            drop(m.session);
            if !mounts_under(&m.dir).is_empty() {
                lazy_unmount(&m.dir);
            }
        }
        self.reads.flush().await;
    }

    /// The filesystem the mount of `chain` (topped by snapshot `name`) serves, its startup
    /// profile looked up, and, where none covers it, the files every start reads on their way.
    async fn build(&self, name: &str, chain: &[Record]) -> Result<Built, SnapshotError> {
        let started = std::time::Instant::now();
        let identity = self.identity(chain);
        let remote = chain
            .last()
            .and_then(|top| top.remote.as_ref())
            .ok_or_else(|| mount_error(name)("not a remote snapshot".into()))?;
        let profile = match remote.manifest() {
            Some(m) => self.profiles.lookup(m, &remote.reference).await,
            None => None,
        };
        let record = profile.is_none() && !self.profiles.window().is_zero();
        // With a profile, the readers guess (locality, read-ahead, whole files on open) only
        // where the profile has no knowledge: see LayerReader.
        let (fs, opts, readers) = self.chain_fs(name, chain, record)?;
        if profile.is_none() && opts.guesses.prefetch_libraries {
            fs.prefetch_startup_files(opts.guesses.prefetch_on_open);
        }
        tracing::debug!(
            snapshot = name,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "filesystem built"
        );
        Ok(Built {
            fs,
            opts,
            readers,
            profile,
            record,
            identity,
        })
    }

    /// What a build ahead of snapshot `id`'s mount made, if it made it from what the store
    /// holds now (`identity`); waits for a build under way. Old builds are dropped.
    async fn take_ahead(&self, id: u64, identity: &[(Digest, Option<Digest>)]) -> Option<Built> {
        let slot = {
            let mut ahead = self.built_ahead.lock().expect("ahead lock");
            ahead.retain(|_, (at, _)| at.elapsed() < AHEAD_TTL);
            ahead.remove(&id)?.1
        };
        let built = slot.lock().await.take()?;
        (built.identity == identity).then_some(built)
    }

    /// The filesystem of `chain` (bottom layer first, topped by snapshot `name`) and how to
    /// mount it. With `record`, every layer's reads are noted for a startup profile. Also
    /// returns the readers, bottom layer first.
    fn chain_fs(
        &self,
        name: &str,
        chain: &[Record],
        record: bool,
    ) -> Result<
        (
            clip_fuse::ClipFs,
            clip_fuse::MountOptions,
            Vec<Arc<LayerReader>>,
        ),
        SnapshotError,
    > {
        let fail = mount_error(name);
        let mut indexes = Vec::new();
        let mut readers = Vec::new();
        for r in chain {
            let remote = r
                .remote
                .as_ref()
                .ok_or_else(|| fail("not a remote snapshot".into()))?;
            let reference: Reference =
                remote.reference.parse().map_err(|e| fail(format!("{e}")))?;
            let reader = self
                .reads
                .stored_reader(&self.store, &self.client, &reference, &remote.layer)
                .map_err(|e| fail(e.to_string()))?
                .ok_or_else(|| fail(format!("no index for layer {} in the store", remote.layer)))?;
            indexes.push(reader.index().clone());
            readers.push(reader);
        }
        let view = ImageView::build(indexes).map_err(|e| fail(e.to_string()))?;
        if record {
            readers = self.profiles.recording(readers);
        }
        let mut fs =
            clip_fuse::ClipFs::new(&view, readers.clone()).map_err(|e| fail(e.to_string()))?;
        if let Some(files) = &self.reads.files {
            fs = fs.with_passthrough(files.clone(), self.fuse.passthrough_min_size);
        }
        let opts = clip_fuse::MountOptions {
            fsname: format!("clip:{name}"),
            passthrough: self.reads.files.is_some(),
            ..self.fuse.clone()
        };
        Ok((fs, opts, readers))
    }
}

#[tonic::async_trait]
impl LazyMounts for FuseMounts {
    async fn mount(
        &self,
        id: u64,
        name: &str,
        chain: &[Record],
        dir: &Path,
    ) -> Result<(), SnapshotError> {
        let started = std::time::Instant::now();
        let ms = move || started.elapsed().as_secs_f64() * 1e3;
        let mut mounts = self.mounts.lock().await;
        let identity = self.identity(chain);
        if let Some(m) = mounts.get(&id) {
            if m.identity.is_empty() || m.identity == identity {
                return Ok(());
            }
            // A layer's index was replaced by one this node built (a published index verified
            // before another repository's image reads it), or the snapshot now holds another
            // layer: new containers get a mount of what the store holds now. Containers already
            // running keep the old one: it is detached, not stopped, and serves them until
            // their last reference goes (the kernel then ends its connection and its thread).
            let old = mounts.remove(&id).expect("present");
            tracing::warn!(
                snapshot = name,
                "the layers under this snapshot changed (verified on this node): mounting them \
                 anew; running containers keep the mount they have"
            );
            self.forget(id);
            lazy_unmount(&old.dir);
            std::mem::forget(old.session);
        }
        let fail = mount_error(name);
        let remote = chain
            .last()
            .and_then(|top| top.remote.as_ref())
            .ok_or_else(|| fail("not a remote snapshot".into()))?;
        let manifest = remote.manifest();
        let built = match self.take_ahead(id, &identity).await {
            Some(b) => b,
            None => self.build(name, chain).await?,
        };
        tracing::debug!(snapshot = name, ms = ms(), "mount: filesystem ready");
        let Built {
            fs,
            opts,
            readers,
            profile,
            record,
            ..
        } = built;
        let guess_program = profile.is_none() && opts.guesses.prefetch_program;
        let fs = Arc::new(fs);
        match (&profile, manifest) {
            (Some(p), _) => self.profiles.replay(name, p, &readers),
            (None, Some(m)) if record => self.profiles.record(name, m, &remote.reference, &readers),
            _ => {}
        }
        std::fs::create_dir_all(dir).map_err(super::io_err(dir.display().to_string()))?;
        if !mounts_under(dir).is_empty() {
            lazy_unmount(dir);
        }
        let (d, rt, served) = (dir.to_path_buf(), self.rt.clone(), fs.clone());
        let handover = self
            .keeper
            .clone()
            .map(|keeper| clip_fuse::Handover { keeper, id });
        let session = tokio::task::spawn_blocking(move || {
            clip_fuse::mount_with(served, &d, rt, &opts, handover)
        })
        .await
        .map_err(|e| fail(e.to_string()))?
        .map_err(|e| fail(e.to_string()))?;
        tracing::info!(snapshot = name, dir = %dir.display(), "mounted lazy layers");
        let dir = dir.to_path_buf();
        mounts.insert(
            id,
            Mounted {
                session,
                dir,
                identity,
                fs,
                guess_program,
            },
        );
        Ok(())
    }

    async fn ahead(&self, id: u64, name: &str, chain: Vec<Record>) {
        let Some(remote) = chain.last().and_then(|top| top.remote.as_ref()) else {
            return;
        };
        // Only an image's top layer is the top of a container's root.
        let top = remote
            .manifest()
            .and_then(|m| self.store.get_image(&m).ok().flatten())
            .and_then(|image| image.layers.last().map(|l| l.digest));
        if top != Some(remote.layer) || self.mounts.lock().await.contains_key(&id) {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let slot: AheadSlot = Arc::new(tokio::sync::Mutex::new(None));
        let Ok(mut guard) = slot.clone().try_lock_owned() else {
            return;
        };
        {
            let mut ahead = self.built_ahead.lock().expect("ahead lock");
            ahead.retain(|_, (at, _)| at.elapsed() < AHEAD_TTL);
            if ahead.len() >= AHEAD_MAX || ahead.contains_key(&id) {
                return;
            }
            ahead.insert(id, (std::time::Instant::now(), slot));
        }
        let name = name.to_string();
        tokio::spawn(async move {
            match me.build(&name, &chain).await {
                Ok(b) => *guard = Some(b),
                Err(e) => tracing::debug!(snapshot = name, "building the filesystem ahead: {e}"),
            }
        });
    }

    async fn container_starting(&self, id: u64, key: &str) {
        let Some(channel) = self.containerd.get().cloned() else {
            return;
        };
        let Some((namespace, key)) = super::program::split_key(key) else {
            return;
        };
        let fs = match self.mounts.lock().await.get(&id) {
            Some(m) if m.guess_program => m.fs.clone(),
            _ => return,
        };
        let (namespace, key) = (namespace.to_string(), key.to_string());
        let (max, libraries) = (
            self.fuse.guesses.prefetch_on_open,
            self.fuse.guesses.prefetch_libraries,
        );
        tokio::spawn(async move {
            let Some(c) = super::program::container_command(channel, &namespace, &key).await else {
                tracing::debug!(%namespace, %key, "no container record: its program is not fetched ahead");
                return;
            };
            fs.prefetch_program(&c.program, c.path.as_deref(), &c.cwd, max, libraries);
        });
    }

    async fn check(&self, id: u64) -> bool {
        self.mounts.lock().await.contains_key(&id)
    }

    fn idmappable(&self) -> Option<bool> {
        clip_fuse::kernel_allows_idmap()
    }

    async fn unmount(&self, id: u64, dir: &Path) {
        self.built_ahead.lock().expect("ahead lock").remove(&id);
        if let Some(m) = self.mounts.lock().await.remove(&id) {
            self.forget(id);
            drop(m.session);
        }
        if !mounts_under(dir).is_empty() {
            lazy_unmount(dir);
        }
    }
}

fn mount_error(name: &str) -> impl Fn(String) -> SnapshotError + '_ {
    move |reason| SnapshotError::Mount {
        name: name.to_string(),
        reason,
    }
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
