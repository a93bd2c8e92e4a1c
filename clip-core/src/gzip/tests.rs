use super::*;
use crate::digest::Digest;
use flate2::{write::GzEncoder, Compression};
use std::io::{Read, Write};

/// Deterministic mixed content: compressible text runs and incompressible noise.
fn sample(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x % 3 == 0 {
            let words = ["lorem ", "ipsum ", "clip ", "layer ", "span ", "\n"];
            for i in 0..64 {
                out.extend_from_slice(words[((x >> (i % 60)) % 6) as usize].as_bytes());
            }
        } else {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn index(gz: &[u8], span: u64) -> Result<(ZranOutput, Vec<u8>), GzipError> {
    let mut ix = GzipIndexer::new(gz, span)?;
    let mut out = Vec::new();
    ix.read_to_end(&mut out)?;
    let (z, _) = ix.finish()?;
    Ok((z, out))
}

/// Reads every span back through its checkpoint and checks bytes and digests.
fn check_all_spans(gz: &[u8], original: &[u8], z: &ZranOutput) {
    assert_eq!(z.checkpoints.len(), z.span_digests.len());
    for (i, cp) in z.checkpoints.iter().enumerate() {
        let (end_u, next_c) = match z.checkpoints.get(i + 1) {
            Some(n) => (n.uncompressed, n.compressed),
            None => (z.uncompressed_size, gz.len() as u64),
        };
        let (s, e) = compressed_range(cp.compressed, cp.bits, next_c);
        let got = inflate_span(
            &gz[s as usize..e as usize],
            cp.bits,
            &cp.window,
            (end_u - cp.uncompressed) as usize,
        )
        .unwrap_or_else(|err| panic!("span {i}: {err}"));
        assert_eq!(
            &got[..],
            &original[cp.uncompressed as usize..end_u as usize],
            "span {i}"
        );
        assert_eq!(Digest::of(&got), z.span_digests[i], "span {i} digest");
    }
}

#[test]
fn spans_round_trip_at_every_level() {
    let data = sample(3 << 20, 7);
    for level in [6, 9, 1] {
        let gz = gzip(&data, level);
        let (z, out) = index(&gz, 128 * 1024).unwrap();
        assert_eq!(out, data);
        assert_eq!(z.uncompressed_size, data.len() as u64);
        assert_eq!(z.compressed_size, gz.len() as u64);
        assert_eq!(z.diff_id, Digest::of(&data));
        // zlib-rs at level 1 writes very long blocks, so checkpoints are fewer there.
        let min = if level == 1 { 2 } else { 10 };
        assert!(
            z.checkpoints.len() >= min,
            "level {level}: {} checkpoints",
            z.checkpoints.len()
        );
        if level != 1 {
            assert!(
                z.checkpoints.iter().any(|c| c.bits != 0),
                "expected mid-byte checkpoints"
            );
        }
        check_all_spans(&gz, &data, &z);
    }
}

#[test]
fn multi_member_and_zero_padding() {
    let a = sample(700_000, 1);
    let b = sample(900_000, 2);
    let mut gz = gzip(&a, 6);
    gz.extend(gzip(&b, 6));
    let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
    let (z, out) = index(&gz, 100_000).unwrap();
    assert_eq!(out, all);
    check_all_spans(&gz, &all, &z);
    // One span crossing the member boundary when spans are large.
    let (z, _) = index(&gz, 1 << 30).unwrap();
    assert_eq!(z.checkpoints.len(), 1);
    check_all_spans(&gz, &all, &z);
    gz.extend([0u8; 1024]);
    let (z, out) = index(&gz, 100_000).unwrap();
    assert_eq!(out, all);
    assert_eq!(z.compressed_size, gz.len() as u64);
}

#[test]
fn empty_stream_has_one_empty_span() {
    let gz = gzip(b"", 6);
    let (z, out) = index(&gz, 1024).unwrap();
    assert!(out.is_empty());
    assert_eq!(z.checkpoints.len(), 1);
    assert_eq!(z.span_digests[0], Digest::of(b""));
}

#[test]
fn bad_streams_fail_cleanly() {
    let data = sample(500_000, 3);
    let gz = gzip(&data, 6);
    // Truncated.
    let err = index(&gz[..gz.len() / 2], 65536).unwrap_err();
    assert!(matches!(err, GzipError::Truncated { .. }), "{err}");
    // Not gzip.
    assert!(matches!(
        index(b"hello world", 65536).unwrap_err(),
        GzipError::NotGzip
    ));
    assert!(matches!(index(b"", 65536).unwrap_err(), GzipError::NotGzip));
    // Trailing garbage.
    let mut g = gzip(b"abc", 6);
    g.extend(b"junk");
    assert!(matches!(
        index(&g, 65536).unwrap_err(),
        GzipError::TrailingGarbage { .. }
    ));
    // Corruption anywhere in the body never panics and never passes silently.
    for pos in (20..gz.len() - 8).step_by(gz.len() / 37) {
        let mut bad = gz.clone();
        bad[pos] ^= 0x5a;
        match index(&bad, 65536) {
            Err(_) => {}
            Ok((z, out)) => assert!(
                out != data || z.diff_id != Digest::of(&data),
                "corruption at {pos} undetected"
            ),
        }
    }
}

#[test]
fn corrupt_span_input_is_an_error_not_a_panic() {
    let data = sample(1 << 20, 9);
    let gz = gzip(&data, 6);
    let (z, _) = index(&gz, 128 * 1024).unwrap();
    let cp = &z.checkpoints[2];
    let next = &z.checkpoints[3];
    let (s, e) = compressed_range(cp.compressed, cp.bits, next.compressed);
    let len = (next.uncompressed - cp.uncompressed) as usize;
    // Too little input.
    assert!(inflate_span(
        &gz[s as usize..(s + (e - s) / 2) as usize],
        cp.bits,
        &cp.window,
        len
    )
    .is_err());
    // Wrong window: output differs (caught by the span digest) or errors.
    let bad_window = vec![0u8; cp.window.len()];
    if let Ok(out) = inflate_span(&gz[s as usize..e as usize], cp.bits, &bad_window, len) {
        assert_ne!(Digest::of(&out), z.span_digests[2]);
    }
    assert!(inflate_span(&[], 3, &[], 10).is_err());
    assert!(inflate_span(&[1, 2], 9, &[], 10).is_err());
}

#[test]
fn span_sink_gets_every_span_with_its_digest() {
    let original = sample(5 << 20, 9);
    let gz = gzip(&original, 6);
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(Digest, Vec<u8>)>::new()));
    let g = got.clone();
    let mut ix = GzipIndexer::new(&gz[..], 1 << 20)
        .unwrap()
        .with_span_sink(Box::new(move |d, b| g.lock().unwrap().push((d, b))));
    let mut out = Vec::new();
    ix.read_to_end(&mut out).unwrap();
    let (z, _) = ix.finish().unwrap();
    let got = got.lock().unwrap();
    assert!(got.len() >= 4, "{} spans", got.len());
    assert_eq!(got.len(), z.span_digests.len());
    for ((d, b), want) in got.iter().zip(&z.span_digests) {
        assert_eq!(d, want);
        assert_eq!(Digest::of(b), *d);
    }
    let joined: Vec<u8> = got.iter().flat_map(|(_, b)| b.iter().copied()).collect();
    assert_eq!(joined, original);
}

