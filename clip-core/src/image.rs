//! Indexing and loading whole images: registry -> builder -> store, and store/registry -> indexes.

use crate::artifact::{self, ArtifactError};
use crate::digest::Digest;
use crate::index::{format, BlobRef, BuildOptions, IndexError, LayerIndex};
use crate::registry::{Client, LayerDescriptor, RegistryError, ResolvedImage};
use crate::store::{ImageRecord, Origin, Store, StoreError};
use bytes::Bytes;
use futures_util::StreamExt;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("layer {layer}: {error}")]
    Index { layer: Digest, error: IndexError },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("layer {layer} has media type {media_type:?}; clip indexes gzip and zstd layers only")]
    NotGzip { layer: Digest, media_type: String },
    #[error("no clip index for {reference}: build one with `clip index {reference}` (add --push to publish it)")]
    NoIndex { reference: String },
    #[error("internal error: {0}")]
    Internal(String),
}

/// The chain ID of a layer with `diff_id` on the chain `parent` (none for a base layer): the
/// name containerd gives a committed snapshot, `sha256(parent + " " + diff_id)`.
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => *diff_id,
        Some(p) => Digest::of(format!("{p} {diff_id}").as_bytes()),
    }
}

/// The chain IDs of a layer stack, base first (see [`chain_id`]).
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<Digest> {
    let mut out: Vec<Digest> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        out.push(chain_id(out.last(), d));
    }
    out
}

/// One layer's index, built now or found.
#[derive(Clone)]
pub struct LayerReport {
    pub descriptor: LayerDescriptor,
    pub index: Arc<LayerIndex>,
    pub encoded: Bytes,
    /// Built in this run (vs found in the store or the registry).
    pub built: bool,
    pub elapsed: Duration,
}

impl LayerReport {
    pub fn encoded_ref(&self) -> BlobRef {
        artifact::blob_ref(&self.encoded)
    }
}

/// A blocking `Read` over chunks arriving on a channel (the registry stream).
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if !self.cur.is_empty() {
                let n = buf.len().min(self.cur.len());
                buf[..n].copy_from_slice(&self.cur[..n]);
                self.cur = self.cur.slice(n..);
                return Ok(n);
            }
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
            }
        }
    }
}

/// Progress callback: compressed bytes processed.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// Indexes one layer by streaming it from the registry (or returns the stored index unless
/// `force`), and stores the result.
pub async fn index_layer(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    desc: &LayerDescriptor,
    opts: &BuildOptions,
    progress: Progress,
    force: bool,
) -> Result<LayerReport, ImageError> {
    index_layer_filling(client, store, image, desc, opts, progress, force, None).await
}

