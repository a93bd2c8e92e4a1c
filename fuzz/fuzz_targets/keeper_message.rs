//! The keeper reads messages from any daemon that connects (root's or its own user's), and the
//! daemon reads the keeper's answers: whatever the bytes, decoding must not panic, and what
//! decodes must encode to words that decode to the same message.
#![no_main]
use clip_fuse::handover::protocol::{Message, MAX_MSG};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let again = m.encode();
        assert!(again.len() <= MAX_MSG);
        assert_eq!(Message::decode(&again), Ok(m));
    }
});
