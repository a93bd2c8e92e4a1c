//! The bookkeeping every bounded on-disk store shares: which keys it holds, their sizes and use
//! order, mirrored in a sled tree so a restart knows what it has without reading the files.
//!
//! The span files of the disk tier and the whole files of the passthrough store both use it: a
//! store says how to check that a recorded key still has its file ([`Ledger::open`]) and how to
//! delete one ([`Ledger::evict`]); the ledger does the rest.

use crate::digest::Digest;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct State {
    map: HashMap<Digest, (u64, u64)>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
    evictions: u64,
}

/// Sizes and LRU order of a store bounded to `cap` bytes, recorded in `tree`.
pub struct Ledger {
    /// Metric label of the store ("disk", "files").
    label: &'static str,
    cap: u64,
    tree: sled::Tree,
    state: Mutex<State>,
}

/// A sled record of a stored file: its size and last-use tick.
fn record(size: u64, tick: u64) -> [u8; 16] {
    let mut r = [0u8; 16];
    r[..8].copy_from_slice(&size.to_le_bytes());
    r[8..].copy_from_slice(&tick.to_le_bytes());
    r
}

fn parse_record(v: &[u8]) -> Option<(u64, u64)> {
    let v: &[u8; 16] = v.try_into().ok()?;
    let (size, tick) = v.split_at(8);
    Some((
        u64::from_le_bytes(size.try_into().ok()?),
        u64::from_le_bytes(tick.try_into().ok()?),
    ))
}

impl Ledger {
    /// Loads the records of `tree`, keeping those for which `present(key, size)` holds (the
    /// store's file is there, whole) in their old use order; malformed records and records
    /// without a file are dropped.
    pub fn open(
        label: &'static str,
        tree: sled::Tree,
        cap: u64,
        present: impl Fn(&Digest, u64) -> bool,
    ) -> Self {
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
        let ledger = Ledger {
            label,
            cap,
            tree,
            state: Mutex::new(State::default()),
        };
        {
            let mut s = ledger.lock();
            for (d, size, tick) in recorded {
                if present(&d, size) {
                    s.tick = s.tick.max(tick);
                    ledger.touch(&mut s, d, size);
                } else {
                    let _ = ledger.tree.remove(d.as_bytes());
                }
            }
        }
        ledger
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("ledger lock")
    }

    fn touch(&self, s: &mut State, key: Digest, size: u64) -> u64 {
        s.tick += 1;
        let tick = s.tick;
        if let Some((old_size, old_tick)) = s.map.insert(key, (size, tick)) {
            s.order.remove(&old_tick);
            s.bytes -= old_size;
            crate::metrics::cache_size(self.label, -(old_size as i64));
        }
        crate::metrics::cache_size(self.label, size as i64);
        s.order.insert(tick, key);
        s.bytes += size;
        tick
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    pub fn contains(&self, key: &Digest) -> bool {
        self.lock().map.contains_key(key)
    }

    /// The recorded size of `key`.
    pub fn size(&self, key: &Digest) -> Option<u64> {
        self.lock().map.get(key).map(|e| e.0)
    }

    /// Marks `key` (of `size` bytes) most recently used, in memory and in its sled record.
    pub fn record_use(&self, key: &Digest, size: u64) {
        let tick = {
            let mut s = self.lock();
            self.touch(&mut s, *key, size)
        };
        let _ = self.tree.insert(key.as_bytes(), &record(size, tick));
    }

    /// Forgets `key` (its file is the caller's to delete).
    pub fn forget(&self, key: &Digest) {
        {
            let mut s = self.lock();
            if let Some((size, tick)) = s.map.remove(key) {
                s.order.remove(&tick);
                s.bytes -= size;
                crate::metrics::cache_size(self.label, -(size as i64));
            }
        }
        let _ = self.tree.remove(key.as_bytes());
    }

    /// Evicts least recently used keys until the store fits its cap; `delete` removes a
    /// victim's file.
    pub fn evict(&self, mut delete: impl FnMut(&Digest)) {
        loop {
            let victim = {
                let mut s = self.lock();
                if s.bytes <= self.cap {
                    return;
                }
                let Some((_, &v)) = s.order.first_key_value() else {
                    return;
                };
                s.evictions += 1;
                crate::metrics::cache_eviction(self.label);
                v
            };
            self.forget(&victim);
            delete(&victim);
        }
    }

    /// Makes the records durable (sled also flushes on its own every 500 ms).
    pub async fn flush(&self) {
        let _ = self.tree.flush_async().await;
    }

    /// Blocking flush, for tests and shutdown paths without a runtime.
    pub fn flush_blocking(&self) {
        let _ = self.tree.flush();
    }

    /// (bytes held, entries, evictions so far)
    pub fn usage(&self) -> (u64, usize, u64) {
        let s = self.lock();
        (s.bytes, s.map.len(), s.evictions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lru_bounded_and_reloaded_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path().join("db")).unwrap();
        let k = |i: u8| Digest::of(&[i]);
        {
            let l = Ledger::open("test", db.open_tree("t").unwrap(), 250, |_, _| true);
            for i in 0..3 {
                l.record_use(&k(i), 100);
            }
            let mut gone = Vec::new();
            l.evict(|d| gone.push(*d));
            assert_eq!(gone, vec![k(0)], "the oldest goes first");
            l.record_use(&k(1), 100); // 1 is now newer than 2
            l.flush_blocking();
        }
        let l = Ledger::open("test", db.open_tree("t").unwrap(), 150, |d, _| *d != k(9));
        let mut gone = Vec::new();
        l.evict(|d| gone.push(*d));
        assert_eq!(gone, vec![k(2)], "use order survives a reopen");
        assert_eq!(l.usage().1, 1);
        // A record whose file is missing is dropped at open.
        let l = Ledger::open("test", db.open_tree("t").unwrap(), 150, |d, _| *d != k(1));
        assert_eq!(l.usage().1, 0);
    }
}
