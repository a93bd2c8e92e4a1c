//! The engine's OpenTelemetry instruments (registry, cache, inflate). Without an installed meter
//! provider they cost next to nothing; the `clip` binary installs its Prometheus exporter when
//! asked to. The FUSE counters live in clip-fuse.

use opentelemetry::metrics::{
    Counter, Histogram, ObservableCounter, ObservableGauge, UpDownCounter,
};
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
    prefetched_spans: Counter<u64>,
    speculated_spans: Counter<u64>,
    bulk_layers: Counter<u64>,
    bulk_bytes: Counter<u64>,
    registry_requests: Counter<u64>,
    registry_retries: Counter<u64>,
    registry_request_seconds: Histogram<f64>,
    cache_bytes: UpDownCounter<i64>,
    cache_evictions: Counter<u64>,
    cache_write_failures: Counter<u64>,
    runs_in_flight: UpDownCounter<i64>,
    /// Read from the process's memory budget when collected.
    _memory: (
        ObservableGauge<u64>,
        ObservableGauge<u64>,
        ObservableCounter<u64>,
        ObservableCounter<u64>,
    ),
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
            prefetched_spans: meter
                .u64_counter("clip.prefetch.spans")
                .with_description("Spans fetched ahead of the program from a startup profile")
                .build(),
            speculated_spans: meter
                .u64_counter("clip.speculate.spans")
                .with_description(
                    "Spans fetched on a guess (files next to ones a program opened cold), once fetched",
                )
                .build(),
            bulk_layers: meter
                .u64_counter("clip.bulk.layers")
                .with_description(
                    "Layers switched to bulk streaming because a workload reads most of them, by \
                     reason (share, sequential, image, eager)",
                )
                .build(),
            bulk_bytes: meter
                .u64_counter("clip.bulk.bytes")
                .with_description("Uncompressed bytes streamed by bulk mode")
                .with_unit("By")
                .build(),
            span_fetch_seconds: meter
                .f64_histogram("clip.span.fetch.seconds")
                .with_description("Latency of fetching a run of spans from the registry")
                .with_unit("s")
                .build(),
            registry_requests: meter
                .u64_counter("clip.registry.requests")
                .with_description("Registry HTTP requests by outcome")
                .build(),
            registry_retries: meter
                .u64_counter("clip.registry.retries")
                .with_description("Registry attempts retried after a transient failure")
                .build(),
            registry_request_seconds: meter
                .f64_histogram("clip.registry.request.seconds")
                .with_description("Registry request latency (to response headers)")
                .with_unit("s")
                .build(),
            cache_bytes: meter
                .i64_up_down_counter("clip.cache.size")
                .with_description("Bytes held per cache tier")
                .with_unit("By")
                .build(),
            cache_evictions: meter
                .u64_counter("clip.cache.evictions")
                .with_description("Spans evicted per cache tier")
                .build(),
            cache_write_failures: meter
                .u64_counter("clip.cache.write_failures")
                .with_description(
                    "Spans a cache tier could not store (a full or failing disk): the read was \
                     served anyway, from the tier above or the registry",
                )
                .build(),
            runs_in_flight: meter
                .i64_up_down_counter("clip.fetch.runs")
                .with_description("Runs of spans being fetched from the registry now")
                .build(),
            _memory: (
                meter
                    .u64_observable_gauge("clip.memory.budget")
                    .with_description("The process's memory budget")
                    .with_unit("By")
                    .with_callback(|o| o.observe(crate::budget::process().limit(), &[]))
                    .build(),
                meter
                    .u64_observable_gauge("clip.memory.used")
                    .with_description(
                        "Memory charged to the budget: memory tier, decoded indexes, fetches in \
                         flight, database cache",
                    )
                    .with_unit("By")
                    .with_callback(|o| o.observe(crate::budget::process().used(), &[]))
                    .build(),
                meter
                    .u64_observable_counter("clip.memory.waits")
                    .with_description("Fetches that waited because the memory budget was spent")
                    .with_callback(|o| o.observe(crate::budget::process().pressure().0, &[]))
                    .build(),
                meter
                    .u64_observable_counter("clip.memory.uncached")
                    .with_description(
                        "Spans served without being kept in memory because the budget was spent",
                    )
                    .with_callback(|o| o.observe(crate::budget::process().pressure().1, &[]))
                    .build(),
            ),
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

/// One registry request: `outcome` is the HTTP status class or the transport failure.
pub fn registry_request(outcome: &'static str, seconds: f64) {
    let i = instruments();
    i.registry_requests
        .add(1, &[KeyValue::new("outcome", outcome)]);
    i.registry_request_seconds
        .record(seconds, &[KeyValue::new("outcome", outcome)]);
}

pub fn registry_retry() {
    instruments().registry_retries.add(1, &[]);
}

/// A cache tier grew (positive) or shrank (negative) by `delta` bytes.
pub fn cache_size(tier: &'static str, delta: i64) {
    instruments()
        .cache_bytes
        .add(delta, &[KeyValue::new("tier", tier)]);
}

pub fn cache_write_failure(tier: &'static str) {
    instruments()
        .cache_write_failures
        .add(1, &[KeyValue::new("tier", tier)]);
}

pub fn cache_eviction(tier: &'static str) {
    instruments()
        .cache_evictions
        .add(1, &[KeyValue::new("tier", tier)]);
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

/// A run's fetch started (`1`) or ended (`-1`).
pub fn run_in_flight(delta: i64) {
    instruments().runs_in_flight.add(delta, &[]);
}

pub fn prefetched(spans: usize) {
    instruments().prefetched_spans.add(spans as u64, &[]);
}

pub fn bulk_started(reason: &'static str) {
    instruments()
        .bulk_layers
        .add(1, &[KeyValue::new("reason", reason)]);
}

pub fn bulk_streamed(bytes: u64) {
    instruments().bulk_bytes.add(bytes, &[]);
}

pub fn speculated(spans: usize) {
    instruments().speculated_spans.add(spans as u64, &[]);
}

/// Creates the instruments now (the observable ones report from the first collection on).
pub fn init() {
    instruments();
}
