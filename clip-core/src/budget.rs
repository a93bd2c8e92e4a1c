//! The process's one memory budget: every large thing the daemon holds in memory is charged to
//! it by accounting, and nothing large is allocated without a charge.
//!
//! What is charged:
//! - the memory tier's spans (a cache: it gives bytes back when anything else needs them);
//! - decoded layer indexes (their own cap, [`crate::index::memory`], sits inside this one);
//! - fetch runs in flight: compressed bytes on the wire, the checkpoint being inflated from, the
//!   spans inflated and waiting for write-back;
//! - the database's page cache, reserved once at start.
//!
//! When the budget is spent, the caches are asked to give bytes back ([`Reclaim`]); if that is
//! not enough, a fetch waits ([`MemoryBudget::reserve`]) until a fetch in flight finishes, and
//! a span that cannot be cached is served without being kept. The process therefore never grows
//! past the budget plus a fixed overhead (code, thread stacks, FUSE request buffers, the
//! allocator's slack).
//!
//! A leaf module: it knows nothing of the crate; the tiers and fetches use it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{LazyLock, Mutex, Weak};

/// A cache that can drop entries to give memory back.
pub trait Reclaim: Send + Sync {
    /// Drops entries worth at least `bytes` if it holds that many; returns the bytes released.
    fn reclaim(&self, bytes: u64) -> u64;
}

/// A budget of bytes, what is charged to it, and who can give bytes back.
pub struct MemoryBudget {
    limit: AtomicU64,
    used: AtomicU64,
    /// Fetches that had to wait for memory, and spans not cached for want of it.
    waits: AtomicU64,
    uncached: AtomicU64,
    released: tokio::sync::Notify,
    reclaimers: Mutex<Vec<Weak<dyn Reclaim>>>,
}

static PROCESS: LazyLock<MemoryBudget> = LazyLock::new(|| MemoryBudget::new(u64::MAX));

/// The daemon's default: 1 GiB for spans, indexes and fetches together.
pub const DEFAULT_BYTES: u64 = 1 << 30;
/// The smallest budget a daemon accepts: room for the database cache, decoded indexes (at
/// most half of the budget), and a quarter for the largest fetch there can be.
pub const MIN_BYTES: u64 = 256 << 20;

/// The budget every part of this process charges. Unlimited until [`set_process_limit`] is
/// called (the daemon and the command line call it; unit tests need not).
pub fn process() -> &'static MemoryBudget {
    &PROCESS
}

/// Sets the process's budget. What is charged already stays charged.
pub fn set_process_limit(bytes: u64) {
    PROCESS.limit.store(bytes, Relaxed);
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Self {
        MemoryBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            uncached: AtomicU64::new(0),
            released: tokio::sync::Notify::new(),
            reclaimers: Mutex::new(Vec::new()),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// (fetches that waited for memory, spans served without being cached for want of it)
    pub fn pressure(&self) -> (u64, u64) {
        (self.waits.load(Relaxed), self.uncached.load(Relaxed))
    }

    /// Counts a span that was served but not cached because the budget was spent.
    pub fn note_uncached(&self) {
        self.uncached.fetch_add(1, Relaxed);
    }

    /// A cache that gives bytes back when the budget is short.
    pub fn register(&self, r: Weak<dyn Reclaim>) {
        let mut v = self.reclaimers.lock().expect("reclaimers lock");
        v.retain(|w| w.strong_count() > 0);
        v.push(r);
    }

    /// Takes `n` bytes if they are free, asking no cache to give any back (for a cache's own
    /// inserts, made under the cache's lock).
    pub fn try_take(&'static self, n: u64) -> Option<Reservation> {
        let limit = self.limit();
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= limit)
            })
            .ok()
            .map(|_| Reservation {
                budget: self,
                bytes: n,
            })
    }

    /// Charges `n` bytes whatever is left: memory that is taken already (the database's cache,
    /// a clone of charged data), so the books stay true.
    pub fn charge(&'static self, n: u64) -> Reservation {
        self.used.fetch_add(n, Relaxed);
        Reservation {
            budget: self,
            bytes: n,
        }
    }

    /// Takes `n` bytes, asking the caches to give bytes back if they are not free. Never called
    /// with a cache's lock held.
    pub fn try_reserve(&'static self, n: u64) -> Option<Reservation> {
        if let Some(r) = self.try_take(n) {
            return Some(r);
        }
        let short = self.used().saturating_add(n).saturating_sub(self.limit());
        let live: Vec<_> = self
            .reclaimers
            .lock()
            .expect("reclaimers lock")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        let mut got = 0;
        for r in live {
            if got >= short {
                break;
            }
            got += r.reclaim(short - got);
        }
        self.try_take(n)
    }

    /// Takes `n` bytes (at most a quarter of the budget: what is left when decoded indexes hold
    /// their half and the database its cache), waiting while fetches in flight hold what the
    /// caches cannot give back.
    pub async fn reserve(&'static self, n: u64) -> Reservation {
        let n = n.min(self.limit() / 4);
        let mut waited = false;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(r) = self.try_reserve(n) {
                return r;
            }
            if !waited {
                waited = true;
                self.waits.fetch_add(1, Relaxed);
            }
            released.await;
        }
    }

    fn release(&self, n: u64) {
        if n > 0 {
            self.used.fetch_sub(n, Relaxed);
            self.released.notify_waiters();
        }
    }
}

