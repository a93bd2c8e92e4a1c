//! A hostile index must never panic the path from its bytes to a file's bytes: decoding, the
//! merged view (the index alone and stacked on itself), the filesystem built on it, every
//! lookup, and reads of its files through the fetcher and the cache, from a source that
//! answers any range with bytes derived from the input (never the layer the index claims, so
//! reads fail verification: an error, never a panic).
#![no_main]
use bytes::Bytes;
use clip_core::cache::TieredCache;
use clip_core::digest::Digest;
use clip_core::fetch::{FetchConfig, Fetcher};
use clip_core::index::{format, view::ImageView, LayerIndex};
use clip_core::reader::{LayerReader, ReaderConfig};
use clip_core::registry::RegistryError;
use clip_core::source::BlobSource;
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};

#[path = "reseal.rs"]
mod reseal;

/// Any range of any blob: the input's bytes, repeated to the length asked (at most 1 MiB).
struct Echo(Bytes);

#[async_trait::async_trait]
impl BlobSource for Echo {
    async fn read_range(&self, _: &Digest, start: u64, len: u64) -> Result<Bytes, RegistryError> {
        if len > 1 << 20 || self.0.is_empty() {
            return Err(RegistryError::Other("range too large for the fuzz source".into()));
        }
        let at = (start % self.0.len() as u64) as usize;
        let mut out = Vec::with_capacity(len as usize);
        out.extend_from_slice(&self.0[at..]);
        while out.len() < len as usize {
            out.extend_from_slice(&self.0);
        }
        out.truncate(len as usize);
        Ok(out.into())
    }

    async fn read_blob(&self, blob: &Digest, _: u64) -> Result<Bytes, RegistryError> {
        Err(RegistryError::NotFound {
            what: blob.to_string(),
        })
    }

    fn describe(&self) -> String {
        "fuzz".into()
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    })
}

/// The input as an index: as it is, else resealed (a valid checksum over the fuzzed body).
fn index_of(data: &[u8]) -> Option<LayerIndex> {
    if let Ok(ix) = format::decode(data) {
        return Some(ix);
    }
    let sealed = reseal::reseal(data)?;
    format::decode(&sealed).ok()
}

fuzz_target!(|data: &[u8]| {
    let Some(ix) = index_of(data) else { return };
    let ix = Arc::new(ix);
    for i in 0..ix.spans.len() {
        let _ = (ix.span_range(i), ix.span_compressed_range(i));
    }
    let _ = ix.spans_covering(ix.uncompressed_size / 3, ix.uncompressed_size);
    let fetcher = Fetcher::new(
        Arc::new(TieredCache::memory_only(8 << 20)),
        FetchConfig {
            run_bytes: 256 << 10,
            verify_attempts: 1,
            ..FetchConfig::default()
        },
    );
    let source: Arc<dyn BlobSource> = Arc::new(Echo(Bytes::copy_from_slice(data)));
    for layers in [vec![ix.clone()], vec![ix.clone(), ix.clone()]] {
        let Ok(view) = ImageView::build(layers.clone()) else { continue };
        let _ = view.check();
        let readers: Vec<Arc<LayerReader>> = layers
            .iter()
            .map(|l| {
                LayerReader::new(
                    &fetcher,
                    source.clone(),
                    l.clone(),
                    None,
                    ReaderConfig {
                        readahead_bytes: 256 << 10,
                        locality_bytes: 256 << 10,
                    },
                )
            })
            .collect();
        let _ = clip_fuse::ClipFs::new(&view, readers.clone());
        let mut reads = 0;
        for (path, node) in view.nodes.iter().take(4096) {
            let _ = view.get(path);
            let Some((layer, offset, size)) = view.file_data(node) else { continue };
            if reads >= 8 {
                continue;
            }
            reads += 1;
            let Some(reader) = readers.get(layer as usize) else { continue };
            let len = size.min(64 << 10);
            let _ = runtime().block_on(reader.read(offset, len));
            let _ = runtime().block_on(reader.read(offset.saturating_add(size / 2), 1));
        }
    }
});
