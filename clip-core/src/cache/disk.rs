//! The local disk tier: one file per span, named by the span's digest, bounded in bytes.
//!
//! File layout: `CLIPSPN1` magic, the span digest (32 bytes), the length (u64 LE), the bytes.
//! Files are written under a temporary name and renamed, so a crash leaves either nothing or a
//! whole file under the real name; a malformed file is dropped, and the composed cache re-hashes
//! every span read from here, so a file damaged any other way is dropped and fetched again,
//! never served. Sizes and last use live in a [`Ledger`] (sled tree `disk-cache`) so a restart
//! knows what it has without reading the files; files whose records were lost (a crash before
//! sled's periodic flush) are adopted on open.

use super::ledger::Ledger;
use super::Tier;
use crate::digest::Digest;
use async_trait::async_trait;
use bytes::Bytes;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 8] = b"CLIPSPN1";
const HEADER: usize = 8 + 32 + 8;

/// The disk tier; cheap to clone (the blocking file work runs on tokio's blocking pool).
#[derive(Clone)]
pub struct DiskTier {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    ledger: Ledger,
    /// Writes are failing now (told once, until one succeeds again).
    failing: std::sync::atomic::AtomicBool,
}

impl DiskTier {
    /// Opens the tier in `dir` with its records in `tree`; reconciles records and files and
    /// evicts down to `cap`.
    pub fn open(dir: &Path, tree: sled::Tree, cap: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ledger = Ledger::open("disk", tree, cap, |d, size| {
            std::fs::metadata(path_in(dir, d)).is_ok_and(|m| m.len() == size + HEADER as u64)
        });
        let inner = Inner {
            dir: dir.to_path_buf(),
            ledger,
            failing: Default::default(),
        };
        inner.adopt_strays();
        inner.ledger.evict(|d| inner.delete(d));
        Ok(DiskTier {
            inner: Arc::new(inner),
        })
    }

    /// Reads a span file; a malformed file is removed and reported absent. The bytes are not
    /// hashed here: the composed cache verifies whatever a tier returns.
    pub fn get_blocking(&self, key: &Digest) -> Option<Bytes> {
        self.inner.get(key)
    }

    /// Stores a (verified) span: temp file + rename; evicts to the cap.
    pub fn put_blocking(&self, key: &Digest, data: &[u8]) -> std::io::Result<()> {
        self.inner.put(key, data)
    }

    #[cfg(test)]
    fn path(&self, key: &Digest) -> PathBuf {
        path_in(&self.inner.dir, key)
    }
}

fn path_in(dir: &Path, key: &Digest) -> PathBuf {
    let hex = key.hex();
    dir.join(&hex[..2]).join(hex)
}

impl Inner {
    fn path(&self, key: &Digest) -> PathBuf {
        path_in(&self.dir, key)
    }

    fn delete(&self, key: &Digest) {
        let _ = std::fs::remove_file(self.path(key));
    }

    /// Files present without a record: adopt whole ones, delete temporaries.
    fn adopt_strays(&self) {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return;
        };
        // Span files live in two-hex-digit subdirectories; anything else is not ours.
        for sub in rd.flatten().filter(|s| s.file_name().len() == 2) {
            let Ok(files) = std::fs::read_dir(sub.path()) else {
                continue;
            };
            for f in files.flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.contains(".tmp") {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let Ok(d) = format!("sha256:{name}").parse::<Digest>() else {
                    continue;
                };
                if self.ledger.contains(&d) {
                    continue;
                }
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < HEADER as u64 {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                self.ledger.record_use(&d, len - HEADER as u64);
            }
        }
    }

    fn get(&self, key: &Digest) -> Option<Bytes> {
        if !self.ledger.contains(key) {
            return None;
        }
        let path = self.path(key);
        let ok = std::fs::read(&path).ok().and_then(|raw| {
            if raw.len() < HEADER || &raw[..8] != MAGIC || &raw[8..40] != key.as_bytes() {
                return None;
            }
            let len = u64::from_le_bytes(raw[40..48].try_into().ok()?) as usize;
            if raw.len() != HEADER + len {
                return None;
            }
            Some(Bytes::from(raw).slice(HEADER..))
        });
        match ok {
            Some(data) => {
                self.ledger.record_use(key, data.len() as u64);
                Some(data)
            }
            None => {
                tracing::warn!(span = %key, path = %path.display(), "dropping damaged cache file");
                self.remove(key);
                None
            }
        }
    }

