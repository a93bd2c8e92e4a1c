//! An image's programs and libraries are read for the libraries they need: whatever the bytes,
//! the reader must not panic, and what it returns stays within its bounds.
#![no_main]
use clip_core::elf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, n)) = elf::needed_in(data) {
        assert!(n.libraries.len() <= elf::MAX_NEEDED);
        assert!(n
            .libraries
            .iter()
            .chain(&n.search)
            .all(|s| s.len() <= elf::MAX_NAME && !s.is_empty()));
        let _ = elf::default_dirs(&h);
    }
});
