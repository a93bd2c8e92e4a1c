use super::builder::normalize;
use super::*;
use crate::digest::Digest;
use flate2::{write::GzEncoder, Compression};
use std::io::Write;
use std::sync::Arc;

/// Writes tar entries with full control over names (the tar crate refuses hostile ones).
struct TarWriter(Vec<u8>);

impl TarWriter {
    fn new() -> Self {
        TarWriter(Vec::new())
    }
    fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        data: &[u8],
        link: &[u8],
        pax: &[(&str, &[u8])],
    ) {
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in pax {
                let rec_len = |n: usize| format!("{n} {k}=").len() + v.len() + 1;
                let mut n = rec_len(0);
                while rec_len(n) != n {
                    n = rec_len(n);
                }
                body.extend(format!("{n} {k}=").as_bytes());
                body.extend(*v);
                body.push(b'\n');
            }
            self.raw(b"PaxHeaders/x", tar::EntryType::XHeader, &body, b"", &[]);
        }
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(1000);
        h.set_gid(100);
        h.set_mtime(1_700_000_000);
        if !link.is_empty() {
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        }
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
    }
    fn file(&mut self, name: &str, data: &[u8]) {
        self.raw(name.as_bytes(), tar::EntryType::Regular, data, b"", &[]);
    }
    fn dir(&mut self, name: &str) {
        self.raw(name.as_bytes(), tar::EntryType::Directory, b"", b"", &[]);
    }
    fn gz(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0u8; 1024]);
        let mut e = GzEncoder::new(Vec::new(), Compression::default());
        e.write_all(&self.0).unwrap();
        e.finish().unwrap()
    }
}

fn build(gz: &[u8]) -> Result<BuiltLayer, IndexError> {
    build_layer_index(
        gz,
        &BuildOptions {
            span_size: 4096,
            ..Default::default()
        },
        |_| {},
    )
}

fn every_type_layer() -> (Vec<u8>, Vec<u8>) {
    let mut t = TarWriter::new();
    t.dir("./");
    t.dir("etc/");
    t.file("etc/hello", b"hello world\n");
    let big: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
    t.file("bin/big", &big);
    t.raw(
        b"bin/ping",
        tar::EntryType::Regular,
        b"PING",
        b"",
        &[(
            "SCHILY.xattr.security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00",
        )],
    );
    t.raw(
        b"bin/link",
        tar::EntryType::Symlink,
        b"",
        b"../etc/hello",
        &[],
    );
    t.raw(b"bin/hard", tar::EntryType::Link, b"", b"etc/hello", &[]);
    t.raw(b"dev/null", tar::EntryType::Char, b"", b"", &[]);
    t.raw(b"dev/sda", tar::EntryType::Block, b"", b"", &[]);
    t.raw(b"run/fifo", tar::EntryType::Fifo, b"", b"", &[]);
    let long = format!("deep/{}/file", "d".repeat(200));
    t.raw(
        b"ignored",
        tar::EntryType::Regular,
        b"long",
        b"",
        &[
            ("path", long.as_bytes()),
            ("uid", b"70000"),
            ("mtime", b"1700000000.25"),
        ],
    );
    t.raw(b"etc/.wh.old", tar::EntryType::Regular, b"", b"", &[]);
    t.raw(b"var/.wh..wh..opq", tar::EntryType::Regular, b"", b"", &[]);
    (t.gz(), big)
}

