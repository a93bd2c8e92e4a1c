//! Resolving a reference to one image: index/list -> platform -> manifest -> config.

use super::{
    Client, RegistryError, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
};
use crate::digest::Digest;
use crate::reference::Reference;
use bytes::Bytes;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use std::fmt;

/// An `os/arch[/variant]` platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in OCI's names.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            a => a,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: (arch == "arm64").then(|| "v8".into()),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] => Ok(Platform {
                os: (*os).into(),
                arch: (*arch).into(),
                variant: None,
            }),
            [os, arch, v] => Ok(Platform {
                os: (*os).into(),
                arch: (*arch).into(),
                variant: Some((*v).into()),
            }),
            _ => Err(format!(
                "invalid platform {s:?} (expected os/arch[/variant])"
            )),
        }
    }
}

/// One layer of a resolved image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerDescriptor {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// The DiffID from the image config (sha256 of the uncompressed layer).
    pub diff_id: Digest,
    /// Where a zstd:chunked layer's table of contents is, as the manifest annotates it.
    #[serde(default)]
    pub toc: Option<TocPosition>,
}

/// A zstd:chunked layer's table of contents: a zstd frame at `offset` of the blob, `length`
/// bytes long, `uncompressed` bytes when decompressed, with sha256 `checksum` of its compressed
/// bytes (the manifest's `io.containers.zstd-chunked.manifest-position` and
/// `manifest-checksum` annotations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TocPosition {
    pub offset: u64,
    pub length: u64,
    pub uncompressed: u64,
    pub checksum: Digest,
}

pub const ANNOTATION_TOC_POSITION: &str = "io.containers.zstd-chunked.manifest-position";
pub const ANNOTATION_TOC_CHECKSUM: &str = "io.containers.zstd-chunked.manifest-checksum";

impl TocPosition {
    /// The position the annotations give, if they give a well-formed one (type 1, the JSON
    /// table of contents, within the blob's `size`).
    pub fn from_annotations(
        annotations: &std::collections::HashMap<String, String>,
        size: u64,
    ) -> Option<TocPosition> {
        let pos = annotations.get(ANNOTATION_TOC_POSITION)?;
        let checksum = annotations.get(ANNOTATION_TOC_CHECKSUM)?.parse().ok()?;
        let mut f = pos.split(':').map(|n| n.parse::<u64>().ok());
        let (Some(Some(offset)), Some(Some(length)), Some(Some(uncompressed)), Some(Some(1)), None) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            return None;
        };
        (length > 0 && offset.checked_add(length)? <= size).then_some(TocPosition {
            offset,
            length,
            uncompressed,
            checksum,
        })
    }
}

impl LayerDescriptor {
    /// zstd-compressed tar.
    pub fn is_zstd(&self) -> bool {
        self.media_type.ends_with("tar+zstd")
    }

    /// gzip-compressed tar, the kind clip indexes.
    pub fn is_gzip(&self) -> bool {
        self.media_type.ends_with("tar+gzip")
            || self.media_type.ends_with("tar.gzip")
            || self.media_type.ends_with(".tar.gz")
    }
}

/// An image resolved to one platform's manifest.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// The reference, pinned to the manifest digest.
    pub reference: Reference,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub manifest_bytes: Bytes,
    pub config_digest: Digest,
    /// The config's bytes (verified against `config_digest`).
    pub config_bytes: Bytes,
    pub layers: Vec<LayerDescriptor>,
}

fn invalid(what: &str, reason: impl fmt::Display) -> RegistryError {
    RegistryError::InvalidManifest {
        what: what.into(),
        reason: reason.to_string(),
    }
}

fn media_type_of(body: &[u8], header: &str) -> String {
    let from_body = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        });
    from_body.unwrap_or_else(|| header.split(';').next().unwrap_or("").trim().to_string())
}

/// An image manifest (`body`, which must hash to `r`'s digest) and its config obtained
/// elsewhere (containerd's content store, say): checked as a registry's answer would be.
pub(super) fn from_documents(
    r: &Reference,
    body: Bytes,
    config_bytes: Bytes,
) -> Result<ResolvedImage, RegistryError> {
    let what = r.to_string();
    let digest = Digest::of(&body);
    if r.digest != Some(digest) {
        return Err(invalid(
            &what,
            "the manifest does not match the pinned digest",
        ));
    }
    let mt = media_type_of(&body, "");
    let m = CheckedManifest::parse(&what, digest, mt, body)?;
    if Digest::of(&config_bytes) != m.config {
        return Err(invalid(&what, "the config does not match its digest"));
    }
    image_from(r, m, config_bytes)
}

