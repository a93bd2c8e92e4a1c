//! Layer resolution and trust: which layer a Prepare names, and whether this node may serve it
//! lazily under the image's trust policy (a stored index it accepts, a published or signed one
//! it loads, or one it builds here).
//!
//! Owns the [`Layers`] seam and its real implementation, [`RegistryLayers`]. Uses the store,
//! the registry client, label-free discovery ([`super::discover`]), the trust policy and
//! [`super::profiles`] (a profile lookup starts as soon as the image is known). The snapshotter
//! sees only the trait, so its containerd semantics are tested with a fake.

use super::discover;
use super::meta::{Record, Remote};
use super::profiles::Profiles;
use super::SnapshotError;
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

/// Why a layer a pull asked for is unpacked by containerd rather than served lazily. Every
/// such fallback is logged at warning level with the snapshot, the image when known and the
/// reason, and counted in `clip_snapshotter_full_unpacks_total{reason}`: a silent full pull is
/// a slow start nobody can explain.
#[derive(Debug)]
pub struct Fallback {
    /// The metric's label: a few fixed words.
    pub reason: &'static str,
    /// For the log: the image and what went wrong.
    pub detail: String,
}

impl Fallback {
    pub fn new(reason: &'static str, detail: impl std::fmt::Display) -> Self {
        Fallback {
            reason,
            detail: detail.to_string(),
        }
    }

    /// Logs and counts the fallback of the Prepare for `snapshot`.
    pub fn report(&self, snapshot: &str) {
        tracing::warn!(
            snapshot,
            reason = self.reason,
            "unpacking normally (no lazy layer): {}",
            self.detail
        );
        unpacks().add(1, &[opentelemetry::KeyValue::new("reason", self.reason)]);
    }
}

fn unpacks() -> &'static opentelemetry::metrics::Counter<u64> {
    static C: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    C.get_or_init(|| {
        opentelemetry::global::meter("clip")
            .u64_counter("clip.snapshotter.full_unpacks")
            .with_description(
                "Layers a pull asked for that containerd downloads and unpacks instead of clip \
                 serving them lazily, by reason",
            )
            .build()
    })
}

fn verifications() -> &'static opentelemetry::metrics::Counter<u64> {
    static C: std::sync::OnceLock<opentelemetry::metrics::Counter<u64>> =
        std::sync::OnceLock::new();
    C.get_or_init(|| {
        opentelemetry::global::meter("clip")
            .u64_counter("clip.snapshotter.layer_verifications")
            .with_description(
                "Layers indexed on this node because an image of another repository than the \
                 one that published their index used them (trust = owner), by outcome: \
                 verified, replaced (the snapshot took another image's layer) or refused",
            )
            .build()
    })
}

/// How long a successful probe of an authority stands for the rest of an image's layers.
const PROBE_TTL: Duration = Duration::from_secs(60);

/// Where the layers a Prepare names come from.
#[tonic::async_trait]
pub trait Layers: Send + Sync {
    /// The layer behind a Prepare's labels, if it can be served lazily, with the DiffID its
    /// index states (the caller checks the chain ID it gives).
    async fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Option<(Remote, Digest)>;
    /// A layer was committed as a remote snapshot (`base`: the image's first): the pull is
    /// under way. Returns when what the pull asked for is done (eager mode: the whole layer
    /// fetched).
    async fn committed(&self, remote: &Remote, base: bool, labels: &BTreeMap<String, String>);
    /// Before a snapshot is made on the remote snapshots `chain` (name and record, bottom
    /// first; `labels` are the new snapshot's), checks that every image using them may read
    /// them under its trust policy, verifying layers where it must. Returns the snapshots whose
    /// content must become another layer (a chain ID claimed by a layer that is not the one it
    /// names); an error refuses the new snapshot.
    async fn admit(
        &self,
        chain: &[(String, Record)],
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, Remote)>, SnapshotError>;
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
    /// One verification of a snapshot's layer at a time (they are rare, and two Prepares on one
    /// chain would download its layer twice). Loading an image's own indexes does not take it:
    /// concurrent pulls of different images are not serialised behind each other.
    verifying: tokio::sync::Mutex<()>,
    /// containerd namespaces whose pulls fetch layers whole.
    eager_namespaces: Vec<String>,
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
        eager_namespaces: Vec<String>,
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
            verifying: tokio::sync::Mutex::new(()),
            eager_namespaces,
        }
    }
}