/// A gzip member holding one fixed-Huffman deflate block: `a` and then `matches` copies of 258
/// bytes at distance 1. zlib never writes blocks this long, but a hostile layer can.
fn one_block_gzip(matches: usize) -> (Vec<u8>, Vec<u8>) {
    struct Bits(Vec<u8>, u32, u32);
    impl Bits {
        fn put(&mut self, value: u32, n: u32) {
            for i in 0..n {
                self.1 |= ((value >> i) & 1) << self.2;
                self.2 += 1;
                if self.2 == 8 {
                    self.0.push(self.1 as u8);
                    (self.1, self.2) = (0, 0);
                }
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u32, n: u32) {
            self.put(code.reverse_bits() >> (32 - n), n);
        }
    }
    let mut b = Bits(vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff], 0, 0);
    b.put(1, 1); // final block
    b.put(1, 2); // fixed Huffman codes
    b.code(0x30 + u32::from(b'a'), 8);
    for _ in 0..matches {
        b.code(0xc0 + (285 - 280), 8); // length 258
        b.code(0, 5); // distance 1
    }
    b.code(0, 7); // end of block
    b.put(0, 7);
    let out = vec![b'a'; 1 + 258 * matches];
    let mut crc = flate2::Crc::new();
    crc.update(&out);
    let mut gz = b.0;
    gz.extend_from_slice(&crc.sum().to_le_bytes());
    gz.extend_from_slice(&(out.len() as u32).to_le_bytes());
    (gz, out)
}

