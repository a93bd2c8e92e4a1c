//! The seed scenario: 50 different files read cold from one large (>= 30 MiB gzip) layer.
//!
//! clip (span reads through a fresh cache, windows and spans fetched from the registry) against
//! the whole-layer approach the Go original settled on (download the layer, inflate it once, serve
//! reads from the inflated copy), both measured here, in this process, against the same registry.
//! Then warm 4 KiB reads through clip's memory tier.
//!
//! Run: `cargo bench -p integration --bench seed` (needs the large test image; prints a table).

#[path = "../tests/it/common.rs"]
#[allow(dead_code)]
mod common;

use clip_core::index::EntryKind;
use clip_core::reader::ReadPath;
use clip_core::registry::{Client, RegistryConfig};
use std::io::Read;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

const RUNS: usize = 3;
const FILES: usize = 50;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let layout = std::env::var_os("CLIP_LARGE_IMAGE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/var/cache/clip-test-images/large".into());
    assert!(
        layout.join("index.json").exists(),
        "missing {}: run scripts/build-large-image.sh",
        layout.display()
    );
    let reg = common::Registry::start(common::Auth::None);
    reg.push_layout(&layout, "large", "large");
    let image = format!("{}:large", reg.image("large"));
    let tmp = tempfile::tempdir().unwrap();
    common::clip_json(tmp.path(), &["index", &image, "--push", "--json"], &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let client = Client::new(RegistryConfig::default());
        let r: clip_core::Reference = image.parse().unwrap();
        let resolved = client.resolve(&r).await.unwrap();
        let store = clip_core::store::Store::open(&tmp.path().join("bench-node")).unwrap();
        let reports = clip_core::image::load_indexes(&client, &store, &resolved).await.unwrap();
        // The largest layer.
        let rep = reports.iter().max_by_key(|r| r.index.compressed_size).unwrap();
        let ix = rep.index.clone();
        assert!(ix.compressed_size >= 30 << 20);
        // 50 files spread evenly over the layer (by offset), at least 4 KiB each.
        let mut files: Vec<(String, u64, u64)> = ix
            .entries
            .iter()
            .filter_map(|e| match e.kind {
                EntryKind::File { offset, size } if size >= 4096 => Some((String::from_utf8_lossy(&e.path).into_owned(), offset, size)),
                _ => None,
            })
            .collect();
        files.sort_by_key(|f| f.1);
        let step = files.len() / FILES;
        let files: Vec<(String, u64, u64)> = (0..FILES).map(|i| files[i * step].clone()).collect();
        let file_bytes: u64 = files.iter().map(|f| f.2).sum();
        let mut touched = std::collections::BTreeSet::new();
        for f in &files {
            touched.extend(ix.spans_covering(f.1, f.2));
        }
        let touched_bytes: u64 = touched.iter().map(|&i| ix.span_range(i).1 - ix.span_range(i).0).sum();

        let (mut clip_t, mut whole_t) = (Vec::new(), Vec::new());
        let (mut clip_reg, mut clip_infl, mut whole_reg, mut whole_infl) = (0, 0, 0, 0);
        let mut warm_reader = None;
        for _ in 0..RUNS {
            // clip: a fresh node's cache, windows and spans from the registry.
            let reads = ReadPath::memory_only(256 << 20);
            let reader = reads.reader(&client, &resolved.reference, ix.clone(), None);
            let start = Instant::now();
            let mut got = 0;
            for (_, off, size) in &files {
                got += reader.read(*off, *size).await.unwrap().len() as u64;
            }
            clip_t.push(start.elapsed().as_secs_f64());
            assert_eq!(got, file_bytes);
            clip_reg = reads.fetcher.stats.registry_bytes.load(Relaxed);
            clip_infl = reads.fetcher.stats.inflated_bytes.load(Relaxed);
            warm_reader = Some(reader);

            // Whole layer: download, inflate everything once, then serve the reads.
            let start = Instant::now();
            let blob = client.get_blob_range(&resolved.reference, &ix.layer, 0, ix.compressed_size).await.unwrap();
            let mut tar = Vec::with_capacity(ix.uncompressed_size as usize);
            flate2::read::MultiGzDecoder::new(&blob[..]).read_to_end(&mut tar).unwrap();
            let mut served = 0;
            for (_, off, size) in &files {
                served += tar[*off as usize..(*off + *size) as usize].len() as u64;
            }
            whole_t.push(start.elapsed().as_secs_f64());
            assert_eq!(served, file_bytes);
            whole_reg = blob.len() as u64;
            whole_infl = tar.len() as u64;
        }
        // Warm 4 KiB reads through the memory tier.
        let reader = warm_reader.unwrap();
        let mut lat = Vec::new();
        let mut x: u64 = 0x2545F4914F6CDD1D;
        for _ in 0..5000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (_, off, size) = &files[(x % FILES as u64) as usize];
            let at = off + (x >> 8) % size.saturating_sub(4096).max(1);
            let t = Instant::now();
            let b = reader.read(at, 4096).await.unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            assert!(!b.is_empty());
        }
        lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (p50, p99) = (lat[lat.len() / 2], lat[lat.len() * 99 / 100]);
        let (cmin, cmax) = (clip_t.iter().cloned().fold(f64::MAX, f64::min), clip_t.iter().cloned().fold(0.0, f64::max));
        let (wmin, wmax) = (whole_t.iter().cloned().fold(f64::MAX, f64::min), whole_t.iter().cloned().fold(0.0, f64::max));
        let (cm, wm) = (median(&mut clip_t), median(&mut whole_t));
        println!(
            "seed scenario: {FILES} files ({file_bytes} bytes) from layer {} ({} bytes gzip, {} bytes tar, {} spans); {} spans touched = {touched_bytes} bytes; {RUNS} runs",
            ix.layer, ix.compressed_size, ix.uncompressed_size, ix.spans.len(), touched.len()
        );
        println!("| approach | cold wall time (median, min-max) | registry bytes | bytes inflated |");
        println!("|---|---|---|---|");
        println!("| clip span reads | {cm:.3} s ({cmin:.3}-{cmax:.3}) | {clip_reg} | {clip_infl} |");
        println!("| whole layer: download + inflate once | {wm:.3} s ({wmin:.3}-{wmax:.3}) | {whole_reg} | {whole_infl} |");
        println!(
            "ratios: time {:.1}x faster, {:.1}x fewer registry bytes, {:.1}x fewer bytes inflated; inflated / spans touched = {:.2} (target <= 2)",
            wm / cm,
            whole_reg as f64 / clip_reg as f64,
            whole_infl as f64 / clip_infl as f64,
            clip_infl as f64 / touched_bytes as f64
        );
        println!("warm 4 KiB reads through the memory tier: p50 {p50:.1} us, p99 {p99:.1} us (target p50 <= 50 us)");
    });
}
