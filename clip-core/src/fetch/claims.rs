//! Single flight: which spans of a layer a fetch owns, as an explicit state machine.
//!
//! Owns [`Claims`] (one per layer fetcher) and the span states; uses only tokio's channels, so
//! its tests need no I/O. The fetch itself (the run, its window, its write-back) lives in
//! [`super::run`]; this module only says who fetches a span and who waits for it.
//!
//! A span is in one of two states:
//!
//! | state | meaning |
//! |---|---|
//! | `Free` | no fetch owns it (a tier may have it, or not) |
//! | `InFlight` | one fetch owns it; readers wait on its channel |
//!
//! and these transitions ([`transition`]) are the only ones:
//!
//! | from | event | to | effect |
//! |---|---|---|---|
//! | `Free` | `Claim` | `InFlight` | the claimer owns the fetch (gets the sender) |
//! | `InFlight` | `Claim` | `InFlight` | the claimer joins: it waits on the owner's channel |
//! | `InFlight` | `Deliver` | `Free` | verified bytes went to the memory tier and the waiters |
//! | `InFlight` | `Fail` | `Free` | the error went to the waiters; the next read claims again |
//!
//! `Deliver` or `Fail` of a `Free` span is a bug (a fetch answers only what it claimed) and
//! is refused. A delivered span is not kept here: the memory tier holds it, so a span's bytes
//! have one home.

use bytes::Bytes;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

use super::ReadError;

/// What a span's waiters receive: nothing yet, the verified bytes, or the fetch's error.
pub(super) type SpanResult = Option<Result<Bytes, Arc<ReadError>>>;

/// Spans a fetch owns, with the senders their waiters listen on, in span order.
pub(super) type Claimed = Vec<(usize, watch::Sender<SpanResult>)>;

/// Receivers of the spans a caller waits for.
pub(super) type Waits = Vec<(usize, watch::Receiver<SpanResult>)>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Free,
    InFlight,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    Claim,
    Deliver,
    Fail,
}

/// The transition table (see the module's comment). `None`: not a legal transition.
pub(super) fn transition(from: State, event: Event) -> Option<State> {
    use {Event::*, State::*};
    match (from, event) {
        // A new fetch owns the span.
        (Free, Claim) => Some(InFlight),
        // Single flight: the claimer waits on the owner's fetch.
        (InFlight, Claim) => Some(InFlight),
        // The owner answered: bytes (to the memory tier and the waiters) or an error.
        (InFlight, Deliver) | (InFlight, Fail) => Some(Free),
        // Only a claimed span is answered.
        (Free, Deliver) | (Free, Fail) => None,
    }
}

/// Whether a claimer waits for the spans it asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Wait {
    /// Receivers for every span asked for (claimed now or already in flight).
    ForAll,
    /// Start fetches only; no receivers.
    No,
}

/// The in-flight spans of one layer.
#[derive(Default)]
pub(super) struct Claims {
    inflight: Mutex<HashMap<usize, watch::Receiver<SpanResult>>>,
    /// Signalled whenever a fetch answers its spans (see [`Claims::settled`]).
    answered: tokio::sync::Notify,
}

impl Claims {
    fn state(map: &HashMap<usize, watch::Receiver<SpanResult>>, i: usize) -> State {
        match map.contains_key(&i) {
            true => State::InFlight,
            false => State::Free,
        }
    }

    /// `Claim` on each of `spans`: the free ones become the caller's (returned in order, to
    /// fetch); every span's receiver is returned if `wait` asks for it.
    pub(super) fn claim(&self, spans: &[usize], wait: Wait) -> (Claimed, Waits) {
        let mut inflight = self.inflight.lock().expect("claims lock");
        let (mut mine, mut waits) = (Vec::new(), Vec::new());
        for &i in spans {
            let from = Self::state(&inflight, i);
            debug_assert_eq!(transition(from, Event::Claim), Some(State::InFlight));
            let rx = match from {
                State::InFlight => inflight[&i].clone(),
                State::Free => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(i, rx.clone());
                    mine.push((i, tx));
                    rx
                }
            };
            if wait == Wait::ForAll {
                waits.push((i, rx));
            }
        }
        (mine, waits)
    }

    /// `Claim` on the spans of `run` that are free and for which `skip` is false (a tier on
    /// this node has them, say); spans in flight are left to their owner, not joined.
    pub(super) fn claim_free(&self, run: Range<usize>, skip: impl Fn(usize) -> bool) -> Claimed {
        let mut inflight = self.inflight.lock().expect("claims lock");
        let mut mine = Vec::new();
        for i in run {
            if Self::state(&inflight, i) == State::InFlight || skip(i) {
                continue;
            }
            let (tx, rx) = watch::channel(None);
            inflight.insert(i, rx);
            mine.push((i, tx));
        }
        mine
    }

    /// `Deliver` or `Fail` of span `i` by its owner: the span is free again. False (and
    /// nothing changes) when `i` was not in flight.
    pub(super) fn answer(&self, i: usize, event: Event) -> bool {
        let mut inflight = self.inflight.lock().expect("claims lock");
        match transition(Self::state(&inflight, i), event) {
            Some(State::Free) => {
                inflight.remove(&i);
                true
            }
            _ => false,
        }
    }

    /// Wakes [`Claims::settled`] waiters: a fetch has answered its spans.
    pub(super) fn notify_answered(&self) {
        self.answered.notify_waiters();
    }

    /// True while any span is in flight.
    pub(super) fn any_in_flight(&self) -> bool {
        !self.inflight.lock().expect("claims lock").is_empty()
    }

    /// Waits until no span is in flight (every claim made so far has been answered).
    pub(super) async fn settled(&self) {
        loop {
            let notified = self.answered.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.any_in_flight() {
                return;
            }
            notified.await;
        }
    }
}

