//! Writes the encoded index of a tar file (gzipped here) as a fuzzing seed:
//! `cargo run -p clip-core --example index_seed -- LAYER.tar OUT SPAN_SIZE`.
//! scripts/fuzz-seeds.sh makes the committed seeds with it.
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, tar, out, span] = &args[..] else {
        eprintln!("usage: index_seed LAYER.tar OUT SPAN_SIZE");
        std::process::exit(2);
    };
    let tar = std::fs::read(tar).expect("reading the tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).expect("gzip");
    let gz = gz.finish().expect("gzip");
    let opts = clip_core::index::BuildOptions {
        span_size: span.parse().expect("span size"),
        ..Default::default()
    };
    let built = clip_core::index::build_layer_index(&gz[..], &opts, |_| {}).expect("indexing");
    std::fs::write(out, clip_core::index::format::encode(&built.index)).expect("writing");
}
