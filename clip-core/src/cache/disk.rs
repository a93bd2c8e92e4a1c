//! The local disk tier: one file per span, named by the span's digest, bounded in bytes.
//!
//! File layout: `CLIPSPN1` magic, the span digest (32 bytes), the length (u64 LE), the bytes.
//! Files are written under a temporary name and renamed, so a crash leaves either nothing or a
//! whole file under the real name; every read re-hashes the bytes, so a file damaged any other
//! way is dropped and fetched again, never served. Sizes and last use live in sled (tree
//! `disk-cache`) so a restart knows what it has without reading the files; files whose records
//! were lost (a crash before sled's periodic flush) are adopted on open.

use crate::digest::Digest;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"CLIPSPN1";
const HEADER: usize = 8 + 32 + 8;

/// LRU bookkeeping of a bounded on-disk store (sizes and use order; the files are elsewhere).
pub(super) struct State {
    /// Metric label of the store ("disk", "files").
    label: &'static str,
    pub(super) map: HashMap<Digest, (u64, u64)>,
    order: BTreeMap<u64, Digest>,
    pub(super) tick: u64,
    pub(super) bytes: u64,
    pub(super) evictions: u64,
}

impl State {
    pub(super) fn new(label: &'static str) -> Self {
        State {
            label,
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            evictions: 0,
        }
    }
    /// The least recently used key.
    pub(super) fn oldest(&self) -> Option<Digest> {
        self.order.first_key_value().map(|(_, &d)| d)
    }
    pub(super) fn touch(&mut self, key: Digest, size: u64) -> u64 {
        self.tick += 1;
        let tick = self.tick;
        if let Some((old_size, old_tick)) = self.map.insert(key, (size, tick)) {
            self.order.remove(&old_tick);
            self.bytes -= old_size;
            crate::metrics::cache_size(self.label, -(old_size as i64));
        }
        crate::metrics::cache_size(self.label, size as i64);
        self.order.insert(tick, key);
        self.bytes += size;
        tick
    }
    pub(super) fn forget(&mut self, key: &Digest) {
        if let Some((size, tick)) = self.map.remove(key) {
            self.order.remove(&tick);
            self.bytes -= size;
            crate::metrics::cache_size(self.label, -(size as i64));
        }
    }
}

pub struct DiskTier {
    dir: PathBuf,
    cap: u64,
    tree: sled::Tree,
    state: Mutex<State>,
}

/// Parses a [`record`]: (size, tick).
pub(super) fn parse_record(v: &[u8]) -> Option<(u64, u64)> {
    let v: &[u8; 16] = v.try_into().ok()?;
    let (size, tick) = v.split_at(8);
    Some((
        u64::from_le_bytes(size.try_into().ok()?),
        u64::from_le_bytes(tick.try_into().ok()?),
    ))
}

/// A sled record of a stored file: its size and last-use tick.
pub(super) fn record(size: u64, tick: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&size.to_le_bytes());
    r[8..].copy_from_slice(&tick.to_le_bytes());
    r
}

impl DiskTier {
    /// Opens the tier in `dir` with its state in `tree`; reconciles records and files and
    /// evicts down to `cap`.
    pub fn open(dir: &Path, tree: sled::Tree, cap: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut recorded: Vec<(Digest, u64, u64)> = Vec::new();
        for (k, v) in tree.iter().flatten() {
            match (<[u8; 32]>::try_from(&k[..]), parse_record(&v)) {
                (Ok(d), Some((size, tick))) => recorded.push((Digest::from_bytes(d), size, tick)),
                _ => {
                    let _ = tree.remove(k);
                }
            }
        }
        recorded.sort_by_key(|r| r.2);
        let state = State::new("disk");
        let tier = DiskTier {
            dir: dir.to_path_buf(),
            cap,
            tree,
            state: Mutex::new(state),
        };
        {
            let mut s = tier.state.lock().expect("disk tier lock");
            for (d, size, tick) in recorded {
                match std::fs::metadata(tier.path(&d)) {
                    Ok(m) if m.len() == size + HEADER as u64 => {
                        s.tick = s.tick.max(tick);
                        s.touch(d, size);
                    }
                    _ => {
                        let _ = tier.tree.remove(d.as_bytes());
                    }
                }
            }
        }
        tier.adopt_strays()?;
        tier.evict();
        Ok(tier)
    }

