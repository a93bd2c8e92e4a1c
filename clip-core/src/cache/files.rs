//! Whole files on local disk, for FUSE passthrough: when a file's bytes are all local, the FUSE
//! layer writes them out once as a plain file and hands the kernel that file, so later reads
//! never reach the daemon.
//!
//! Files are content-addressed (named by the sha256 of their bytes, so identical files of
//! different layers or images are stored once) and bounded in bytes with LRU eviction; sled
//! keeps their sizes and use order (tree `file-cache`) and which layer file each one is (tree
//! `file-names`: layer digest + offset of the file's bytes in the layer's tar stream). The bytes
//! come from verified spans and are hashed while written; after a restart a file is hashed again
//! before it is handed out ([`FileStore::verify`]), so a file damaged on disk is dropped, not
//! served. Files are written under a temporary name and renamed.

use super::ledger::Ledger;
use crate::digest::{Digest, Hasher};
use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub struct FileStore {
    dir: PathBuf,
    ledger: Ledger,
    names: sled::Tree,
    /// Files hashed (or written) by this process: safe to hand out.
    verified: Mutex<HashSet<Digest>>,
}

/// A file being written into the store; removed unless committed.
pub struct NewFile {
    file: File,
    tmp: PathBuf,
    hasher: Hasher,
    len: u64,
    done: bool,
}

impl NewFile {
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.hasher.update(data);
        self.len += data.len() as u64;
        self.file.write_all(data)
    }
}

impl Drop for NewFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn name_key(layer: &Digest, offset: u64) -> [u8; 40] {
    let mut k = [0u8; 40];
    k[..32].copy_from_slice(layer.as_bytes());
    k[32..].copy_from_slice(&offset.to_be_bytes());
    k
}

