//! One conformance suite for every cache tier: what the composed [`super::TieredCache`]
//! relies on a [`Tier`] to do. Run against the memory and disk tiers by this crate's unit
//! tests, and against a real Redis by the integration tests (with the `test-util` feature).
//!
//! A tier may lose entries (eviction, a restart, a neighbour's write) and may return damaged
//! bytes (the cache verifies them); it must not return bytes for a key it was never given, keep
//! serving an entry it was told to remove, or hand back other bytes than it was given while
//! healthy. `contains` answers without I/O and may say false for a networked tier.

use super::{SpanKey, Tier, TieredCache};
use crate::digest::Digest;
use bytes::Bytes;
use std::sync::Arc;

/// Distinct span-like values: `n` values of `len` bytes each (the i-th differs in every byte).
fn values(n: usize, len: usize) -> Vec<(Digest, Bytes)> {
    (0..n)
        .map(|i| {
            let data: Vec<u8> = (0..len).map(|j| (i * 31 + j * 7) as u8).collect();
            let data = Bytes::from(data);
            (Digest::of(&data), data)
        })
        .collect()
}

/// Runs every check on `tier`, which must start empty and hold at least 16 MiB. Panics with
/// the name of the first check that fails.
pub async fn check(tier: Arc<dyn Tier>) {
    round_trip(&*tier).await;
    absent_keys_are_misses(&*tier).await;
    removed_entries_are_misses(&*tier).await;
    puts_are_idempotent(&*tier).await;
    sizes_from_empty_to_large(&*tier).await;
    concurrent_writers_and_readers(tier.clone()).await;
    through_the_composed_cache(tier).await;
}

async fn round_trip(tier: &dyn Tier) {
    for (key, data) in values(8, 4096) {
        tier.put(&key, data.clone()).await;
        tier.flush().await;
        assert_eq!(
            tier.get(&key).await.as_ref(),
            Some(&data),
            "round_trip: {} returned other bytes than it was given",
            tier.name()
        );
        if tier.local() {
            assert!(
                tier.contains(&key),
                "round_trip: a local tier knows what it holds"
            );
        }
    }
}

async fn absent_keys_are_misses(tier: &dyn Tier) {
    let key = Digest::of(b"never put in any tier");
    assert!(tier.get(&key).await.is_none(), "absent_keys_are_misses");
    assert!(!tier.contains(&key), "absent_keys_are_misses: contains");
}

async fn removed_entries_are_misses(tier: &dyn Tier) {
    let (key, data) = values(1, 1000).remove(0);
    let key = Digest::of(&[key.as_bytes().as_slice(), b"removed"].concat());
    tier.put(&key, data).await;
    tier.remove(&key).await;
    assert!(tier.get(&key).await.is_none(), "removed_entries_are_misses");
    assert!(!tier.contains(&key), "removed_entries_are_misses: contains");
}

async fn puts_are_idempotent(tier: &dyn Tier) {
    let (key, data) = values(1, 3000).remove(0);
    let key = Digest::of(&[key.as_bytes().as_slice(), b"twice"].concat());
    tier.put(&key, data.clone()).await;
    tier.put(&key, data.clone()).await;
    assert_eq!(tier.get(&key).await, Some(data), "puts_are_idempotent");
}

async fn sizes_from_empty_to_large(tier: &dyn Tier) {
    // Empty spans exist (an empty tar member at a checkpoint); 4 MiB is a large span. An
    // empty value may read as a miss (Redis's bounded GETRANGE cannot tell it from a missing
    // key; the span is then fetched, at the cost of no bytes), never as bytes.
    for len in [0usize, 1, 65536, 4 << 20] {
        let data = Bytes::from(vec![(len % 251) as u8; len]);
        let key = Digest::of(&[&data[..], b"size"].concat());
        tier.put(&key, data.clone()).await;
        let got = tier.get(&key).await;
        match (len, got) {
            (0, None) => {}
            (_, got) => assert_eq!(
                got.map(|b| b.len()),
                Some(len),
                "sizes_from_empty_to_large: {len} bytes"
            ),
        }
    }
}

async fn concurrent_writers_and_readers(tier: Arc<dyn Tier>) {
    let vals = values(32, 20000);
    let mut tasks = tokio::task::JoinSet::new();
    for (key, data) in vals.clone() {
        let t = tier.clone();
        tasks.spawn(async move {
            t.put(&key, data.clone()).await;
            // Readers during the writes see the whole value or nothing.
            let got = t.get(&key).await;
            assert!(
                got.is_none() || got.as_ref() == Some(&data),
                "concurrent_writers_and_readers: a torn value"
            );
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("concurrent_writers_and_readers: a task panicked");
    }
    for (key, data) in vals {
        assert_eq!(
            tier.get(&key).await,
            Some(data),
            "concurrent_writers_and_readers: lost a value within capacity"
        );
    }
}

async fn through_the_composed_cache(tier: Arc<dyn Tier>) {
    // The tier below process memory: its hit fills memory; a value damaged in it is a miss and
    // is dropped from it. (Process memory is trusted: only verified bytes are ever put there.)
    let memory = Arc::new(super::memory::MemoryTier::new(1 << 20));
    let cache = TieredCache::with_tiers(vec![memory.clone(), tier.clone()]);
    let layer = Digest::of(b"a layer");
    let data = Bytes::from_static(b"bytes a fetch verified");
    let key = SpanKey::new(layer, Digest::of(&data));
    tier.put(&key.storage(), data.clone()).await;
    assert_eq!(
        cache.get(&key).await,
        Some(data.clone()),
        "through_the_composed_cache"
    );
    assert!(
        memory.contains(&key.storage()),
        "through_the_composed_cache: a hit fills memory"
    );
    // The same bytes are not another layer's span, whatever its digest says.
    let other = SpanKey::new(Digest::of(b"another layer"), key.span);
    assert!(
        cache.get(&other).await.is_none(),
        "through_the_composed_cache: one layer's bytes served for another layer"
    );
    if tier.trusted() {
        return;
    }
    let key = SpanKey::new(layer, Digest::of(b"a span whose value will be wrong"));
    tier.put(
        &key.storage(),
        Bytes::from_static(b"not the bytes of this span"),
    )
    .await;
    assert!(
        cache.get(&key).await.is_none(),
        "through_the_composed_cache: wrong bytes served"
    );
    assert!(
        tier.get(&key.storage()).await.is_none(),
        "through_the_composed_cache: the damaged entry stays in its tier"
    );
}