/// [`index_layer`] that also writes every span it inflates to `fill`'s disk tier in the same
/// pass, so a node that indexes an image on demand reads it without fetching it again.
#[allow(clippy::too_many_arguments)]
pub async fn index_layer_filling(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    desc: &LayerDescriptor,
    opts: &BuildOptions,
    progress: Progress,
    force: bool,
    fill: Option<Arc<crate::cache::TieredCache>>,
) -> Result<LayerReport, ImageError> {
    let start = Instant::now();
    if !force {
        if let Some((ix, enc)) = store.get_layer(&desc.digest)? {
            if store.open_windows(&ix.windows).is_some() {
                progress(desc.size);
                return Ok(LayerReport {
                    descriptor: desc.clone(),
                    index: Arc::new(ix),
                    encoded: enc.into(),
                    built: false,
                    elapsed: start.elapsed(),
                });
            }
        }
    }
    if let Some(toc) = desc.toc.filter(|_| !opts.from_bytes) {
        return index_zstd_chunked(client, store, image, desc, toc, progress, start).await;
    }
    if !desc.is_gzip() && !desc.is_zstd() {
        return Err(ImageError::NotGzip {
            layer: desc.digest,
            media_type: desc.media_type.clone(),
        });
    }
    let (tx, rx) = mpsc::channel(64);
    let streamer = {
        let client = client.clone();
        let r = image.reference.clone();
        let d = desc.clone();
        tokio::spawn(async move { client.stream_blob(&r, &d.digest, d.size, tx).await })
    };
    let opts = BuildOptions {
        expected_layer: Some(desc.digest),
        expected_diff_id: Some(desc.diff_id),
        ..opts.clone()
    };
    // Spans for the cache go through a small bounded channel: the build waits for the disk
    // rather than holding a layer's worth of spans in memory.
    let (sink, filler) = match fill {
        Some(cache) => {
            let (stx, mut srx) = mpsc::channel::<(crate::digest::Digest, Vec<u8>)>(4);
            let layer = desc.digest;
            let filler = tokio::spawn(async move {
                while let Some((d, b)) = srx.recv().await {
                    let key = crate::cache::SpanKey::new(layer, d);
                    cache
                        .put_slow(&key, &Bytes::from(b), crate::cache::Reach::ThisNode)
                        .await;
                }
            });
            let sink: crate::gzip::SpanSink = Box::new(move |d, b| {
                let _ = stx.blocking_send((d, b));
            });
            (Some(sink), Some(filler))
        }
        None => (None, None),
    };
    let built = tokio::task::spawn_blocking(move || {
        let reader = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        crate::index::builder::build_layer_index_with_sink(reader, &opts, |n| progress(n), sink)
    })
    .await
    .map_err(|e| ImageError::Internal(format!("indexing task: {e}")))?;
    if let Some(f) = filler {
        let _ = f.await;
    }
    let streamed = streamer
        .await
        .map_err(|e| ImageError::Internal(format!("download task: {e}")))?;
    // A download failure explains a build failure better than "truncated gzip".
    streamed?;
    let built = built.map_err(|error| ImageError::Index {
        layer: desc.digest,
        error,
    })?;
    let encoded = format::encode(&built.index);
    store
        .put_layer(&desc.digest, &encoded, Some(&built.windows), Origin::Built)
        .await?;
    crate::metrics::indexed_bytes(built.index.uncompressed_size, &desc.digest.to_string());
    Ok(LayerReport {
        descriptor: desc.clone(),
        index: Arc::new(built.index),
        encoded: encoded.into(),
        built: true,
        elapsed: start.elapsed(),
    })
}

/// A zstd:chunked layer's index, from its table of contents: one range request, nothing
/// decompressed but the TOC ([`crate::zstdchunked`]). Stored as the image's publisher's word
/// (the TOC's checksum is a manifest annotation): under the `owner` trust policy it serves
/// that repository's images.
async fn index_zstd_chunked(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    desc: &LayerDescriptor,
    toc: crate::registry::TocPosition,
    progress: Progress,
    start: Instant,
) -> Result<LayerReport, ImageError> {
    let bad = |error| ImageError::Index {
        layer: desc.digest,
        error,
    };
    if toc.length > crate::zstdchunked::MAX_TOC {
        return Err(bad(IndexError::Format(format!(
            "zstd:chunked table of contents of {} bytes (limit {})",
            toc.length,
            crate::zstdchunked::MAX_TOC
        ))));
    }
    let compressed = client
        .get_blob_range(&image.reference, &desc.digest, toc.offset, toc.length)
        .await?;
    let (d, c) = (desc.clone(), compressed);
    let ix = tokio::task::spawn_blocking(move || {
        let json = crate::zstdchunked::open_toc(&c, &toc)?;
        crate::zstdchunked::index_from_toc(&d, &json)
    })
    .await
    .map_err(|e| ImageError::Internal(format!("indexing task: {e}")))?
    .map_err(bad)?;
    let encoded = format::encode(&ix);
    let publisher = image.reference.repository_name();
    store.put_windows(b"")?;
    if !store
        .put_published(&desc.digest, &encoded, &publisher)
        .await?
    {
        // The node holds an index of the layer already. The same one (another image's
        // manifest names the same table of contents) serves; another one is another
        // publisher's word about this layer, which this image must not be served by.
        if let Some((held, enc)) = store.get_layer(&desc.digest)? {
            if enc != encoded {
                return Err(bad(IndexError::Format(
                    "this image's zstd:chunked table of contents differs from the index the \
                     node holds for the layer"
                        .into(),
                )));
            }
            progress(desc.size);
            return Ok(LayerReport {
                descriptor: desc.clone(),
                index: Arc::new(held),
                encoded: enc.into(),
                built: false,
                elapsed: start.elapsed(),
            });
        }
    }
    progress(desc.size);
    Ok(LayerReport {
        descriptor: desc.clone(),
        index: Arc::new(ix),
        encoded: encoded.into(),
        built: true,
        elapsed: start.elapsed(),
    })
}