impl FileStore {
    /// Opens the store in `dir`; records without a whole file are dropped, files without a
    /// record and leftover temporaries are deleted, and the store is evicted down to `cap`.
    pub fn open(
        dir: &Path,
        tree: sled::Tree,
        names: sled::Tree,
        cap: u64,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ledger = Ledger::open("files", tree, cap, |d, size| {
            std::fs::metadata(dir.join(d.hex())).is_ok_and(|m| m.len() == size)
        });
        for f in std::fs::read_dir(dir)?.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            let ours = format!("sha256:{name}")
                .parse::<Digest>()
                .is_ok_and(|d| ledger.contains(&d));
            if !ours {
                let _ = std::fs::remove_file(f.path());
            }
        }
        let store = FileStore {
            dir: dir.to_path_buf(),
            ledger,
            names,
            verified: Mutex::new(HashSet::new()),
        };
        store.ledger.evict(|d| store.delete(d));
        Ok(store)
    }

    /// The store `cfg` asks for: `<disk_dir>/files`, records in trees of `db`. None
    /// when there is no disk tier or passthrough is off (a cap of 0).
    pub async fn open_for(
        cfg: &super::CacheConfig,
        db: &sled::Db,
    ) -> Result<Option<std::sync::Arc<Self>>, super::CacheError> {
        let (Some(dir), cap) = (&cfg.disk_dir, cfg.files_cap()) else {
            return Ok(None);
        };
        if cfg.disk_bytes == 0 || cap == 0 {
            return Ok(None);
        }
        let (tree, names) = (db.open_tree("file-cache")?, db.open_tree("file-names")?);
        let files = dir.join("files");
        let at = files.clone();
        tokio::task::spawn_blocking(move || FileStore::open(&at, tree, names, cap))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r)
            .map(|f| Some(std::sync::Arc::new(f)))
            .map_err(|error| super::CacheError::Disk {
                path: files.display().to_string(),
                error,
            })
    }

    fn path(&self, content: &Digest) -> PathBuf {
        self.dir.join(content.hex())
    }

    /// The stored file holding the `size` bytes of the layer file at `offset`, if there is
    /// one. A file stored for the same offset with another size (written for another index's
    /// idea of the file: a forged one, say) is not it.
    pub fn lookup(&self, layer: &Digest, offset: u64, size: u64) -> Option<Digest> {
        let v = self.names.get(name_key(layer, offset)).ok()??;
        let d = Digest::from_bytes(<[u8; 32]>::try_from(&v[..]).ok()?);
        (self.ledger.size(&d) == Some(size)).then_some(d)
    }

    /// True if `content` was hashed or written by this process.
    pub fn is_verified(&self, content: &Digest) -> bool {
        self.verified
            .lock()
            .expect("file store lock")
            .contains(content)
    }

    /// Opens a stored file for reading if this process has verified it (marks it used).
    pub fn open_verified(&self, content: &Digest) -> Option<File> {
        if !self.is_verified(content) {
            return None;
        }
        let size = self.ledger.size(content)?;
        let f = File::open(self.path(content)).ok()?;
        self.ledger.record_use(content, size);
        Some(f)
    }

    /// Hashes a stored file (blocking); a file that does not match its name is removed.
    pub fn verify(&self, content: &Digest) -> bool {
        if self.is_verified(content) {
            return true;
        }
        let ok = File::open(self.path(content))
            .and_then(|mut f| {
                let mut h = Hasher::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        return Ok(h.finish());
                    }
                    h.update(&buf[..n]);
                }
            })
            .is_ok_and(|d| d == *content);
        if ok {
            self.verified
                .lock()
                .expect("file store lock")
                .insert(*content);
        } else {
            tracing::warn!(file = %content, "dropping damaged passthrough file");
            self.remove(content);
        }
        ok
    }

    /// Starts writing a file of `size` bytes; None if it could never fit.
    pub fn create(&self, size: u64) -> std::io::Result<Option<NewFile>> {
        if size > self.ledger.cap() {
            return Ok(None);
        }
        let tmp = self.dir.join(format!(
            "new.{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        Ok(Some(NewFile {
            file: File::create(&tmp)?,
            tmp,
            hasher: Hasher::new(),
            len: 0,
            done: false,
        }))
    }

    /// Stores a fully written file as the bytes of the layer file at `offset`.
    pub fn commit(&self, mut f: NewFile, layer: &Digest, offset: u64) -> std::io::Result<Digest> {
        f.file.flush()?;
        let content = std::mem::take(&mut f.hasher).finish();
        let path = self.path(&content);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == f.len) {
            std::fs::remove_file(&f.tmp)?;
        } else {
            std::fs::rename(&f.tmp, &path)?;
        }
        f.done = true;
        self.verified
            .lock()
            .expect("file store lock")
            .insert(content);
        self.ledger.record_use(&content, f.len);
        let _ = self
            .names
            .insert(name_key(layer, offset), content.as_bytes());
        self.ledger.evict(|d| self.delete(d));
        Ok(content)
    }

    fn delete(&self, key: &Digest) {
        self.verified.lock().expect("file store lock").remove(key);
        let _ = std::fs::remove_file(self.path(key));
    }

    /// Drops a file. A file the kernel still has open stays readable until it is closed.
    fn remove(&self, key: &Digest) {
        self.ledger.forget(key);
        self.delete(key);
    }

    /// Drops the files stored for `layer` (a collected one), unless another layer's name
    /// holds the same bytes too. Returns how many files went.
    pub fn forget_layer(&self, layer: &Digest) -> usize {
        let mine: Vec<(sled::IVec, sled::IVec)> = self
            .names
            .scan_prefix(layer.as_bytes())
            .filter_map(Result::ok)
            .collect();
        if mine.is_empty() {
            return 0;
        }
        for (k, _) in &mine {
            let _ = self.names.remove(k);
        }
        let still: std::collections::HashSet<sled::IVec> = self
            .names
            .iter()
            .filter_map(Result::ok)
            .map(|(_, v)| v)
            .collect();
        let mut gone = 0;
        for (_, v) in mine {
            if still.contains(&v) {
                continue;
            }
            if let Ok(b) = <[u8; 32]>::try_from(&v[..]) {
                self.remove(&Digest::from_bytes(b));
                gone += 1;
            }
        }
        gone
    }

    /// (bytes held, files, evictions so far)
    pub fn usage(&self) -> (u64, usize, u64) {
        self.ledger.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path, cap: u64) -> FileStore {
        let db = sled::open(dir.join("db")).unwrap();
        FileStore::open(
            &dir.join("files"),
            db.open_tree("file-cache").unwrap(),
            db.open_tree("file-names").unwrap(),
            cap,
        )
        .unwrap()
    }

    fn put(s: &FileStore, layer: &Digest, offset: u64, data: &[u8]) -> Digest {
        let mut f = s.create(data.len() as u64).unwrap().unwrap();
        for c in data.chunks(7) {
            f.write(c).unwrap();
        }
        s.commit(f, layer, offset).unwrap()
    }

    #[test]
    fn a_collected_layers_files_go_unless_another_layer_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path(), 1 << 20);
        let (gone, kept) = (Digest::of(b"gone"), Digest::of(b"kept"));
        let own = put(&s, &gone, 0, &[1; 500]);
        let shared = put(&s, &gone, 4096, &[2; 500]);
        assert_eq!(put(&s, &kept, 0, &[2; 500]), shared);
        assert_eq!(s.forget_layer(&gone), 1);
        assert_eq!(s.lookup(&gone, 0, 500), None);
        assert_eq!(s.lookup(&gone, 4096, 500), None);
        assert_eq!(s.lookup(&kept, 0, 500), Some(shared));
        assert!(!dir.path().join("files").join(own.hex()).exists());
        assert!(s.open_verified(&shared).is_some());
        assert_eq!(s.usage().1, 1);
    }

    #[test]
    fn content_addressed_bounded_verified_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Digest::of(b"layer");
        let files: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 1000]).collect();
        let content;
        {
            let s = open(dir.path(), 2500);
            let d: Vec<Digest> = files
                .iter()
                .enumerate()
                .map(|(i, f)| put(&s, &layer, i as u64 * 4096, f))
                .collect();
            assert_eq!(d[0], Digest::of(&files[0]));
            assert_eq!(s.usage().1, 2, "two 1000-byte files fit in 2500");
            assert_eq!(s.lookup(&layer, 0, 1000), None, "oldest evicted");
            assert_eq!(s.lookup(&layer, 3 * 4096, 1000), Some(d[3]));
            // Another index's idea of the file at that offset (another size) is not it.
            assert_eq!(s.lookup(&layer, 3 * 4096, 999), None);
            assert_eq!(s.lookup(&layer, 3 * 4096, 1001), None);
            let mut got = Vec::new();
            s.open_verified(&d[3])
                .unwrap()
                .read_to_end(&mut got)
                .unwrap();
            assert_eq!(got, files[3]);
            // The same bytes under another name are stored once.
            assert_eq!(put(&s, &Digest::of(b"other"), 0, &files[3]), d[3]);
            assert_eq!(s.usage().1, 2);
            // A write that is dropped half way leaves nothing behind.
            let mut f = s.create(10).unwrap().unwrap();
            f.write(b"half").unwrap();
            drop(f);
            assert_eq!(
                std::fs::read_dir(dir.path().join("files")).unwrap().count(),
                2
            );
            content = d[2];
            s.ledger.flush_blocking();
            s.names.flush().unwrap();
        }
        let s = open(dir.path(), 2500);
        assert_eq!(s.lookup(&layer, 2 * 4096, 1000), Some(content));
        // Not handed out before it is hashed again in this process.
        assert!(s.open_verified(&content).is_none());
        assert!(s.verify(&content));
        assert!(s.open_verified(&content).is_some());
        // A file damaged on disk is dropped at verification.
        let other = s.lookup(&layer, 3 * 4096, 1000).unwrap();
        let p = s.path(&other);
        let mut raw = std::fs::read(&p).unwrap();
        raw[10] ^= 1;
        std::fs::write(&p, raw).unwrap();
        assert!(!s.verify(&other));
        assert!(!p.exists());
        assert_eq!(s.lookup(&layer, 3 * 4096, 1000), None);
    }
}
