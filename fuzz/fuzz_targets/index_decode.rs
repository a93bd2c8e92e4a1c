//! The index decoder treats its input as hostile: it must never panic, and whatever it accepts
//! must re-encode to the same bytes.
#![no_main]
use clip_core::index::format;
use libfuzzer_sys::fuzz_target;

#[path = "reseal.rs"]
mod reseal;

fuzz_target!(|data: &[u8]| {
    // Raw input exercises the magic/version/checksum checks; the resealed input (valid checksum
    // over the fuzzed body) exercises the structural decoder behind them.
    let _ = format::decode(data);
    if let Some(sealed) = reseal::reseal(data) {
        if let Ok(ix) = format::decode(&sealed) {
            let again = format::encode(&ix);
            assert_eq!(format::decode(&again).expect("re-decode"), ix);
        }
    }
});
