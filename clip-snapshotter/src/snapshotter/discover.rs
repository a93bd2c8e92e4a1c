//! Finding the layer behind a Prepare that carries no pull labels.
//!
//! `ctr pull`, nerdctl, the CRI with `disable_snapshot_annotations = true` and containerd 2.x's
//! transfer service call `Prepare(key, parent)` with only `containerd.io/snapshot.ref=<chain ID>`.
//! By then containerd has the image's manifest and config in its content store: the unpacker
//! computes the chain from the config it read. The manifest's content labels name its config
//! (`containerd.io/gc.ref.content.config`), its layers (`...content.l.<i>`) and where it came
//! from (`containerd.io/distribution.source.<host>=<repository>`). So: list the manifests of
//! every namespace (containerd 1.6 does not tell a proxy plugin the request's namespace), read
//! each new one and its config once, and map every chain ID of every manifest to its layer.
//!
//! containerd writes the source label with the registry's host *name*: a port is dropped
//! (`127.0.0.1:5000` becomes `127.0.0.1`). Which authority serves it is found among the hosts
//! directory's entries, the insecure list and the images containerd already has, with that
//! host name; the caller checks a candidate by fetching the pinned manifest from it.
//!
//! Cost per Prepare: nothing for a chain seen before; otherwise one listing per namespace
//! (content infos only) plus two reads per manifest never seen. What is learned is kept for
//! `MAX_MANIFESTS` manifests.

use crate::labels;
use clip_core::digest::Digest;
use clip_core::image::chain_ids;
use clip_core::registry::{self, hosts};
use containerd_client::services::v1::{
    content_client::ContentClient, images_client::ImagesClient,
    namespaces_client::NamespacesClient, ListContentRequest, ListImagesRequest,
    ListNamespacesRequest, ReadContentRequest,
};
use containerd_client::tonic::{self, transport::Channel, Request};
use opentelemetry::metrics::{Counter, Histogram};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Manifests and configs bigger than this are not read (the distribution spec suggests 4 MiB).
const MAX_DOC: usize = 8 << 20;
/// Manifests remembered; beyond this the oldest knowledge is dropped and read again if needed.
const MAX_MANIFESTS: usize = 16384;
/// Namespaces searched per lookup.
const MAX_NAMESPACES: usize = 256;
/// Layers per manifest (more is not an image containerd would unpack either).
const MAX_LAYERS: usize = 1024;
/// Each call to containerd.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("containerd at {address}: {reason}")]
    Containerd { address: String, reason: String },
}

/// Why a manifest gave nothing.
enum Unreadable {
    /// Not an image manifest this can use: not read again.
    Unusable(String),
    /// Not (completely) in the content store yet: read again on the next lookup.
    NotYet(String),
}

impl std::fmt::Display for Unreadable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unreadable::Unusable(e) | Unreadable::NotYet(e) => f.write_str(e),
        }
    }
}

/// One layer a chain ID can be served from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hit {
    pub namespace: String,
    pub manifest: Digest,
    pub layer: Digest,
    /// `(host name, repository)` from the manifest's distribution-source labels.
    pub sources: Vec<(String, String)>,
}

/// What one manifest in containerd's content store gives.
#[derive(Debug)]
struct Facts {
    namespace: String,
    layers: Vec<Digest>,
    chains: Vec<Digest>,
    sources: Vec<(String, String)>,
    /// The content's last update (seconds): the newest manifest wins a shared chain.
    updated: i64,
}

#[derive(Default)]
struct State {
    channel: Option<Channel>,
    /// Manifest -> what it gives (`None`: not an image manifest we can use; not read again).
    /// Keyed by namespace and manifest: one manifest in two namespaces has two sets of labels
    /// (where each pulled it from).
    manifests: HashMap<(String, Digest), Option<Facts>>,
    /// Insertion order, for dropping the oldest knowledge.
    order: std::collections::VecDeque<(String, Digest)>,
    /// Authorities (`host[:port]`) of the images containerd has, across namespaces.
    image_authorities: BTreeSet<String>,
    /// The namespace image documents were last found in.
    documents_namespace: Option<String>,
    /// Host name (+ repository) -> the authority that served it last.
    served_by: HashMap<(String, String), String>,
}

pub struct Discovery {
    address: PathBuf,
    hosts_dir: Option<PathBuf>,
    insecure: Vec<String>,
    state: tokio::sync::Mutex<State>,
}

