//! `clip pull REF`: pulls an image through containerd's API the way containerd's own unpacker
//! does, but with the remote-snapshot labels on every layer's Prepare, so layers with a clip
//! index become lazy snapshots (the snapshotter answers AlreadyExists) and are never downloaded.
//! Layers without an index are fetched into containerd's content store and applied by its diff
//! service, exactly like a normal pull. Everything runs under a lease, so a pull that dies half
//! way leaves nothing containerd's garbage collector will not reclaim.

use crate::cli::human;
use crate::cli::PullArgs;
use crate::labels;
use crate::node::registry_client;
use anyhow::{bail, Context, Result};
use clip_core::digest::Digest;
use clip_core::reference::Reference;
use clip_core::registry::ResolvedImage;
use containerd_client::services::v1::{
    self as api,
    content_client::ContentClient,
    diff_client::DiffClient,
    images_client::ImagesClient,
    leases_client::LeasesClient,
    snapshots::{self as snap, snapshots_client::SnapshotsClient},
};
use containerd_client::tonic::{self, transport::Channel, Code, Request};
use containerd_client::types::Descriptor;
use std::collections::HashMap;
use std::time::Instant;

struct Containerd {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
    snapshotter: String,
}

impl Containerd {
    fn req<T>(&self, msg: T) -> Request<T> {
        crate::containerd::request(&self.namespace, self.lease.as_deref(), msg)
    }

    async fn content_exists(&self, digest: &Digest) -> Result<bool> {
        Ok(self.content_labels(digest).await?.is_some())
    }

    /// The labels of content `digest`, if containerd has it.
    async fn content_labels(&self, digest: &Digest) -> Result<Option<HashMap<String, String>>> {
        let r = ContentClient::new(self.channel.clone())
            .info(self.req(api::InfoRequest {
                digest: digest.to_string(),
            }))
            .await;
        match r {
            Ok(i) => Ok(Some(
                i.into_inner().info.map(|i| i.labels).unwrap_or_default(),
            )),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(anyhow::anyhow!("content info {digest}: {}", s.message())),
        }
    }

    /// Adds labels to existing content.
    async fn label_content(&self, digest: &Digest, labels: &HashMap<String, String>) -> Result<()> {
        ContentClient::new(self.channel.clone())
            .update(self.req(api::UpdateRequest {
                info: Some(api::Info {
                    digest: digest.to_string(),
                    labels: labels.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: labels.keys().map(|k| format!("labels.{k}")).collect(),
                }),
            }))
            .await
            .map_err(|s| anyhow::anyhow!("labelling content {digest}: {}", s.message()))?;
        Ok(())
    }