#[tonic::async_trait]
impl Layers for RegistryLayers {
    async fn remote_layer(&self, labels: &BTreeMap<String, String>) -> Option<(Remote, Digest)> {
        let target = labels.get(labels::TARGET)?;
        match self.resolve(target, labels).await {
            Ok(found) => Some(found),
            Err(f) => {
                f.report(target);
                None
            }
        }
    }

    async fn committed(&self, remote: &Remote, base: bool, labels: &BTreeMap<String, String>) {
        if base {
            self.profiles.prefetch_soon(remote);
        }
        let asked = labels.get(labels::FETCH).is_some_and(|v| v == "full");
        let namespace = crate::containerd::request_namespace();
        let eager = namespace
            .as_ref()
            .is_some_and(|ns| self.eager_namespaces.iter().any(|e| e == ns));
        if asked || eager {
            self.fetch_whole(remote).await;
        }
    }

    async fn admit(
        &self,
        chain: &[(String, Record)],
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<(String, Remote)>, SnapshotError> {
        // The image asking, when the Prepare says (a pull's next layer).
        let asker = labels
            .get(labels::IMAGE_REF)
            .and_then(|r| r.parse::<Reference>().ok())
            .map(|r| r.repository_name());
        let mut rebinds = Vec::new();
        for (name, rec) in chain {
            let Some(remote) = &rec.remote else { continue };
            if let Some(r) = self.admit_one(name, remote, asker.as_deref()).await? {
                rebinds.push((name.clone(), r));
            }
        }
        Ok(rebinds)
    }
}

impl RegistryLayers {
    /// Eager mode: fetches every span of `remote`'s layer into the cache now, in parallel range
    /// requests inflated on every core (see clip_core::fetch::bulk). A failure leaves the rest
    /// to lazy reads.
    async fn fetch_whole(&self, remote: &Remote) {
        let Ok(reference) = remote.reference.parse::<Reference>() else {
            return;
        };
        let reader =
            match self
                .reads
                .stored_reader(&self.store, &self.client, &reference, &remote.layer)
            {
                Ok(Some(r)) => r,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(layer = %remote.layer, "eager fetch: {e}");
                    return;
                }
            };
        let t = Instant::now();
        let fetched = match reader.fetch_whole() {
            Some(task) => task.await.unwrap_or(0),
            None => {
                reader.bulk_ended().await;
                0
            }
        };
        tracing::info!(
            layer = %remote.layer,
            mib = fetched >> 20,
            seconds = t.elapsed().as_secs_f64(),
            "fetched the whole layer at pull time (eager)"
        );
    }