#[test]
fn every_entry_type_is_indexed() {
    let (gz, big) = every_type_layer();
    let built = build(&gz).unwrap();
    let ix = &built.index;
    assert_eq!(ix.layer, Digest::of(&gz));
    assert_eq!(ix.compressed_size, gz.len() as u64);
    let by_path = |p: &str| {
        ix.entries
            .iter()
            .find(|e| e.path == p.as_bytes())
            .unwrap_or_else(|| panic!("{p}"))
    };
    assert_eq!(by_path("").kind, EntryKind::Dir);
    let EntryKind::File { offset, size } = by_path("bin/big").kind else {
        panic!()
    };
    assert_eq!(size, big.len() as u64);
    // The offset points at the bytes in the uncompressed stream: inflate the spans and compare.
    let spans = ix.spans_covering(offset, size);
    assert!(spans.len() > 10, "{spans:?}");
    let mut stream = Vec::new();
    for i in spans.clone() {
        let (s, e) = ix.span_compressed_range(i);
        let sp = &ix.spans[i];
        let w = format::decode_window(
            &built.windows[sp.window_offset as usize..][..sp.window_len as usize],
            ix.codec,
        )
        .unwrap();
        let (us, ue) = ix.span_range(i);
        let out =
            crate::gzip::inflate_span(&gz[s as usize..e as usize], sp.bits, &w, (ue - us) as usize)
                .unwrap();
        assert_eq!(Digest::of(&out), sp.digest);
        stream.extend(out);
    }
    let base = ix.spans[spans.start].uncompressed;
    assert_eq!(&stream[(offset - base) as usize..][..big.len()], &big[..]);

    let ping = by_path("bin/ping");
    assert_eq!(
        ping.xattrs,
        vec![(
            b"security.capability".to_vec(),
            b"\x01\x00\x00\x02\x00\x20\x00\x00".to_vec()
        )]
    );
    assert_eq!(
        by_path("bin/link").kind,
        EntryKind::Symlink {
            target: b"../etc/hello".to_vec()
        }
    );
    assert_eq!(
        by_path("bin/hard").kind,
        EntryKind::Hardlink {
            target: b"etc/hello".to_vec()
        }
    );
    assert_eq!(
        by_path("dev/null").kind,
        EntryKind::CharDevice { major: 1, minor: 3 }
    );
    assert_eq!(
        by_path("dev/sda").kind,
        EntryKind::BlockDevice { major: 1, minor: 3 }
    );
    assert_eq!(by_path("run/fifo").kind, EntryKind::Fifo);
    let long = by_path(&format!("deep/{}/file", "d".repeat(200)));
    assert_eq!(
        (long.uid, long.mtime, long.mtime_nsec),
        (70000, 1_700_000_000, 250_000_000)
    );
    assert_eq!(by_path("etc/old").kind, EntryKind::Whiteout);
    assert_eq!(by_path("var").kind, EntryKind::Opaque);
    assert_eq!(
        (
            by_path("etc/hello").uid,
            by_path("etc/hello").gid,
            by_path("etc/hello").mode
        ),
        (1000, 100, 0o644)
    );
}

#[test]
fn format_round_trips_deterministically_and_rejects_damage() {
    let (gz, _) = every_type_layer();
    let a = build(&gz).unwrap();
    let b = build(&gz).unwrap();
    let ea = format::encode(&a.index);
    assert_eq!(
        ea,
        format::encode(&b.index),
        "encoding must be deterministic"
    );
    assert_eq!(a.windows, b.windows);
    let back = format::decode(&ea).unwrap();
    assert_eq!(back, a.index);
    // Any flipped byte is caught (by the checksum, or the magic/version checks before it).
    for pos in (0..ea.len()).step_by(7) {
        let mut bad = ea.clone();
        bad[pos] ^= 0x01;
        assert!(format::decode(&bad).is_err(), "flip at {pos} accepted");
    }
    for len in [0, 10, 47, ea.len() - 1] {
        assert!(format::decode(&ea[..len]).is_err());
    }
}

/// Re-checksums a body so the structural checks (not the checksum) are what is tested.
fn reseal(body: &[u8]) -> Vec<u8> {
    let mut v = body.to_vec();
    v.extend_from_slice(Digest::of(body).as_bytes());
    v
}

#[test]
fn decoder_survives_hostile_bodies() {
    let (gz, _) = every_type_layer();
    let enc = format::encode(&build(&gz).unwrap().index);
    let body = &enc[..enc.len() - 32];
    let mut x: u64 = 0x9e3779b97f4a7c15;
    for _ in 0..3000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut b = body.to_vec();
        let pos = 16 + (x as usize) % (b.len() - 16);
        b[pos] = (x >> 32) as u8;
        if x % 5 == 0 {
            b.truncate(16 + (x as usize >> 8) % (b.len() - 16));
        }
        let _ = format::decode(&reseal(&b));
    }
    // Huge claimed counts are refused before allocation.
    let mut b = body[..16 + 96].to_vec();
    for v in [0u64, 0, 0, 0, u64::MAX >> 1, u64::MAX >> 1] {
        let mut out = Vec::new();
        let mut v = v;
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
        b.extend(out);
    }
    assert!(format::decode(&reseal(&b)).is_err());
}

