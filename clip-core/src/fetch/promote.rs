//! Local read-ahead: a workload reading a layer in its order (a tar of a tree, a scan of a
//! classpath laid out in order) gets the next spans loaded from the disk tier into memory in the
//! background, so its reads find them in memory instead of each waiting for a disk read and a
//! hash on the FUSE thread. Reads of spans no local tier has are the fetcher's business (read-
//! ahead, bulk mode); this only moves bytes already on this node.
//!
//! At most one loading task per layer at a time, on the runtime's blocking pool; it loads at
//! most [`AHEAD_BYTES`] past the read that started it, and the memory tier takes what its budget
//! allows (the rest stays on disk, where the read finds it as before).
//!
//! Part of [`super::LayerFetcher`].

use super::LayerFetcher;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

/// How far past an in-order read spans are loaded into memory.
pub const AHEAD_BYTES: u64 = 8 << 20;

/// One layer's local read-ahead state.
pub(super) struct Promotion {
    /// A loading task is running.
    busy: AtomicBool,
    /// The spans the latest task was started for: `from..until`.
    from: AtomicUsize,
    until: AtomicUsize,
}

impl Promotion {
    pub(super) fn new() -> Self {
        Promotion {
            busy: AtomicBool::new(false),
            from: AtomicUsize::new(0),
            until: AtomicUsize::new(0),
        }
    }
}

impl LayerFetcher {
    /// Called on a read of spans `read` that continues the previous one (see the module): starts
    /// loading the spans after it, up to [`AHEAD_BYTES`], from disk into memory, unless a task
    /// is at it or has done so already. Call within the runtime's context (it does nothing
    /// outside one).
    pub fn promote_ahead(self: &Arc<Self>, read: Range<usize>) {
        let n = self.index.spans.len();
        let end = (read.end + self.spans_in(AHEAD_BYTES)).min(n);
        let p = &self.promotion;
        let (from, until) = (p.from.load(Relaxed), p.until.load(Relaxed));
        // Covered: the latest task took in this read's end and at least half the distance past
        // it.
        let covered = from <= read.end && read.end <= until;
        if end <= read.end || (covered && (until - read.end) * 2 >= end - read.end) {
            return;
        }
        if p.busy.swap(true, Relaxed) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            p.busy.store(false, Relaxed);
            return;
        };
        // Continuing the latest window: only what it did not take.
        let start = if covered { until } else { read.end };
        p.from.store(read.end, Relaxed);
        p.until.store(end, Relaxed);
        let me = self.clone();
        rt.spawn_blocking(move || {
            for i in start..end {
                // Spans no local tier has are skipped: fetching is not this task's job.
                me.fetcher.cache.promote_now(&me.key(i));
            }
            me.promotion.busy.store(false, Relaxed);
        });
    }
}
