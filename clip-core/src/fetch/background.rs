//! Work nobody waits for: replaying a startup profile, fetching on a guess, and filling a whole
//! layer in the background. All of it yields to demand reads: profile and guess runs take
//! permits of a pool of their own and claim spans only once they hold one; `fill` waits while
//! any demand fetch is in flight.
//!
//! Part of [`super::LayerFetcher`]; uses its claims and runs.

use super::run::Permit;
use super::{LayerFetcher, ReadError};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Why spans are fetched ahead of a read.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Background {
    /// A startup profile lists them.
    Profile,
    /// A guess (see [`LayerFetcher::speculate`]).
    Guess,
}

impl LayerFetcher {
    /// True if a startup profile replayed on this layer lists any span of `range`.
    pub fn profiled(&self, range: Range<usize>) -> bool {
        range.into_iter().any(|i| {
            self.profiled
                .get(i / 64)
                .is_some_and(|w| w.load(Relaxed) & (1 << (i % 64)) != 0)
        })
    }

    pub(super) fn mark_profiled(&self, spans: &[usize]) {
        for &i in spans {
            if let Some(w) = self.profiled.get(i / 64) {
                w.fetch_or(1 << (i % 64), Relaxed);
            }
        }
    }

    /// Background fill: fetches every span of the layer that no tier has, in order, one run at a
    /// time, yielding to demand reads (it waits while any demand fetch is in flight) and keeping
    /// to `bytes_per_sec` of registry traffic (0 = no cap). Stops early when `cancel` fires.
    /// Returns the compressed bytes it fetched.
    pub async fn fill(
        self: &Arc<Self>,
        bytes_per_sec: u64,
        cancel: CancellationToken,
    ) -> Result<u64, ReadError> {
        let started = Instant::now();
        let mut fetched = 0u64;
        let n = self.index.spans.len();
        let mut i = 0;
        while i < n {
            if cancel.is_cancelled() {
                break;
            }
            while !self.fetcher.idle() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(fetched),
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
            let run = i..(i + self.spans_in(self.fetcher.cfg.run_bytes)).min(n);
            i = run.end;
            if run.clone().all(|k| self.is_local(k)) {
                continue;
            }
            let (cs, _) = self.index.span_compressed_range(run.start);
            let (_, ce) = self.index.span_compressed_range(run.end - 1);
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.fetch_missing(run) => r?,
            }
            fetched += ce - cs;
            if bytes_per_sec > 0 {
                let due = Duration::from_secs_f64(fetched as f64 / bytes_per_sec as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        Ok(fetched)
    }

    /// Fetches `spans` ahead of need (a startup profile), in runs of up to `prefetch_run`
    /// adjacent spans ordered by first use, on the prefetch pool. A run claims its spans only
    /// once it holds a permit, so a demand read never waits behind queued prefetch; spans a
    /// demand read already claimed are left to it. Returns when every run has finished; the
    /// result is the number of runs fetched (errors are logged, prefetch is only a hint).
    pub async fn prefetch_spans(self: &Arc<Self>, spans: &[usize]) -> usize {
        self.mark_profiled(spans);
        let wanted: Vec<usize> = spans
            .iter()
            .copied()
            .filter(|&i| i < self.index.spans.len() && !self.is_local(i))
            .collect();
        let runs =
            crate::profile::runs(&wanted, self.spans_in(self.fetcher.cfg.prefetch_run_bytes));
        self.fetch_in_background(runs, Background::Profile).await
    }

    /// Fetches `spans` on a guess (files next to ones a program opened, say), on the prefetch
    /// pool: a run claims its spans only once it holds a prefetch permit, so a demand read never
    /// waits behind queued speculation, and spans a demand read or a profile already claimed
    /// are left to it; spans a startup profile lists are left to the profile. Returns the runs
    /// fetched.
    pub async fn speculate(self: &Arc<Self>, spans: &[usize]) -> usize {
        let wanted: Vec<usize> = spans
            .iter()
            .copied()
            .filter(|&i| {
                i < self.index.spans.len() && !self.is_local(i) && !self.profiled(i..i + 1)
            })
            .collect();
        let runs =
            crate::profile::runs(&wanted, self.spans_in(self.fetcher.cfg.prefetch_run_bytes));
        self.fetch_in_background(runs, Background::Guess).await
    }

    /// Fetches `runs` in order on the prefetch pool: each claims its spans only once it holds a
    /// permit (spans claimed by then, or local, are left out; the rest go one request per
    /// piece). Returns when every run has finished; the result is the number of runs fetched.
    async fn fetch_in_background(
        self: &Arc<Self>,
        runs: Vec<Range<usize>>,
        why: Background,
    ) -> usize {
        let mut tasks = tokio::task::JoinSet::new();
        let mut fetched = 0;
        for run in runs {
            let Ok(permit) = self.fetcher.background.clone().acquire_owned().await else {
                break;
            };
            let pieces = self.runs_of(self.claims.claim_free(run, |i| self.is_local(i)), u64::MAX);
            if pieces.is_empty() {
                continue;
            }
            fetched += 1;
            if why == Background::Profile {
                crate::metrics::prefetched(pieces.iter().map(Vec::len).sum());
            }
            let me = self.clone();
            tasks.spawn(async move {
                for piece in pieces {
                    let delivered = me.clone().fetch_run(piece, Permit::Held).await;
                    if why == Background::Guess {
                        // Counted once fetched: the count tells when a guess has landed.
                        crate::metrics::speculated(delivered);
                    }
                }
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
        fetched
    }
}
