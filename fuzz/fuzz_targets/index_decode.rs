//! The index decoder treats its input as hostile: it must never panic, and whatever it accepts
//! must re-encode to the same bytes.
#![no_main]
use clip_core::index::format;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Raw input exercises the magic/version/checksum checks; the resealed input (valid checksum
    // over the fuzzed body) exercises the structural decoder behind them.
    let _ = format::decode(data);
    // A mutated seed (a whole index, fuzz/seeds/) gets its checksum made right again.
    if data.len() >= 16 {
        let mut sealed = Vec::with_capacity(data.len() + 48);
        if data.len() >= 48 && data.starts_with(format::MAGIC) {
            sealed.extend_from_slice(&data[..data.len() - 32]);
        } else {
            sealed.extend_from_slice(format::MAGIC);
            sealed.extend_from_slice(&format::VERSION.to_le_bytes());
            sealed.extend_from_slice(&data[..4]);
            sealed.extend_from_slice(&data[4..]);
        }
        let sum = clip_core::Digest::of(&sealed);
        sealed.extend_from_slice(sum.as_bytes());
        if let Ok(ix) = format::decode(&sealed) {
            let again = format::encode(&ix);
            assert_eq!(format::decode(&again).expect("re-decode"), ix);
        }
    }
});