#[test]
fn hostile_names_and_links_are_refused() {
    let cases: Vec<(&[u8], tar::EntryType, &[u8], &str)> = vec![
        (b"../escape", tar::EntryType::Regular, b"", "'..'"),
        (b"a/../../b", tar::EntryType::Regular, b"", "'..'"),
        (b"/etc/passwd", tar::EntryType::Regular, b"", "absolute"),
        (b"x", tar::EntryType::Link, b"../../etc/shadow", "'..'"),
        (b"x", tar::EntryType::Link, b"y", "later"),
        (b"x", tar::EntryType::Link, b"x", "itself"),
    ];
    for (name, kind, link, want) in cases {
        let mut t = TarWriter::new();
        t.raw(name, kind, b"", link, &[]);
        t.file("y", b"later");
        let err = build(&t.gz())
            .err()
            .unwrap_or_else(|| panic!("{name:?} accepted"))
            .to_string();
        assert!(err.contains(want), "{name:?}: {err}");
    }
    let mut t = TarWriter::new();
    t.raw(b"s", tar::EntryType::GNUSparse, b"", b"", &[]);
    assert!(build(&t.gz()).is_err());
}

#[test]
fn digests_are_checked() {
    let (gz, _) = every_type_layer();
    let ok = build(&gz).unwrap().index;
    let wrong = Digest::of(b"nope");
    let opts = |l, d| BuildOptions {
        expected_layer: l,
        expected_diff_id: d,
        ..Default::default()
    };
    assert!(build_layer_index(&gz[..], &opts(Some(ok.layer), Some(ok.diff_id)), |_| {}).is_ok());
    let e = build_layer_index(&gz[..], &opts(Some(wrong), None), |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("layer digest mismatch"), "{e}");
    let e = build_layer_index(&gz[..], &opts(None, Some(wrong)), |_| {})
        .err()
        .unwrap();
    assert!(e.to_string().contains("DiffID mismatch"), "{e}");
    // A truncated layer is a gzip error, whatever the tar parser was doing.
    let e = build(&gz[..gz.len() - 100]).err().unwrap();
    assert!(
        matches!(e, IndexError::Gzip(_) | IndexError::Tar { .. }),
        "{e}"
    );
    // A header claiming a huge file in a small stream.
    let mut t = TarWriter::new();
    t.file("a", b"x");
    let mut raw = t.0.clone();
    let size_field = &mut raw[124..136];
    size_field.copy_from_slice(b"77777777777\0");
    let mut h = tar::Header::new_old();
    h.as_mut_bytes().copy_from_slice(&raw[..512]);
    h.set_cksum();
    raw[..512].copy_from_slice(h.as_bytes());
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(&raw).unwrap();
    assert!(build(&e.finish().unwrap()).is_err());
}

#[test]
fn normalize_paths() {
    assert_eq!(normalize(b"./a//b/./c/").unwrap(), b"a/b/c");
    assert_eq!(normalize(b"./").unwrap(), b"");
    assert!(normalize(b"/a").is_err());
    assert!(normalize(b"a/..").is_err());
}

fn layer_of(t: TarWriter) -> Arc<LayerIndex> {
    Arc::new(build(&t.gz()).unwrap().index)
}