    /// Writes `chunks` (the whole blob, in order) as content `digest` with `labels`; `Locked`
    /// when another writer holds the write's ref (see [`LockWait`]): nothing was written.
    async fn write_content(
        &self,
        digest: &Digest,
        size: u64,
        labels: HashMap<String, String>,
        mut chunks: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    ) -> Result<Written> {
        let (tx, rx) = tokio::sync::mpsc::channel::<api::WriteContentRequest>(4);
        let reference = format!("clip-pull-{digest}");
        let (d, r) = (digest.to_string(), reference.clone());
        let feeder = tokio::spawn(async move {
            let mut offset = 0i64;
            while let Some(chunk) = chunks.recv().await {
                let chunk = chunk.context("reading the blob")?;
                let n = chunk.len() as i64;
                let msg = api::WriteContentRequest {
                    action: api::WriteAction::Write as i32,
                    r#ref: r.clone(),
                    total: size as i64,
                    expected: d.clone(),
                    offset,
                    data: chunk.to_vec(),
                    labels: HashMap::new(),
                };
                offset += n;
                if tx.send(msg).await.is_err() {
                    return Ok::<(), anyhow::Error>(());
                }
            }
            let _ = tx
                .send(api::WriteContentRequest {
                    action: api::WriteAction::Commit as i32,
                    r#ref: r,
                    total: size as i64,
                    expected: d,
                    offset,
                    data: Vec::new(),
                    labels,
                })
                .await;
            Ok(())
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let resp = ContentClient::new(self.channel.clone())
            .write(self.req(stream))
            .await;
        let mut resp = match resp {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == Code::AlreadyExists => return Ok(Written::Done),
            Err(s) if s.code() == Code::Unavailable => {
                feeder.abort();
                return Ok(Written::Locked(s.message().to_string()));
            }
            Err(s) => bail!("writing content {digest}: {}", s.message()),
        };
        loop {
            match resp.message().await {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(s) if s.code() == Code::AlreadyExists => break,
                Err(s) if s.code() == Code::Unavailable => {
                    feeder.abort();
                    return Ok(Written::Locked(s.message().to_string()));
                }
                Err(s) => bail!("writing content {digest}: {}", s.message()),
            }
        }
        feeder.await.context("content writer task")??;
        Ok(Written::Done)
    }

    async fn put_small(
        &self,
        digest: &Digest,
        data: bytes::Bytes,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let mut wait = LockWait::new();
        loop {
            if let Some(existing) = self.content_labels(digest).await? {
                return self
                    .label_content(digest, &merged_sources(&existing, labels))
                    .await;
            }
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let size = data.len() as u64;
            tx.send(Ok(data.clone())).await.ok();
            drop(tx);
            match self.write_content(digest, size, labels.clone(), rx).await? {
                Written::Done => return Ok(()),
                Written::Locked(why) => wait.wait(digest, &why).await?,
            }
        }
    }

    async fn snapshot_exists(&self, key: &str) -> Result<bool> {
        let r = while_unavailable(|| {
            let mut c = SnapshotsClient::new(self.channel.clone());
            let req = self.req(snap::StatSnapshotRequest {
                snapshotter: self.snapshotter.clone(),
                key: key.to_string(),
            });
            async move { c.stat(req).await }
        })
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => bail!("snapshot stat {key}: {}", s.message()),
        }
    }
}

/// How a content write ended.
enum Written {
    Done,
    /// containerd refused it: another writer holds its ref. Nothing was written.
    Locked(String),
}

/// Waiting between attempts at something containerd reports busy: a delay that doubles up to
/// a cap, until a time limit; the first wait says why on stderr.
struct Backoff {
    until: Instant,
    delay: std::time::Duration,
    max: std::time::Duration,
    told: bool,
}

impl Backoff {
    fn new(
        first: std::time::Duration,
        max: std::time::Duration,
        limit: std::time::Duration,
    ) -> Self {
        Backoff {
            until: Instant::now() + limit,
            delay: first,
            max,
            told: false,
        }
    }

    /// Sleeps before the next attempt (saying `why` the first time); false, at once, once the
    /// limit has passed: give up.
    async fn wait(&mut self, why: impl FnOnce() -> String) -> bool {
        if Instant::now() >= self.until {
            return false;
        }
        if !self.told {
            eprintln!("{}", why());
            self.told = true;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(self.max);
        true
    }
}

/// Waiting for another writer of the same content. Two pulls of one image at once write the
/// same content under the same ref; containerd lets one write it and answers the other
/// Unavailable ("ref ... locked"). The other waits, with a backoff, and finds the content
/// written (containerd's own pull does the same), for at most [`LockWait::LIMIT`].
struct LockWait(Backoff);

impl LockWait {
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

    fn new() -> Self {
        let ms = std::time::Duration::from_millis;
        LockWait(Backoff::new(ms(50), ms(1000), Self::LIMIT))
    }

