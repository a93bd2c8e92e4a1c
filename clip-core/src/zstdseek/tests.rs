use super::*;
use crate::digest::Digest;
use std::io::Read;
use std::sync::{Arc, Mutex};

/// Data with the shapes that exercise the decoder state: text (Huffman literals, short
/// matches), random runs (raw literals), runs of one byte, and copies from up to `reach` back
/// (long offsets, repeat offsets).
fn sample(len: usize, reach: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = [
        "usr", "lib", "python3", "import", "def ", "return", "self", "\n", "    ", "class ",
        "0x7f", "ELF", "/etc/", "shared", "object", "(", ")", ":",
    ];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        match rnd() % 10 {
            0..=4 => {
                for _ in 0..(rnd() % 200) {
                    out.extend_from_slice(words[(rnd() % words.len() as u64) as usize].as_bytes());
                }
            }
            5 => {
                for _ in 0..(rnd() % 3000) {
                    out.push(rnd() as u8);
                }
            }
            6 => out.extend(std::iter::repeat_n(rnd() as u8, (rnd() % 5000) as usize)),
            _ => {
                if out.len() > 16 {
                    let back = 1 + (rnd() as usize % out.len().min(reach));
                    let n = (rnd() as usize % 20000).min(back);
                    let s = out.len() - back;
                    let piece = out[s..s + n].to_vec();
                    out.extend_from_slice(&piece);
                }
            }
        }
    }
    out.truncate(len);
    out
}

struct Indexed {
    output: Vec<u8>,
    zran: crate::gzip::ZranOutput,
    sizes: indexer::CheckpointSizes,
    windows: Vec<Vec<u8>>,
}

fn index(compressed: &[u8], span: u64) -> Result<Indexed, ZstdSeekError> {
    let windows = Arc::new(Mutex::new(Vec::new()));
    let w = windows.clone();
    let mut ix = ZstdIndexer::new(compressed, span)?
        .with_window_sink(Box::new(move |e| w.lock().unwrap().push(e)));
    let mut output = Vec::new();
    ix.read_to_end(&mut output)?;
    let (zran, sizes, _) = ix.finish()?;
    let windows = std::mem::take(&mut *windows.lock().unwrap());
    Ok(Indexed {
        output,
        zran,
        sizes,
        windows,
    })
}

/// Every span decodes from its checkpoint alone to the bytes its digest names.
fn check_spans(compressed: &[u8], plain: &[u8], ix: &Indexed) {
    assert_eq!(ix.output, plain);
    assert_eq!(ix.zran.diff_id, Digest::of(plain));
    let cps = &ix.zran.checkpoints;
    assert_eq!(cps.len(), ix.windows.len());
    assert_eq!(cps.len(), ix.zran.span_digests.len());
    for i in 0..cps.len() {
        let (us, ue) = (
            cps[i].uncompressed as usize,
            cps.get(i + 1)
                .map_or(plain.len(), |c| c.uncompressed as usize),
        );
        let (cs, ce) = (
            cps[i].compressed as usize,
            cps.get(i + 1)
                .map_or(compressed.len(), |c| c.compressed as usize),
        );
        assert!(ue > us, "span {i} of {} is empty", cps.len());
        let got = decode_span(&ix.windows[i], &compressed[cs..ce], ue - us)
            .unwrap_or_else(|e| panic!("span {i} of {}: {e}", cps.len()));
        assert!(got == plain[us..ue], "span {i} decodes wrong");
        assert_eq!(Digest::of(&got), ix.zran.span_digests[i]);
    }
}

#[test]
fn every_checkpoint_resumes_a_frame_at_each_level() {
    let plain = sample(6 << 20, 3 << 20, 7);
    for level in [1, 3, 9, 19] {
        let z = zstd::bulk::compress(&plain, level).unwrap();
        let ix = index(&z, 256 << 10).unwrap();
        assert!(ix.sizes.count >= 15, "level {level}: {:?}", ix.sizes);
        check_spans(&z, &plain, &ix);
        let packed: usize = ix
            .windows
            .iter()
            .map(|w| zstd::bulk::compress(w, 1).unwrap().len())
            .sum();
        eprintln!(
            "level {level}: {} checkpoints, history kept {} of {} window bytes, {} referenced, \
             dictionaries {}, compressed {packed}",
            ix.sizes.count,
            ix.sizes.history,
            ix.sizes.full_windows,
            ix.sizes.referenced,
            ix.sizes.dictionaries
        );
    }
}