struct Metrics {
    manifests_read: Counter<u64>,
    lookups: Counter<u64>,
    refresh_seconds: Histogram<f64>,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let meter = opentelemetry::global::meter("clip");
        Metrics {
            manifests_read: meter
                .u64_counter("clip.discovery.manifests.read")
                .with_description(
                    "Manifests (and their configs) read from containerd's content store to find \
                     the layer of a Prepare without pull labels",
                )
                .build(),
            lookups: meter
                .u64_counter("clip.discovery.lookups")
                .with_description("Prepares without pull labels, by whether the layer was found")
                .build(),
            refresh_seconds: meter
                .f64_histogram("clip.discovery.refresh.seconds")
                .with_description(
                    "Time to list containerd's manifests and read the new ones (a Prepare \
                     without pull labels for a chain not seen before)",
                )
                .with_unit("s")
                .build(),
        }
    })
}

impl Discovery {
    /// `address`: containerd's socket. `hosts_dir` and `insecure`: the registry configuration
    /// whose entries name authorities (with their ports).
    pub fn new(address: &Path, hosts_dir: Option<&Path>, insecure: &[String]) -> Discovery {
        Discovery {
            address: address.to_path_buf(),
            hosts_dir: hosts_dir.map(Path::to_path_buf),
            insecure: insecure.to_vec(),
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    fn err(&self, reason: impl std::fmt::Display) -> DiscoverError {
        DiscoverError::Containerd {
            address: self.address.display().to_string(),
            reason: reason.to_string(),
        }
    }

    /// The layers `chain` can be served from, the newest manifest first: from the images of
    /// containerd namespace `namespace` when the request said which (containerd 1.7 and later),
    /// else of any.
    pub async fn find(
        &self,
        chain: &Digest,
        namespace: Option<&str>,
    ) -> Result<Vec<Hit>, DiscoverError> {
        let mut st = self.state.lock().await;
        let mine = |hits: Vec<Hit>| only_in(hits, namespace);
        let mut hits = mine(hits_of(&st, chain));
        if hits.is_empty() {
            let t = std::time::Instant::now();
            let refreshed = self.refresh(&mut st).await;
            metrics()
                .refresh_seconds
                .record(t.elapsed().as_secs_f64(), &[]);
            if let Err(e) = refreshed {
                // A broken connection is dialled again next time.
                st.channel = None;
                return Err(e);
            }
            hits = mine(hits_of(&st, chain));
        }
        let outcome = if hits.is_empty() { "none" } else { "found" };
        metrics()
            .lookups
            .add(1, &[opentelemetry::KeyValue::new("outcome", outcome)]);
        Ok(hits)
    }

    /// Every image manifest containerd holds, in any namespace, whose chains include `chain`,
    /// read afresh (an image whose pull began a moment ago counts), the newest first: the
    /// images that use a committed snapshot.
    pub async fn users(&self, chain: &Digest) -> Result<Vec<Hit>, DiscoverError> {
        let mut st = self.state.lock().await;
        if let Err(e) = self.refresh(&mut st).await {
            st.channel = None;
            return Err(e);
        }
        Ok(hits_of(&st, chain))
    }

    /// Image `manifest` and its config from containerd's content store (the namespace it was
    /// last found in first, then every namespace), each checked against its digest: a pull
    /// has put them there before its first Prepare, so the snapshotter need not fetch them from
    /// the registry again. `None` when they are not (both) there or containerd is out of reach.
    pub async fn image_documents(&self, manifest: &Digest) -> Option<(Vec<u8>, Vec<u8>)> {
        let (channel, last) = {
            let mut st = self.state.lock().await;
            let channel = self.channel(&mut st).await.ok()?;
            (channel, st.documents_namespace.clone())
        };
        // The usual case (every pull in one namespace) costs no listing.
        if let Some(ns) = &last {
            if let Some(found) = self.documents_in(&channel, ns, manifest).await {
                return Some(found);
            }
        }
        for ns in self.namespaces(&channel).await.ok()? {
            if last.as_ref() == Some(&ns) {
                continue;
            }
            if let Some(found) = self.documents_in(&channel, &ns, manifest).await {
                self.state.lock().await.documents_namespace = Some(ns);
                return Some(found);
            }
        }
        None
    }

    /// Image `manifest` and its config from namespace `ns`, if both are there.
    async fn documents_in(
        &self,
        channel: &Channel,
        ns: &str,
        manifest: &Digest,
    ) -> Option<(Vec<u8>, Vec<u8>)> {
        let body = self.read(channel, ns, manifest).await.ok()?;
        let (config, _) = registry::manifest_parts(&body).ok()?;
        let config = self.read(channel, ns, &config).await.ok()?;
        Some((body, config))
    }

    /// containerd's namespaces (at most [`MAX_NAMESPACES`]).
    async fn namespaces(&self, channel: &Channel) -> Result<Vec<String>, DiscoverError> {
        let listed = self
            .call(
                NamespacesClient::new(channel.clone())
                    .list(Request::new(ListNamespacesRequest::default())),
            )
            .await?
            .namespaces;
        Ok(listed
            .into_iter()
            .take(MAX_NAMESPACES)
            .map(|n| n.name)
            .collect())
    }

    /// The authorities to try for a source's host name, the likeliest first: the one that
    /// served it before, hosts-directory entries, insecure entries and containerd's images
    /// with that host name, then the name itself (the scheme's default port).
    pub async fn authorities(&self, host: &str, repo: &str) -> Vec<String> {
        let st = self.state.lock().await;
        let mut out: Vec<String> = Vec::new();
        // `clip pull` names the source by authority (with its port), containerd by host name.
        let mut add = |a: &str| {
            if (a == host || hosts::hostname(a) == host) && !out.iter().any(|o| o == a) {
                out.push(a.to_string());
            }
        };
        if let Some(a) = st.served_by.get(&(host.to_string(), repo.to_string())) {
            add(a);
        }
        if let Some(dir) = &self.hosts_dir {
            if let Ok(rd) = std::fs::read_dir(dir) {
                let mut names: Vec<String> = rd
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect();
                names.sort();
                names.iter().for_each(|n| add(n));
            }
        }
        self.insecure.iter().for_each(|a| add(a));
        st.image_authorities.iter().for_each(|a| add(a));
        add(host);
        out
    }

    /// Remembers that `authority` served `host`/`repo`.
    pub async fn served(&self, host: &str, repo: &str, authority: &str) {
        let mut st = self.state.lock().await;
        if st.served_by.len() >= MAX_MANIFESTS {
            st.served_by.clear();
        }
        st.served_by
            .insert((host.to_string(), repo.to_string()), authority.to_string());
    }

    async fn channel(&self, st: &mut State) -> Result<Channel, DiscoverError> {
        if let Some(c) = &st.channel {
            return Ok(c.clone());
        }
        let c = crate::containerd::connect(&self.address, CALL_TIMEOUT)
            .await
            .map_err(|e| self.err(e.reason))?;
        st.channel = Some(c.clone());
        Ok(c)
    }

    /// Reads every manifest not seen yet, in every namespace.
    async fn refresh(&self, st: &mut State) -> Result<(), DiscoverError> {
        let channel = self.channel(st).await?;
        for ns in &self.namespaces(&channel).await? {
            let images = self
                .call(
                    ImagesClient::new(channel.clone())
                        .list(in_namespace(ns, ListImagesRequest::default())),
                )
                .await?
                .images;
            for i in images {
                if let Some(a) = authority_of(&i.name) {
                    if st.image_authorities.len() < MAX_MANIFESTS {
                        st.image_authorities.insert(a);
                    }
                }
            }
            let mut stream = self
                .call(ContentClient::new(channel.clone()).list(in_namespace(
                    ns,
                    ListContentRequest {
                        filters: vec![format!("labels.\"{}\"", labels::CONTENT_CONFIG)],
                    },
                )))
                .await?;
            let mut infos = Vec::new();
            loop {
                let next = tokio::time::timeout(CALL_TIMEOUT, stream.message())
                    .await
                    .map_err(|_| self.err("listing content timed out"))?
                    .map_err(|e| self.err(e))?;
                match next {
                    Some(page) => infos.extend(page.info),
                    None => break,
                }
            }
            for info in infos {
                let Ok(manifest) = info.digest.parse::<Digest>() else {
                    continue;
                };
                let sources = sources_of(&info.labels);
                let key = (ns.clone(), manifest);
                if let Some(known) = st.manifests.get_mut(&key) {
                    // Pulled again from another repository since it was read: the repositories
                    // that use it are the ones its labels name now.
                    if let (Some(f), false) = (known.as_mut(), sources.is_empty()) {
                        f.sources = sources;
                    }
                    continue;
                }
                if sources.is_empty() {
                    // Labelled later in the same pull, or not pulled from a registry: looked
                    // at again next time.
                    continue;
                }
                match self.read_facts(&channel, ns, &manifest, &info.labels).await {
                    Ok((layers, chains)) => {
                        let facts = Facts {
                            namespace: ns.clone(),
                            layers,
                            chains,
                            sources,
                            updated: info.updated_at.map_or(0, |t| t.seconds),
                        };
                        remember(st, key, Some(facts));
                    }
                    Err(Unreadable::Unusable(e)) => {
                        tracing::debug!(%manifest, namespace = %ns, "not a usable image manifest: {e}");
                        remember(st, key, None);
                    }
                    // Its config may not be fetched yet: looked at again next time.
                    Err(Unreadable::NotYet(e)) => {
                        tracing::debug!(%manifest, namespace = %ns, "manifest not readable yet: {e}")
                    }
                }
            }
        }
        Ok(())
    }

    /// The layers and chain IDs of a manifest, from it and its config in the content store.
    async fn read_facts(
        &self,
        channel: &Channel,
        ns: &str,
        manifest: &Digest,
        labels: &HashMap<String, String>,
    ) -> Result<(Vec<Digest>, Vec<Digest>), Unreadable> {
        use Unreadable::Unusable;
        metrics().manifests_read.add(1, &[]);
        let config: Digest = labels
            .get(labels::CONTENT_CONFIG)
            .and_then(|c| c.parse().ok())
            .ok_or(Unusable("no config label".into()))?;
        let body = self.read(channel, ns, manifest).await?;
        let (named, layers) =
            registry::manifest_parts(&body).map_err(|e| Unusable(e.to_string()))?;
        if named != config {
            return Err(Unusable(
                "the config label does not match the manifest".into(),
            ));
        }
        if layers.len() > MAX_LAYERS {
            return Err(Unusable(format!("{} layers", layers.len())));
        }
        let body = self.read(channel, ns, &config).await?;
        let diff_ids = registry::config_diff_ids(&body).map_err(|e| Unusable(e.to_string()))?;
        if diff_ids.len() != layers.len() {
            return Err(Unusable(format!(
                "{} layers but {} DiffIDs",
                layers.len(),
                diff_ids.len()
            )));
        }
        Ok((layers, chain_ids(&diff_ids)))
    }

    /// A small blob from the content store, verified against its digest.
    async fn read(
        &self,
        channel: &Channel,
        ns: &str,
        digest: &Digest,
    ) -> Result<Vec<u8>, Unreadable> {
        use Unreadable::{NotYet, Unusable};
        let req = in_namespace(
            ns,
            ReadContentRequest {
                digest: digest.to_string(),
                offset: 0,
                size: 0,
            },
        );
        let mut stream = self
            .call(ContentClient::new(channel.clone()).read(req))
            .await
            .map_err(|e| NotYet(e.to_string()))?;
        let mut out = Vec::new();
        loop {
            let next = tokio::time::timeout(CALL_TIMEOUT, stream.message())
                .await
                .map_err(|_| NotYet("reading content timed out".into()))?
                .map_err(|e| NotYet(e.to_string()))?;
            let Some(chunk) = next else { break };
            if out.len() + chunk.data.len() > MAX_DOC {
                return Err(Unusable(format!("{digest} is larger than {MAX_DOC} bytes")));
            }
            out.extend_from_slice(&chunk.data);
        }
        if Digest::of(&out) != *digest {
            return Err(NotYet(format!(
                "{digest}: content does not match its digest"
            )));
        }
        Ok(out)
    }

    async fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, DiscoverError> {
        match tokio::time::timeout(CALL_TIMEOUT, f).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.err(format!("{}: {}", s.code(), s.message()))),
            Err(_) => Err(self.err("timed out")),
        }
    }
}

