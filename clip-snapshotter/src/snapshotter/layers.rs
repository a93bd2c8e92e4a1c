//! Layer resolution and trust: which layer a Prepare names, and whether this node may serve it
//! lazily under the image's trust policy (a stored index it accepts, a published or signed one
//! it loads, or one it builds here).
//!
//! Owns the [`Layers`] seam and its real implementation, [`RegistryLayers`]. Uses the store,
//! the registry client, label-free discovery ([`super::discover`]), the trust policy and
//! [`super::profiles`] (a profile lookup starts as soon as the image is known). The snapshotter
//! sees only the trait, so its containerd semantics are tested with a fake.

use super::discover;
use super::meta::Remote;
use super::profiles::Profiles;
use crate::labels;
use crate::trust::{Trust, TrustPolicy};
use clip_core::digest::Digest;
use clip_core::image::{self, ImageError};
use clip_core::reader::ReadPath;
use clip_core::reference::Reference;
use clip_core::registry::{Client, ResolvedImage};
use clip_core::store::Store;
use containerd_snapshots::tonic;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a successful probe of an authority stands for the rest of an image's layers.
const PROBE_TTL: Duration = Duration::from_secs(60);

/// Where the layers a Prepare names come from.
#[tonic::async_trait]
pub trait Layers: Send + Sync {
    /// The layer behind a Prepare's labels, if it can be served lazily, with the DiffID its
    /// index states (the caller checks the chain ID it gives).
    async fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Option<(Remote, Digest)>;
    /// A base layer was committed as a remote snapshot: the pull is under way.
    fn committed(&self, remote: &Remote);
}

/// Layers from the store, the registry and containerd's content store.
pub struct RegistryLayers {
    store: Arc<Store>,
    client: Client,
    reads: ReadPath,
    trust: TrustPolicy,
    index_on_demand: bool,
    profiles: Arc<Profiles>,
    /// Finds the layer of a Prepare without pull labels in containerd's content store.
    discovery: Option<discover::Discovery>,
    /// Checks a candidate registry authority quickly (a short deadline, no long retries).
    probe: Client,
    /// Pinned images whose manifest a probe fetched lately: the other layers of the same pull
    /// need not probe again.
    probed: Mutex<HashMap<String, Instant>>,
}

impl RegistryLayers {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Arc<Store>,
        client: Client,
        reads: ReadPath,
        trust: TrustPolicy,
        index_on_demand: bool,
        containerd: Option<&std::path::Path>,
        profiles: Arc<Profiles>,
    ) -> Self {
        let discovery = containerd.map(|a| {
            let c = client.config();
            discover::Discovery::new(a, c.hosts_dir.as_deref(), &c.insecure)
        });
        let probe = Client::new(clip_core::registry::RegistryConfig {
            deadline: Duration::from_secs(10),
            ..client.config().clone()
        });
        RegistryLayers {
            store,
            client,
            reads,
            trust,
            index_on_demand,
            profiles,
            discovery,
            probe,
            probed: Mutex::new(HashMap::new()),
        }
    }
}

#[tonic::async_trait]
impl Layers for RegistryLayers {
    async fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Option<(Remote, Digest)> {
        if !labels.contains_key(labels::LAYER) {
            return self.discovered_layer(labels.get(labels::TARGET)?).await;
        }
        let layer: Digest = labels.get(labels::LAYER)?.parse().ok()?;
        let manifest: Digest = labels.get(labels::MANIFEST)?.parse().ok()?;
        let image_ref: Reference = labels.get(labels::IMAGE_REF)?.parse().ok()?;
        self.serve_layer(layer, image_ref.with_digest(manifest))
            .await
    }

    fn committed(&self, remote: &Remote) {
        self.profiles.prefetch_soon(remote);
    }
}

impl RegistryLayers {
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
        probed.insert(key, Instant::now());
        true
    }

    /// `layer` of image `pinned`, if it can be served lazily under the image's trust policy,
    /// with the DiffID its index states.
    async fn serve_layer(&self, layer: Digest, pinned: Reference) -> Option<(Remote, Digest)> {
        let remote = Remote {
            layer,
            reference: pinned.to_string(),
        };
        let trust = self.trust.for_image(&pinned);
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
        self.profiles.start_lookup(&pinned);
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
            Err(ImageError::NoIndex { .. }) if self.index_on_demand => {
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
        let keys = &self.trust.keys;
        let Err(e) = image::load_signed_indexes(&self.client, &self.store, image, keys).await
        else {
            return true;
        };
        if !self.index_on_demand {
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
}