/// Indexes every layer of `image` (`parallel` at a time) and records the image in the store.
pub async fn index_image(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    opts: &BuildOptions,
    progress: Progress,
    force: bool,
    parallel: usize,
) -> Result<Vec<LayerReport>, ImageError> {
    let reports: Vec<Result<LayerReport, ImageError>> =
        futures_util::stream::iter(image.layers.iter())
            .map(|d| index_layer(client, store, image, d, opts, progress.clone(), force))
            .buffered(parallel.max(1))
            .collect()
            .await;
    let reports = reports.into_iter().collect::<Result<Vec<_>, _>>()?;
    record_image(store, image, &reports, None).await?;
    Ok(reports)
}

pub async fn record_image(
    store: &Store,
    image: &ResolvedImage,
    reports: &[LayerReport],
    artifact: Option<Digest>,
) -> Result<(), ImageError> {
    let artifact = artifact.or(store
        .get_image(&image.manifest_digest)?
        .and_then(|r| r.artifact));
    store
        .put_image(&ImageRecord {
            reference: image.reference.to_string(),
            manifest_digest: image.manifest_digest,
            config_digest: image.config_digest,
            layers: image.layers.clone(),
            indexes: reports.iter().map(LayerReport::encoded_ref).collect(),
            artifact,
        })
        .await?;
    Ok(())
}

/// The indexes of every layer of `image` from an index artifact signed by one of `keys`, stored
/// and marked as signed. Errors with [`ImageError::NoIndex`] when no artifact is signed.
pub async fn load_signed_indexes(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    keys: &crate::signature::TrustedKeys,
) -> Result<Vec<LayerReport>, ImageError> {
    let start = Instant::now();
    let Some(fetched) = artifact::fetch_signed(client, image, keys).await? else {
        return Err(ImageError::NoIndex {
            reference: format!("{} (signed by a trusted key)", image.reference),
        });
    };
    store_fetched(store, image, fetched, Origin::Signed, start).await
}

/// The indexes of every layer of `image`: from the store, else from the registry's index
/// artifact (then stored). Errors with [`ImageError::NoIndex`] when neither has them.
pub async fn load_indexes(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
) -> Result<Vec<LayerReport>, ImageError> {
    let start = Instant::now();
    let mut found = Vec::new();
    for d in &image.layers {
        match stored_report(store, d, start)? {
            Some(r) => found.push(r),
            // A zstd:chunked layer carries its own table of contents: one range request.
            None if d.toc.is_some() => {
                let toc = d.toc.expect("checked");
                let progress: Progress = Arc::new(|_| {});
                found
                    .push(index_zstd_chunked(client, store, image, d, toc, progress, start).await?);
            }
            None => break,
        }
    }
    if found.len() == image.layers.len() {
        if store.get_image(&image.manifest_digest)?.is_none() {
            record_image(store, image, &found, None).await?;
        }
        return Ok(found);
    }
    let Some(fetched) = artifact::fetch(client, image).await? else {
        return Err(ImageError::NoIndex {
            reference: image.reference.to_string(),
        });
    };
    store_fetched(store, image, fetched, Origin::Published, start).await
}

/// The indexes of every layer of `image` under the `owner` rule: a stored index serves the
/// image if this node built it, a trusted key signed it, or the image's own repository
/// published it; any other layer (its index brought by another repository's image, or of
/// unknown origin) is indexed here first, from its own bytes, with its digest and DiffID
/// checked, and the node's index replaces the published one. Layers with no stored index
/// take the image's own published index, as [`load_indexes`] does. `fill` gets the spans
/// inflated on the way.
pub async fn load_owned_indexes(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    fill: Option<Arc<crate::cache::TieredCache>>,
) -> Result<Vec<LayerReport>, ImageError> {
    let repository = image.reference.repository_name();
    let foreign = |d: &LayerDescriptor| -> Result<bool, ImageError> {
        Ok(store
            .provenance(&d.digest)?
            .is_some_and(|p| !p.serves(&repository)))
    };
    let loaded = load_indexes(client, store, image).await?;
    let mut reports = Vec::new();
    for (i, d) in image.layers.iter().enumerate() {
        if !foreign(d)? {
            if let Some(r) = loaded.get(i).filter(|r| r.descriptor.digest == d.digest) {
                reports.push(r.clone());
                continue;
            }
            if let Some(r) = stored_report(store, d, Instant::now())? {
                reports.push(r);
                continue;
            }
        }
        tracing::info!(
            image = %image.reference,
            layer = %d.digest,
            "the node's index of this layer came from another repository: indexing it here \
             from its own bytes before this image uses it"
        );
        let progress: Progress = Arc::new(|_| {});
        reports.push(
            index_layer_filling(
                client,
                store,
                image,
                d,
                &BuildOptions::default(),
                progress,
                true,
                fill.clone(),
            )
            .await?,
        );
    }
    record_image(store, image, &reports, None).await?;
    Ok(reports)
}

