//! Collection of what clip keeps under its root that nothing uses any more: layer indexes,
//! windows blobs, image records, startup profiles and leftover temporaries.
//!
//! A layer's index (and its windows blob, its images' records and their profiles) is *live*
//! while a snapshot on the node is that layer. Anything else is noted as unreferenced (sled tree
//! `gc-unreferenced`: item -> when first seen so) and collected once it has stayed so for the
//! grace period; an item used again loses its note. Each removal is durable before its note goes,
//! so a collection killed half-way is finished by the next one. The span cache and passthrough
//! copies are bounded by their caps and evict by themselves; the report shows their use.
//!
//! The daemon collects every [`Settings::interval`] and answers `clip gc` on its admin socket
//! (root's only); without a daemon, `clip gc` opens the root itself.

use crate::snapshotter::meta::Meta;
use clip_core::digest::Digest;
use clip_core::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long an item stays after nothing uses it, by default.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3600);
/// How often the daemon collects, by default.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);
/// A temporary younger than this may still be being written.
const TEMPORARY_AGE: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Store(#[from] clip_core::store::StoreError),
    #[error("snapshot records: {0}")]
    Snapshots(String),
    #[error("collection records: {0}")]
    Db(#[from] sled::Error),
}

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub grace: Duration,
    pub interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            grace: DEFAULT_GRACE,
            interval: DEFAULT_INTERVAL,
        }
    }
}

/// One thing held under the root.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Item {
    /// `index`, `windows`, `image`, `profile` or `temporary`.
    pub kind: String,
    pub id: String,
    pub bytes: u64,
    /// Why it is kept, or that it is (or was, with `--apply`) collected.
    pub status: Status,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Status {
    /// Used: by which snapshot, index or image.
    Live { by: String },
    /// Unused since `since` (seconds since the epoch), kept until the grace period has passed.
    Grace { since: u64, left_secs: u64 },
    /// Unused for longer than the grace period: collected when applied.
    Collectable { since: u64 },
    /// Removed by this collection.
    Collected,
}

/// What a collection found and did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub applied: bool,
    pub grace_secs: u64,
    pub items: Vec<Item>,
    /// Bytes under each top-level entry of the root (the span cache and passthrough copies are
    /// bounded by their caps; snapshots' directories are containerd's to remove).
    pub root_bytes: BTreeMap<String, u64>,
}

