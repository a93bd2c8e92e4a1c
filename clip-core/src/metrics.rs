//! OpenTelemetry instruments. Without an installed meter provider they cost next to nothing;
//! the daemon and the command line install an exporter when asked to.

use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use std::sync::OnceLock;

struct Instruments {
    registry_bytes: Counter<u64>,
    indexed_bytes: Counter<u64>,
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