fn in_namespace<T>(ns: &str, msg: T) -> Request<T> {
    crate::containerd::request(ns, None, msg)
}

fn remember(st: &mut State, manifest: (String, Digest), facts: Option<Facts>) {
    while st.manifests.len() >= MAX_MANIFESTS {
        match st.order.pop_front() {
            Some(old) => {
                st.manifests.remove(&old);
            }
            None => break,
        }
    }
    st.order.push_back(manifest.clone());
    st.manifests.insert(manifest, facts);
}

/// The hits of namespace `ns` (all of them when the namespace is not known).
fn only_in(hits: Vec<Hit>, ns: Option<&str>) -> Vec<Hit> {
    hits.into_iter()
        .filter(|h| ns.is_none_or(|ns| h.namespace == ns))
        .collect()
}

fn hits_of(st: &State, chain: &Digest) -> Vec<Hit> {
    let mut found: Vec<(i64, Hit)> = st
        .manifests
        .iter()
        .filter_map(|((_, m), f)| {
            let f = f.as_ref()?;
            let i = f.chains.iter().position(|c| c == chain)?;
            Some((
                f.updated,
                Hit {
                    namespace: f.namespace.clone(),
                    manifest: *m,
                    layer: f.layers[i],
                    sources: f.sources.clone(),
                },
            ))
        })
        .filter(|(_, h)| !h.sources.is_empty())
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.manifest.cmp(&b.1.manifest)));
    found.into_iter().map(|(_, h)| h).collect()
}

