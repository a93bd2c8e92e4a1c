//! The containerd labels clip reads and writes: the remote-snapshot handshake's labels on
//! Prepare, and the content labels containerd puts on an image's manifest.
//!
//! A leaf module: the snapshotter, `clip pull` and label-free discovery all name labels from
//! here, and it uses nothing of the crate.

/// The chain ID a Prepare asks the snapshotter to commit (containerd's remote handshake).
pub const TARGET: &str = "containerd.io/snapshot.ref";
/// The image reference a pull's handler adds to each Prepare (CRI, `clip pull`).
pub const IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// The manifest digest a pull's handler adds.
pub const MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// The layer (compressed) digest a pull's handler adds.
pub const LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// Every layer of the image, comma-separated (the CRI's handler adds it; so does `clip pull`).
pub const IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// On a Prepare (`clip pull --full`): `full` fetches the whole layer before the Prepare
/// returns (eager mode, docs/snapshotter.md).
pub const FETCH: &str = "containerd.io/snapshot/clip.fetch";
/// Set on the snapshots this snapshotter serves lazily.
pub const REMOTE: &str = "containerd.io/snapshot/clip.remote";
/// On a manifest in containerd's content store: its config's digest.
pub const CONTENT_CONFIG: &str = "containerd.io/gc.ref.content.config";
/// On a manifest: `<prefix><host>=<repository>[,<repository>...]`, where it was pulled from.
pub const DISTRIBUTION_SOURCE: &str = "containerd.io/distribution.source.";