/// The report of layer `d` from the index the store holds for it, if any.
fn stored_report(
    store: &Store,
    d: &LayerDescriptor,
    start: Instant,
) -> Result<Option<LayerReport>, ImageError> {
    Ok(store.get_layer(&d.digest)?.map(|(ix, enc)| LayerReport {
        descriptor: d.clone(),
        index: Arc::new(ix),
        encoded: enc.into(),
        built: false,
        elapsed: start.elapsed(),
    }))
}

/// Stores the layer indexes of a fetched index artifact and records the image.
async fn store_fetched(
    store: &Store,
    image: &ResolvedImage,
    (artifact, fetched): (crate::digest::Digest, Vec<artifact::FetchedLayer>),
    origin: Origin,
    start: Instant,
) -> Result<Vec<LayerReport>, ImageError> {
    let mut reports = Vec::new();
    for (d, f) in image.layers.iter().zip(fetched) {
        // An unverified index never replaces the one a node holds for a layer: another image
        // with the layer brought that one, and this image's publisher must not rewrite what
        // that image's containers read. The stored index serves this image too.
        if origin == Origin::Published {
            if let Some(r) = stored_report(store, d, start)? {
                reports.push(r);
                continue;
            }
        }
        match origin {
            Origin::Published => {
                let publisher = image.reference.repository_name();
                if !store
                    .put_published(&d.digest, &f.encoded, &publisher)
                    .await?
                {
                    // Another image stored one meanwhile: that one serves this image too.
                    if let Some(r) = stored_report(store, d, start)? {
                        reports.push(r);
                        continue;
                    }
                }
            }
            _ => {
                store.put_layer(&d.digest, &f.encoded, None, origin).await?;
            }
        }
        reports.push(LayerReport {
            descriptor: d.clone(),
            index: Arc::new(f.index),
            encoded: f.encoded,
            built: false,
            elapsed: start.elapsed(),
        });
    }
    record_image(store, image, &reports, Some(artifact)).await?;
    Ok(reports)
}

/// Publishes the indexes in `reports` (windows read from the store) as `image`'s index artifact.
pub async fn publish(
    client: &Client,
    store: &Store,
    image: &ResolvedImage,
    reports: &[LayerReport],
) -> Result<Digest, ImageError> {
    let mut windows = Vec::new();
    for r in reports {
        let w = store.get_windows(&r.index.windows).ok_or_else(|| {
            ImageError::Internal(format!(
                "windows of layer {} are not in the local store; re-run with --force",
                r.descriptor.digest
            ))
        })?;
        windows.push(Bytes::from(w));
    }
    let layers: Vec<artifact::PublishedLayer<'_>> = reports
        .iter()
        .zip(windows)
        .map(|(r, w)| artifact::PublishedLayer {
            index: &r.index,
            encoded: r.encoded.clone(),
            windows: w,
        })
        .collect();
    let digest = artifact::push(client, image, &layers).await?;
    record_image(store, image, reports, Some(digest)).await?;
    Ok(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let a = Digest::of(b"a");
        let b = Digest::of(b"b");
        let c = Digest::of(b"c");
        let chain = chain_ids(&[a, b, c]);
        let ab = Digest::of(format!("{a} {b}").as_bytes());
        assert_eq!(
            chain,
            vec![a, ab, Digest::of(format!("{ab} {c}").as_bytes())]
        );
        assert_eq!(chain_id(Some(&ab), &c), chain[2]);
    }
}
