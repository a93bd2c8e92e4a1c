//! Publishing an image's layer indexes to its registry, and finding them again.
//!
//! The indexes travel as one OCI artifact per image: an image manifest whose `artifactType` is
//! [`ARTIFACT_TYPE`], whose `subject` is the image manifest (so the referrers API lists it), and
//! whose layers are, for each image layer in order, the encoded layer index and its windows blob,
//! annotated with the image layer's digest. Indexes are deterministic, so images sharing base
//! layers push byte-identical blobs that the registry stores once.
//!
//! Registries without the referrers API (Distribution 2.8, Debian's `docker-registry`) get the
//! OCI referrers tag schema instead: an image index tagged `sha256-<subject hex>` listing the
//! artifacts, which we read and update.

use crate::digest::Digest;
use crate::index::{format, BlobRef, LayerIndex};
use crate::profile::Profile;
use crate::reference::Reference;
use crate::registry::{Client, RegistryError, ResolvedImage, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};
use crate::signature::{TrustedKeys, MAX_BUNDLE, MEDIA_TYPE_BUNDLE};
use bytes::Bytes;
use serde_json::{json, Value};

pub const ARTIFACT_TYPE: &str = "application/vnd.clip.index.v1";
pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.clip.profile.v1";
pub const ANNOTATION_LAYER: &str = "dev.clip.layer.digest";
const EMPTY_CONFIG: &[u8] = b"{}";
/// The most bytes read for one encoded index, whatever its descriptor claims (the decoder's
/// own limits keep real indexes far below this).
pub const MAX_INDEX_BLOB: u64 = 128 << 20;
const MEDIA_EMPTY: &str = "application/vnd.oci.empty.v1+json";

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("index artifact {digest}: {reason}")]
    Invalid { digest: String, reason: String },
}

/// The referrers tag for a subject digest.
pub fn referrers_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// One layer's index as published.
pub struct PublishedLayer<'a> {
    pub index: &'a LayerIndex,
    pub encoded: Bytes,
    pub windows: Bytes,
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Value {
    json!({ "mediaType": media_type, "digest": digest.to_string(), "size": size })
}

