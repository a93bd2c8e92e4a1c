//! The layer builder on hostile input: the fuzzed bytes are used as a tar stream (gzipped here)
//! and, separately, as the compressed stream itself. Errors are fine; panics are not. Whatever is
//! accepted must encode and decode losslessly.
#![no_main]
use clip_core::index::{build_layer_index, format, BuildOptions};
use libfuzzer_sys::fuzz_target;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let opts = BuildOptions { span_size: 64 * 1024, ..Default::default() };
    let _ = build_layer_index(data, &opts, |_| {});
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    let gz = gz.finish().unwrap();
    if let Ok(built) = build_layer_index(&gz[..], &opts, |_| {}) {
        let enc = format::encode(&built.index);
        assert_eq!(format::decode(&enc).expect("decode own encoding"), built.index);
    }
});
