//! OpenTelemetry instruments. Without an installed meter provider they cost next to nothing;
//! the daemon and the command line install an exporter when asked to.

use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::KeyValue;
use std::sync::OnceLock;

struct Instruments {
    registry_bytes: Counter<u64>,
    indexed_bytes: Counter<u64>,
    cache_hits: Counter<u64>,
    cache_misses: Counter<u64>,
    inflated_bytes: Counter<u64>,
    inflate_seconds: Counter<f64>,
    span_fetch_seconds: Histogram<f64>,
}

fn instruments() -> &'static Instruments {
    static I: OnceLock<Instruments> = OnceLock::new();
    I.get_or_init(|| {
        let meter = opentelemetry::global::meter("clip");
        Instruments {
            registry_bytes: meter
                .u64_counter("clip.registry.bytes")
                .with_description("Bytes received from registries")
                .with_unit("By")
                .build(),
            indexed_bytes: meter
                .u64_counter("clip.index.bytes")
                .with_description("Uncompressed bytes indexed")
                .with_unit("By")
                .build(),
            cache_hits: meter
                .u64_counter("clip.cache.hits")
                .with_description("Span reads served by a cache tier")
                .build(),
            cache_misses: meter
                .u64_counter("clip.cache.misses")
                .with_description("Span reads no cache tier had")
                .build(),
            inflated_bytes: meter
                .u64_counter("clip.inflate.bytes")
                .with_description("Bytes inflated for lazy reads")
                .with_unit("By")
                .build(),
            inflate_seconds: meter
                .f64_counter("clip.inflate.seconds")
                .with_description("CPU time inflating")
                .with_unit("s")
                .build(),
            span_fetch_seconds: meter
                .f64_histogram("clip.span.fetch.seconds")
                .with_description("Latency of fetching a run of spans from the registry")
                .with_unit("s")
                .build(),
        }
    })
}

pub fn registry_bytes(n: u64) {
    instruments().registry_bytes.add(n, &[]);
}

pub fn indexed_bytes(n: u64, layer: &str) {
    instruments()
        .indexed_bytes
        .add(n, &[KeyValue::new("layer", layer.to_string())]);
}

pub fn cache_hit(tier: &'static str) {
    instruments()
        .cache_hits
        .add(1, &[KeyValue::new("tier", tier)]);
}

pub fn cache_miss() {
    instruments().cache_misses.add(1, &[]);
}

pub fn inflated(bytes: u64, seconds: f64) {
    let i = instruments();
    i.inflated_bytes.add(bytes, &[]);
    i.inflate_seconds.add(seconds, &[]);
}

pub fn span_fetch(seconds: f64, spans: usize) {
    instruments()
        .span_fetch_seconds
        .record(seconds, &[KeyValue::new("spans", spans as i64)]);
}
