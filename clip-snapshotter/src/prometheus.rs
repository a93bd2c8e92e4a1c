//! A Prometheus scrape endpoint over clip's OpenTelemetry instruments.
//!
//! The OpenTelemetry Prometheus exporter crate is discontinued (and pulls an unmaintained
//! protobuf crate), so this renders the text exposition format itself from a manual reader:
//! counters as `<name>_total`, histograms as `_bucket`/`_sum`/`_count`, units as suffixes.

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
                    AggregatedMetrics::U64(d) => render_data(&mut out, &name, m.description(), d),
                    AggregatedMetrics::I64(d) => render_data(&mut out, &name, m.description(), d),
                    AggregatedMetrics::F64(d) => render_data(&mut out, &name, m.description(), d),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn prometheus_endpoint_serves_clip_metrics() {
        let exporter = install();
        clip_core::metrics::registry_bytes(1234);
        clip_core::metrics::cache_hit("memory");
        clip_core::metrics::cache_hit("memory");
        clip_core::metrics::cache_hit("disk");
        clip_core::metrics::cache_miss();
        clip_core::metrics::inflated(1 << 20, 0.002);
        clip_core::metrics::span_fetch(0.015, 2);
        clip_core::metrics::registry_request("2xx", 0.004);
        clip_core::metrics::registry_retry();
        clip_core::metrics::cache_size("memory", 4096);
        clip_core::metrics::cache_size("memory", -1024);
        clip_core::metrics::cache_eviction("disk");
        let text = exporter.render();
        for want in [
            "clip_registry_bytes_total 1234",
            "clip_cache_hits_total{tier=\"memory\"} 2",
            "clip_cache_hits_total{tier=\"disk\"} 1",
            "clip_cache_misses_total 1",
            "clip_inflate_bytes_total 1048576",
            "# TYPE clip_span_fetch_seconds histogram",
            "clip_span_fetch_seconds_count{spans=\"2\"} 1",
            "clip_registry_requests_total{outcome=\"2xx\"} 1",
            "clip_registry_request_seconds_count{outcome=\"2xx\"} 1",
            "clip_registry_retries_total 1",
            "clip_cache_size_bytes{tier=\"memory\"} 3072",
            "clip_cache_evictions_total{tier=\"disk\"} 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        tokio::spawn(exporter.clone().serve(addr));
        let body = tokio::task::spawn_blocking(move || {
            for _ in 0..50 {
                if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut out = String::new();
                    s.read_to_string(&mut out).unwrap();
                    return out;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            panic!("metrics endpoint did not come up");
        })
        .await
        .unwrap();
        assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
        assert!(body.contains("clip_cache_misses_total 1"), "{body}");
    }
}