#[test]
fn merged_view_applies_whiteouts_opaque_dirs_and_implied_parents() {
    let mut l0 = TarWriter::new();
    l0.dir("etc/");
    l0.file("etc/a", b"a0");
    l0.file("etc/b", b"b0");
    l0.dir("var/");
    l0.file("var/x", b"x");
    l0.dir("var/sub/");
    l0.file("var/sub/y", b"y");
    l0.file("data", b"shared bytes");
    l0.dir("d/");
    l0.file("d/inner", b"i");
    let mut l1 = TarWriter::new();
    l1.raw(b"etc/.wh.a", tar::EntryType::Regular, b"", b"", &[]);
    l1.file("etc/b", b"b1");
    l1.raw(b"var/.wh..wh..opq", tar::EntryType::Regular, b"", b"", &[]);
    l1.file("var/new", b"n");
    l1.file("implied/deep/file", b"z");
    l1.raw(b"link", tar::EntryType::Link, b"", b"data", &[]);
    l1.file("d", b"now a file");
    let mut l2 = TarWriter::new();
    l2.raw(b".wh.data", tar::EntryType::Regular, b"", b"", &[]);
    let v = ImageView::build(vec![layer_of(l0), layer_of(l1), layer_of(l2)]).unwrap();
    let paths: Vec<String> = v
        .nodes
        .keys()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    assert_eq!(
        paths,
        [
            "",
            "d",
            "etc",
            "etc/b",
            "implied",
            "implied/deep",
            "implied/deep/file",
            "link",
            "var",
            "var/new"
        ]
    );
    assert_eq!(v.get(b"etc/b").unwrap().0.layer, 1);
    assert_eq!(v.get(b"implied").unwrap().1, None);
    // The hard link still reaches layer 0's bytes though layer 2 deleted the name "data".
    let (node, _) = v.get(b"link").unwrap();
    let (layer, _, size) = v.file_data(&node).unwrap();
    assert_eq!((layer, size), (0, 12));
    assert_eq!(v.file_count(), 5);
}

#[test]
fn checkpoints_are_denser_inside_small_files() {
    // 96 files of 8 KiB, then one of 1 MiB; pseudo-random text so deflate emits many blocks.
    let mut x: u32 = 7;
    let mut text = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                b"abcdefghijklmnopqrstuvwxyz \n"[(x >> 16) as usize % 28]
            })
            .collect()
    };
    let mut t = TarWriter::new();
    for i in 0..96 {
        t.file(&format!("small/{i}"), &text(8 << 10));
    }
    t.file("big", &text(1 << 20));
    let gz = t.gz();
    let build = |dense| {
        build_layer_index(
            &gz[..],
            &BuildOptions {
                span_size: 128 << 10,
                dense_span_size: dense,
                small_file: 64 << 10,
                ..Default::default()
            },
            |_| {},
        )
        .unwrap()
    };
    let uniform = build(0).index;
    let built = build(32 << 10);
    // Every span of the dense index reads back right through the whole read path.
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar).unwrap();
    let source = Arc::new(
        crate::source::fake::FakeSource::new()
            .with_blob(gz.clone())
            .with_blob(built.windows.clone()),
    );
    let fetcher = crate::fetch::Fetcher::new(
        Arc::new(crate::cache::TieredCache::memory_only(64 << 20)),
        Default::default(),
    );
    let dense = Arc::new(built.index);
    let reader =
        crate::reader::LayerReader::new(&fetcher, source, dense.clone(), None, Default::default());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let all = rt
        .block_on(reader.read(0, dense.uncompressed_size))
        .unwrap();
    assert!(all[..] == tar[..dense.uncompressed_size as usize]);
    let dense: &LayerIndex = &dense;
    let big_at = 96 * (512 + (8 << 10)) as u64;
    let spans_before =
        |ix: &LayerIndex| ix.spans.iter().filter(|s| s.uncompressed < big_at).count();
    let spans_after = |ix: &LayerIndex| ix.spans.len() - spans_before(ix);
    // The small-file region (~800 KiB) gets several times the checkpoints; the big file does not.
    assert!(
        spans_before(dense) >= 3 * spans_before(&uniform),
        "{} vs {}",
        spans_before(dense),
        spans_before(&uniform)
    );
    assert!(spans_after(dense) <= spans_after(&uniform) + 1);
    // Same layer, same files: only the checkpoints differ.
    assert_eq!(dense.entries, uniform.entries);
    assert_eq!(dense.diff_id, uniform.diff_id);
}

