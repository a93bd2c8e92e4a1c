use super::*;
use crate::testutil::TestTier;
use memory::MemoryTier;

fn two_tiers() -> (TieredCache, Arc<MemoryTier>, Arc<TestTier>) {
    let mem = Arc::new(MemoryTier::new(1 << 20));
    let slow = Arc::new(TestTier {
        local: true,
        ..Default::default()
    });
    let tiers: Vec<Arc<dyn Tier>> = vec![mem.clone(), slow.clone()];
    (TieredCache::with_tiers(tiers), mem, slow)
}

#[tokio::test]
async fn a_slower_tier_hit_fills_memory() {
    let (cache, mem, slow) = two_tiers();
    let data = Bytes::from_static(b"span bytes");
    let key = SpanKey::new(Digest::of(b"layer"), Digest::of(&data));
    slow.map.lock().unwrap().insert(key.storage(), data.clone());
    assert!(!mem.contains(&key.storage()));
    assert_eq!(cache.get(&key).await.unwrap(), data);
    assert!(mem.contains(&key.storage()), "a disk hit fills memory");
    assert_eq!(cache.get(&key).await.unwrap(), data);
    assert_eq!(cache.stats.memory_hits.load(Relaxed), 1);
    assert_eq!(cache.stats.disk_hits.load(Relaxed), 1);
}

#[tokio::test]
async fn promoting_a_span_moves_it_from_disk_to_memory_without_a_hit() {
    let (cache, mem, slow) = two_tiers();
    let data = Bytes::from_static(b"span bytes");
    let key = SpanKey::new(Digest::of(b"layer"), Digest::of(&data));
    let absent = SpanKey::new(Digest::of(b"layer"), Digest::of(b"nowhere"));
    assert!(!cache.promote_now(&absent), "nothing to promote");
    slow.map.lock().unwrap().insert(key.storage(), data.clone());
    assert!(cache.promote_now(&key));
    assert!(mem.contains(&key.storage()), "in memory now");
    assert!(cache.promote_now(&key), "already in memory");
    assert_eq!(cache.stats.disk_hits.load(Relaxed), 0, "no reader asked");
    assert_eq!(cache.get_now(&key).unwrap(), data);
    assert_eq!(cache.stats.memory_hits.load(Relaxed), 1);
    // Damaged bytes are not promoted.
    let bad = Bytes::from_static(b"other span");
    let key2 = SpanKey::new(Digest::of(b"layer"), Digest::of(&bad));
    slow.map.lock().unwrap().insert(key2.storage(), bad);
    slow.damage.store(true, Relaxed);
    assert!(!cache.promote_now(&key2));
    assert!(!mem.contains(&key2.storage()));
}

#[tokio::test]
async fn damaged_entries_are_dropped_not_served() {
    let (cache, mem, slow) = two_tiers();
    let data = Bytes::from_static(b"span bytes");
    let key = SpanKey::new(Digest::of(b"layer"), Digest::of(&data));
    slow.map.lock().unwrap().insert(key.storage(), data.clone());
    slow.damage.store(true, Relaxed);
    assert!(cache.get(&key).await.is_none());
    assert!(
        !slow.map.lock().unwrap().contains_key(&key.storage()),
        "removed from its tier"
    );
    assert!(!mem.contains(&key.storage()));
    assert_eq!(cache.stats.damaged.load(Relaxed), 1);
    assert_eq!(cache.stats.misses.load(Relaxed), 1);
}

#[tokio::test]
async fn a_real_disk_tier_with_a_damaged_file_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let disk = disk::DiskTier::open(
        &dir.path().join("spans"),
        db.open_tree("d").unwrap(),
        1 << 20,
    )
    .unwrap();
    let data = Bytes::from(vec![7u8; 5000]);
    let key = SpanKey::new(Digest::of(b"layer"), Digest::of(&data));
    disk.put_blocking(&key.storage(), &data).unwrap();
    let tiers: Vec<Arc<dyn Tier>> =
        vec![Arc::new(MemoryTier::new(1 << 20)), Arc::new(disk.clone())];
    // Flip a byte of the file's content (its length stays right).
    let hex = key.storage().hex();
    let path = dir.path().join("spans").join(&hex[..2]).join(&hex);
    let mut raw = std::fs::read(&path).unwrap();
    let n = raw.len();
    raw[n - 10] ^= 1;
    std::fs::write(&path, raw).unwrap();
    let cache = TieredCache::with_tiers(tiers);
    assert!(cache.get(&key).await.is_none());
    assert!(!path.exists(), "the damaged file is deleted");
    assert!(!cache.contains_local(&key));
}

#[tokio::test]
async fn put_fast_is_memory_only_and_put_slow_the_rest() {
    let (cache, mem, slow) = two_tiers();
    let data = Bytes::from_static(b"abc");
    let key = SpanKey::new(Digest::of(b"layer"), Digest::of(&data));
    cache.put_fast(&key, &data);
    assert!(mem.contains(&key.storage()) && slow.map.lock().unwrap().is_empty());
    cache.put_slow(&key, &data, super::Reach::ThisNode).await;
    assert!(slow.map.lock().unwrap().contains_key(&key.storage()));
}

#[tokio::test]
async fn the_memory_tier_conforms() {
    conformance::check(Arc::new(MemoryTier::new(64 << 20))).await;
}

#[tokio::test]
async fn the_disk_tier_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let disk = disk::DiskTier::open(
        &dir.path().join("spans"),
        db.open_tree("d").unwrap(),
        64 << 20,
    )
    .unwrap();
    conformance::check(Arc::new(disk)).await;
}