/// Pushes the index artifact for `image`; returns the artifact manifest's digest.
pub async fn push(
    client: &Client,
    image: &ResolvedImage,
    layers: &[PublishedLayer<'_>],
) -> Result<Digest, ArtifactError> {
    let r = &image.reference;
    let mut descs = Vec::new();
    for l in layers {
        let enc_digest = Digest::of(&l.encoded);
        client.push_blob(r, &enc_digest, l.encoded.clone()).await?;
        client
            .push_blob(r, &l.index.windows.digest, l.windows.clone())
            .await?;
        let mut d = descriptor(
            format::MEDIA_TYPE_INDEX,
            &enc_digest,
            l.encoded.len() as u64,
        );
        d["annotations"] = json!({ ANNOTATION_LAYER: l.index.layer.to_string() });
        descs.push(d);
        let mut w = descriptor(
            format::MEDIA_TYPE_WINDOWS,
            &l.index.windows.digest,
            l.index.windows.size,
        );
        w["annotations"] = json!({ ANNOTATION_LAYER: l.index.layer.to_string() });
        descs.push(w);
    }
    push_artifact(client, image, ARTIFACT_TYPE, descs).await
}

/// Pushes an artifact manifest of `artifact_type` whose subject is `image`'s manifest and whose
/// layers are `descs` (blobs already pushed), and lists it in the referrers tag when the
/// registry has no referrers API. Returns the artifact manifest's digest.
async fn push_artifact(
    client: &Client,
    image: &ResolvedImage,
    artifact_type: &str,
    descs: Vec<Value>,
) -> Result<Digest, ArtifactError> {
    let r = &image.reference;
    let empty = Digest::of(EMPTY_CONFIG);
    client
        .push_blob(r, &empty, Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": descriptor(MEDIA_EMPTY, &empty, EMPTY_CONFIG.len() as u64),
        "layers": descs,
        "subject": descriptor(&image.manifest_media_type, &image.manifest_digest, image.manifest_bytes.len() as u64),
    });
    let body = Bytes::from(serde_json::to_vec(&manifest).expect("json"));
    let digest = Digest::of(&body);
    client
        .push_manifest(r, &digest.to_string(), MEDIA_OCI_MANIFEST, body.clone())
        .await?;

    if client
        .referrers_api(r, &image.manifest_digest)
        .await?
        .is_none()
    {
        // No referrers API: maintain the referrers tag.
        let tag = referrers_tag(&image.manifest_digest);
        let mut index = match client.get_manifest(r, &tag).await {
            Ok((b, _, _)) => serde_json::from_slice::<Value>(&b).unwrap_or_else(|_| json!({})),
            Err(RegistryError::NotFound { .. }) => json!({}),
            Err(e) => return Err(e.into()),
        };
        let mut manifests: Vec<Value> = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        if !manifests.iter().any(|m| m["digest"] == digest.to_string()) {
            let mut d = descriptor(MEDIA_OCI_MANIFEST, &digest, body.len() as u64);
            d["artifactType"] = json!(artifact_type);
            manifests.push(d);
        }
        index = json!({ "schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests });
        let b = Bytes::from(serde_json::to_vec(&index).expect("json"));
        client.push_manifest(r, &tag, MEDIA_OCI_INDEX, b).await?;
    }
    client.forget_referrers(r, &image.manifest_digest);
    Ok(digest)
}

/// A published layer index, fetched and verified.
pub struct FetchedLayer {
    pub index: LayerIndex,
    pub encoded: Bytes,
}

/// Finds the newest clip index artifact for `image` and fetches its layer indexes (not the
/// windows, which are read by range when needed). `Ok(None)` when there is none.
pub async fn fetch(
    client: &Client,
    image: &ResolvedImage,
) -> Result<Option<(Digest, Vec<FetchedLayer>)>, ArtifactError> {
    let Some((artifact, m)) = find_artifact(client, image, ARTIFACT_TYPE).await? else {
        return Ok(None);
    };
    Ok(Some((
        artifact,
        fetch_layers(client, image, &artifact, &m).await?,
    )))
}

/// Like [`fetch`], but only an index artifact signed with one of `keys` (see
/// [`crate::signature`]); the newest signed one wins. `Ok(None)` when no artifact is signed.
pub async fn fetch_signed(
    client: &Client,
    image: &ResolvedImage,
    keys: &TrustedKeys,
) -> Result<Option<(Digest, Vec<FetchedLayer>)>, ArtifactError> {
    let r = &image.reference;
    let candidates = referrers(client, r, &image.manifest_digest, &[ARTIFACT_TYPE]).await?;
    for artifact in candidates.iter().rev() {
        if is_signed(client, r, artifact, keys).await {
            let m = artifact_manifest(
                client,
                r,
                artifact,
                &image.manifest_digest,
                Some(ARTIFACT_TYPE),
            )
            .await?;
            return Ok(Some((
                *artifact,
                fetch_layers(client, image, artifact, &m).await?,
            )));
        }
        tracing::warn!(artifact = %artifact, image = %r, "index artifact not signed by a trusted key");
    }
    Ok(None)
}

/// Whether a signature bundle attached to `artifact` verifies with one of `keys` and names it.
async fn is_signed(client: &Client, r: &Reference, artifact: &Digest, keys: &TrustedKeys) -> bool {
    // cosign lists its bundle under the referrers tag with the empty config's type.
    let types = [MEDIA_TYPE_BUNDLE, MEDIA_EMPTY];
    let Ok(sigs) = referrers(client, r, artifact, &types).await else {
        return false;
    };
    for sig in sigs.iter().rev() {
        let Ok(m) = artifact_manifest(client, r, sig, artifact, None).await else {
            continue;
        };
        for d in m["layers"].as_array().into_iter().flatten() {
            if d["mediaType"] != MEDIA_TYPE_BUNDLE {
                continue;
            }
            let Some(digest) = d["digest"].as_str().and_then(|s| s.parse::<Digest>().ok()) else {
                continue;
            };
            let Ok(bundle) = client.get_blob(r, &digest, MAX_BUNDLE).await else {
                continue;
            };
            match keys.verify_bundle(&bundle, artifact) {
                Ok(()) => return true,
                Err(e) => tracing::debug!(signature = %sig, "signature refused: {e}"),
            }
        }
    }
    false
}

/// The layer indexes an index artifact lists, one per layer of `image`, each checked against
/// the layer's digest and DiffID.
async fn fetch_layers(
    client: &Client,
    image: &ResolvedImage,
    artifact: &Digest,
    m: &Value,
) -> Result<Vec<FetchedLayer>, ArtifactError> {
    let r = &image.reference;
    let invalid = |reason: String| ArtifactError::Invalid {
        digest: artifact.to_string(),
        reason,
    };
    let descs = m["layers"]
        .as_array()
        .ok_or_else(|| invalid("no layers".into()))?;
    // Every layer's index at once: one round trip, not one per layer.
    let fetches = image.layers.iter().map(|layer| async move {
        let d = descs
            .iter()
            .find(|d| {
                d["mediaType"] == format::MEDIA_TYPE_INDEX
                    && d["annotations"][ANNOTATION_LAYER] == layer.digest.to_string()
            })
            .ok_or_else(|| invalid(format!("no index for layer {}", layer.digest)))?;
        let digest: Digest = d["digest"]
            .as_str()
            .unwrap_or("")
            .parse()
            .map_err(|e: crate::digest::DigestParseError| invalid(e.to_string()))?;
        // The descriptor's size is the publisher's word: the read is capped regardless.
        let size = d["size"].as_u64().unwrap_or(0).clamp(1, MAX_INDEX_BLOB);
        let encoded = client.get_blob(r, &digest, size).await?;
        let index = format::decode(&encoded)
            .map_err(|e| invalid(format!("layer {}: {e}", layer.digest)))?;
        if index.layer != layer.digest || index.diff_id != layer.diff_id {
            return Err(invalid(format!(
                "index for layer {} describes another layer",
                layer.digest
            )));
        }
        Ok(FetchedLayer { index, encoded })
    });
    futures_util::future::try_join_all(fetches).await
}

/// The artifacts of `artifact_type` whose subject is `subject`, oldest first: from the
/// referrers API, or the referrers tag on registries without it.
async fn referrers(
    client: &Client,
    r: &Reference,
    subject: &Digest,
    artifact_types: &[&str],
) -> Result<Vec<Digest>, ArtifactError> {
    let Some(listing) = client
        .referrers(r, subject, &referrers_tag(subject))
        .await?
    else {
        return Ok(Vec::new());
    };
    let listing: Value = serde_json::from_slice(&listing).map_err(|e| ArtifactError::Invalid {
        digest: referrers_tag(subject),
        reason: e.to_string(),
    })?;
    Ok(listing["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| artifact_types.iter().any(|t| m["artifactType"] == *t))
        .filter_map(|m| m["digest"].as_str()?.parse::<Digest>().ok())
        .collect())
}

/// An artifact's manifest, checked to refer to `subject`.
async fn artifact_manifest(
    client: &Client,
    r: &Reference,
    artifact: &Digest,
    subject: &Digest,
    artifact_type: Option<&str>,
) -> Result<Value, ArtifactError> {
    let (body, _, _) = client.get_manifest(r, &artifact.to_string()).await?;
    let invalid = |reason: String| ArtifactError::Invalid {
        digest: artifact.to_string(),
        reason,
    };
    let m: Value = serde_json::from_slice(&body).map_err(|e| invalid(e.to_string()))?;
    if m["subject"]["digest"] != subject.to_string() {
        return Err(invalid("its subject is another manifest".into()));
    }
    // A referrers listing is the registry's word (or, under the referrers tag schema, whoever
    // pushed the tag's): the manifest itself must say what it is.
    if let Some(t) = artifact_type {
        if m["artifactType"] != t {
            return Err(invalid(format!(
                "it is not a {t} artifact (artifactType {})",
                m["artifactType"]
                    .to_string()
                    .chars()
                    .take(100)
                    .collect::<String>()
            )));
        }
    }
    Ok(m)
}

/// The newest artifact of `artifact_type` referring to `image`: its digest and manifest.
async fn find_artifact(
    client: &Client,
    image: &ResolvedImage,
    artifact_type: &str,
) -> Result<Option<(Digest, Value)>, ArtifactError> {
    let r = &image.reference;
    let candidates = referrers(client, r, &image.manifest_digest, &[artifact_type]).await?;
    let Some(artifact) = candidates.last() else {
        return Ok(None);
    };
    let m = artifact_manifest(
        client,
        r,
        artifact,
        &image.manifest_digest,
        Some(artifact_type),
    )
    .await?;
    Ok(Some((*artifact, m)))
}

/// Publishes a startup profile for `image` (see [`crate::profile`]); returns the artifact's
/// digest. The newest profile artifact is the one nodes use.
pub async fn push_profile(
    client: &Client,
    image: &ResolvedImage,
    profile: &Profile,
) -> Result<Digest, ArtifactError> {
    let body = Bytes::from(profile.encode());
    let digest = Digest::of(&body);
    client
        .push_blob(&image.reference, &digest, body.clone())
        .await?;
    let d = descriptor(crate::profile::MEDIA_TYPE, &digest, body.len() as u64);
    push_artifact(client, image, PROFILE_ARTIFACT_TYPE, vec![d]).await
}

/// The newest startup profile published for `image`, if any. A profile recorded on another
/// manifest is refused (stale).
pub async fn fetch_profile(
    client: &Client,
    image: &ResolvedImage,
) -> Result<Option<Profile>, ArtifactError> {
    let Some((artifact, m)) = find_artifact(client, image, PROFILE_ARTIFACT_TYPE).await? else {
        return Ok(None);
    };
    let invalid = |reason: String| ArtifactError::Invalid {
        digest: artifact.to_string(),
        reason,
    };
    let d = m["layers"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|d| d["mediaType"] == crate::profile::MEDIA_TYPE)
        })
        .ok_or_else(|| invalid("no profile blob".into()))?;
    let digest: Digest = d["digest"]
        .as_str()
        .unwrap_or("")
        .parse()
        .map_err(|e: crate::digest::DigestParseError| invalid(e.to_string()))?;
    let raw = client
        .get_blob(
            &image.reference,
            &digest,
            crate::profile::MAX_ENCODED as u64,
        )
        .await?;
    let p = Profile::decode(&raw).map_err(|e| invalid(e.to_string()))?;
    if p.manifest != image.manifest_digest {
        return Err(invalid(format!("recorded on manifest {}", p.manifest)));
    }
    Ok(Some(p))
}

/// The encoded-index reference of a fetched or built layer.
pub fn blob_ref(encoded: &[u8]) -> BlobRef {
    BlobRef {
        digest: Digest::of(encoded),
        size: encoded.len() as u64,
    }
}