pub(super) async fn resolve(
    client: &Client,
    r: &Reference,
) -> Result<ResolvedImage, RegistryError> {
    let what = r.to_string();
    let (mut body, header_type, mut digest) = client.get_manifest(r, &r.manifest_ref()).await?;
    let mut mt = media_type_of(&body, &header_type);
    let looks_like_index = || {
        serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .is_some_and(|v| v.get("manifests").is_some())
    };
    if mt == MEDIA_OCI_INDEX || mt == MEDIA_DOCKER_LIST || (mt.is_empty() && looks_like_index()) {
        let index: ImageIndex = serde_json::from_slice(&body).map_err(|e| invalid(&what, e))?;
        let want = &client.config().platform;
        let mut available = Vec::new();
        let mut chosen = None;
        for m in index.manifests() {
            let Some(p) = m.platform() else { continue };
            let (os, arch, variant) = (
                p.os().to_string(),
                p.architecture().to_string(),
                p.variant().clone(),
            );
            available.push(format!(
                "{os}/{arch}{}",
                variant
                    .as_deref()
                    .map(|v| format!("/{v}"))
                    .unwrap_or_default()
            ));
            let variant_ok = want.variant.is_none() || variant.is_none() || variant == want.variant;
            if os == want.os && arch == want.arch && variant_ok && chosen.is_none() {
                chosen = Some(m.digest().to_string());
            }
        }
        let Some(chosen) = chosen else {
            return Err(RegistryError::NoMatchingPlatform {
                what,
                platform: want.to_string(),
                available: available.join(", "),
            });
        };
        let (b, h, d) = client.get_manifest(r, &chosen).await?;
        body = b;
        mt = media_type_of(&body, &h);
        digest = d;
    }
    let m = CheckedManifest::parse(&what, digest, mt, body)?;
    // Verified against its digest by get_blob.
    let config_bytes = client.get_blob(r, &m.config, super::MAX_MANIFEST).await?;
    image_from(r, m, config_bytes)
}

/// An image manifest, its digest and media type, parsed once.
struct CheckedManifest {
    digest: Digest,
    media_type: String,
    body: Bytes,
    parsed: ImageManifest,
    /// The config's digest.
    config: Digest,
}

impl CheckedManifest {
    /// Parses `body` (digest `digest`, media type `mt` from the body or the response) as an
    /// image manifest; anything else (an index, another artifact) is refused.
    fn parse(what: &str, digest: Digest, mt: String, body: Bytes) -> Result<Self, RegistryError> {
        if !(mt == MEDIA_OCI_MANIFEST || mt == MEDIA_DOCKER_MANIFEST || mt.is_empty()) {
            return Err(invalid(
                what,
                format!("unsupported manifest media type {mt:?}"),
            ));
        }
        let parsed: ImageManifest = serde_json::from_slice(&body).map_err(|e| invalid(what, e))?;
        let config = parsed
            .config()
            .digest()
            .to_string()
            .parse()
            .map_err(|e| invalid(what, e))?;
        Ok(CheckedManifest {
            digest,
            media_type: mt,
            body,
            parsed,
            config,
        })
    }
}

/// The config digest and the layer digests an image manifest's `body` names (read from
/// containerd's content store, say: the caller has checked the body's digest).
pub fn manifest_parts(body: &[u8]) -> Result<(Digest, Vec<Digest>), RegistryError> {
    let m: ImageManifest = serde_json::from_slice(body).map_err(|e| invalid("manifest", e))?;
    let config = m
        .config()
        .digest()
        .to_string()
        .parse()
        .map_err(|e| invalid("manifest config", e))?;
    let layers = m
        .layers()
        .iter()
        .map(|l| l.digest().to_string().parse())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("manifest layer", e))?;
    Ok((config, layers))
}

/// The DiffIDs an image config's `body` lists, base layer first.
pub fn config_diff_ids(body: &[u8]) -> Result<Vec<Digest>, RegistryError> {
    let config: ImageConfiguration =
        serde_json::from_slice(body).map_err(|e| invalid("config", e))?;
    config
        .rootfs()
        .diff_ids()
        .iter()
        .map(|d| d.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| invalid("config DiffID", e))
}

/// An image from its checked manifest and its config (already verified against its digest).
fn image_from(
    r: &Reference,
    m: CheckedManifest,
    config_bytes: Bytes,
) -> Result<ResolvedImage, RegistryError> {
    let what = r.to_string();
    let manifest = &m.parsed;
    let diff_ids = config_diff_ids(&config_bytes).map_err(|e| invalid(&what, e))?;
    if diff_ids.len() != manifest.layers().len() {
        return Err(invalid(
            &what,
            format!(
                "{} layers but {} DiffIDs in the config",
                manifest.layers().len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (l, diff) in manifest.layers().iter().zip(diff_ids) {
        layers.push(LayerDescriptor {
            digest: l
                .digest()
                .to_string()
                .parse()
                .map_err(|e| invalid(&what, e))?,
            size: l.size(),
            media_type: l.media_type().to_string(),
            diff_id: diff,
            toc: l
                .annotations()
                .as_ref()
                .and_then(|a| TocPosition::from_annotations(a, l.size())),
        });
    }
    Ok(ResolvedImage {
        reference: r.with_digest(m.digest),
        manifest_digest: m.digest,
        manifest_media_type: if m.media_type.is_empty() {
            MEDIA_OCI_MANIFEST.into()
        } else {
            m.media_type
        },
        manifest_bytes: m.body,
        config_digest: m.config,
        config_bytes,
        layers,
    })
}
