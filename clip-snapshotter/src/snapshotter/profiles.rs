//! Startup profiles on the node: looking up an image's profile (this node's store, the shared
//! tier, then the registry), prefetching what it lists, and recording one where none exists.
//!
//! Owns [`Profiles`], shared by the layer resolution (which starts a lookup as soon as it
//! knows the image) and the mounts (which replay or record). Uses clip-core's store, reader and
//! profile types; nothing else of the snapshotter but [`super::meta::Remote`].

use super::meta::Remote;
use clip_core::digest::Digest;
use clip_core::profile::{Profile, Recorder};
use clip_core::reader::{LayerReader, ReadPath};
use clip_core::reference::Reference;
use clip_core::registry::Client;
use clip_core::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// How long a mount waits for its image's profile lookup.
const LOOKUP_WAIT: Duration = Duration::from_secs(5);

/// Startup profiles of the images this node serves.
pub struct Profiles {
    /// Lookups by image manifest: started once (at Prepare), awaited by the mount.
    lookups: Mutex<HashMap<Digest, Arc<OnceCell<Option<Profile>>>>>,
    store: Arc<Store>,
    client: Client,
    reads: ReadPath,
    /// How long after its first read a mount without a profile records one (zero: never).
    window: Duration,
    /// Push recorded profiles to the image's registry.
    publish: bool,
}

impl Profiles {
    pub fn new(
        store: Arc<Store>,
        client: Client,
        reads: ReadPath,
        window: Duration,
        publish: bool,
    ) -> Arc<Self> {
        Arc::new(Profiles {
            lookups: Mutex::new(HashMap::new()),
            store,
            client,
            reads,
            window,
            publish,
        })
    }

    /// How long a mount without a profile records (zero: never).
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The startup profile of image `manifest` (pinned `reference`): this node's, else the
    /// shared tier's, else the one published next to the image. Looked up once per manifest (a
    /// lookup started by Prepare is awaited, not repeated), waited for at most 5 s.
    pub async fn lookup(&self, manifest: Digest, reference: &str) -> Option<Profile> {
        let cell = self
            .lookups
            .lock()
            .expect("profiles lock")
            .entry(manifest)
            .or_default()
            .clone();
        let lookup = cell.get_or_init(|| self.find(manifest, reference));
        tokio::time::timeout(LOOKUP_WAIT, lookup)
            .await
            .ok()
            .and_then(|p| p.clone())
    }

    async fn find(&self, manifest: Digest, reference: &str) -> Option<Profile> {
        if let Some(p) = self.store.get_profile(&manifest) {
            return Some(p);
        }
        let shared = match &self.reads.shared {
            Some(s) => {
                s.get_doc(&key(&manifest), clip_core::profile::MAX_ENCODED)
                    .await
            }
            None => None,
        };
        if let Some(raw) = shared {
            match Profile::decode(&raw) {
                Ok(p) if p.manifest == manifest => {
                    tracing::info!(image = %reference, "found a startup profile in the shared tier");
                    let _ = self.store.put_profile(&p).await;
                    return Some(p);
                }
                Ok(_) => {
                    tracing::warn!(image = %reference, "the shared tier's profile is for another manifest")
                }
                Err(e) => {
                    tracing::warn!(image = %reference, "ignoring the shared tier's profile: {e}")
                }
            }
        }
        let r: Reference = reference.parse().ok()?;
        let image = self.client.resolve(&r).await.ok()?;
        match clip_core::artifact::fetch_profile(&self.client, &image).await {
            Ok(Some(p)) => {
                tracing::info!(image = %reference, "found a published startup profile");
                let _ = self.store.put_profile(&p).await;
                Some(p)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(image = %reference, "ignoring its startup profile: {e}");
                None
            }
        }
    }

    /// Starts looking up the startup profile of image `pinned` (if no lookup has started).
    pub fn start_lookup(self: &Arc<Self>, pinned: &Reference) {
        let Some(manifest) = pinned.digest else {
            return;
        };
        if self
            .lookups
            .lock()
            .expect("profiles lock")
            .contains_key(&manifest)
        {
            return;
        }
        let (me, reference) = (self.clone(), pinned.to_string());
        tokio::spawn(async move { me.lookup(manifest, &reference).await });
    }

