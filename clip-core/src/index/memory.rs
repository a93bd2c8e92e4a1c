//! The process-wide budget of memory held by decoded layer indexes.
//!
//! An index is small on the wire and large in memory: its entry table is compressed, paths are
//! front-coded, and every entry becomes a struct and a few heap allocations. A hostile 160 KiB
//! index could decode to more than 500 MB. Decoding therefore charges what it builds (spans,
//! entries, names) to one budget as it goes and fails with [`super::IndexError::Budget`] as soon
//! as an index would take more than its share: at most half of the budget for one index, and
//! never more than what is left. The charge is released when the decoded index is dropped.
//!
//! This budget sits inside the process's one memory budget ([`crate::budget`]): every byte
//! charged here is charged there too, and the memory tier gives spans back to make room.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// 1 GiB: the indexes of a few hundred ordinary layers (a layer of 10,000 files takes about
/// 2 MB decoded).
pub const DEFAULT_BUDGET: u64 = 1 << 30;

/// A budget of bytes, and what is charged to it now.
#[derive(Debug)]
pub struct Budget {
    limit: AtomicU64,
    used: AtomicU64,
}

static PROCESS: Budget = Budget::new(DEFAULT_BUDGET);

impl Budget {
    pub const fn new(limit: u64) -> Self {
        Budget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        }
    }

    /// The budget every decode in this process charges (see [`set_process_budget`]).
    pub fn process() -> &'static Budget {
        &PROCESS
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Relaxed)
    }

    /// Bytes held by decoded indexes now.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Takes `n` more bytes for a charge that holds `held` already, if this budget and the
    /// process's allow.
    fn take(&self, held: u64, n: u64) -> Result<crate::budget::Reservation, (u64, u64)> {
        let limit = self.limit();
        let share = limit / 2;
        if held.saturating_add(n) > share {
            return Err((limit, share));
        }
        self.used
            .fetch_update(Relaxed, Relaxed, |u| {
                u.checked_add(n).filter(|&t| t <= limit)
            })
            .map_err(|u| (limit, limit.saturating_sub(u)))?;
        let process = crate::budget::process();
        process.try_reserve(n).ok_or_else(|| {
            self.used.fetch_sub(n, Relaxed);
            (
                process.limit(),
                process.limit().saturating_sub(process.used()),
            )
        })
    }
}

/// Sets the process's budget (the daemon's `--index-memory`). Indexes decoded already keep
/// their charge.
pub fn set_process_budget(bytes: u64) {
    PROCESS.limit.store(bytes, Relaxed);
}

/// Memory one decoded index holds against a budget; released on drop. Cloning an index
/// clones its memory, so a clone charges again (unchecked: the original fit).
pub struct Charge {
    budget: &'static Budget,
    bytes: u64,
    /// The same bytes, held against the process's budget.
    process: crate::budget::Reservation,
}

impl Charge {
    pub fn new(budget: &'static Budget) -> Self {
        Charge {
            budget,
            bytes: 0,
            process: crate::budget::Reservation::none(),
        }
    }

    /// Charges `n` more bytes, or says why not: `(budget, bytes that were available)`.
    pub fn add(&mut self, n: u64) -> Result<(), (u64, u64)> {
        self.process.absorb(self.budget.take(self.bytes, n)?);
        self.bytes += n;
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Default for Charge {
    /// Nothing charged (an index built on this node, or in a test).
    fn default() -> Self {
        Charge::new(Budget::process())
    }
}

impl Clone for Charge {
    fn clone(&self) -> Self {
        self.budget.used.fetch_add(self.bytes, Relaxed);
        Charge {
            budget: self.budget,
            bytes: self.bytes,
            process: crate::budget::process().charge(self.bytes),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Relaxed);
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({} bytes)", self.bytes)
    }
}

/// Charges never make two indexes unequal.
impl PartialEq for Charge {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Charge {}

/// Bytes an entry holds in memory besides its heap data: the struct and the allocator's
/// overhead for its path.
pub const ENTRY_OVERHEAD: u64 = (std::mem::size_of::<super::Entry>() + 16) as u64;
/// Bytes a span holds in memory.
pub const SPAN_BYTES: u64 = std::mem::size_of::<super::Span>() as u64;
/// Heap overhead of one allocation (a link target, an xattr name or value).
pub const ALLOC_OVERHEAD: u64 = 16;
