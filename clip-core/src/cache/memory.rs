//! The memory tier: an LRU of verified spans, bounded in bytes.

use super::Tier;
use crate::digest::Digest;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

struct State {
    map: HashMap<Digest, (Bytes, u64)>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
    evictions: u64,
}

pub struct MemoryTier {
    cap: u64,
    state: Mutex<State>,
}

impl MemoryTier {
    pub fn new(cap: u64) -> Self {
        MemoryTier {
            cap,
            state: Mutex::new(State {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                bytes: 0,
                evictions: 0,
            }),
        }
    }

    pub fn get(&self, key: &Digest) -> Option<Bytes> {
        let mut s = self.state.lock().expect("memory tier lock");
        s.tick += 1;
        let tick = s.tick;
        let (data, old) = {
            let (data, t) = s.map.get_mut(key)?;
            let old = std::mem::replace(t, tick);
            (data.clone(), old)
        };
        s.order.remove(&old);
        s.order.insert(tick, *key);
        Some(data)
    }

    /// Presence only: no clone, and the LRU order is left alone (a probe is not a use).
    pub fn contains(&self, key: &Digest) -> bool {
        self.state
            .lock()
            .expect("memory tier lock")
            .map
            .contains_key(key)
    }

    /// Inserts (spans larger than the whole cap are not kept) and evicts least recently used.
    pub fn put(&self, key: Digest, data: Bytes) {
        if data.len() as u64 > self.cap {
            return;
        }
        let mut s = self.state.lock().expect("memory tier lock");
        s.tick += 1;
        let tick = s.tick;
        let len = data.len() as u64;
        if let Some((_, old)) = s.map.insert(key, (data, tick)) {
            s.order.remove(&old);
            s.bytes -= len;
        }
        s.order.insert(tick, key);
        s.bytes += len;
        while s.bytes > self.cap {
            let Some((_, victim)) = s.order.pop_first() else {
                break;
            };
            if let Some((d, _)) = s.map.remove(&victim) {
                s.bytes -= d.len() as u64;
                s.evictions += 1;
            }
        }
    }

    /// (bytes held, entries, evictions so far)
    pub fn usage(&self) -> (u64, usize, u64) {
        let s = self.state.lock().expect("memory tier lock");
        (s.bytes, s.map.len(), s.evictions)
    }
}

#[async_trait]
impl Tier for MemoryTier {
    fn name(&self) -> &'static str {
        "memory"
    }
    async fn get(&self, key: &Digest) -> Option<Bytes> {
        MemoryTier::get(self, key)
    }
    fn get_now(&self, key: &Digest) -> Option<Bytes> {
        MemoryTier::get(self, key)
    }
    async fn put(&self, key: &Digest, data: Bytes) {
        MemoryTier::put(self, *key, data)
    }
    fn contains(&self, key: &Digest) -> bool {
        MemoryTier::contains(self, key)
    }
    async fn remove(&self, key: &Digest) {
        let mut s = self.state.lock().expect("memory tier lock");
        if let Some((d, tick)) = s.map.remove(key) {
            s.order.remove(&tick);
            s.bytes -= d.len() as u64;
        }
    }
    fn trusted(&self) -> bool {
        true
    }
    fn usage(&self) -> (u64, usize, u64) {
        MemoryTier::usage(self)
    }
    fn capacity(&self) -> u64 {
        self.cap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_lru() {
        let m = MemoryTier::new(100);
        let k = |i: u8| Digest::of(&[i]);
        for i in 0..5 {
            m.put(k(i), Bytes::from(vec![i; 30]));
        }
        // 3 x 30 fit in 100: the two oldest went.
        assert_eq!(m.usage().0, 90);
        assert!(m.get(&k(0)).is_none() && m.get(&k(1)).is_none());
        assert!(m.get(&k(2)).is_some()); // now most recent
        m.put(k(9), Bytes::from(vec![9; 30]));
        assert!(m.get(&k(3)).is_none(), "3 was least recently used");
        assert!(m.get(&k(2)).is_some());
        m.put(k(10), Bytes::from(vec![0; 101]));
        assert!(m.get(&k(10)).is_none(), "larger than the cap");
        assert!(m.usage().0 <= 100);
    }
}