    /// The layer a Prepare for chain `target` names by its labels (or, with none, the one
    /// found in containerd's content store), if it can be served lazily.
    async fn resolve(
        &self,
        target: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(Remote, Digest), Fallback> {
        if !labels.contains_key(labels::LAYER) {
            return self.discovered_layer(target).await;
        }
        let bad = |what| Fallback::new("bad labels", format!("the pull's {what} label"));
        let parse = |key, what| -> Result<String, Fallback> {
            labels.get(key).cloned().ok_or_else(|| bad(what))
        };
        let layer: Digest = parse(labels::LAYER, "layer")?
            .parse()
            .map_err(|_| bad("layer"))?;
        let manifest: Digest = parse(labels::MANIFEST, "manifest")?
            .parse()
            .map_err(|_| bad("manifest"))?;
        let image_ref: Reference = parse(labels::IMAGE_REF, "image reference")?
            .parse()
            .map_err(|_| bad("image reference"))?;
        self.serve_layer(layer, image_ref.with_digest(manifest))
            .await
    }

    /// A Prepare with only the chain ID: the layer and image found in containerd's content
    /// store, the registry authority checked by fetching the pinned manifest from it.
    async fn discovered_layer(&self, target: &str) -> Result<(Remote, Digest), Fallback> {
        let discovery = self.discovery.as_ref().ok_or_else(|| {
            Fallback::new(
                "no labels",
                "no pull labels, and finding the layer in containerd's content store is off \
                 (containerd_address = \"\")",
            )
        })?;
        let chain: Digest = target
            .parse()
            .map_err(|_| Fallback::new("no labels", "no pull labels and no chain ID"))?;
        let namespace = crate::containerd::request_namespace();
        let hits = discovery
            .find(&chain, namespace.as_deref())
            .await
            .map_err(|e| {
                Fallback::new(
                    "no labels",
                    format!("no pull labels and containerd's content store is out of reach: {e}"),
                )
            })?;
        if hits.is_empty() {
            return Err(Fallback::new(
                "no labels",
                format!(
                    "no pull labels and no image in containerd{} gives this chain",
                    namespace
                        .as_deref()
                        .map(|ns| format!("'s namespace {ns}"))
                        .unwrap_or_default()
                ),
            ));
        }
        // A chain shared by several images: the newest few are tried.
        for hit in hits.iter().take(3) {
            if let Some(pinned) = self.pinned_of(hit).await {
                tracing::info!(snapshot = %target, image = %pinned, namespace = %hit.namespace, request_namespace = namespace.as_deref().unwrap_or("(not said)"), layer = %hit.layer, "no pull labels: found the layer in containerd's content store");
                return self.serve_layer(hit.layer, pinned).await;
            }
        }
        let sources: Vec<String> = hits
            .iter()
            .take(3)
            .flat_map(|h| {
                h.sources
                    .iter()
                    .map(|(host, repo)| format!("{host}/{repo}"))
            })
            .collect();
        Err(Fallback::new(
            "registry not found",
            format!(
                "no pull labels, and no registry serving the image answered (sources: {}; \
                 containerd keeps no port in them: list the registry in the hosts directory)",
                sources.join(", ")
            ),
        ))
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
    async fn serve_layer(
        &self,
        layer: Digest,
        pinned: Reference,
    ) -> Result<(Remote, Digest), Fallback> {
        let remote = Remote {
            layer,
            reference: pinned.to_string(),
        };
        let trust = self.trust_for(&pinned);
        if let Some(d) = self.stored_diff_id(trust, &layer, &pinned) {
            return Ok((remote, d));
        }
        self.resolve_locally(&pinned).await;
        let image = self.client.resolve(&pinned).await.map_err(|e| {
            Fallback::new(
                "registry error",
                format!("{pinned}: cannot resolve the image: {e}"),
            )
        })?;
        match image.layers.iter().find(|d| d.digest == layer) {
            None => {
                return Err(Fallback::new(
                    "bad labels",
                    format!("{pinned} has no layer {layer}"),
                ))
            }
            Some(d) if !d.is_gzip() && !d.is_zstd() => {
                let why = format!("{pinned}: layer {layer} is {}", d.media_type);
                return Err(Fallback::new("neither gzip nor zstd", why));
            }
            Some(_) => {}
        }
        // The image's startup profile is looked up alongside its index (one referrers listing
        // serves both, and the two artifacts are fetched at once): the mount finds it done.
        self.profiles.start_lookup(&pinned);
        match trust {
            Trust::Owner => self.load_published(&pinned, &image, true).await?,
            Trust::Published => self.load_published(&pinned, &image, false).await?,
            Trust::Signed => self.load_signed(&pinned, &image).await?,
            // Never a published index: the node indexes the image from its own bytes. A layer
            // whose bytes do not match the image's claims fails here, and containerd's own
            // unpack refuses it too.
            Trust::Local => {
                tracing::info!(image = %pinned, "trust = local: indexing on this node");
                self.index_here(&pinned, &image).await?
            }
        }
        self.stored_diff_id(trust, &layer, &pinned)
            .map(|d| (remote, d))
            .ok_or_else(|| {
                Fallback::new(
                    "no index",
                    format!("{pinned}: its index has no entry for layer {layer}"),
                )
            })
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

    /// The DiffID of the stored index of `layer` that `trust` accepts for `image`: one built
    /// here, signed, or published by the image's repository (`owner`), any (`published`), one
    /// this node built (`local`), or one built here or signed by a trusted key (`signed`).
    fn stored_diff_id(&self, trust: Trust, layer: &Digest, image: &Reference) -> Option<Digest> {
        let found = match trust {
            Trust::Owner => {
                let p = self.store.provenance(layer).ok()??;
                if !p.serves(&image.repository_name()) {
                    return None;
                }
                self.store.get_layer(layer)
            }
            Trust::Published => self.store.get_layer(layer),
            Trust::Local => self.store.get_verified_layer(layer),
            Trust::Signed => self.store.get_signed_layer(layer),
        };
        found.ok().flatten().map(|(ix, _)| ix.diff_id)
    }

    /// The image's trust. `owner` needs to know which images use a snapshot, which only
    /// containerd's content store tells: without it (`containerd_address = ""`) it is `local`.
    fn trust_for(&self, image: &Reference) -> Trust {
        match self.trust.for_image(image) {
            Trust::Owner if self.discovery.is_none() => Trust::Local,
            t => t,
        }
    }

    /// [`Layers::admit`] for one remote snapshot `name`: under `owner`, a layer whose index
    /// another repository published is verified (indexed here from its bytes, DiffID checked)
    /// as soon as an image of another repository uses the snapshot. A layer that is not what
    /// its chain ID names is replaced by the layer of a using image that is (returned).
    async fn admit_one(
        &self,
        name: &str,
        remote: &Remote,
        asker: Option<&str>,
    ) -> Result<Option<Remote>, SnapshotError> {
        let refuse =
            |why: String| SnapshotError::FailedPrecondition(format!("snapshot {name}: {why}"));
        let Ok(pinned) = remote.reference.parse::<Reference>() else {
            return Err(refuse(format!(
                "unreadable reference {:?}",
                remote.reference
            )));
        };
        if self.trust_for(&pinned) != Trust::Owner {
            return Ok(None);
        }
        let publisher = match self.store.provenance(&remote.layer) {
            Ok(Some(clip_core::store::Provenance::Published { publisher, .. })) => publisher,
            // Built here, signed, or gone (the mount then says so).
            Ok(_) => return Ok(None),
            Err(e) => return Err(refuse(e.to_string())),
        };
        let discovery = self.discovery.as_ref().expect("owner trust has discovery");
        let users = match name.parse::<Digest>() {
            Ok(chain) => discovery.users(&chain).await.map_err(|e| {
                refuse(format!(
                    "cannot tell which images use it, so its layer cannot be checked: {e}"
                ))
            })?,
            Err(_) => Vec::new(),
        };
        let theirs = |host: &str, repo: &str| {
            publisher.as_deref().is_some_and(|p| {
                // containerd's pulls name the source by host name (no port), `clip pull` by
                // authority.
                p.split_once('/').is_some_and(|(authority, r)| {
                    (host == authority || clip_core::registry::hosts::hostname(authority) == host)
                        && r == repo
                })
            })
        };
        let others: Vec<&discover::Hit> = users
            .iter()
            .filter(|h| h.sources.iter().any(|(host, repo)| !theirs(host, repo)))
            .collect();
        let asked_by_other = asker.is_some_and(|a| publisher.as_deref() != Some(a));
        if publisher.is_some() && others.is_empty() && !asked_by_other {
            return Ok(None);
        }
        let _one = self.verifying.lock().await;
        if !matches!(
            self.store.provenance(&remote.layer),
            Ok(Some(clip_core::store::Provenance::Published { .. }))
        ) {
            return Ok(None); // verified meanwhile
        }
        let by = publisher.as_deref().unwrap_or("an unknown repository");
        tracing::warn!(
            snapshot = name,
            layer = %remote.layer,
            publisher = by,
            "another repository's image uses this layer, whose index {by} published: indexing \
             it on this node from its own bytes before that image reads it"
        );
        let t = Instant::now();
        let err = match self.verify_layer(&pinned, &remote.layer).await {
            Ok(()) => {
                tracing::info!(snapshot = name, layer = %remote.layer, seconds = t.elapsed().as_secs_f64(), "layer verified; the node's own index serves it from now on");
                verifications().add(1, &[opentelemetry::KeyValue::new("outcome", "verified")]);
                return Ok(None);
            }
            Err(e) => e,
        };
        // The layer is not what its chain ID names (or cannot be read): the snapshot takes the
        // layer of another image using the chain that is.
        tracing::error!(
            snapshot = name,
            layer = %remote.layer,
            publisher = by,
            "the layer this snapshot was committed from is not the one its chain ID names: {err}"
        );
        for hit in others.iter().filter(|h| h.layer != remote.layer).take(3) {
            let Some(other) = self.pinned_of(hit).await else {
                continue;
            };
            if self.verify_layer(&other, &hit.layer).await.is_ok() {
                tracing::warn!(snapshot = name, layer = %hit.layer, image = %other, "the snapshot now holds this image's layer, verified on this node; containers already running on the old one keep it");
                verifications().add(1, &[opentelemetry::KeyValue::new("outcome", "replaced")]);
                return Ok(Some(Remote {
                    layer: hit.layer,
                    reference: other.to_string(),
                }));
            }
        }
        verifications().add(1, &[opentelemetry::KeyValue::new("outcome", "refused")]);
        Err(refuse(format!(
            "layer {} (index published by {by}) is not the layer this chain ID names: {err}; no \
             image using the chain has one that is. Remove the image that brought it ({})",
            remote.layer, remote.reference
        )))
    }

    /// Indexes `layer` of image `pinned` on this node from its bytes (its digest and the DiffID
    /// the image's config states checked), filling the cache; the node's index replaces any.
    async fn verify_layer(&self, pinned: &Reference, layer: &Digest) -> Result<(), String> {
        self.resolve_locally(pinned).await;
        let image = self
            .client
            .resolve(pinned)
            .await
            .map_err(|e| e.to_string())?;
        let d = image
            .layers
            .iter()
            .find(|d| d.digest == *layer)
            .ok_or_else(|| format!("{pinned} has no layer {layer}"))?;
        image::index_layer_filling(
            &self.client,
            &self.store,
            &image,
            d,
            &clip_core::index::builder::BuildOptions::default(),
            Arc::new(|_| {}),
            true,
            Some(self.reads.cache().clone()),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// The pinned reference a discovered image is served from: the first of its sources'
    /// candidate authorities whose registry serves its manifest (probed, and remembered).
    async fn pinned_of(&self, hit: &discover::Hit) -> Option<Reference> {
        let discovery = self.discovery.as_ref()?;
        for (host, repo) in &hit.sources {
            for authority in discovery.authorities(host, repo).await {
                let Ok(pinned) =
                    format!("{authority}/{repo}@{}", hit.manifest).parse::<Reference>()
                else {
                    continue;
                };
                if self.probe_ok(&pinned, &hit.manifest).await {
                    discovery.served(host, repo, &authority).await;
                    return Some(pinned);
                }
            }
        }
        None
    }

    /// Loads the image's published indexes, under the `owner` rule when `owned` (its own
    /// published ones; layers another repository's index is stored for are indexed here), else
    /// as they are; without a published index, indexes it here with `index_on_demand`.
    async fn load_published(
        &self,
        pinned: &Reference,
        image: &ResolvedImage,
        owned: bool,
    ) -> Result<(), Fallback> {
        let loaded = match owned {
            true => {
                let fill = Some(self.reads.cache().clone());
                image::load_owned_indexes(&self.client, &self.store, image, fill).await
            }
            false => image::load_indexes(&self.client, &self.store, image).await,
        };
        match loaded {
            Ok(_) => Ok(()),
            Err(ImageError::NoIndex { .. }) if self.index_on_demand => {
                tracing::info!(image = %pinned, "no published index: indexing on demand");
                self.index_here(pinned, image).await
            }
            Err(ImageError::NoIndex { .. }) => Err(Fallback::new(
                "no index",
                format!("{pinned} has no published index (index_on_demand is off)"),
            )),
            Err(e) => Err(Fallback::new(
                "index error",
                format!("{pinned}: loading its index failed: {e}"),
            )),
        }
    }

    /// Loads an index signed by a trusted key; without one, the image is unpacked normally, or
    /// indexed here with `index_on_demand`.
    async fn load_signed(&self, pinned: &Reference, image: &ResolvedImage) -> Result<(), Fallback> {
        let keys = &self.trust.keys;
        let Err(e) = image::load_signed_indexes(&self.client, &self.store, image, keys).await
        else {
            return Ok(());
        };
        if !self.index_on_demand {
            return Err(Fallback::new(
                "not signed",
                format!("{pinned}: trust = signed: {e}"),
            ));
        }
        tracing::info!(image = %pinned, "trust = signed: {e}; indexing on this node");
        self.index_here(pinned, image).await
    }

    /// [`Self::index_now`]; a failure is a fallback: the image is then unpacked normally.
    async fn index_here(&self, pinned: &Reference, image: &ResolvedImage) -> Result<(), Fallback> {
        self.index_now(image).await.map_err(|e| {
            Fallback::new(
                "indexing failed",
                format!("{pinned}: indexing on this node failed: {e}"),
            )
        })
    }

    /// Indexes every gzip layer of `image` (one pass over each, filling the disk cache with every
    /// span on the way) and records the image.
    async fn index_now(&self, image: &ResolvedImage) -> Result<(), ImageError> {
        // A zstd:chunked layer's table of contents is its publisher's word (a manifest
        // annotation): this node indexes the layer from its bytes instead, as plain zstd.
        let opts = clip_core::index::builder::BuildOptions {
            from_bytes: true,
            ..Default::default()
        };
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