impl Report {
    pub fn bytes_where(&self, f: impl Fn(&Status) -> bool) -> (usize, u64) {
        self.items
            .iter()
            .filter(|i| f(&i.status))
            .fold((0, 0), |(n, b), i| (n + 1, b + i.bytes))
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Bytes under `p` (not following symlinks, not crossing into mounts: a lazy snapshot's FUSE
/// mount is not on this disk).
fn du(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let dev = top.dev();
    let mut total = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&d) else {
            continue;
        };
        if m.dev() != dev {
            continue;
        }
        total += m.blocks() * 512;
        if m.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&d) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

/// The collector over one root's store and snapshot records.
pub struct Collector<'a> {
    pub store: &'a Store,
    pub meta: &'a Meta,
    /// The daemon's span cache: a collected layer's spans leave its memory and disk tiers at
    /// once (without a daemon, the disk tier's least-recently-used order drops them later).
    pub cache: Option<&'a clip_core::cache::TieredCache>,
    /// The daemon's whole-file copies (passthrough): a collected layer's go too.
    pub files: Option<&'a clip_core::cache::files::FileStore>,
}

impl Collector<'_> {
    /// Finds what is held and why; with `apply`, removes what has been unused for `grace`.
    pub async fn run(&self, grace: Duration, apply: bool) -> Result<Report, GcError> {
        let now = now_secs();
        let notes = self.store.db().open_tree(clip_core::store::GC_NOTES)?;
        let mut items: Vec<Item> = Vec::new();
        let mut seen: BTreeSet<String> = BTreeSet::new();

        // Which layers snapshots are.
        let mut live_layers: BTreeMap<Digest, String> = BTreeMap::new();
        for (name, r) in self
            .meta
            .list()
            .map_err(|e| GcError::Snapshots(e.to_string()))?
        {
            if let Some(remote) = r.remote {
                live_layers.entry(remote.layer).or_insert(name);
            }
        }

        // Decides an unused item's fate from its note (made now if it has none).
        let judge = |key: &str, seen: &mut BTreeSet<String>| -> Result<Status, GcError> {
            seen.insert(key.to_string());
            let since = match notes.get(key)? {
                Some(v) if v.len() == 8 => u64::from_le_bytes(v[..].try_into().expect("8 bytes")),
                _ => {
                    notes.insert(key, &now.to_le_bytes())?;
                    now
                }
            };
            let age = now.saturating_sub(since);
            Ok(if age >= grace.as_secs() {
                Status::Collectable { since }
            } else {
                Status::Grace {
                    since,
                    left_secs: grace.as_secs() - age,
                }
            })
        };

        // Images: live while one of their layers is a snapshot.
        let mut live_manifests: BTreeSet<Digest> = BTreeSet::new();
        let mut images = Vec::new();
        for (key, bytes, rec) in self.store.images()? {
            let by = rec.as_ref().and_then(|r| {
                r.layers
                    .iter()
                    .find_map(|l| live_layers.get(&l.digest).map(|s| format!("snapshot {s}")))
            });
            if let (Some(_), Some(r)) = (&by, &rec) {
                live_manifests.insert(r.manifest_digest);
            }
            images.push((key, bytes, rec, by));
        }
        for (key, bytes, rec, by) in images {
            let status = match by {
                Some(by) => Status::Live { by },
                None => judge(&format!("image:{key}"), &mut seen)?,
            };
            let id = rec.map_or(key.clone(), |r| r.reference);
            items.push(Item {
                kind: "image".into(),
                id: format!("{id} ({key})"),
                bytes,
                status,
            });
        }

        // Profiles: live while their image is.
        for (manifest, bytes) in self.store.profiles()? {
            let status = if live_manifests.contains(&manifest) {
                Status::Live {
                    by: format!("image {manifest}"),
                }
            } else {
                judge(&format!("profile:{manifest}"), &mut seen)?
            };
            items.push(Item {
                kind: "profile".into(),
                id: manifest.to_string(),
                bytes,
                status,
            });
        }

        // Layer indexes, and the windows blobs they name.
        let mut kept_windows: BTreeMap<String, String> = BTreeMap::new();
        let mut dropped_windows: BTreeSet<String> = BTreeSet::new();
        // An index whose header cannot be read names windows nobody can tell: then no windows
        // blob is judged unused this time.
        let mut unknown_windows = None;
        for (layer, bytes, windows) in self.store.layer_indexes()? {
            if windows.is_none() {
                unknown_windows = Some(format!("unreadable index of {layer}"));
            }
            let status = match live_layers.get(&layer) {
                Some(s) => Status::Live {
                    by: format!("snapshot {s}"),
                },
                None => judge(&format!("index:{layer}"), &mut seen)?,
            };
            if let Some(w) = windows {
                match status {
                    Status::Collectable { .. } => dropped_windows.insert(w.digest.hex()),
                    _ => kept_windows
                        .insert(w.digest.hex(), format!("kept with the index of {layer}"))
                        .is_none(),
                };
            }
            items.push(Item {
                kind: "index".into(),
                id: layer.to_string(),
                bytes,
                status,
            });
        }
        for (name, bytes, age) in self.store.windows_files() {
            let (kind, status) = if name.contains(".tmp") {
                let status = if age >= TEMPORARY_AGE {
                    Status::Collectable { since: now }
                } else {
                    Status::Grace {
                        since: now,
                        left_secs: (TEMPORARY_AGE - age).as_secs(),
                    }
                };
                ("temporary", status)
            } else if let Some(by) = kept_windows.get(&name) {
                ("windows", Status::Live { by: by.clone() })
            } else if let Some(by) = &unknown_windows {
                ("windows", Status::Live { by: by.clone() })
            } else if dropped_windows.contains(&name) {
                // Its index goes in this collection: it goes with it.
                ("windows", Status::Collectable { since: now })
            } else {
                ("windows", judge(&format!("windows:{name}"), &mut seen)?)
            };
            items.push(Item {
                kind: kind.into(),
                id: name,
                bytes,
                status,
            });
        }

        if apply {
            for item in &mut items {
                let Status::Collectable { since } = item.status else {
                    continue;
                };
                // Claimed by taking its note away as it was: an item written again since
                // (its note cleared by the store) or used by a snapshot made since is kept.
                let key = match item.kind.as_str() {
                    "index" => Some(format!("index:{}", item.id)),
                    "image" => item
                        .id
                        .rsplit_once(" (")
                        .map(|(_, k)| format!("image:{}", k.trim_end_matches(')'))),
                    "profile" => Some(format!("profile:{}", item.id)),
                    "windows" if !dropped_windows.contains(&item.id) => {
                        Some(format!("windows:{}", item.id))
                    }
                    _ => None,
                };
                if let Some(k) = &key {
                    let claimed = notes
                        .compare_and_swap(
                            k.as_bytes(),
                            Some(&since.to_le_bytes()[..]),
                            None::<&[u8]>,
                        )?
                        .is_ok();
                    if !claimed {
                        continue;
                    }
                }
                let note = match item.kind.as_str() {
                    "index" => {
                        let layer: Digest = item.id.parse().expect("listed from the store");
                        let used = self
                            .meta
                            .list()
                            .map_err(|e| GcError::Snapshots(e.to_string()))?
                            .iter()
                            .any(|(_, r)| r.remote.as_ref().is_some_and(|x| x.layer == layer));
                        if used {
                            continue;
                        }
                        if let (Some(cache), Ok(Some((ix, _)))) =
                            (self.cache, self.store.get_layer(&layer))
                        {
                            for s in &ix.spans {
                                let key = clip_core::cache::SpanKey::new(layer, s.digest);
                                cache.forget_local(&key).await;
                            }
                        }
                        if let Some(files) = self.files {
                            files.forget_layer(&layer);
                        }
                        self.store.remove_layer(&layer).await?;
                        format!("index:{layer}")
                    }
                    "image" => {
                        let key = item
                            .id
                            .rsplit_once(" (")
                            .map_or(item.id.as_str(), |(_, k)| k.trim_end_matches(')'));
                        self.store.remove_image(key).await?;
                        format!("image:{key}")
                    }
                    "profile" => {
                        let m: Digest = item.id.parse().expect("listed from the store");
                        self.store.remove_profile(&m).await?;
                        format!("profile:{m}")
                    }
                    _ => {
                        self.store.remove_windows_file(&item.id)?;
                        format!("windows:{}", item.id)
                    }
                };
                notes.remove(note.as_bytes())?;
                item.status = Status::Collected;
            }
        }
        // Notes of items that are used again, or gone by other means.
        for k in notes.iter().keys() {
            let k = k?;
            if !seen.contains(&*String::from_utf8_lossy(&k)) {
                notes.remove(&k)?;
            }
        }
        notes.flush_async().await?;

        // A walk of every span file: off the async threads.
        let root = self.store.root().to_path_buf();
        let root_bytes = tokio::task::spawn_blocking(move || {
            let mut sizes = BTreeMap::new();
            if let Ok(rd) = std::fs::read_dir(&root) {
                for e in rd.flatten() {
                    sizes.insert(e.file_name().to_string_lossy().into_owned(), du(&e.path()));
                }
            }
            sizes
        })
        .await
        .unwrap_or_default();
        Ok(Report {
            applied: apply,
            grace_secs: grace.as_secs(),
            items,
            root_bytes,
        })
    }
}

