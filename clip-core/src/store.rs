//! The local store: indexes and image records in sled, checkpoint windows as files.
//!
//! sled holds small metadata only (an encoded layer index is tens to hundreds of KiB); the
//! windows blobs (about 30 KiB per checkpoint) are plain files named by digest, written to a
//! temporary name, fsynced and renamed, so a crash never leaves a half-written blob under a real
//! name. Every change is flushed before it is acknowledged. Everything here can be rebuilt from
//! the registry, so a record that fails to decode is dropped (and logged), never served.

use crate::digest::Digest;
use crate::index::{format, BlobRef, IndexError, LayerIndex};
use crate::registry::LayerDescriptor;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {error}")]
    Db { path: String, error: sled::Error },
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("database {path} is in use by another clip process (one --root per process)")]
    Busy { path: String },
    #[error("stored record {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

/// What the store knows of one image.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    pub reference: String,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layers: Vec<LayerDescriptor>,
    /// The encoded index blob of each layer (same order as `layers`).
    pub indexes: Vec<BlobRef>,
    /// The published index artifact, if known.
    pub artifact: Option<Digest>,
}

/// Where a stored layer index came from (see [`Store::get_verified_layer`] and
/// [`Store::get_signed_layer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// A registry's index artifact, taken on its publisher's word.
    Published,
    /// Built on this machine from the layer's own bytes (digest and DiffID checked).
    Built,
    /// A registry's index artifact signed by a trusted key.
    Signed,
}

/// Removes the temporaries a killed process left in `dir` (`<digest>.tmp<pid>`): whole blobs
/// are only ever renamed into place, so a temporary is never needed again.
fn sweep_temporaries(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut swept = 0;
    for e in rd.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.contains(".tmp") && std::fs::remove_file(e.path()).is_ok() {
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::info!(dir = %dir.display(), swept, "removed temporaries of an interrupted write");
    }
}

/// Who vouches for a stored layer index, with the sha256 of its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provenance {
    /// Built on this machine from the layer's bytes.
    Built(Digest),
    /// Published and signed by a trusted key.
    Signed(Digest),
    /// Published, on its publisher's word: the repository (`registry/repository`) whose image
    /// brought it, when known.
    Published {
        digest: Digest,
        publisher: Option<String>,
    },
}

impl Provenance {
    /// The sha256 of the encoded index.
    pub fn digest(&self) -> &Digest {
        match self {
            Provenance::Built(d) | Provenance::Signed(d) => d,
            Provenance::Published { digest, .. } => digest,
        }
    }

    /// Whether the index may serve an image of `repository` (`registry/repository`) under the
    /// `owner` rule: built here, signed, or published by that repository.
    pub fn serves(&self, repository: &str) -> bool {
        match self {
            Provenance::Built(_) | Provenance::Signed(_) => true,
            Provenance::Published { publisher, .. } => publisher.as_deref() == Some(repository),
        }
    }
}

/// The sled tree where collection notes when each unused item was first seen so (kept by the
/// collector in clip-snapshotter; a store write that makes an item used again clears its note).
pub const GC_NOTES: &str = "gc-unreferenced";

/// sled's page cache, charged to the process's memory budget while the store is open.
pub const DB_CACHE_BYTES: u64 = 32 << 20;

pub struct Store {
    root: PathBuf,
    db: sled::Db,
    /// The page cache's bytes, held against the process's memory budget.
    _cache_memory: crate::budget::Reservation,
    layers: sled::Tree,
    /// Layers indexed on this machine from their own bytes (digest and DiffID checked while
    /// indexing): layer -> sha256 of the encoded index built. A published index stored later
    /// for the same layer has other bytes, so it never inherits the mark.
    verified: sled::Tree,
    /// Layers whose published index was signed by a trusted key: layer -> sha256 of that index.
    signed: sled::Tree,
    /// Layers whose stored index is a published one: layer -> the repository that brought it
    /// (`registry/repository`) and the sha256 of that index.
    publishers: sled::Tree,
    images: sled::Tree,
}