/// A layer index with these entries only (no bytes behind them): for merge tests.
fn bare_layer(entries: &[(&str, EntryKind)]) -> Arc<LayerIndex> {
    Arc::new(LayerIndex {
        layer: Digest::of(b"l"),
        diff_id: Digest::of(b"d"),
        codec: Default::default(),
        compressed_size: 1,
        uncompressed_size: 1 << 20,
        span_size: DEFAULT_SPAN_SIZE,
        windows: BlobRef {
            digest: Digest::of(b""),
            size: 0,
        },
        spans: vec![],
        entries: entries
            .iter()
            .map(|(p, k)| Entry {
                path: p.as_bytes().to_vec(),
                kind: k.clone(),
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            })
            .collect(),
        charge: Default::default(),
    })
}

fn file() -> EntryKind {
    EntryKind::File { offset: 0, size: 1 }
}

#[test]
fn whiteout_of_a_lower_dir_keeps_this_layers_children_under_a_directory() {
    // Layer 1 lists a/b, then whites out a lower `a`: a/b stays, so `a` must stay a directory.
    let l0 = bare_layer(&[("a", EntryKind::Dir), ("a/old", file())]);
    let l1 = bare_layer(&[("a/b", file()), ("a", EntryKind::Whiteout)]);
    let v = ImageView::build(vec![l0, l1]).unwrap();
    v.check().unwrap();
    assert!(v.get(b"a/b").is_some());
    assert!(v.get(b"a/old").is_none());
    assert_eq!(v.get(b"a").unwrap().1, None, "implied directory");
}

#[test]
fn entries_naming_the_root_never_remove_it() {
    for kind in [EntryKind::Whiteout, file(), EntryKind::Fifo] {
        let l0 = bare_layer(&[("etc", EntryKind::Dir), ("etc/x", file())]);
        let l1 = bare_layer(&[("", kind.clone())]);
        let v = ImageView::build(vec![l0, l1]).unwrap();
        v.check().unwrap();
        assert!(v.get(b"etc/x").is_some(), "{kind:?}");
    }
}

#[test]
fn merged_tree_keeps_its_invariant_for_any_layers() {
    // Random layers over a small path alphabet, so whiteouts, opaque dirs, replacements and
    // re-creations collide often.
    let names = ["", "a", "b", "a/b", "a/c", "a/b/c", "b/a", "a/b/c/d"];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % n as u64) as usize
    };
    for round in 0..3000 {
        let mut layers = Vec::new();
        for _ in 0..1 + next(4) {
            let mut entries = Vec::new();
            for _ in 0..next(7) {
                let kind = match next(6) {
                    0 => EntryKind::Dir,
                    1 => file(),
                    2 => EntryKind::Whiteout,
                    3 => EntryKind::Opaque,
                    4 => EntryKind::Symlink {
                        target: b"a".to_vec(),
                    },
                    _ => EntryKind::Hardlink {
                        target: names[next(names.len())].as_bytes().to_vec(),
                    },
                };
                entries.push((names[next(names.len())], kind));
            }
            layers.push(bare_layer(&entries));
        }
        if let Ok(v) = ImageView::build(layers.clone()) {
            if let Err(e) = v.check() {
                let shown: Vec<Vec<(String, EntryKind)>> = layers
                    .iter()
                    .map(|l| {
                        l.entries
                            .iter()
                            .map(|e| (show_path(&e.path), e.kind.clone()))
                            .collect()
                    })
                    .collect();
                panic!("round {round}: {e}\nlayers: {shown:?}");
            }
        }
    }
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A sealed index with the given header numbers, spans `(du, dc, window_len)` and entry table.
fn crafted_index(
    sizes: [u64; 4], // windows, compressed, uncompressed, span size
    spans: &[(u64, u64, u64)],
    entry_count: u64,
    table_len: u64,
    table: &[u8],
) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(format::MAGIC);
    b.extend_from_slice(&format::VERSION.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&[7u8; 96]);
    for v in sizes {
        varint(&mut b, v);
    }
    varint(&mut b, spans.len() as u64);
    varint(&mut b, entry_count);
    for &(du, dc, wlen) in spans {
        varint(&mut b, du);
        varint(&mut b, dc);
        b.push(0);
        varint(&mut b, wlen);
        b.extend_from_slice(&[1u8; 32]);
    }
    varint(&mut b, table_len);
    let z = zstd::bulk::compress(table, 19).unwrap();
    varint(&mut b, z.len() as u64);
    b.extend_from_slice(&z);
    reseal(&b)
}