/// The daemon's admin socket under the root (0600, root's and the daemon's user's only).
pub const ADMIN_SOCKET: &str = "admin.sock";
/// The longest request line the admin socket reads.
const MAX_REQUEST: usize = 4096;

/// The daemon's side: a collection every [`Settings::interval`], and `clip gc` answered on the
/// admin socket; one collection at a time.
pub struct Daemon {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Daemon {
    pub fn start(
        store: std::sync::Arc<Store>,
        sn: std::sync::Arc<crate::snapshotter::ClipSnapshotter>,
        reads: clip_core::reader::ReadPath,
        settings: Settings,
        admin: tokio::net::UnixListener,
    ) -> Daemon {
        let one = std::sync::Arc::new(tokio::sync::Mutex::new(()));
        let collect = {
            let (store, sn, one) = (store.clone(), sn.clone(), one.clone());
            move |grace: Duration, apply: bool| {
                let (store, sn, one, reads) =
                    (store.clone(), sn.clone(), one.clone(), reads.clone());
                async move {
                    let _one = one.lock().await;
                    Collector {
                        store: &store,
                        meta: sn.meta(),
                        cache: Some(reads.cache()),
                        files: reads.files.as_deref(),
                    }
                    .run(grace, apply)
                    .await
                }
            }
        };
        let mut tasks = Vec::new();
        if !settings.interval.is_zero() {
            let collect = collect.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(settings.interval);
                loop {
                    tick.tick().await;
                    match collect(settings.grace, true).await {
                        Ok(r) => {
                            let (n, b) = r.bytes_where(|s| matches!(s, Status::Collected));
                            if n > 0 {
                                tracing::info!(items = n, bytes = b, "collected what nothing used");
                            }
                        }
                        Err(e) => tracing::warn!("collection failed: {e}"),
                    }
                }
            }));
        }
        tasks.push(tokio::spawn(async move {
            use futures_util::StreamExt;
            use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
            let conns = crate::os::trusted_connections(admin);
            futures_util::pin_mut!(conns);
            while let Some(Ok(s)) = conns.next().await {
                let collect = collect.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut line = String::new();
                    let read = tokio::io::BufReader::new(r)
                        .take(MAX_REQUEST as u64)
                        .read_line(&mut line)
                        .await;
                    let answer = match read
                        .ok()
                        .and_then(|_| serde_json::from_str::<Request>(&line).ok())
                    {
                        None => serde_json::json!({"error": "not a gc request"}).to_string(),
                        Some(req) => {
                            let grace = req.grace_secs.map_or(settings.grace, Duration::from_secs);
                            match collect(grace, req.apply).await {
                                Ok(report) => {
                                    serde_json::to_string(&report).expect("reports serialise")
                                }
                                Err(e) => serde_json::json!({"error": e.to_string()}).to_string(),
                            }
                        }
                    };
                    let _ = w.write_all(format!("{answer}\n").as_bytes()).await;
                });
            }
        }));
        Daemon { tasks }
    }

    pub fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `clip gc`: asks the daemon that holds the root, or opens the root itself.
