//! How long a mount's tables take to build for an image whose indexes are in a clip root: the
//! part of every cold start spent between containerd's Prepare and the FUSE mount.
//!
//! ```text
//! cargo run --release -p clip-fuse --example mount_tables -- ROOT LAYER...
//! ```
//! `LAYER`s are the image's layer digests, bottom first. Prints the median of 5 builds of each
//! step: decoding the stored indexes, merging them (`ImageView::build`), the filesystem's
//! tables (`ClipFs::new`).

use clip_core::fetch::{FetchConfig, Fetcher};
use clip_core::index::view::ImageView;
use clip_core::reader::{LayerReader, ReaderConfig};
use clip_core::source::fake::FakeSource;
use clip_core::store::Store;
use clip_core::Digest;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        return Err("usage: mount_tables ROOT LAYER...".into());
    }
    let store = Store::open(Path::new(&args[0]))?;
    let layers: Vec<Digest> = args[1..]
        .iter()
        .map(|l| l.parse())
        .collect::<Result<_, _>>()?;
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    let fetcher = Fetcher::new(
        Arc::new(clip_core::cache::TieredCache::memory_only(1 << 20)),
        FetchConfig::default(),
    );
    let source = Arc::new(FakeSource::default());
    let (mut dec, mut merge, mut tables) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let mut indexes = Vec::new();
        for l in &layers {
            let (ix, _) = store.get_layer(l)?.ok_or("layer not in the store")?;
            indexes.push(Arc::new(ix));
        }
        dec.push(t.elapsed().as_secs_f64() * 1e3);
        let readers: Vec<Arc<LayerReader>> = indexes
            .iter()
            .map(|ix| {
                LayerReader::new(
                    &fetcher,
                    source.clone(),
                    ix.clone(),
                    None,
                    ReaderConfig::default(),
                )
            })
            .collect();
        let t = Instant::now();
        let view = ImageView::build(indexes)?;
        merge.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let fs = clip_fuse::ClipFs::new(&view, readers)?;
        tables.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(fs.inode_count() > 0);
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "decode {:.1} ms, merge {:.1} ms, filesystem tables {:.1} ms",
        med(&mut dec),
        med(&mut merge),
        med(&mut tables)
    );
    Ok(())
}
