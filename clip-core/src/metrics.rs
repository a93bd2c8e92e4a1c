//! OpenTelemetry instruments. Without an installed meter provider they cost next to nothing;
//! the daemon and the command line install an exporter when asked to.

use opentelemetry::metrics::{Counter, Histogram, UpDownCounter};
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
    registry_requests: Counter<u64>,
    registry_retries: Counter<u64>,
    registry_request_seconds: Histogram<f64>,
    cache_bytes: UpDownCounter<i64>,
    cache_evictions: Counter<u64>,
    fuse_read_bytes: Counter<u64>,
    fuse_opens: Counter<u64>,
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
            fuse_read_bytes: meter
                .u64_counter("clip.fuse.read.bytes")
                .with_description("File bytes served by the daemon over FUSE (not passthrough)")
                .with_unit("By")
                .build(),
            fuse_opens: meter
                .u64_counter("clip.fuse.opens")
                .with_description("File opens by mode: daemon (page-cached) or passthrough")
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

pub fn fuse_read(bytes: u64) {
    instruments().fuse_read_bytes.add(bytes, &[]);
}

pub fn fuse_open(mode: &'static str) {
    instruments()
        .fuse_opens
        .add(1, &[KeyValue::new("mode", mode)]);
}

pub fn span_fetch(seconds: f64, spans: usize) {
    instruments()
        .span_fetch_seconds
        .record(seconds, &[KeyValue::new("spans", spans as i64)]);
}

/// A Prometheus scrape endpoint over clip's OpenTelemetry instruments.
///
/// The OpenTelemetry Prometheus exporter crate is discontinued (and pulls an unmaintained
/// protobuf crate), so this renders the text exposition format itself from a manual reader:
/// counters as `<name>_total`, histograms as `_bucket`/`_sum`/`_count`, units as suffixes.
pub mod prometheus {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
    use opentelemetry_sdk::metrics::reader::MetricReader;
    use opentelemetry_sdk::metrics::{
        InstrumentKind, ManualReader, Pipeline, SdkMeterProvider, Temporality,
    };
    use std::fmt::Write as _;
    use std::sync::{Arc, Weak};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[derive(Debug, Clone)]
    struct SharedReader(Arc<ManualReader>);

    impl MetricReader for SharedReader {
        fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
            self.0.register_pipeline(pipeline)
        }
        fn collect(&self, rm: &mut ResourceMetrics) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.collect(rm)
        }
        fn force_flush(&self) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.force_flush()
        }
        fn shutdown_with_timeout(
            &self,
            t: std::time::Duration,
        ) -> opentelemetry_sdk::error::OTelSdkResult {
            self.0.shutdown_with_timeout(t)
        }
        fn temporality(&self, kind: InstrumentKind) -> Temporality {
            self.0.temporality(kind)
        }
    }

    /// Installed as the global meter provider; renders what it has collected.
    pub struct Exporter {
        reader: SharedReader,
        _provider: SdkMeterProvider,
    }

    /// Installs the exporter as the global meter provider. Call before the first metric is
    /// recorded (instruments bind to the provider that is global when they are created).
    pub fn install() -> Arc<Exporter> {
        let reader = SharedReader(Arc::new(ManualReader::builder().build()));
        let provider = SdkMeterProvider::builder()
            .with_reader(reader.clone())
            .build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Arc::new(Exporter {
            reader,
            _provider: provider,
        })
    }

    fn sanitize(name: &str) -> String {
        name.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    }

    fn labels(
        attrs: impl Iterator<Item = impl std::borrow::Borrow<opentelemetry::KeyValue>>,
        extra: Option<(&str, String)>,
    ) -> String {
        let mut parts: Vec<String> = attrs
            .map(|kv| {
                let kv = kv.borrow();
                format!(
                    "{}=\"{}\"",
                    sanitize(kv.key.as_str()),
                    kv.value.as_str().replace('\\', "\\\\").replace('"', "\\\"")
                )
            })
            .collect();
        if let Some((k, v)) = extra {
            parts.push(format!("{k}=\"{v}\""));
        }
        if parts.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", parts.join(","))
        }
    }

    fn render_data<T: Copy + std::fmt::Display>(
        out: &mut String,
        name: &str,
        help: &str,
        data: &MetricData<T>,
    ) {
        match data {
            MetricData::Sum(s) => {
                let (name, kind) = if s.is_monotonic() {
                    (format!("{name}_total"), "counter")
                } else {
                    (name.to_string(), "gauge")
                };
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
                for p in s.data_points() {
                    let _ = writeln!(out, "{name}{} {}", labels(p.attributes(), None), p.value());
                }
            }
            MetricData::Gauge(g) => {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for p in g.data_points() {
                    let _ = writeln!(out, "{name}{} {}", labels(p.attributes(), None), p.value());
                }
            }
            MetricData::Histogram(h) => {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
                for p in h.data_points() {
                    let mut cumulative = 0;
                    let bounds: Vec<f64> = p.bounds().collect();
                    for (i, c) in p.bucket_counts().enumerate() {
                        cumulative += c;
                        let le = bounds.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                        let _ = writeln!(
                            out,
                            "{name}_bucket{} {cumulative}",
                            labels(p.attributes(), Some(("le", le)))
                        );
                    }
                    let l = labels(p.attributes(), None);
                    let _ = writeln!(
                        out,
                        "{name}_sum{l} {}\n{name}_count{l} {}",
                        p.sum(),
                        p.count()
                    );
                }
            }
            MetricData::ExponentialHistogram(_) => {}
        }
    }

    impl Exporter {
        /// The current values in Prometheus' text exposition format.
        pub fn render(&self) -> String {
            let mut rm = ResourceMetrics::default();
            if let Err(e) = self.reader.collect(&mut rm) {
                return format!("# collection failed: {e}\n");
            }
            let mut out = String::new();
            for scope in rm.scope_metrics() {
                for m in scope.metrics() {
                    let unit = match m.unit() {
                        "By" => "_bytes",
                        "s" => "_seconds",
                        _ => "",
                    };
                    let base = sanitize(m.name());
                    let name = if unit.is_empty() || base.ends_with(unit) {
                        base
                    } else {
                        format!("{base}{unit}")
                    };
                    let name = name
                        .replace("_bytes_bytes", "_bytes")
                        .replace("_seconds_seconds", "_seconds");
                    match m.data() {
                        AggregatedMetrics::U64(d) => {
                            render_data(&mut out, &name, m.description(), d)
                        }
                        AggregatedMetrics::I64(d) => {
                            render_data(&mut out, &name, m.description(), d)
                        }
                        AggregatedMetrics::F64(d) => {
                            render_data(&mut out, &name, m.description(), d)
                        }
                    }
                }
            }
            out
        }

        /// Serves `GET /metrics` on `addr` until the task is dropped.
        pub async fn serve(self: Arc<Self>, addr: std::net::SocketAddr) -> std::io::Result<()> {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(%addr, "serving Prometheus metrics on /metrics");
            loop {
                let (mut conn, _) = listener.accept().await?;
                let me = self.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = match tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        conn.read(&mut buf),
                    )
                    .await
                    {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                    let req = String::from_utf8_lossy(&buf[..n]);
                    let (status, body) = if req.starts_with("GET /metrics") {
                        ("200 OK", me.render())
                    } else {
                        ("404 Not Found", "try /metrics\n".to_string())
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        }
    }
}