pub async fn command(g: &crate::cli::GlobalArgs, a: crate::cli::GcArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    let root = g.root.clone().unwrap_or_else(crate::node::default_root);
    let req = Request {
        apply: a.apply,
        grace_secs: a.grace,
    };
    let sock = root.join(ADMIN_SOCKET);
    let report = match tokio::net::UnixStream::connect(&sock).await {
        Ok(s) => ask(s, &req)
            .await
            .with_context(|| format!("asking the daemon on {}", sock.display()))?,
        Err(_) => {
            let store = Store::open(&root)
                .with_context(|| format!("opening the store in {}", root.display()))?;
            let meta = Meta::open(store.db().clone())
                .map_err(|e| anyhow::anyhow!("snapshot records: {e}"))?;
            let grace = a.grace.map_or(DEFAULT_GRACE, Duration::from_secs);
            Collector {
                store: &store,
                meta: &meta,
                cache: None,
                files: None,
            }
            .run(grace, a.apply)
            .await?
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, a.all));
    }
    Ok(())
}

async fn ask(s: tokio::net::UnixStream, req: &Request) -> anyhow::Result<Report> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let (r, mut w) = s.into_split();
    w.write_all(format!("{}\n", serde_json::to_string(req)?).as_bytes())
        .await?;
    let mut line = String::new();
    // A report lists every item: bounded by what the store holds, not by this request.
    tokio::io::BufReader::new(r)
        .take(256 << 20)
        .read_line(&mut line)
        .await?;
    let v: serde_json::Value = serde_json::from_str(&line)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        anyhow::bail!("the daemon: {e}");
    }
    Ok(serde_json::from_value(v)?)
}

/// A request on the daemon's admin socket (one JSON line), answered with a [`Report`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub apply: bool,
    /// The grace period for this collection (the daemon's own when absent).
    pub grace_secs: Option<u64>,
}

