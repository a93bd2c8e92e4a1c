//! Fixtures for the read path's unit tests: a synthetic gzip layer with its index, and a tier
//! whose writes can be held back.

use crate::cache::Tier;
use crate::digest::Digest;
use crate::index::{build_layer_index, BuildOptions, LayerIndex};
use async_trait::async_trait;
use bytes::Bytes;
use flate2::{write::GzEncoder, Compression};
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// A gzip layer of `files` tar entries of `size` bytes each (compressible but not trivially),
/// indexed with small spans. Returns (gzip bytes, index, windows blob, uncompressed tar).
pub fn layer(files: usize, size: usize, span: u64) -> (Bytes, Arc<LayerIndex>, Bytes, Vec<u8>) {
    let mut tar = tar::Builder::new(Vec::new());
    let mut x: u32 = 12345;
    for f in 0..files {
        let data: Vec<u8> = (0..size)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"abcdefghijklmnop"[(x >> 16) as usize % 16]
            })
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, format!("f{f}"), &data[..]).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(&tar).unwrap();
    let gz = e.finish().unwrap();
    let built = build_layer_index(
        &gz[..],
        &BuildOptions {
            span_size: span,
            ..Default::default()
        },
        |_| {},
    )
    .unwrap();
    (
        Bytes::from(gz),
        Arc::new(built.index),
        Bytes::from(built.windows),
        tar,
    )
}

/// An in-memory tier, not trusted (its bytes are verified on read), whose writes wait for a
/// permit of `gate` when one is set, and which can be told to return damaged bytes.
#[derive(Default)]
pub struct TestTier {
    pub map: Mutex<HashMap<Digest, Bytes>>,
    pub gate: Option<Arc<Semaphore>>,
    pub damage: std::sync::atomic::AtomicBool,
    pub puts: std::sync::atomic::AtomicUsize,
    pub local: bool,
}

#[async_trait]
impl Tier for TestTier {
    fn name(&self) -> &'static str {
        "disk"
    }
    async fn get(&self, key: &Digest) -> Option<Bytes> {
        self.get_now(key)
    }
    fn get_now(&self, key: &Digest) -> Option<Bytes> {
        let b = self.map.lock().unwrap().get(key).cloned()?;
        if self.damage.load(std::sync::atomic::Ordering::Relaxed) {
            let mut v = b.to_vec();
            v[0] ^= 1;
            return Some(Bytes::from(v));
        }
        Some(b)
    }
    async fn put(&self, key: &Digest, data: Bytes) {
        if let Some(g) = &self.gate {
            let _p = g.acquire().await.unwrap();
        }
        self.map.lock().unwrap().insert(*key, data);
        self.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn contains(&self, key: &Digest) -> bool {
        self.local && self.map.lock().unwrap().contains_key(key)
    }
    async fn remove(&self, key: &Digest) {
        self.map.lock().unwrap().remove(key);
    }
    fn local(&self) -> bool {
        self.local
    }
}

/// Counts the bytes each thread holds, so a test can bound what decoding hostile input
/// allocates. It is the test binary's global allocator (see `lib.rs`).
pub mod alloc_meter {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    pub struct Meter;

    thread_local! {
        static LIVE: Cell<usize> = const { Cell::new(0) };
        static PEAK: Cell<usize> = const { Cell::new(0) };
    }

    fn note(grow: usize, shrink: usize) {
        let _ = LIVE.try_with(|live| {
            let v = live.get().saturating_add(grow).saturating_sub(shrink);
            live.set(v);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(v)));
        });
    }

    // SAFETY: every call is forwarded to the system allocator unchanged; only counters move.
    unsafe impl GlobalAlloc for Meter {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc(l) };
            if !p.is_null() {
                note(l.size(), 0);
            }
            p
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            let p = unsafe { System.alloc_zeroed(l) };
            if !p.is_null() {
                note(l.size(), 0);
            }
            p
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            unsafe { System.dealloc(p, l) };
            note(0, l.size());
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            let q = unsafe { System.realloc(p, l, new) };
            if !q.is_null() {
                note(new, l.size());
            }
            q
        }
    }

    /// Runs `f`; returns its result and the most bytes this thread held at once during it,
    /// beyond what it held before.
    pub fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        let out = f();
        (out, PEAK.with(Cell::get) - base)
    }
}