#[test]
fn decoded_indexes_are_charged_to_a_budget_and_one_over_its_share_is_refused_early() {
    use crate::index::memory::Budget;
    use crate::testutil::alloc_meter::peak_during;
    // 400,000 root-directory entries (valid, each a few bytes of the table, their mtimes
    // scattered so the table does not compress past the 256x limit): 5 MB of table, over 40 MB
    // decoded.
    let mut table = Vec::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..400_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        table.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        varint(&mut table, (x >> 36) << 1);
        table.extend_from_slice(&[0, 0]);
    }
    let ix = crafted_index(
        [0, 1, 1, 1 << 20],
        &[(0, 0, 0)],
        400_000,
        table.len() as u64,
        &table,
    );
    assert!(ix.len() < 4 << 20, "{} bytes", ix.len());
    // A 32 MiB budget: refused before the entries are reserved.
    let small: &'static Budget = Box::leak(Box::new(Budget::new(32 << 20)));
    let (r, peak) = peak_during(|| format::decode_within(&ix, small));
    let e = r.unwrap_err();
    assert!(matches!(e, IndexError::Budget { .. }), "{e}");
    assert!(e.to_string().contains("--index-memory"), "{e}");
    assert!(peak < 16 << 20, "{peak} bytes held while refusing");
    assert_eq!(small.used(), 0, "a refused decode holds nothing");
    // A budget that fits: charged while the index lives, twice for a clone, freed on drop.
    let big: &'static Budget = Box::leak(Box::new(Budget::new(2 << 30)));
    let decoded = format::decode_within(&ix, big).unwrap();
    assert_eq!(decoded.entries.len(), 400_000);
    let held = big.used();
    assert!(held >= 40 << 20 && held == decoded.charge.bytes(), "{held}");
    let copy = decoded.clone();
    assert_eq!(big.used(), 2 * held);
    drop((decoded, copy));
    assert_eq!(big.used(), 0);
    // The budget is shared: a second index fits only in what the first left.
    let shared: &'static Budget = Box::leak(Box::new(Budget::new(3 * held - 1)));
    let first = format::decode_within(&ix, shared).unwrap();
    let second = format::decode_within(&ix, shared);
    assert!(second.is_ok(), "half of the budget is one index's share");
    let third = format::decode_within(&ix, shared);
    assert!(
        matches!(third, Err(IndexError::Budget { .. })),
        "nothing left"
    );
    drop((first, second));
    assert_eq!(shared.used(), 0);
}

