//! A zstd:chunked layer's table of contents comes from a registry blob, and its frames from the
//! same: whatever the bytes, indexing the TOC and decoding frames must not panic, and an index
//! accepted must hold together (spans in order, within the data, encoded and decoded unchanged).
#![no_main]
use clip_core::digest::Digest;
use clip_core::registry::{LayerDescriptor, TocPosition};
use clip_core::zstdchunked::{index_from_toc, FrameSpans};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let toc_offset = 1 << 20;
    let desc = LayerDescriptor {
        digest: Digest::of(b"layer"),
        size: toc_offset + 100,
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        diff_id: Digest::of(b"diff"),
        toc: Some(TocPosition {
            offset: toc_offset,
            length: 100,
            uncompressed: data.len() as u64,
            checksum: Digest::of(b""),
        }),
    };
    if let Ok(ix) = index_from_toc(&desc, data) {
        let mut last = None;
        for (i, s) in ix.spans.iter().enumerate() {
            assert!(s.compressed < toc_offset);
            assert!(last.is_none_or(|(u, c)| s.uncompressed > u && s.compressed > c));
            last = Some((s.uncompressed, s.compressed));
            let (a, b) = ix.span_range(i);
            assert!(a < b && b <= ix.uncompressed_size);
        }
        let enc = clip_core::index::format::encode(&ix);
        let back = clip_core::index::format::decode(&enc).expect("an accepted index decodes");
        assert!(back.same_spans(&ix) && back.entries == ix.entries);
    }
    // The same bytes as frames: spans of a few sizes, fed in two pieces.
    if data.len() >= 4 {
        let want = usize::from(u16::from_le_bytes([data[0], data[1]]));
        let comp = (data.len() - 2) as u64;
        if let Ok(mut d) = FrameSpans::new(vec![(want, comp)]) {
            let (a, b) = data[2..].split_at((data.len() - 2) / 2);
            let mut got = Vec::new();
            for part in [a, b] {
                match d.feed(part) {
                    Ok(spans) => got.extend(spans),
                    Err(_) => return,
                }
            }
            assert!(got.iter().all(|s| s.len() == want));
        }
    }
});