    /// Waits a little before the next attempt at writing `digest`; an error once the other
    /// writer has held it for too long.
    async fn wait(&mut self, digest: &Digest, why: &str) -> Result<()> {
        let waited = self
            .0
            .wait(|| {
                format!("content {digest} is being written by another pull: waiting for it ({why})")
            })
            .await;
        if !waited {
            bail!(
                "writing content {digest}: another writer has held it for {} s: {why}",
                Self::LIMIT.as_secs()
            );
        }
        Ok(())
    }
}

/// Retries `f` while containerd reports the snapshotter unavailable (it redials a restarted
/// snapshotter with a backoff of a few seconds), for up to 60 s.
async fn while_unavailable<T, F, Fut>(mut f: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let s = std::time::Duration::from_secs;
    let mut backoff = Backoff::new(std::time::Duration::from_millis(100), s(2), s(60));
    loop {
        match f().await {
            Err(e) if e.code() == Code::Unavailable => {
                let why = || {
                    format!(
                        "waiting for containerd to reach the snapshotter: {}",
                        e.message()
                    )
                };
                if !backoff.wait(why).await {
                    return Err(e);
                }
            }
            r => return r,
        }
    }
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size: size as i64,
        annotations: HashMap::new(),
    }
}

pub async fn pull(g: &crate::cli::GlobalArgs, a: PullArgs) -> Result<()> {
    let start = Instant::now();
    // The registry client only: the store belongs to the snapshotter daemon (sled allows one
    // process per database), and a pull needs nothing from it.
    let client = registry_client(g)?;
    let reference: Reference = a.reference.parse()?;
    let image: ResolvedImage = client
        .resolve(&reference)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let channel =
        crate::containerd::connect(&a.address, std::time::Duration::from_secs(20)).await?;
    let mut cd = Containerd {
        channel,
        namespace: a.namespace.clone(),
        lease: None,
        snapshotter: a.snapshotter.clone(),
    };
    // A lease keeps what this pull writes from garbage collection until the image holds it.
    let lease_id = format!("clip-pull-{}", rand::random::<u64>());
    let expire = std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
    let expire = humantime_rfc3339(expire);
    LeasesClient::new(cd.channel.clone())
        .create(cd.req(api::CreateRequest {
            id: lease_id.clone(),
            labels: HashMap::from([("containerd.io/gc.expire".to_string(), expire)]),
        }))
        .await
        .map_err(|s| anyhow::anyhow!("creating a lease in containerd: {}", s.message()))?;
    cd.lease = Some(lease_id.clone());
    let result = pull_under_lease(&client, &cd, &a, &image).await;
    cd.lease = None;
    let _ = LeasesClient::new(cd.channel.clone())
        .delete(cd.req(api::DeleteRequest {
            id: lease_id,
            sync: false,
        }))
        .await;
    let (lazy, unpacked, fetched) = result?;
    eprintln!(
        "pulled {} in {:.2} s: {lazy} lazy layer(s), {unpacked} unpacked ({} downloaded)",
        a.reference,
        start.elapsed().as_secs_f64(),
        human(fetched)
    );
    Ok(())
}

/// RFC 3339 UTC time (containerd's lease expiry label).
fn humantime_rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `labels` for content that has `existing` ones: a distribution-source label keeps the
/// repositories already named (comma-separated, as containerd writes them), so that the content
/// says every repository it was pulled from.
fn merged_sources(
    existing: &HashMap<String, String>,
    mut labels: HashMap<String, String>,
) -> HashMap<String, String> {
    for (k, v) in labels.iter_mut() {
        if !k.starts_with(labels::DISTRIBUTION_SOURCE) {
            continue;
        }
        let Some(old) = existing.get(k) else { continue };
        let mut repos: Vec<&str> = old.split(',').filter(|r| !r.is_empty()).collect();
        if !repos.contains(&v.as_str()) {
            repos.push(v);
        }
        *v = repos.join(",");
    }
    labels
}

async fn pull_under_lease(
    client: &clip_core::registry::Client,
    cd: &Containerd,
    a: &PullArgs,
    image: &ResolvedImage,
) -> Result<(usize, usize, u64)> {
    let r = &image.reference;
    let diff_ids: Vec<Digest> = image.layers.iter().map(|l| l.diff_id).collect();
    let chains = clip_core::image::chain_ids(&diff_ids);
    let source = (
        format!("{}{}", labels::DISTRIBUTION_SOURCE, r.registry),
        r.repository.clone(),
    );
    // Content: config (holding the snapshot chain for GC) and manifest (holding the config and
    // layers), the same labels containerd's own pull sets.
    let config = image.config_bytes.clone();
    let mut config_labels = HashMap::from([source.clone()]);
    if let Some(top) = chains.last() {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", a.snapshotter),
            top.to_string(),
        );
    }
    cd.put_small(&image.config_digest, config.clone(), config_labels)
        .await?;
    let mut manifest_labels = HashMap::from([
        source.clone(),
        (
            "containerd.io/gc.ref.content.config".to_string(),
            image.config_digest.to_string(),
        ),
    ]);
    for (i, l) in image.layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.to_string(),
        );
    }
    cd.put_small(
        &image.manifest_digest,
        image.manifest_bytes.clone(),
        manifest_labels,
    )
    .await?;

    // Layers: Prepare with the remote labels; AlreadyExists means the snapshotter serves it.
    let name = a.name.clone().unwrap_or_else(|| a.reference.clone());
    let all_layers = image
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut parent = String::new();
    let (mut lazy, mut unpacked, mut fetched) = (0, 0, 0u64);
    let n = image.layers.len();
    for (i, (layer, chain)) in image.layers.iter().zip(&chains).enumerate() {
        let chain_s = chain.to_string();
        if cd.snapshot_exists(&chain_s).await? {
            eprintln!("layer {}/{n} {}: already present", i + 1, layer.digest);
            parent = chain_s;
            continue;
        }
        let mut labels = HashMap::from([
            (labels::TARGET.to_string(), chain_s.clone()),
            (labels::IMAGE_REF.to_string(), r.to_string()),
            (
                labels::MANIFEST.to_string(),
                image.manifest_digest.to_string(),
            ),
            (labels::LAYER.to_string(), layer.digest.to_string()),
        ]);
        if a.full {
            labels.insert(labels::FETCH.to_string(), "full".to_string());
        }
        // containerd caps label values at 4096 bytes; the list is a hint only.
        if all_layers.len() < 4000 {
            labels.insert(labels::IMAGE_LAYERS.to_string(), all_layers.clone());
        }
        let key = format!(
            "extract-{}-{chain_s}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let prepared = while_unavailable(|| {
            let mut c = SnapshotsClient::new(cd.channel.clone());
            let req = cd.req(snap::PrepareSnapshotRequest {
                snapshotter: cd.snapshotter.clone(),
                key: key.clone(),
                parent: parent.clone(),
                labels: labels.clone(),
            });
            async move { c.prepare(req).await }
        })
        .await;
        let mounts = match prepared {
            Ok(m) => m.into_inner().mounts,
            Err(s) if s.code() == Code::AlreadyExists => {
                if !cd.snapshot_exists(&chain_s).await? {
                    bail!(
                        "layer {}: snapshotter reported it exists, but it does not",
                        layer.digest
                    );
                }
                let how = if a.full {
                    "lazy, fetched whole"
                } else {
                    "lazy"
                };
                eprintln!("layer {}/{n} {}: {how}", i + 1, layer.digest);
                lazy += 1;
                parent = chain_s;
                continue;
            }
            Err(s) => bail!("preparing layer {}: {}", layer.digest, s.message()),
        };
        // No index: a normal pull of this layer.
        eprintln!(
            "layer {}/{n} {}: no index, downloading {} and unpacking",
            i + 1,
            layer.digest,
            human(layer.size)
        );
        let applied = unpack_layer(client, cd, r, layer, mounts, &source).await;
        let applied = match applied {
            Ok(d) => d,
            Err(e) => {
                let _ = SnapshotsClient::new(cd.channel.clone())
                    .remove(cd.req(snap::RemoveSnapshotRequest {
                        snapshotter: cd.snapshotter.clone(),
                        key,
                    }))
                    .await;
                return Err(e);
            }
        };
        if applied != layer.diff_id {
            bail!(
                "layer {}: unpacked content is {applied}, the image config says {}",
                layer.digest,
                layer.diff_id
            );
        }
        SnapshotsClient::new(cd.channel.clone())
            .commit(cd.req(snap::CommitSnapshotRequest {
                snapshotter: cd.snapshotter.clone(),
                name: chain_s.clone(),
                key,
                labels,
            }))
            .await
            .map_err(|s| anyhow::anyhow!("committing layer {}: {}", layer.digest, s.message()))?;
        fetched += layer.size;
        unpacked += 1;
        parent = chain_s;
    }

    // The image record: name -> manifest.
    let img = api::Image {
        name: name.clone(),
        labels: HashMap::new(),
        target: Some(descriptor(
            &image.manifest_media_type,
            &image.manifest_digest,
            image.manifest_bytes.len() as u64,
        )),
        created_at: None,
        updated_at: None,
    };
    let created = ImagesClient::new(cd.channel.clone())
        .create(cd.req(api::CreateImageRequest {
            image: Some(img.clone()),
            source_date_epoch: None,
        }))
        .await;
    match created {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {
            ImagesClient::new(cd.channel.clone())
                .update(cd.req(api::UpdateImageRequest {
                    image: Some(img),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(|s| anyhow::anyhow!("updating image {name}: {}", s.message()))?;
        }
        Err(s) => bail!("creating image {name}: {}", s.message()),
    }
    Ok((lazy, unpacked, fetched))
}

/// Downloads a layer into containerd's content store and applies it to `mounts` with
/// containerd's diff service; returns the digest of what was applied (the DiffID).
async fn unpack_layer(
    client: &clip_core::registry::Client,
    cd: &Containerd,
    r: &Reference,
    layer: &clip_core::registry::LayerDescriptor,
    mounts: Vec<containerd_client::types::Mount>,
    source: &(String, String),
) -> Result<Digest> {
    let mut wait = LockWait::new();
    while !cd.content_exists(&layer.digest).await? {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let (client, rr, d, size) = (client.clone(), r.clone(), layer.digest, layer.size);
        let fetch = tokio::spawn(async move { client.stream_blob(&rr, &d, size, tx).await });
        let written = cd
            .write_content(
                &layer.digest,
                layer.size,
                HashMap::from([source.clone()]),
                rx,
            )
            .await?;
        match written {
            Written::Done => {
                fetch
                    .await
                    .context("download task")?
                    .with_context(|| format!("downloading layer {}", layer.digest))?;
                break;
            }
            Written::Locked(why) => {
                fetch.abort();
                wait.wait(&layer.digest, &why).await?;
            }
        }
    }
    let applied = DiffClient::new(cd.channel.clone())
        .apply(cd.req(api::ApplyRequest {
            diff: Some(descriptor(&layer.media_type, &layer.digest, layer.size)),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        }))
        .await
        .map_err(|s| anyhow::anyhow!("applying layer {}: {}", layer.digest, s.message()))?
        .into_inner()
        .applied
        .context("diff service returned no descriptor")?;
    applied
        .digest
        .parse()
        .map_err(|e| anyhow::anyhow!("applied digest: {e}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_second_repository_is_added_to_the_source_label_not_put_in_its_place() {
        let key = format!("{}reg:5000", labels::DISTRIBUTION_SOURCE);
        let existing = HashMap::from([(key.clone(), "team-a/app".to_string())]);
        let new = HashMap::from([
            (key.clone(), "team-b/app".to_string()),
            ("other".to_string(), "x".to_string()),
        ]);
        let merged = super::merged_sources(&existing, new.clone());
        assert_eq!(merged[&key], "team-a/app,team-b/app");
        assert_eq!(merged["other"], "x");
        // Pulled again from a repository it names: unchanged.
        let again = super::merged_sources(&merged, new);
        assert_eq!(again[&key], "team-a/app,team-b/app");
    }

    use super::*;

    #[test]
    fn rfc3339() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        assert_eq!(humantime_rfc3339(t), "2023-11-14T22:13:20Z");
    }
}