#[test]
fn frames_checksums_and_skippable_frames_split_spans_where_they_must() {
    let plain = sample(3 << 20, 1 << 20, 11);
    let mut z = Vec::new();
    // A skippable frame first, then frames of different sizes, with and without checksums.
    z.extend_from_slice(&0x184D2A5Au32.to_le_bytes());
    z.extend_from_slice(&5u32.to_le_bytes());
    z.extend_from_slice(b"hello");
    let mut at = 0;
    for (i, n) in [100usize, 1 << 20, 70_000, 1_500_000, 0, 10]
        .iter()
        .enumerate()
    {
        let end = (at + n).min(plain.len());
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(i % 2 == 0).unwrap();
        z.extend_from_slice(&c.compress(&plain[at..end]).unwrap());
        at = end;
    }
    // A frame streamed with a flush at a block boundary: libzstd ends it with an empty block.
    let mut e = zstd::stream::raw::Encoder::new(3).unwrap();
    let mut frame = vec![0u8; 4 << 20];
    let rest = &plain[at..];
    let mut src = zstd::stream::raw::InBuffer::around(rest);
    let mut dst = zstd::stream::raw::OutBuffer::around(&mut frame[..]);
    use zstd::stream::raw::Operation;
    while src.pos() < rest.len() {
        e.run(&mut src, &mut dst).unwrap();
    }
    e.flush(&mut dst).unwrap();
    e.finish(&mut dst, true).unwrap();
    let n = dst.pos();
    assert_eq!(&frame[n - 3..n], &[1, 0, 0], "an empty last block");
    z.extend_from_slice(&frame[..n]);
    let ix = index(&z, 128 << 10).unwrap();
    check_spans(&z, &plain, &ix);
    check_runs(&z, &plain, &ix, 5000);
    check_runs(&z, &plain, &ix, 3000);
    assert!(ix.sizes.count > 5);
    assert!(ix.windows.iter().filter(|w| w.is_empty()).count() >= 3);
}

#[test]
fn a_checkpoint_keeps_only_the_history_its_span_reaches_into() {
    // Random bytes with copies from at most 64 KiB back: matches reach no further, and a
    // checkpoint keeps about that, not the 8 MiB window.
    let mut x = 3u64;
    let mut plain: Vec<u8> = Vec::with_capacity(8 << 20);
    while plain.len() < 8 << 20 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        if x % 3 == 0 && plain.len() > 70_000 {
            let back = 1000 + (x >> 20) as usize % 60_000;
            let s = plain.len() - back;
            let piece = plain[s..s + 900].to_vec();
            plain.extend_from_slice(&piece);
        } else {
            plain.extend_from_slice(&x.to_le_bytes()[..7]);
        }
    }
    let z = zstd::bulk::compress(&plain, 19).unwrap();
    let ix = index(&z, 1 << 20).unwrap();
    check_spans(&z, &plain, &ix);
    assert!(ix.sizes.count >= 6);
    assert!(
        ix.sizes.history < ix.sizes.count * (200 << 10),
        "{:?}",
        ix.sizes
    );
    assert!(
        ix.sizes.full_windows > ix.sizes.history * 4,
        "{:?}",
        ix.sizes
    );
}

#[test]
fn damaged_streams_are_refused_without_panics() {
    let plain = sample(1 << 20, 1 << 20, 5);
    let z = zstd::bulk::compress(&plain, 3).unwrap();
    assert!(matches!(
        index(b"\x1f\x8b\x08\x00", 1 << 16),
        Err(ZstdSeekError::NotZstd)
    ));
    assert!(index(&z[..z.len() / 2], 1 << 16).is_err());
    let mut x = 99u64;
    for _ in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut bad = z.clone();
        let at = 6 + (x >> 33) as usize % (bad.len() - 6);
        bad[at] ^= 1 << ((x >> 20) % 8);
        // Either refused, or (a flipped literal bit) decoded to other bytes whose spans
        // still decode from their checkpoints.
        if let Ok(ix) = index(&bad, 1 << 16) {
            check_spans(&bad, &ix.output.clone(), &ix);
        }
    }
}

#[test]
fn long_windows_are_refused_with_a_clear_error() {
    let plain = sample(1 << 20, 1 << 20, 2);
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    e.long_distance_matching(true).unwrap();
    e.window_log(27).unwrap();
    std::io::Write::write_all(&mut e, &plain).unwrap();
    let z = e.finish().unwrap();
    let e = index(&z, 1 << 16).err().expect("refused");
    assert!(e.to_string().contains("--long"), "{e}");
}

/// From every checkpoint, the run of all the spans after it decodes as its bytes arrive in
/// pieces: across block, frame, checksum and skippable-frame boundaries.
fn check_runs(compressed: &[u8], plain: &[u8], ix: &Indexed, piece: usize) {
    let cps = &ix.zran.checkpoints;
    for first in 0..cps.len() {
        let spans = (first..cps.len())
            .map(|i| {
                let ce = cps
                    .get(i + 1)
                    .map_or(compressed.len() as u64, |c| c.compressed);
                let ue = cps
                    .get(i + 1)
                    .map_or(plain.len() as u64, |c| c.uncompressed);
                (
                    ce - cps[i].compressed,
                    (ue - cps[i].uncompressed) as usize,
                    zstd::bulk::compress(&ix.windows[i], 1).unwrap().into(),
                )
            })
            .collect();
        let mut d = CheckpointSpans::new(spans).unwrap();
        let mut got = Vec::new();
        for p in compressed[cps[first].compressed as usize..].chunks(piece) {
            for s in d.feed(p).unwrap() {
                got.extend_from_slice(&s);
            }
        }
        assert!(
            got == plain[cps[first].uncompressed as usize..],
            "the run from span {first} of {}",
            cps.len()
        );
    }
}

#[test]
fn runs_decode_as_their_bytes_arrive_in_pieces() {
    let plain = sample(2 << 20, 1 << 20, 9);
    let z = zstd::bulk::compress(&plain, 3).unwrap();
    let ix = index(&z, 128 << 10).unwrap();
    check_runs(&z, &plain, &ix, 7777);
    check_runs(&z, &plain, &ix, 1000);
}
