//! The memory tier: an LRU of verified spans, bounded in bytes.

use super::Tier;
use crate::budget::{MemoryBudget, Reclaim, Reservation};
use crate::digest::Digest;
use async_trait::async_trait;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};

struct State {
    /// Each span with its last use and the memory it holds against the process's budget.
    map: HashMap<Digest, (Bytes, u64, Reservation)>,
    order: BTreeMap<u64, Digest>,
    tick: u64,
    bytes: u64,
    evictions: u64,
}

impl State {
    /// Drops span `key` (its reservation with it); its bytes, if it was here.
    fn remove(&mut self, key: &Digest) -> Option<u64> {
        let (d, tick, _) = self.map.remove(key)?;
        self.order.remove(&tick);
        let len = d.len() as u64;
        self.bytes -= len;
        crate::metrics::cache_size("memory", -(len as i64));
        Some(len)
    }

    /// Drops the least recently used span; its bytes, or None when empty.
    fn evict_one(&mut self) -> Option<u64> {
        let (_, &victim) = self.order.first_key_value()?;
        let len = self.remove(&victim)?;
        self.evictions += 1;
        crate::metrics::cache_eviction("memory");
        Some(len)
    }
}

struct Inner {
    cap: u64,
    budget: &'static MemoryBudget,
    state: Mutex<State>,
}

/// Bounded twice: by its own cap, and by the process's memory budget, which it shares with
/// indexes and fetches in flight. It gives spans back (least recently used first) when those
/// need the memory, and caches nothing it has no budget for.
pub struct MemoryTier {
    inner: Arc<Inner>,
}

impl Reclaim for Inner {
    fn reclaim(&self, bytes: u64) -> u64 {
        let mut s = self.state.lock().expect("memory tier lock");
        let mut got = 0;
        while got < bytes {
            match s.evict_one() {
                Some(n) => got += n,
                None => break,
            }
        }
        got
    }
}

impl MemoryTier {
    /// A tier of `cap` bytes charged to the process's budget.
    pub fn new(cap: u64) -> Self {
        Self::with_budget(cap, crate::budget::process())
    }

    pub fn with_budget(cap: u64, budget: &'static MemoryBudget) -> Self {
        let inner = Arc::new(Inner {
            cap,
            budget,
            state: Mutex::new(State {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
                bytes: 0,
                evictions: 0,
            }),
        });
        budget.register(Arc::downgrade(&inner) as Weak<dyn Reclaim>);
        MemoryTier { inner }
    }

    pub fn get(&self, key: &Digest) -> Option<Bytes> {
        let mut s = self.inner.state.lock().expect("memory tier lock");
        s.tick += 1;
        let tick = s.tick;
        let (data, old) = {
            let (data, t, _) = s.map.get_mut(key)?;
            let old = std::mem::replace(t, tick);
            (data.clone(), old)
        };
        s.order.remove(&old);
        s.order.insert(tick, *key);
        Some(data)
    }

    /// Presence only: no clone, and the LRU order is left alone (a probe is not a use).
    pub fn contains(&self, key: &Digest) -> bool {
        self.inner
            .state
            .lock()
            .expect("memory tier lock")
            .map
            .contains_key(key)
    }

    /// Inserts and evicts least recently used, to stay within the cap and to find the span's
    /// bytes in the budget. A span larger than the cap, or one the budget has no room for even
    /// with the tier empty, is not kept.
    pub fn put(&self, key: Digest, data: Bytes) {
        let len = data.len() as u64;
        if len > self.inner.cap {
            return;
        }
        let mut s = self.inner.state.lock().expect("memory tier lock");
        s.remove(&key);
        while s.bytes + len > self.inner.cap {
            if s.evict_one().is_none() {
                break;
            }
        }
        // The tier's own lock is held: take without asking the caches (this one included).
        let reservation = loop {
            if let Some(r) = self.inner.budget.try_take(len) {
                break r;
            }
            if s.evict_one().is_none() {
                self.inner.budget.note_uncached();
                return;
            }
        };
        s.tick += 1;
        let tick = s.tick;
        s.map.insert(key, (data, tick, reservation));
        s.order.insert(tick, key);
        s.bytes += len;
        crate::metrics::cache_size("memory", len as i64);
    }

    /// (bytes held, entries, evictions so far)
    pub fn usage(&self) -> (u64, usize, u64) {
        let s = self.inner.state.lock().expect("memory tier lock");
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
        self.inner
            .state
            .lock()
            .expect("memory tier lock")
            .remove(key);
    }
    fn trusted(&self) -> bool {
        true
    }
    fn usage(&self) -> (u64, usize, u64) {
        MemoryTier::usage(self)
    }
    fn capacity(&self) -> u64 {
        self.inner.cap
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

    #[test]
    fn the_process_budget_bounds_the_tier_and_can_take_its_spans_back() {
        let budget: &'static MemoryBudget = Box::leak(Box::new(MemoryBudget::new(100)));
        let m = MemoryTier::with_budget(1000, budget);
        let k = |i: u8| Digest::of(&[i]);
        for i in 0..5 {
            m.put(k(i), Bytes::from(vec![i; 30]));
        }
        // The cap allows 1000, the budget 100: three spans, charged.
        assert_eq!(m.usage().0, 90);
        assert_eq!(budget.used(), 90);
        assert!(m.get(&k(4)).is_some() && m.get(&k(1)).is_none());
        // A fetch needs 50: the tier gives back its least recently used spans.
        let r = budget.try_reserve(50).expect("reclaimed from the tier");
        assert_eq!(m.usage().0, 30);
        assert!(m.get(&k(4)).is_some(), "the most recently used span stays");
        // With the fetch's 50 and the tier's 30 held, a span of 30 evicts the tier's last one
        // rather than going over the budget; with nothing left to evict, a span is not kept.
        m.put(k(7), Bytes::from(vec![7; 30]));
        assert_eq!(budget.used(), 80);
        let big = budget.try_take(20).unwrap();
        m.put(k(8), Bytes::from(vec![8; 40]));
        assert!(m.get(&k(8)).is_none());
        assert_eq!(budget.pressure().1, 1, "counted as uncached");
        drop((r, big));
        drop(m);
        assert_eq!(budget.used(), 0, "a dropped tier gives everything back");
    }
}