/// The report as a person reads it.
pub fn render(r: &Report, all: bool) -> String {
    use std::fmt::Write;
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    let mut out = String::new();
    let total: u64 = r.root_bytes.values().sum();
    let _ = writeln!(out, "under the root: {}", mb(total));
    for (name, b) in &r.root_bytes {
        let what = match name.as_str() {
            "cache" => "span cache (bounded by --disk-cap, least recently used first)",
            "files" => "passthrough copies (bounded by --passthrough-cap)",
            "db" => "metadata (indexes, image records, profiles, snapshot records)",
            "windows" => "checkpoint windows of stored indexes",
            "snapshots" => "snapshots' directories (removed when containerd removes them)",
            _ => "",
        };
        let _ = writeln!(out, "  {name:<12} {:>10}  {what}", mb(*b));
    }
    let kinds = ["index", "windows", "image", "profile", "temporary"];
    for kind in kinds {
        let of: Vec<&Item> = r.items.iter().filter(|i| i.kind == kind).collect();
        if of.is_empty() {
            continue;
        }
        let count = |f: &dyn Fn(&Status) -> bool| {
            let v: Vec<&&Item> = of.iter().filter(|i| f(&i.status)).collect();
            (v.len(), v.iter().map(|i| i.bytes).sum::<u64>())
        };
        let (live, lb) = count(&|s| matches!(s, Status::Live { .. }));
        let (grace, gb) = count(&|s| matches!(s, Status::Grace { .. }));
        let (coll, cb) = count(&|s| matches!(s, Status::Collectable { .. }));
        let (done, db) = count(&|s| matches!(s, Status::Collected));
        let _ = writeln!(
            out,
            "{kind}: {live} live ({}), {grace} in grace ({}), {coll} collectable ({}), {done} collected ({})",
            mb(lb),
            mb(gb),
            mb(cb),
            mb(db)
        );
        if all {
            for i in of {
                let why = match &i.status {
                    Status::Live { by } => format!("live: {by}"),
                    Status::Grace { left_secs, .. } => {
                        format!("unused, kept {left_secs} s more")
                    }
                    Status::Collectable { .. } => "collectable".into(),
                    Status::Collected => "collected".into(),
                };
                let _ = writeln!(out, "  {} {}  {why}", i.id, mb(i.bytes));
            }
        }
    }
    let (n, b) = r.bytes_where(|s| matches!(s, Status::Collectable { .. }));
    if !r.applied && n > 0 {
        let _ = writeln!(
            out,
            "{n} item(s), {}, can be collected: run with --apply",
            mb(b)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshotter::meta::{Kind, Record, Remote};
    use clip_core::registry::LayerDescriptor;
    use clip_core::store::{ImageRecord, Origin};

    async fn index_of(store: &Store, layer: &Digest) -> String {
        use clip_core::index::{format, BlobRef, LayerIndex};
        let windows = format!("windows of {layer}").into_bytes();
        let ix = LayerIndex {
            layer: *layer,
            diff_id: Digest::of(b"diff"),
            codec: Default::default(),
            compressed_size: 1,
            uncompressed_size: 0,
            span_size: 1 << 17,
            windows: BlobRef {
                digest: Digest::of(&windows),
                size: windows.len() as u64,
            },
            spans: vec![],
            entries: vec![],
            charge: Default::default(),
        };
        store
            .put_layer(layer, &format::encode(&ix), Some(&windows), Origin::Built)
            .await
            .unwrap();
        Digest::of(&windows).hex()
    }

    fn image(layer: &Digest, n: u8) -> ImageRecord {
        ImageRecord {
            reference: format!("reg/app:{n}"),
            manifest_digest: Digest::of(&[n]),
            config_digest: Digest::of(b"config"),
            layers: vec![LayerDescriptor {
                digest: *layer,
                size: 1,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                diff_id: Digest::of(b"diff"),
                toc: None,
            }],
            indexes: vec![],
            artifact: None,
        }
    }

    /// A layer a snapshot is stays with its windows, image and profile; an unused one stays for
    /// the grace period, then goes with its windows, image and profile, and a restart in
    /// between keeps the clock; stale temporaries go at once.
    #[tokio::test]
    async fn unused_layers_go_after_the_grace_period_with_what_belongs_to_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let meta = Meta::open(store.db().clone()).unwrap();
        let (used, unused) = (Digest::of(b"used"), Digest::of(b"unused"));
        let used_w = index_of(&store, &used).await;
        let unused_w = index_of(&store, &unused).await;
        store.put_image(&image(&used, 1)).await.unwrap();
        store.put_image(&image(&unused, 2)).await.unwrap();
        for n in [1u8, 2] {
            let p = clip_core::profile::Profile::new(Digest::of(&[n]));
            store.put_profile(&p).await.unwrap();
        }
        meta.create(
            "sha256:chain",
            &Record {
                id: 1,
                kind: Kind::Committed,
                parent: String::new(),
                labels: Default::default(),
                created: 0,
                updated: 0,
                remote: Some(Remote {
                    layer: used,
                    reference: "reg/app@sha256:x".into(),
                }),
                size: 0,
                inodes: 0,
            },
        )
        .unwrap();
        let stale = dir.path().join("windows").join("abc.tmp1");
        std::fs::write(&stale, b"half").unwrap();
        let old = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();

        let gc = Collector {
            store: &store,
            meta: &meta,
            cache: None,
            files: None,
        };
        let status = |r: &Report, kind: &str, id: &str| {
            r.items
                .iter()
                .find(|i| i.kind == kind && i.id.contains(id))
                .map(|i| i.status.clone())
                .unwrap_or_else(|| panic!("no {kind} {id}: {r:?}"))
        };
        let r = gc.run(Duration::from_secs(3600), true).await.unwrap();
        assert!(matches!(
            status(&r, "index", &used.to_string()),
            Status::Live { .. }
        ));
        assert!(matches!(
            status(&r, "windows", &used_w),
            Status::Live { .. }
        ));
        assert!(matches!(status(&r, "image", "app:1"), Status::Live { .. }));
        assert!(matches!(
            status(&r, "profile", &Digest::of(&[1]).to_string()),
            Status::Live { .. }
        ));
        assert!(matches!(
            status(&r, "index", &unused.to_string()),
            Status::Grace { .. }
        ));
        assert!(matches!(status(&r, "image", "app:2"), Status::Grace { .. }));
        assert_eq!(status(&r, "temporary", "abc.tmp1"), Status::Collected);
        assert!(!stale.exists());
        let has = |s: &Store, d: &Digest| s.layer_indexes().unwrap().iter().any(|(l, ..)| l == d);
        assert!(has(&store, &unused), "kept in grace");

        // A restart keeps the clock: the notes are in the database.
        drop(meta);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        let meta = Meta::open(store.db().clone()).unwrap();
        let gc = Collector {
            store: &store,
            meta: &meta,
            cache: None,
            files: None,
        };
        let r = gc.run(Duration::from_secs(3600), false).await.unwrap();
        assert!(matches!(
            status(&r, "index", &unused.to_string()),
            Status::Grace { .. }
        ));
        // With no grace left: collected with what belongs to it, nothing else.
        let r = gc.run(Duration::ZERO, true).await.unwrap();
        assert_eq!(status(&r, "index", &unused.to_string()), Status::Collected);
        assert_eq!(status(&r, "windows", &unused_w), Status::Collected);
        assert_eq!(status(&r, "image", "app:2"), Status::Collected);
        assert_eq!(
            status(&r, "profile", &Digest::of(&[2]).to_string()),
            Status::Collected
        );
        assert!(!has(&store, &unused));
        assert!(has(&store, &used));
        assert!(store.get_profile(&Digest::of(&[1])).is_some());
        assert!(store.get_profile(&Digest::of(&[2])).is_none());
        assert!(!dir.path().join("windows").join(&unused_w).exists());
        assert!(dir.path().join("windows").join(&used_w).exists());
        let r = gc.run(Duration::ZERO, true).await.unwrap();
        assert!(
            r.items
                .iter()
                .all(|i| matches!(i.status, Status::Live { .. })),
            "{r:?}"
        );
        assert_eq!(
            store
                .db()
                .open_tree(clip_core::store::GC_NOTES)
                .unwrap()
                .len(),
            0,
            "no notes of items gone"
        );
    }
}