    fn path(&self, key: &Digest) -> PathBuf {
        let hex = key.hex();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Files present without a record: adopt whole ones, delete temporaries.
    fn adopt_strays(&self) -> std::io::Result<()> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else {
            return Ok(());
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
                if self
                    .state
                    .lock()
                    .expect("disk tier lock")
                    .map
                    .contains_key(&d)
                {
                    continue;
                }
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len < HEADER as u64 {
                    let _ = std::fs::remove_file(f.path());
                    continue;
                }
                let size = len - HEADER as u64;
                self.record_use(&d, size);
            }
        }
        Ok(())
    }

    /// Reads and verifies a span; a damaged file is removed and reported absent.
    pub fn get(&self, key: &Digest) -> Option<Bytes> {
        if !self
            .state
            .lock()
            .expect("disk tier lock")
            .map
            .contains_key(key)
        {
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
            let data = Bytes::from(raw).slice(HEADER..);
            (Digest::of(&data) == *key).then_some(data)
        });
        match ok {
            Some(data) => {
                self.record_use(key, data.len() as u64);
                Some(data)
            }
            None => {
                tracing::warn!(span = %key, path = %path.display(), "dropping damaged cache file");
                self.remove(key);
                None
            }
        }
    }

    pub fn contains(&self, key: &Digest) -> bool {
        self.state
            .lock()
            .expect("disk tier lock")
            .map
            .contains_key(key)
    }

    /// Stores a (verified) span durably enough: temp file + rename; evicts to the cap.
    pub fn put(&self, key: &Digest, data: &[u8]) -> std::io::Result<()> {
        if data.len() as u64 > self.cap || self.contains(key) {
            return Ok(());
        }
        let path = self.path(key);
        std::fs::create_dir_all(path.parent().expect("span files live in a subdirectory"))?;
        let tmp = path.with_extension(format!(
            "tmp{}.{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(MAGIC)?;
            f.write_all(key.as_bytes())?;
            f.write_all(&(data.len() as u64).to_le_bytes())?;
            f.write_all(data)?;
        }
        std::fs::rename(&tmp, &path)?;
        self.record_use(key, data.len() as u64);
        self.evict();
        Ok(())
    }

    /// Marks `key` (of `size` bytes) most recently used, in memory and in its sled record.
    fn record_use(&self, key: &Digest, size: u64) {
        let tick = self.state.lock().expect("disk tier lock").touch(*key, size);
        let _ = self.tree.insert(key.as_bytes(), &record(size, tick));
    }

    fn remove(&self, key: &Digest) {
        self.state.lock().expect("disk tier lock").forget(key);
        let _ = self.tree.remove(key.as_bytes());
        let _ = std::fs::remove_file(self.path(key));
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut s = self.state.lock().expect("disk tier lock");
                if s.bytes <= self.cap {
                    return;
                }
                let Some(v) = s.oldest() else {
                    return;
                };
                s.evictions += 1;
                crate::metrics::cache_eviction("disk");
                v
            };
            self.remove(&victim);
        }
    }

    /// Makes the records durable (sled also flushes on its own every 500 ms).
    pub async fn flush(&self) {
        let _ = self.tree.flush_async().await;
    }

    /// (bytes held, entries, evictions so far)
    pub fn usage(&self) -> (u64, usize, u64) {
        let s = self.state.lock().expect("disk tier lock");
        (s.bytes, s.map.len(), s.evictions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(dir: &Path) -> sled::Tree {
        sled::open(dir.join("db"))
            .unwrap()
            .open_tree("disk-cache")
            .unwrap()
    }

    #[test]
    fn verified_bounded_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let spans: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; 1000]).collect();
        let keys: Vec<Digest> = spans.iter().map(|s| Digest::of(s)).collect();
        {
            let t = DiskTier::open(&dir.path().join("spans"), tree(dir.path()), 3500).unwrap();
            for (k, s) in keys.iter().zip(&spans) {
                t.put(k, s).unwrap();
            }
            assert_eq!(t.usage().1, 3, "3 x 1000 fit in 3500");
            assert!(t.get(&keys[0]).is_none() && t.get(&keys[5]).is_some());
            t.tree.flush().unwrap();
        }
        let t = DiskTier::open(&dir.path().join("spans"), tree(dir.path()), 3500).unwrap();
        assert_eq!(t.usage().1, 3);
        assert_eq!(&t.get(&keys[4]).unwrap()[..], &spans[4][..]);
        // A damaged file is dropped, not served.
        let p = t.path(&keys[3]);
        let mut raw = std::fs::read(&p).unwrap();
        raw[HEADER + 10] ^= 1;
        std::fs::write(&p, raw).unwrap();
        assert!(t.get(&keys[3]).is_none());
        assert!(!p.exists());
        // A lost record (crash before sled flushed) is re-adopted from the file.
        t.tree.remove(keys[5].as_bytes()).unwrap();
        t.tree.flush().unwrap();
        drop(t);
        let t = DiskTier::open(&dir.path().join("spans"), tree(dir.path()), 3500).unwrap();
        assert_eq!(&t.get(&keys[5]).unwrap()[..], &spans[5][..]);
    }
}
