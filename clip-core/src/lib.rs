//! clip-core: the engine behind clip's lazy container images.
//!
//! clip starts containers from ordinary (unmodified) gzip OCI images without downloading them first.
//! The pieces here know nothing of FUSE or gRPC:
//!
//! - [`reference`]: parsing `host[:port]/repo[:tag][@digest]` with Docker Hub defaults.
//! - [`registry`]: an OCI distribution client: auth (basic, bearer tokens, docker config), mirrors
//!   and insecure hosts from containerd `hosts.toml`, retries with backoff under a deadline,
//!   range reads, resumable blob streams, pushes of index artifacts.
//! - [`gzip`]: random access into gzip streams (zran): checkpoints at deflate block boundaries
//!   with their 32 KiB windows, so any span can be inflated without starting from the beginning.
//! - [`index`]: the per-layer index (every tar entry, where each file's bytes sit in the
//!   uncompressed tar stream, checkpoints and a digest per span), its builder (one streaming
//!   pass), its versioned checksummed binary format, and the merged view of an image's layers.
//! - [`zstdchunked`]: zstd:chunked layers indexed from their table of contents, and their spans
//!   decoded frame by frame.
//! - [`cache`]: the tiered span cache (bounded memory, bounded disk, shared Redis), verified.
//! - [`reader`]: lazy reads of a layer's byte ranges, assembled from spans.
//! - [`fetch`]: spans no tier has: single flight, runs, range requests, inflate, verify,
//!   write-back; fetch permits and registry/inflate counters.
//! - [`source`]: the blob-source seam (the registry client, and a fake with scripted faults).
//! - [`profile`]: startup profiles: what a container read first, replayed as prefetch.
//! - [`store`]: the local sled database holding indexes and image records across restarts.
//! - [`image`]: indexing whole images (registry -> builder -> store) and loading their indexes.
//! - [`artifact`]: publishing and discovering indexes in the registry as OCI referrers.
//! - [`metrics`]: OpenTelemetry instruments.

pub mod artifact;
pub mod budget;
pub mod cache;
pub mod digest;
pub mod elf;
pub mod fetch;
pub mod gzip;
pub mod image;
pub mod index;
pub mod limits;
pub mod metrics;
pub mod profile;
pub mod reader;
pub mod reference;
pub mod registry;
pub mod signature;
pub mod source;
pub mod store;
mod tarscan;
#[cfg(test)]
mod testutil;
pub mod zstdchunked;
pub mod zstdseek;

#[cfg(test)]
#[global_allocator]
static ALLOC: testutil::alloc_meter::Meter = testutil::alloc_meter::Meter;

pub use digest::Digest;
pub use reference::Reference;
