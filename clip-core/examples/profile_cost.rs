// Throwaway analysis: cost of replaying a profile under chunk/checkpoint strategies.
use clip_core::digest::Digest;
use clip_core::index::LayerIndex;
use clip_core::store::Store;
use std::path::Path;

fn merge(mut v: Vec<(u64, u64)>, gap: u64) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(l) if s <= l.1 + gap => l.1 = l.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}



fn cost(need: &[(u64, u64)], ck: &LayerIndex, grid: &LayerIndex, gap: u64) -> (u64, u64) {
    let mut iv = Vec::new();
    for &(s, e) in need {
        for g in grid.spans_covering(s, e - s) {
            let (gs, _) = grid.span_range(g);
            let (_, gce) = grid.span_compressed_range(g);
            let k = ck.spans_covering(gs, 1).start;
            let (kcs, _) = ck.span_compressed_range(k);
            iv.push((kcs, gce));
        }
    }
    let m = merge(iv, gap);
    (m.iter().map(|x| x.1 - x.0).sum(), m.len() as u64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let m: Digest = args[1].parse().unwrap();
    let stores: Vec<Store> = args[2..].iter().map(|r| Store::open(Path::new(r)).unwrap()).collect();
    let prof = stores[0].get_profile(&m).unwrap();
    let fine = stores.len() - 1; // last root: the finest grid
    let mut floor = 0f64;
    let mut rows: Vec<(String, u64, u64, u64)> = Vec::new();
    for lp in &prof.layers {
        let ixs: Vec<LayerIndex> = stores.iter().map(|s| s.get_layer(&lp.layer).unwrap().unwrap().0).collect();
        let need = merge(lp.ranges.iter().map(|&(o, n)| (o, o + n)).collect(), 0);
        floor += clip_core::profile::floor_bytes(&ixs[fine], &lp.ranges).1 as f64;
        let mut k = 0;
        for (i, ix) in ixs.iter().enumerate() {
            let w = ix.windows.size / ix.spans.len().max(1) as u64;
            for (grid, gname) in [(i, "whole"), (fine, "fine-ends")] {
                for gap in [0u64, 64 << 10] {
                    let (b, n) = cost(&need, ix, &ixs[grid], gap);
                    let name = format!("{} {gname} gap{}k", args[2 + i], gap >> 10);
                    if rows.len() <= k { rows.push((name, 0, 0, 0)); }
                    rows[k].1 += b; rows[k].2 += n; rows[k].3 += n * w;
                    k += 1;
                }
            }
        }
    }
    println!("floor {:.2} MiB", floor / 1048576.0);
    for (n, b, q, w) in rows {
        println!("{n:45} data {:6.2} MiB requests {q:5} windows {:5.2} MiB total {:6.2} MiB", b as f64 / 1048576.0, w as f64 / 1048576.0, (b + w) as f64 / 1048576.0);
    }
}