#[test]
fn tiny_hostile_indexes_get_a_clear_error_within_bounded_memory() {
    use crate::testutil::alloc_meter::peak_during;
    let one_span = [(0, 0, 0)];
    // 16 MiB of zeros is 1.8 M root entries of 9 bytes each; zstd makes it a few hundred bytes.
    let zeros = vec![0u8; 16 << 20];
    for claimed in [16 << 20, 1 << 30, u64::MAX >> 1] {
        let ix = crafted_index(
            [0, 1, 1, 1 << 20],
            &one_span,
            (16 << 20) / 9,
            claimed,
            &zeros,
        );
        assert!(ix.len() < 1024, "{} bytes", ix.len());
        let (r, peak) = peak_during(|| format::decode(&ix));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("entry table claims"), "{e}");
        assert!(peak < 1 << 20, "{peak} bytes for a {}-byte index", ix.len());
    }
    // Front-coded paths that grow by one byte per entry: quadratic if rebuilt without a limit.
    let mut table = Vec::new();
    for i in 0..20_000u64 {
        varint(&mut table, i);
        table.extend_from_slice(&[1, b'a', 0, 0, 0, 0, 0, 0, 0]);
    }
    let ix = crafted_index(
        [0, 1, 1, 1 << 20],
        &one_span,
        20_000,
        table.len() as u64,
        &table,
    );
    let (r, peak) = peak_during(|| format::decode(&ix));
    let e = r.unwrap_err().to_string();
    assert!(e.contains("path longer than clip's limit"), "{e}");
    assert!(
        peak < 64 << 20,
        "{peak} bytes for a {}-byte index",
        ix.len()
    );
    // A span claiming 2^40 bytes (each read would allocate it).
    let huge = 1u64 << 40;
    let ix = crafted_index(
        [0, 2, huge + 1, 1 << 20],
        &[(0, 0, 0), (huge, 1, 0)],
        0,
        0,
        &[],
    );
    let e = format::decode(&ix).unwrap_err().to_string();
    assert!(e.contains("span larger than clip's limit"), "{e}");
    let ix = crafted_index([0, 1, huge, 1 << 20], &one_span, 0, 0, &[]);
    let e = format::decode(&ix).unwrap_err().to_string();
    assert!(e.contains("last span larger"), "{e}");
    // Paths the builder never writes: `..`, absolute, empty components; a root that is a file.
    // (The first case is the control: a well-formed directory entry decodes.)
    for (path, kind) in [
        (&b"a/b"[..], 0u8),
        (b"a/../b", 0),
        (b"/etc", 0),
        (b"a//b", 0),
        (b"", 1),
    ] {
        let mut t = Vec::new();
        varint(&mut t, 0);
        varint(&mut t, path.len() as u64);
        t.extend_from_slice(path);
        t.extend_from_slice(&[kind, 0, 0, 0, 0, 0]);
        if kind == 1 {
            t.extend_from_slice(&[0, 0]);
        }
        t.push(0);
        let ix = crafted_index([0, 1, 1, 1 << 20], &one_span, 1, t.len() as u64, &t);
        if path == b"a/b" {
            assert_eq!(format::decode(&ix).unwrap().entries[0].path, path);
            continue;
        }
        let e = format::decode(&ix).unwrap_err().to_string();
        assert!(
            e.contains("not normalised") || e.contains("root"),
            "{path:?}: {e}"
        );
    }
}

#[test]
fn a_gzip_bomb_in_a_long_name_is_refused_before_it_is_buffered() {
    use crate::testutil::alloc_meter::peak_during;
    // 64 MiB of GNU long name compress to a few hundred KiB.
    let name = vec![b'a'; 64 << 20];
    for kind in [tar::EntryType::GNULongName, tar::EntryType::XHeader] {
        let mut t = TarWriter::new();
        t.raw(b"LongLink", kind, &name, b"", &[]);
        t.file("victim", b"x");
        let gz = t.gz();
        assert!(gz.len() < 1 << 20);
        let (r, peak) = peak_during(|| build(&gz).map(|_| ()));
        let e = r.unwrap_err().to_string();
        assert!(e.contains("over clip's limit"), "{kind:?}: {e}");
        assert!(
            peak < 16 << 20,
            "{kind:?}: {peak} bytes held while indexing"
        );
    }
}

#[test]
fn a_failed_build_leaves_no_indexing_thread_behind() {
    // A layer cut short: the build fails while the hashing thread still has spans to hand to
    // a slow span sink. The call must not return before that thread is gone: the sink (moved
    // into it) must have been dropped, so it is never called after the build failed. Noise, so
    // there is a checkpoint every span.
    let mut t = TarWriter::new();
    let mut x = 7u64;
    let noise: Vec<u8> = (0..(3 << 20))
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 56) as u8
        })
        .collect();
    t.file("noise", &noise);
    let gz = t.gz();
    let cut = &gz[..gz.len() - 4096];
    let alive = Arc::new(());
    let held = alive.clone();
    let sink: crate::gzip::SpanSink = Box::new(move |_, _| {
        let _ = &held;
        std::thread::sleep(std::time::Duration::from_millis(20));
    });
    let opts = BuildOptions {
        span_size: 64 << 10,
        ..Default::default()
    };
    let built = super::builder::build_layer_index_with_sink(cut, &opts, |_| {}, Some(sink));
    assert!(built.is_err(), "a truncated layer was indexed");
    assert_eq!(
        Arc::strong_count(&alive),
        1,
        "the hashing thread, and the span sink, outlived the failed build"
    );
}