#[test]
fn a_deflate_block_longer_than_the_span_limit_is_refused_at_index_time() {
    // A 5 MiB block indexes and reads back (the control for the generator).
    let (gz, out) = one_block_gzip(20_000);
    let (z, got) = index(&gz, 1 << 20).unwrap();
    assert_eq!(got, out);
    check_all_spans(&gz, &out, &z);
    // Beyond the limit: a clear error, not a span every read would inflate whole.
    let (gz, _) = one_block_gzip((crate::limits::MAX_SPAN / 258 + 10) as usize);
    match index(&gz, 1 << 20) {
        Err(GzipError::SpanTooLong { max, .. }) => {
            assert_eq!(max, crate::limits::MAX_SPAN)
        }
        Err(e) => panic!("{e}"),
        Ok((z, _)) => panic!("indexed into {} spans", z.checkpoints.len()),
    }
}

#[test]
fn a_window_sink_gets_every_window_in_order_and_the_checkpoints_keep_none() {
    let data = sample(3 << 20, 7);
    let gz = gzip(&data, 6);
    let (kept, _) = index(&gz, 128 << 10).unwrap();
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let g = got.clone();
    let mut ix = GzipIndexer::new(&gz[..], 128 << 10)
        .unwrap()
        .with_window_sink(Box::new(move |w| g.lock().unwrap().push(w)));
    std::io::copy(&mut ix, &mut std::io::sink()).unwrap();
    let (sunk, _) = ix.finish().unwrap();
    assert!(kept.checkpoints.len() > 10);
    assert!(sunk.checkpoints.iter().all(|c| c.window.is_empty()));
    let windows: Vec<Vec<u8>> = kept.checkpoints.iter().map(|c| c.window.clone()).collect();
    assert_eq!(*got.lock().unwrap(), windows);
}

#[test]
fn fed_in_pieces_of_any_size_spans_come_out_the_same_as_soon_as_they_can() {
    // Two members, so runs cross a member boundary (its trailer split across pieces too).
    let a = sample(1_500_000, 3);
    let b = sample(2_000_000, 4);
    let mut gz = gzip(&a, 6);
    gz.extend(gzip(&b, 6));
    let all: Vec<u8> = a.iter().chain(b.iter()).copied().collect();
    let (z, _) = index(&gz, 16 << 10).unwrap();
    assert!(
        z.checkpoints.len() > 6,
        "{} checkpoints",
        z.checkpoints.len()
    );
    // One run from checkpoint 1 to the end, in pieces of 1, 7, 100 and 4096 bytes.
    assert!(
        z.checkpoints.iter().any(|c| c.bits != 0),
        "a mid-byte checkpoint"
    );
    let cp = &z.checkpoints[1];
    let (s, _) = compressed_range(cp.compressed, cp.bits, gz.len() as u64);
    let run = &gz[s as usize..];
    let bounds: Vec<u64> = z.checkpoints[1..]
        .iter()
        .map(|c| c.uncompressed)
        .chain([z.uncompressed_size])
        .collect();
    let lens: Vec<usize> = bounds.windows(2).map(|w| (w[1] - w[0]) as usize).collect();
    for piece in [1usize, 7, 100, 4096] {
        let mut inf = SpanInflater::new(cp.bits, &cp.window, &lens).unwrap();
        let mut outs = Vec::new();
        for (k, chunk) in run.chunks(piece).enumerate() {
            outs.extend(inf.feed(chunk).unwrap());
            // A span is out once the bytes up to the next checkpoint are in (plus the byte
            // holding its last bits).
            let fed = s + ((k + 1) * piece).min(run.len()) as u64;
            let ready = z.checkpoints[2..]
                .iter()
                .take_while(|c| c.compressed < fed)
                .count();
            assert!(
                outs.len() >= ready,
                "piece {piece}: {} of {ready} spans out",
                outs.len()
            );
        }
        inf.finish().unwrap();
        assert_eq!(outs.len(), lens.len());
        let joined: Vec<u8> = outs.concat();
        assert_eq!(joined, &all[bounds[0] as usize..], "piece {piece}");
    }
    // An empty span needs no bytes at all.
    let mut inf = SpanInflater::new(3, &[], &[0]).unwrap();
    assert_eq!(inf.feed(&[]).unwrap(), vec![Vec::<u8>::new()]);
    inf.finish().unwrap();
    // Fed short, it says so.
    let mut inf = SpanInflater::new(cp.bits, &cp.window, &lens).unwrap();
    inf.feed(&run[..run.len() / 2]).unwrap();
    assert!(matches!(inf.finish(), Err(GzipError::ShortSpan { .. })));
}