/// `(host name, repository)` pairs of `containerd.io/distribution.source.<host>=<repo>` labels
/// (containerd may list several repositories, comma-separated).
fn sources_of(labels: &HashMap<String, String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = labels
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(labels::DISTRIBUTION_SOURCE)?, v)))
        .flat_map(|(host, repos)| {
            repos
                .split(',')
                .filter(|r| !r.is_empty())
                .map(move |r| (host.to_string(), r.to_string()))
        })
        .collect();
    out.sort();
    out
}

/// The registry authority of an image name (`host[:port]/repo:tag`), when it names one.
fn authority_of(name: &str) -> Option<String> {
    let (first, _) = name.split_once('/')?;
    (first.contains('.') || first.contains(':') || first == "localhost").then(|| first.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn source_labels_give_host_and_every_repository() {
        let labels: HashMap<String, String> = [
            (
                format!("{}127.0.0.1", labels::DISTRIBUTION_SOURCE),
                "a/b,c".to_string(),
            ),
            (
                format!("{}docker.io", labels::DISTRIBUTION_SOURCE),
                "library/busybox".into(),
            ),
            (labels::CONTENT_CONFIG.into(), d("c").to_string()),
        ]
        .into();
        assert_eq!(
            sources_of(&labels),
            vec![
                ("127.0.0.1".into(), "a/b".into()),
                ("127.0.0.1".into(), "c".into()),
                ("docker.io".into(), "library/busybox".into()),
            ]
        );
    }

    #[test]
    fn image_names_give_their_registry_authority() {
        assert_eq!(
            authority_of("127.0.0.1:5000/x:v1").as_deref(),
            Some("127.0.0.1:5000")
        );
        assert_eq!(
            authority_of("docker.io/library/busybox:1").as_deref(),
            Some("docker.io")
        );
        assert_eq!(authority_of("localhost/x").as_deref(), Some("localhost"));
        assert_eq!(authority_of("library/busybox:1"), None);
        assert_eq!(authority_of("busybox"), None);
    }

    #[test]
    fn a_shared_chain_is_served_from_the_newest_manifest_and_knowledge_is_bounded() {
        let mut st = State::default();
        let facts = |updated, layer: &str| Facts {
            namespace: "default".into(),
            layers: vec![d(layer)],
            chains: vec![d("chain")],
            sources: vec![("h".into(), "r".into())],
            updated,
        };
        let key = |m: &str| ("default".to_string(), d(m));
        remember(&mut st, key("old"), Some(facts(1, "l-old")));
        remember(&mut st, key("new"), Some(facts(2, "l-new")));
        remember(&mut st, key("unusable"), None);
        let hits = hits_of(&st, &d("chain"));
        assert_eq!(
            hits.iter().map(|h| h.layer).collect::<Vec<_>>(),
            vec![d("l-new"), d("l-old")]
        );
        assert!(hits_of(&st, &d("other")).is_empty());
        // Another namespace's image with the chain serves only requests of that namespace.
        let mut theirs = facts(3, "l-theirs");
        theirs.namespace = "tenant-b".into();
        // The same manifest in another namespace is known there on its own.
        remember(&mut st, ("tenant-b".into(), d("old")), Some(theirs));
        let layers = |ns| {
            only_in(hits_of(&st, &d("chain")), ns)
                .iter()
                .map(|h| h.layer)
                .collect::<Vec<_>>()
        };
        assert_eq!(layers(Some("default")), vec![d("l-new"), d("l-old")]);
        assert_eq!(layers(Some("tenant-b")), vec![d("l-theirs")]);
        assert!(layers(Some("tenant-c")).is_empty());
        assert_eq!(layers(None).len(), 3, "containerd 1.6 does not say");
        for i in 0..MAX_MANIFESTS + 10 {
            remember(&mut st, key(&format!("m{i}")), None);
        }
        assert_eq!(st.manifests.len(), MAX_MANIFESTS);
        assert!(
            hits_of(&st, &d("chain")).is_empty(),
            "the oldest are dropped first"
        );
    }
}