    fn put(&self, key: &Digest, data: &[u8]) -> std::io::Result<()> {
        if data.len() as u64 > self.ledger.cap() || self.ledger.contains(key) {
            return Ok(());
        }
        let path = self.path(key);
        std::fs::create_dir_all(path.parent().expect("span files live in a subdirectory"))?;
        let tmp = path.with_extension(format!(
            "tmp{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(key.as_bytes())?;
            f.write_all(&(data.len() as u64).to_le_bytes())?;
            f.write_all(data)?;
            std::fs::rename(&tmp, &path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.ledger.record_use(key, data.len() as u64);
        self.ledger.evict(|d| self.delete(d));
        Ok(())
    }

    fn remove(&self, key: &Digest) {
        self.ledger.forget(key);
        self.delete(key);
    }
}

#[async_trait]
impl Tier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn get(&self, key: &Digest) -> Option<Bytes> {
        if !self.inner.ledger.contains(key) {
            return None;
        }
        let (me, k) = (self.inner.clone(), *key);
        tokio::task::spawn_blocking(move || me.get(&k))
            .await
            .ok()
            .flatten()
    }

    async fn put(&self, key: &Digest, data: Bytes) {
        use std::sync::atomic::Ordering::Relaxed;
        let (me, k) = (self.inner.clone(), *key);
        let failed = match tokio::task::spawn_blocking(move || me.put(&k, &data)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        // Reads never depend on this write (the bytes were served from the tier above or the
        // registry), and a failed write leaves nothing a later read trusts: said once when
        // writes start failing, counted each time, and said again when they work.
        match failed {
            Some(e) => {
                crate::metrics::cache_write_failure("disk");
                if !self.inner.failing.swap(true, Relaxed) {
                    tracing::warn!(
                        dir = %self.inner.dir.display(),
                        "the disk cache cannot store spans ({e}); reads go on from memory and \
                         the registry (clip_cache_write_failures_total counts them)"
                    );
                }
            }
            None => {
                if self.inner.failing.swap(false, Relaxed) {
                    tracing::info!(dir = %self.inner.dir.display(), "the disk cache stores spans again");
                }
            }
        }
    }

    fn contains(&self, key: &Digest) -> bool {
        self.inner.ledger.contains(key)
    }

    fn get_now(&self, key: &Digest) -> Option<Bytes> {
        self.inner.get(key)
    }

    async fn remove(&self, key: &Digest) {
        let (me, k) = (self.inner.clone(), *key);
        let _ = tokio::task::spawn_blocking(move || me.remove(&k)).await;
    }

    async fn flush(&self) {
        self.inner.ledger.flush().await;
    }

    fn usage(&self) -> (u64, usize, u64) {
        self.inner.ledger.usage()
    }
    fn capacity(&self) -> u64 {
        self.inner.ledger.cap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let tree = || db.open_tree("disk-cache").unwrap();
        let spans: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1000]).collect();
        let keys: Vec<Digest> = spans.iter().map(|s| Digest::of(s)).collect();
        {
            let t = DiskTier::open(&dir.path().join("spans"), tree(), 3500).unwrap();
            for (k, s) in keys.iter().zip(&spans) {
                t.put_blocking(k, s).unwrap();
            }
            assert_eq!(t.usage().1, 3, "3 x 1000 fit in 3500");
            assert!(t.get_blocking(&keys[0]).is_none() && t.get_blocking(&keys[5]).is_some());
            t.inner.ledger.flush_blocking();
        }
        let t = DiskTier::open(&dir.path().join("spans"), tree(), 3500).unwrap();
        assert_eq!(t.usage().1, 3);
        assert_eq!(&t.get_blocking(&keys[4]).unwrap()[..], &spans[4][..]);
        // A truncated file is dropped, not served (content damage is caught by the composed
        // cache's verification: see the cache tests).
        let p = t.path(&keys[3]);
        let raw = std::fs::read(&p).unwrap();
        std::fs::write(&p, &raw[..raw.len() - 1]).unwrap();
        assert!(t.get_blocking(&keys[3]).is_none());
        assert!(!p.exists());
        // A lost record (crash before sled flushed) is re-adopted from the file.
        drop(t);
        tree().remove(keys[5].as_bytes()).unwrap();
        let t = DiskTier::open(&dir.path().join("spans"), tree(), 3500).unwrap();
        assert_eq!(&t.get_blocking(&keys[5]).unwrap()[..], &spans[5][..]);
    }
}
