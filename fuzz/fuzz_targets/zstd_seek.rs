//! Plain zstd layers come from registry blobs and their checkpoints from published windows
//! blobs. Whatever the bytes: indexing them as a zstd stream, and decoding a span from a
//! hostile checkpoint, must not panic; every checkpoint of a stream accepted must reproduce
//! its span; and any data zstd compresses must be accepted, every span resuming.
#![no_main]
use clip_core::zstdseek::{decode_span, ZstdIndexer};
use libfuzzer_sys::fuzz_target;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// Indexes `z` with small spans and checks that every span decodes from its checkpoint alone.
fn index_and_check(z: &[u8]) -> bool {
    let windows = Arc::new(Mutex::new(Vec::new()));
    let w = windows.clone();
    let Ok(ix) = ZstdIndexer::new(z, 2048) else {
        return false;
    };
    let mut ix = ix.with_window_sink(Box::new(move |e| w.lock().unwrap().push(e)));
    let mut out = Vec::new();
    if ix.read_to_end(&mut out).is_err() {
        return false;
    }
    let Ok((zran, _, _)) = ix.finish() else {
        return false;
    };
    let windows = windows.lock().unwrap();
    let cps = &zran.checkpoints;
    assert_eq!(cps.len(), windows.len());
    for i in 0..cps.len() {
        let us = cps[i].uncompressed as usize;
        let ue = cps.get(i + 1).map_or(out.len(), |c| c.uncompressed as usize);
        let cs = cps[i].compressed as usize;
        let ce = cps.get(i + 1).map_or(z.len(), |c| c.compressed as usize);
        let got = decode_span(&windows[i], &z[cs..ce], ue - us).expect("a proved checkpoint");
        assert!(got == out[us..ue], "span {i} decodes differently");
    }
    true
}

fuzz_target!(|data: &[u8]| {
    index_and_check(data);
    if let Some((&level, rest)) = data.split_first() {
        let z = zstd::bulk::compress(rest, i32::from(level % 9) + 1).unwrap();
        assert!(index_and_check(&z), "a stream zstd wrote was refused");
        // A hostile checkpoint: the first bytes as one, the rest as the span's data.
        let cut = rest.len() / 3;
        let _ = decode_span(&rest[..cut], &z, rest.len());
    }
});