/// Waits for one span's answer on `rx`.
pub(super) async fn answer_of(mut rx: watch::Receiver<SpanResult>) -> Result<Bytes, ReadError> {
    let got = rx
        .wait_for(|v| v.is_some())
        .await
        .map_err(|_| ReadError::Internal("span fetch was dropped".into()))?;
    match got.as_ref() {
        Some(Ok(b)) => Ok(b.clone()),
        Some(Err(e)) => Err(ReadError::Shared(e.clone())),
        None => Err(ReadError::Internal("span fetch gave nothing".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_allows_only_claims_and_answers_of_claimed_spans() {
        use {Event::*, State::*};
        assert_eq!(transition(Free, Claim), Some(InFlight));
        assert_eq!(transition(InFlight, Claim), Some(InFlight));
        assert_eq!(transition(InFlight, Deliver), Some(Free));
        assert_eq!(transition(InFlight, Fail), Some(Free));
        assert_eq!(transition(Free, Deliver), None);
        assert_eq!(transition(Free, Fail), None);
    }

    #[test]
    fn a_span_claimed_twice_has_one_owner_and_both_wait_on_it() {
        let c = Claims::default();
        let (first, w1) = c.claim(&[3, 4], Wait::ForAll);
        let (second, w2) = c.claim(&[4, 5], Wait::ForAll);
        assert_eq!(first.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(second.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [5]);
        assert_eq!(w1.len(), 2);
        assert_eq!(w2.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [4, 5]);
        // The owner's answer reaches the joiner.
        let (_, tx4) = &first[1];
        tx4.send(Some(Ok(Bytes::from_static(b"four")))).unwrap();
        assert!(c.answer(4, Event::Deliver));
        let got = w2[0].1.borrow().clone();
        assert_eq!(got.unwrap().unwrap(), Bytes::from_static(b"four"));
    }

    #[test]
    fn an_answered_span_is_free_and_the_next_claim_fetches_it_again() {
        let c = Claims::default();
        let (mine, _) = c.claim(&[7], Wait::No);
        assert_eq!(mine.len(), 1);
        assert!(c.answer(7, Event::Fail));
        assert!(!c.any_in_flight());
        let (again, _) = c.claim(&[7], Wait::No);
        assert_eq!(
            again.len(),
            1,
            "a failed span is claimed anew, not stuck in flight"
        );
    }

    #[test]
    fn answering_a_span_nobody_claimed_changes_nothing() {
        let c = Claims::default();
        assert!(!c.answer(1, Event::Deliver));
        let (_held, _) = c.claim(&[2], Wait::No);
        assert!(!c.answer(1, Event::Fail));
        assert!(c.any_in_flight());
    }

    #[test]
    fn claim_free_leaves_spans_in_flight_and_skipped_ones_alone() {
        let c = Claims::default();
        let (_held, _) = c.claim(&[1], Wait::No);
        let mine = c.claim_free(0..4, |i| i == 2);
        assert_eq!(mine.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 3]);
    }

    #[tokio::test]
    async fn settled_returns_once_every_claim_is_answered() {
        let c = Arc::new(Claims::default());
        let (mine, _) = c.claim(&[0, 1], Wait::No);
        let waiter = tokio::spawn({
            let c = c.clone();
            async move { c.settled().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        for (i, _) in &mine {
            c.answer(*i, Event::Deliver);
        }
        c.notify_answered();
        waiter.await.unwrap();
    }

    #[tokio::test]
    async fn a_dropped_owner_is_an_error_for_its_waiters_not_a_hang() {
        let c = Claims::default();
        let (mine, waits) = c.claim(&[0], Wait::ForAll);
        drop(mine);
        let err = answer_of(waits.into_iter().next().unwrap().1)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("dropped"), "{err}");
    }
}