/// Bytes held against a budget; given back when dropped.
pub struct Reservation {
    budget: &'static MemoryBudget,
    bytes: u64,
}

impl Reservation {
    /// Nothing held.
    pub fn none() -> Self {
        Reservation {
            budget: process(),
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Gives back all but `keep` bytes now.
    pub fn shrink_to(&mut self, keep: u64) {
        if keep < self.bytes {
            self.budget.release(self.bytes - keep);
            self.bytes = keep;
        }
    }

    /// Holds `other`'s bytes too (both are the process's).
    pub fn absorb(&mut self, mut other: Reservation) {
        debug_assert!(std::ptr::eq(self.budget, other.budget));
        self.bytes += std::mem::take(&mut other.bytes);
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.bytes);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reservation({} bytes)", self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn leak(limit: u64) -> &'static MemoryBudget {
        Box::leak(Box::new(MemoryBudget::new(limit)))
    }

    #[test]
    fn takes_within_the_limit_and_gives_back_on_drop() {
        let b = leak(100);
        let r = b.try_take(60).unwrap();
        assert!(b.try_take(41).is_none());
        let r2 = b.try_take(40).unwrap();
        assert_eq!(b.used(), 100);
        drop(r);
        drop(r2);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_short_budget_asks_the_caches_first() {
        let b = leak(100);
        // A cache holds 80; asked, it drops its entry and its reservation with it.
        let held = b.try_take(80).unwrap();
        struct Dropping(Mutex<Option<Reservation>>);
        impl Reclaim for Dropping {
            fn reclaim(&self, _: u64) -> u64 {
                self.0.lock().unwrap().take().map_or(0, |r| r.bytes())
            }
        }
        let dropping = Arc::new(Dropping(Mutex::new(Some(held))));
        b.register(Arc::downgrade(&dropping) as Weak<dyn Reclaim>);
        assert!(b.try_take(50).is_none(), "try_take asks no cache");
        let r = b.try_reserve(50).expect("the cache gave its bytes back");
        assert_eq!(r.bytes(), 50);
        assert_eq!(b.used(), 50);
    }

    #[tokio::test]
    async fn a_fetch_waits_for_one_in_flight_to_finish() {
        let b = leak(400);
        let indexes = b.try_take(250).unwrap();
        let first = b.reserve(100).await;
        let waiter = tokio::spawn(async move { b.reserve(100).await.bytes() });
        // The waiter cannot proceed while `first` is held; it registers as waiting.
        while b.pressure().0 == 0 {
            tokio::task::yield_now().await;
        }
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(waiter.await.unwrap(), 100);
        assert_eq!(b.used(), 250);
        drop(indexes);
        // More than a quarter of the budget is clamped to it, so a fetch always proceeds once
        // the others have finished.
        assert_eq!(b.reserve(1000).await.bytes(), 100);
    }

    #[test]
    fn shrinking_gives_back_the_rest() {
        let b = leak(100);
        let mut r = b.try_take(80).unwrap();
        r.shrink_to(30);
        assert_eq!(b.used(), 30);
        r.absorb(b.charge(5));
        assert_eq!(b.used(), 35);
        drop(r);
        assert_eq!(b.used(), 0);
    }
}