    /// Starts the startup-profile lookup of the image a remote layer belongs to (or joins the
    /// one started with its index) and prefetches what it lists, so that the mount finds it
    /// done.
    pub fn prefetch_soon(self: &Arc<Self>, remote: &Remote) {
        let Some(manifest) = remote.manifest() else {
            return;
        };
        let (me, reference) = (self.clone(), remote.reference.clone());
        tokio::spawn(async move {
            let profile = me.lookup(manifest, &reference).await;
            // Prefetch at pull time: the transfer overlaps containerd's container setup. The
            // mount's readers share these readers' fetchers (one flight per span).
            let (Some(profile), Ok(r)) = (profile, reference.parse::<Reference>()) else {
                return;
            };
            // Only the layers of the image that is starting: a profile is its publisher's word,
            // and may name any layer (another image's, on this node).
            let Ok(Some(image)) = me.store.get_image(&manifest) else {
                return;
            };
            let mut layers = 0;
            for lp in &profile.layers {
                if !image.layers.iter().any(|l| l.digest == lp.layer) {
                    tracing::warn!(image = %reference, layer = %lp.layer, "its startup profile names a layer it does not have: not prefetched");
                    continue;
                }
                let Ok(Some(reader)) = me.reads.stored_reader(&me.store, &me.client, &r, &lp.layer)
                else {
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

    /// Prefetches what `profile` lists for a chain's layers, in the background.
    pub fn replay(&self, name: &str, profile: &Profile, readers: &[Arc<LayerReader>]) {
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

    /// `readers`, each noting what it reads for a startup profile.
    pub fn recording(&self, readers: Vec<Arc<LayerReader>>) -> Vec<Arc<LayerReader>> {
        readers
            .into_iter()
            .map(|r| r.recording(Arc::new(Recorder::new(self.window))))
            .collect()
    }

    /// Collects what `readers` read in their first `window` into this node's profile of
    /// `manifest` (and the shared tier's, and the registry's when publishing).
    pub fn record(
        self: &Arc<Self>,
        name: &str,
        manifest: Digest,
        reference: &str,
        readers: &[Arc<LayerReader>],
    ) {
        let recorders: Vec<(Digest, Arc<Recorder>)> = readers
            .iter()
            .filter_map(|r| Some((r.index().layer, r.recorder()?.clone())))
            .collect();
        let (name, reference) = (name.to_string(), reference.to_string());
        tracing::info!(snapshot = %name, "recording a startup profile");
        let cell = self
            .lookups
            .lock()
            .expect("profiles lock")
            .get(&manifest)
            .cloned();
        let me = self.clone();
        tokio::spawn(async move {
            // The window starts at each layer's first read; wait until every layer that was
            // read has closed (bounded: layers never read are not waited for).
            tokio::time::sleep(me.window).await;
            let deadline = tokio::time::Instant::now() + me.window;
            while recorders.iter().any(|(_, r)| r.started() && !r.done())
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
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
            let mut merged = me
                .store
                .get_profile(&manifest)
                .unwrap_or_else(|| Profile::new(manifest));
            merged.merge(&p);
            if let Err(e) = me.store.put_profile(&merged).await {
                tracing::warn!(snapshot = %name, "storing the startup profile: {e}");
                return;
            }
            tracing::info!(snapshot = %name, layers = merged.layers.len(), "recorded a startup profile");
            if let Some(s) = &me.reads.shared {
                s.put_doc(&key(&manifest), &merged.encode()).await;
            }
            if let Some(c) = cell {
                let _ = c.set(Some(merged.clone()));
            }
            if me.publish {
                me.publish(&reference, &merged).await;
            }
        });
    }

    async fn publish(&self, reference: &str, profile: &Profile) {
        let Ok(r) = reference.parse::<Reference>() else {
            return;
        };
        let pushed = match self.client.resolve(&r).await {
            Ok(img) => clip_core::artifact::push_profile(&self.client, &img, profile)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match pushed {
            Ok(d) => tracing::info!(image = %r, artifact = %d, "published the startup profile"),
            Err(e) => tracing::warn!(image = %r, "publishing the startup profile: {e}"),
        }
    }
}

/// Where the shared (Redis) tier keeps an image's startup profile.
fn key(manifest: &Digest) -> String {
    format!("clip:profile:{}", manifest.hex())
}