impl Store {
    /// Opens (creating) the store under `root`.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let io = |p: &Path, error| StoreError::Io {
            path: p.display().to_string(),
            error,
        };
        std::fs::create_dir_all(root.join("windows")).map_err(|e| io(root, e))?;
        sweep_temporaries(&root.join("windows"));
        let db_path = root.join("db");
        // sled holds an exclusive lock on the database. A process that just exited (a restart)
        // or a store dropped a moment ago (its flusher thread still winding down) may hold it
        // briefly: wait a few seconds before calling the database busy.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let db = loop {
            match sled::Config::new()
                .path(&db_path)
                .cache_capacity(DB_CACHE_BYTES)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(sled::Error::Io(e)) if e.to_string().contains("could not acquire lock") => {
                    return Err(StoreError::Busy {
                        path: db_path.display().to_string(),
                    })
                }
                Err(error) => {
                    return Err(StoreError::Db {
                        path: db_path.display().to_string(),
                        error,
                    })
                }
            }
        };
        let tree = |name: &str| {
            db.open_tree(name).map_err(|error| StoreError::Db {
                path: db_path.display().to_string(),
                error,
            })
        };
        Ok(Store {
            root: root.to_path_buf(),
            layers: tree("layer-index")?,
            verified: tree("layer-verified")?,
            signed: tree("layer-signed")?,
            publishers: tree("layer-publisher")?,
            images: tree("image")?,
            db,
            _cache_memory: crate::budget::process().charge(DB_CACHE_BYTES),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The sled database (for components that need ids or transactions of their own).
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// A named sled tree for other components' small state (e.g. the disk cache's records).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        self.db.open_tree(name).map_err(|e| self.db_err(e))
    }

    /// An item is written or used again: a collection running now must not remove it.
    fn touch(&self, note: &str) -> Result<(), StoreError> {
        self.db
            .open_tree(GC_NOTES)
            .and_then(|t| t.remove(note.as_bytes()))
            .map_err(|e| self.db_err(e))?;
        Ok(())
    }

    fn db_err(&self, error: sled::Error) -> StoreError {
        StoreError::Db {
            path: self.root.join("db").display().to_string(),
            error,
        }
    }

    pub fn windows_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("windows").join(digest.hex())
    }

    /// Stores an encoded index and (when given) its windows blob, named by its content digest
    /// (which is what the index records), with where it came from; durable on return. An
    /// unverified (published) index is stored only where none is: it never replaces one.
    /// Returns whether `encoded` is now the layer's index.
    pub async fn put_layer(
        &self,
        layer: &Digest,
        encoded: &[u8],
        windows: Option<&[u8]>,
        origin: Origin,
    ) -> Result<bool, StoreError> {
        self.put(layer, encoded, windows, origin, None).await
    }

    /// Stores a published index brought by `publisher` (`registry/repository`) where the node
    /// holds none for the layer, and remembers who brought it (see [`Store::provenance`]).
    /// Returns whether it was stored.
    pub async fn put_published(
        &self,
        layer: &Digest,
        encoded: &[u8],
        publisher: &str,
    ) -> Result<bool, StoreError> {
        self.put(layer, encoded, None, Origin::Published, Some(publisher))
            .await
    }

    async fn put(
        &self,
        layer: &Digest,
        encoded: &[u8],
        windows: Option<&[u8]>,
        origin: Origin,
        publisher: Option<&str>,
    ) -> Result<bool, StoreError> {
        if let Some(w) = windows {
            self.write_file_atomic(&self.windows_path(&Digest::of(w)), w)?;
        }
        let key = layer.to_string();
        self.touch(&format!("index:{key}"))?;
        let digest = Digest::of(encoded);
        let stored = match origin {
            Origin::Published => {
                let swapped = self
                    .layers
                    .compare_and_swap(&key, None as Option<&[u8]>, Some(encoded))
                    .map_err(|e| self.db_err(e))?
                    .is_ok();
                // Named with the index's digest: a mark never outlives the index it is for. A
                // crash before it is written leaves an index with no known publisher, which
                // every image treats as another repository's.
                if let (true, Some(p)) = (swapped, publisher) {
                    let mut v = digest.as_bytes().to_vec();
                    v.extend_from_slice(p.as_bytes());
                    self.publishers
                        .insert(&key, v)
                        .map_err(|e| self.db_err(e))?;
                }
                swapped
            }
            Origin::Built | Origin::Signed => {
                self.layers
                    .insert(&key, encoded)
                    .map_err(|e| self.db_err(e))?;
                self.publishers.remove(&key).map_err(|e| self.db_err(e))?;
                true
            }
        };
        let marks = match origin {
            Origin::Published => None,
            Origin::Built => Some(&self.verified),
            Origin::Signed => Some(&self.signed),
        };
        if let Some(t) = marks {
            t.insert(&key, digest.as_bytes())
                .map_err(|e| self.db_err(e))?;
        }
        self.db.flush_async().await.map_err(|e| self.db_err(e))?;
        Ok(stored)
    }

    /// Stores a windows blob by its digest (an index with no windows names the empty one).
    pub fn put_windows(&self, windows: &[u8]) -> Result<(), StoreError> {
        let path = self.windows_path(&Digest::of(windows));
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == windows.len() as u64) {
            return Ok(());
        }
        self.write_file_atomic(&path, windows)
    }

    /// Who vouches for the index the node holds for `layer` (`None`: it holds none).
    pub fn provenance(&self, layer: &Digest) -> Result<Option<Provenance>, StoreError> {
        let key = layer.to_string();
        let Some(raw) = self.layers.get(&key).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        let digest = Digest::of(&raw);
        let marked = |t: &sled::Tree| -> Result<bool, StoreError> {
            Ok(t.get(&key)
                .map_err(|e| self.db_err(e))?
                .is_some_and(|m| m[..] == digest.as_bytes()[..]))
        };
        if marked(&self.verified)? {
            return Ok(Some(Provenance::Built(digest)));
        }
        if marked(&self.signed)? {
            return Ok(Some(Provenance::Signed(digest)));
        }
        let publisher = self
            .publishers
            .get(&key)
            .map_err(|e| self.db_err(e))?
            .filter(|v| v.len() > 32 && v[..32] == digest.as_bytes()[..])
            .and_then(|v| String::from_utf8(v[32..].to_vec()).ok());
        Ok(Some(Provenance::Published { digest, publisher }))
    }

    /// The layer's index if it is the one this machine built from the layer's bytes.
    pub fn get_verified_layer(
        &self,
        layer: &Digest,
    ) -> Result<Option<(LayerIndex, Vec<u8>)>, StoreError> {
        self.get_marked(&self.verified, layer)
    }

    /// The layer's index if it was built here or published with a trusted signature.
    pub fn get_signed_layer(
        &self,
        layer: &Digest,
    ) -> Result<Option<(LayerIndex, Vec<u8>)>, StoreError> {
        match self.get_marked(&self.verified, layer)? {
            Some(found) => Ok(Some(found)),
            None => self.get_marked(&self.signed, layer),
        }
    }

    fn get_marked(
        &self,
        t: &sled::Tree,
        layer: &Digest,
    ) -> Result<Option<(LayerIndex, Vec<u8>)>, StoreError> {
        let Some(mark) = t.get(layer.to_string()).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        Ok(self
            .get_layer(layer)?
            .filter(|(_, raw)| Digest::of(raw).as_bytes()[..] == mark[..]))
    }

    fn write_file_atomic(&self, path: &Path, data: &[u8]) -> Result<(), StoreError> {
        let io = |error| StoreError::Io {
            path: path.display().to_string(),
            error,
        };
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if written.is_err() {
            // A failed write leaves nothing behind (ENOSPC would otherwise keep the space).
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(io)
    }

    /// The encoded index of a layer, checked. A corrupt record is removed and reported as absent.
    pub fn get_layer(&self, layer: &Digest) -> Result<Option<(LayerIndex, Vec<u8>)>, StoreError> {
        let Some(raw) = self
            .layers
            .get(layer.to_string())
            .map_err(|e| self.db_err(e))?
        else {
            return Ok(None);
        };
        match format::decode(&raw).and_then(|ix| {
            if ix.layer == *layer {
                Ok(ix)
            } else {
                Err(IndexError::Format(format!(
                    "record is for layer {}",
                    ix.layer
                )))
            }
        }) {
            Ok(ix) => Ok(Some((ix, raw.to_vec()))),
            Err(e) => {
                tracing::warn!(%layer, "dropping unreadable stored index: {e}");
                self.layers
                    .remove(layer.to_string())
                    .map_err(|e| self.db_err(e))?;
                Ok(None)
            }
        }
    }

    /// Reads a windows blob if it is present and intact.
    pub fn get_windows(&self, blob: &BlobRef) -> Option<Vec<u8>> {
        let data = std::fs::read(self.windows_path(&blob.digest)).ok()?;
        (data.len() as u64 == blob.size && Digest::of(&data) == blob.digest).then_some(data)
    }

    /// The windows blob for reads by range, if it is present and has its size. Not hashed: a
    /// damaged window cannot produce a span's digest, and the fetcher then turns to the
    /// published windows (so mounting and prefetching do not read the whole blob first).
    pub fn windows_for_reads(&self, blob: &BlobRef) -> Option<crate::index::LocalWindows> {
        let f = std::fs::File::open(self.windows_path(&blob.digest)).ok()?;
        (f.metadata().ok()?.len() == blob.size)
            .then(|| crate::index::LocalWindows::File(std::sync::Arc::new(f), blob.size))
    }

    /// The windows blob, if it is present and intact (checked by streaming it through sha256:
    /// nothing of it stays in memory). For reuse of a built index, which may be pushed.
    pub fn open_windows(&self, blob: &BlobRef) -> Option<crate::index::LocalWindows> {
        use std::io::Read;
        let windows = self.windows_for_reads(blob)?;
        let crate::index::LocalWindows::File(f, _) = &windows else {
            return None;
        };
        let mut h = crate::digest::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match (&**f).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => h.update(&buf[..n]),
                Err(_) => return None,
            }
        }
        (h.finish() == blob.digest).then_some(windows)
    }

    pub async fn put_image(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(rec).expect("image records serialise");
        self.touch(&format!("image:{}", rec.manifest_digest))?;
        self.images
            .insert(rec.manifest_digest.to_string(), json)
            .map_err(|e| self.db_err(e))?;
        self.db.flush_async().await.map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// The startup profile recorded or fetched for an image manifest (a damaged record is
    /// treated as absent: a profile is only a hint).
    pub fn get_profile(&self, manifest: &Digest) -> Option<crate::profile::Profile> {
        let raw = self
            .tree("profiles")
            .ok()?
            .get(manifest.as_bytes())
            .ok()??;
        crate::profile::Profile::decode(&raw).ok()
    }

    /// Stores the startup profile of `profile.manifest`; durable on return.
    pub async fn put_profile(&self, profile: &crate::profile::Profile) -> Result<(), StoreError> {
        let t = self.tree("profiles")?;
        self.touch(&format!("profile:{}", profile.manifest))?;
        t.insert(profile.manifest.as_bytes(), profile.encode())
            .map_err(|e| self.db_err(e))?;
        t.flush_async().await.map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Every stored layer index: the layer, the encoded size and the windows blob it names (an
    /// unreadable record: none). For collection ([`Store::remove_layer`]).
    pub fn layer_indexes(&self) -> Result<Vec<(Digest, u64, Option<BlobRef>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.layers.iter() {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let Some(layer) = std::str::from_utf8(&k).ok().and_then(|k| k.parse().ok()) else {
                continue;
            };
            let windows = format::windows_ref(&v).ok();
            out.push((layer, v.len() as u64, windows));
        }
        Ok(out)
    }

    /// Forgets `layer`'s index and every mark on it (its windows blob is a separate file);
    /// durable on return.
    pub async fn remove_layer(&self, layer: &Digest) -> Result<(), StoreError> {
        let key = layer.to_string();
        for t in [&self.layers, &self.verified, &self.signed, &self.publishers] {
            t.remove(&key).map_err(|e| self.db_err(e))?;
        }
        self.db.flush_async().await.map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Every windows blob file: its name (a digest's hex, or a temporary), size and age.
    pub fn windows_files(&self) -> Vec<(String, u64, std::time::Duration)> {
        let Ok(dir) = std::fs::read_dir(self.root.join("windows")) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                let age = m.modified().ok()?.elapsed().unwrap_or_default();
                Some((e.file_name().to_string_lossy().into_owned(), m.len(), age))
            })
            .collect()
    }

    /// Removes windows blob file `name` (as [`Store::windows_files`] lists it).
    pub fn remove_windows_file(&self, name: &str) -> Result<(), StoreError> {
        if name.contains('/') || name.starts_with('.') {
            return Ok(());
        }
        let path = self.root.join("windows").join(name);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                path: path.display().to_string(),
                error: e,
            }),
            _ => Ok(()),
        }
    }

    /// Every image record, with its encoded size (an unreadable one: `None`, by its key).
    pub fn images(&self) -> Result<Vec<(String, u64, Option<ImageRecord>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.images.iter() {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            let key = String::from_utf8_lossy(&k).into_owned();
            out.push((key, v.len() as u64, serde_json::from_slice(&v).ok()));
        }
        Ok(out)
    }

    /// Forgets the image record stored under `key`; durable on return.
    pub async fn remove_image(&self, key: &str) -> Result<(), StoreError> {
        self.images.remove(key).map_err(|e| self.db_err(e))?;
        self.db.flush_async().await.map_err(|e| self.db_err(e))?;
        Ok(())
    }

    /// Every stored startup profile: its manifest and encoded size.
    pub fn profiles(&self) -> Result<Vec<(Digest, u64)>, StoreError> {
        let t = self.tree("profiles")?;
        let mut out = Vec::new();
        for kv in t.iter() {
            let (k, v) = kv.map_err(|e| self.db_err(e))?;
            if let Ok(d) = <[u8; 32]>::try_from(&k[..]) {
                out.push((Digest::from_bytes(d), v.len() as u64));
            }
        }
        Ok(out)
    }

    /// Forgets the startup profile of `manifest`; durable on return.
    pub async fn remove_profile(&self, manifest: &Digest) -> Result<(), StoreError> {
        let t = self.tree("profiles")?;
        t.remove(manifest.as_bytes()).map_err(|e| self.db_err(e))?;
        t.flush_async().await.map_err(|e| self.db_err(e))?;
        Ok(())
    }

    pub fn get_image(&self, manifest: &Digest) -> Result<Option<ImageRecord>, StoreError> {
        let Some(raw) = self
            .images
            .get(manifest.to_string())
            .map_err(|e| self.db_err(e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                key: manifest.to_string(),
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{Entry, EntryKind, Span};

    fn sample() -> (LayerIndex, Vec<u8>) {
        let windows = b"not really zstd".to_vec();
        let ix = LayerIndex {
            layer: Digest::of(b"layer"),
            diff_id: Digest::of(b"diff"),
            codec: Default::default(),
            compressed_size: 10,
            uncompressed_size: 20,
            span_size: 1 << 20,
            windows: BlobRef {
                digest: Digest::of(&windows),
                size: windows.len() as u64,
            },
            spans: vec![Span {
                uncompressed: 0,
                compressed: 10,
                bits: 0,
                window_offset: 0,
                window_len: windows.len() as u32,
                digest: Digest::of(b""),
            }],
            entries: vec![Entry {
                path: b"a".to_vec(),
                kind: EntryKind::File {
                    offset: 0,
                    size: 20,
                },
                mode: 0o644,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            }],
            charge: Default::default(),
        };
        (ix, windows)
    }

    #[tokio::test]
    async fn a_published_index_serves_only_its_publishers_repository_until_built_here() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (ix, _) = sample();
        let first = format::encode(&ix);
        let mut other = ix.clone();
        other.entries[0].mode = 0o4755;
        let second = format::encode(&other);
        assert_eq!(s.provenance(&ix.layer).unwrap(), None);
        assert!(s
            .put_published(&ix.layer, &first, "reg:5000/a")
            .await
            .unwrap());
        // The second publisher neither replaces the index nor becomes its publisher.
        assert!(!s
            .put_published(&ix.layer, &second, "reg:5000/b")
            .await
            .unwrap());
        let p = s.provenance(&ix.layer).unwrap().unwrap();
        assert!(p.serves("reg:5000/a"));
        assert!(!p.serves("reg:5000/b"));
        assert!(!p.serves("reg:5000/a/sub"));
        assert_eq!(*p.digest(), Digest::of(&first));
        // Built here: it serves every repository, and the publisher's mark is gone.
        s.put_layer(&ix.layer, &second, None, Origin::Built)
            .await
            .unwrap();
        let p = s.provenance(&ix.layer).unwrap().unwrap();
        assert_eq!(p, Provenance::Built(Digest::of(&second)));
        assert!(p.serves("reg:5000/b"));
        // An index of unknown origin (no publisher recorded) serves nobody's images.
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.put_layer(&ix.layer, &first, None, Origin::Published)
            .await
            .unwrap();
        assert!(!s
            .provenance(&ix.layer)
            .unwrap()
            .unwrap()
            .serves("reg:5000/a"));
    }

    #[test]
    fn temporaries_are_swept_at_open_and_a_failed_write_leaves_none() {
        let dir = tempfile::tempdir().unwrap();
        let windows = dir.path().join("windows");
        std::fs::create_dir_all(&windows).unwrap();
        std::fs::write(windows.join("abcd.tmp4242"), b"half").unwrap();
        std::fs::write(windows.join("abcd"), b"whole").unwrap();
        let s = Store::open(dir.path()).unwrap();
        let names: Vec<String> = std::fs::read_dir(&windows)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["abcd"], "the temporary is gone, the blob kept");
        // A write whose rename fails (a directory in the way) leaves no temporary.
        let target = windows.join("blocked");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("x"), b"x").unwrap();
        assert!(s.write_file_atomic(&target, b"data").is_err());
        let left: Vec<_> = std::fs::read_dir(&windows)
            .unwrap()
            .filter_map(|e| {
                let n = e.unwrap().file_name().to_string_lossy().into_owned();
                n.contains(".tmp").then_some(n)
            })
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn an_unverified_index_never_replaces_a_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let (ix, _) = sample();
        let first = format::encode(&ix);
        let mut other = ix.clone();
        other.entries[0].mode = 0o4755;
        let forged = format::encode(&other);
        s.put_layer(&ix.layer, &first, None, Origin::Published)
            .await
            .unwrap();
        s.put_layer(&ix.layer, &forged, None, Origin::Published)
            .await
            .unwrap();
        assert_eq!(s.get_layer(&ix.layer).unwrap().unwrap().1, first);
        // One built here from the layer's bytes does replace it.
        s.put_layer(&ix.layer, &forged, None, Origin::Built)
            .await
            .unwrap();
        assert_eq!(s.get_verified_layer(&ix.layer).unwrap().unwrap().1, forged);
    }

    #[tokio::test]
    async fn survives_reopen_and_drops_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let (ix, windows) = sample();
        let enc = format::encode(&ix);
        {
            let s = Store::open(dir.path()).unwrap();
            s.put_layer(&ix.layer, &enc, Some(&windows), Origin::Published)
                .await
                .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let (back, raw) = s.get_layer(&ix.layer).unwrap().unwrap();
        assert_eq!((back, raw), (ix.clone(), enc.clone()));
        assert_eq!(s.get_windows(&ix.windows).unwrap(), windows);
        // A damaged windows file is not returned.
        std::fs::write(s.windows_path(&ix.windows.digest), b"not really zstE").unwrap();
        assert!(s.get_windows(&ix.windows).is_none());
        // A damaged record is dropped, not served.
        let mut bad = enc.clone();
        bad[20] ^= 1;
        s.layers.insert(ix.layer.to_string(), bad).unwrap();
        assert!(s.get_layer(&ix.layer).unwrap().is_none());
        assert!(s.get_layer(&ix.layer).unwrap().is_none());
    }
}
