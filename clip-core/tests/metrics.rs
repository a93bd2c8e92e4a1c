//! The Prometheus endpoint over the OpenTelemetry instruments (own test binary: the global
//! meter provider is process-wide).

use std::io::{Read, Write};

#[tokio::test]
async fn prometheus_endpoint_serves_clip_metrics() {
    let exporter = clip_core::metrics::prometheus::install();
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
