//! What replaying a startup profile would fetch under indexes of different checkpoint densities:
//! the measurement behind the default span size (docs/benchmarks.md, history at 9053815,
//! "denser checkpoints").
//!
//! ```text
//! cargo run --release -p clip-core --example profile_cost -- MANIFEST ROOT [ROOT...]
//! ```
//! `MANIFEST` is the image manifest digest; the first `ROOT` is a clip root holding the image's
//! profile (`clip profile --no-push`); every `ROOT` holds the image's indexes built with one
//! density (`clip --root ROOT index --span-size ...`). For each root it prints the compressed
//! bytes of the spans the profile touches (adjacent spans merged into one range request), the
//! requests, and the checkpoint windows those requests need (one per request, at the root's mean
//! window size), against the floor: the compressed bytes of the file ranges read, pro-rated.

use clip_core::digest::Digest;
use clip_core::index::LayerIndex;
use clip_core::profile::merge_intervals as merge;
use clip_core::store::Store;
use std::path::Path;

/// Compressed bytes and range requests to fetch the spans covering `need`.
fn cost(need: &[(u64, u64)], ix: &LayerIndex) -> (u64, u64) {
    let ranges: Vec<(u64, u64)> = need
        .iter()
        .flat_map(|&(s, e)| ix.spans_covering(s, e - s))
        .map(|i| ix.span_compressed_range(i))
        .collect();
    let merged = merge(ranges);
    (merged.iter().map(|r| r.1 - r.0).sum(), merged.len() as u64)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err("usage: profile_cost MANIFEST ROOT [ROOT...]".into());
    }
    let manifest: Digest = args[0].parse()?;
    let stores = args[1..]
        .iter()
        .map(|r| Store::open(Path::new(r)))
        .collect::<Result<Vec<_>, _>>()?;
    let profile = stores[0]
        .get_profile(&manifest)
        .ok_or("the first root has no profile of that manifest")?;
    let mut floor = 0u64;
    // Per root: data bytes, requests, window bytes, index bytes.
    let mut rows = vec![(0u64, 0u64, 0u64, 0u64); stores.len()];
    for lp in &profile.layers {
        let need = merge(lp.ranges.iter().map(|&(o, n)| (o, o + n)).collect());
        for (row, store) in rows.iter_mut().zip(&stores) {
            let (ix, raw) = store
                .get_layer(&lp.layer)?
                .ok_or_else(|| format!("a root lacks the index of layer {}", lp.layer))?;
            let (bytes, requests) = cost(&need, &ix);
            let window = ix.windows.size / ix.spans.len().max(1) as u64;
            row.0 += bytes;
            row.1 += requests;
            row.2 += requests * window;
            row.3 += raw.len() as u64;
        }
        let (ix, _) = stores[0].get_layer(&lp.layer)?.ok_or("no index")?;
        floor += clip_core::profile::floor_bytes(&ix, &lp.ranges).1;
    }
    let mib = |b: u64| b as f64 / 1048576.0;
    println!(
        "floor (file ranges read, compressed): {:.2} MiB",
        mib(floor)
    );
    println!("| root | spans fetched | range requests | windows | total | total / floor | index of these layers |");
    println!("|---|---|---|---|---|---|---|");
    for (root, (bytes, requests, windows, index)) in args[1..].iter().zip(rows) {
        println!(
            "| {root} | {:.2} MiB | {requests} | {:.2} MiB | {:.2} MiB | {:.2} | {:.0} KiB |",
            mib(bytes),
            mib(windows),
            mib(bytes + windows),
            (bytes + windows) as f64 / floor.max(1) as f64,
            index as f64 / 1024.0
        );
    }
    Ok(())
}
