//! The filesystem's OpenTelemetry instruments: bytes served through the daemon, opens by mode,
//! requests the kernel sent by kind (each one a round trip), bytes stored in the page cache at
//! opens.

use opentelemetry::metrics::Counter;
use opentelemetry::KeyValue;
use std::sync::OnceLock;

struct Instruments {
    read_bytes: Counter<u64>,
    opens: Counter<u64>,
    libraries: Counter<u64>,
    programs: Counter<u64>,
    requests: Counter<u64>,
    stored: Counter<u64>,
}

fn instruments() -> &'static Instruments {
    static I: OnceLock<Instruments> = OnceLock::new();
    I.get_or_init(|| {
        let meter = opentelemetry::global::meter("clip");
        Instruments {
            read_bytes: meter
                .u64_counter("clip.fuse.read.bytes")
                .with_description("File bytes served by the daemon over FUSE (not passthrough)")
                .with_unit("By")
                .build(),
            opens: meter
                .u64_counter("clip.fuse.opens")
                .with_description("File opens by mode: daemon (page-cached) or passthrough")
                .build(),
            libraries: meter
                .u64_counter("clip.fuse.libraries.prefetched")
                .with_description(
                    "Shared libraries fetched because an opened program or library needs them",
                )
                .build(),
            programs: meter
                .u64_counter("clip.fuse.programs.prefetched")
                .with_description(
                    "Programs (and script interpreters) fetched as a container starts, before \
                     the runtime execs them: read from containerd's record of the container",
                )
                .build(),
            requests: meter
                .u64_counter("clip.fuse.requests")
                .with_description(
                    "FUSE requests answered, by kind: each is a round trip from the kernel",
                )
                .build(),
            stored: meter
                .u64_counter("clip.fuse.stored.bytes")
                .with_description(
                    "File bytes written into the kernel's page cache as files were opened \
                     (their READs then cost no round trip)",
                )
                .with_unit("By")
                .build(),
        }
    })
}

pub fn read(bytes: u64) {
    instruments().read_bytes.add(bytes, &[]);
}

pub fn open(mode: &'static str) {
    instruments().opens.add(1, &[KeyValue::new("mode", mode)]);
}

pub fn library_prefetched() {
    instruments().libraries.add(1, &[]);
}

pub fn program_prefetched() {
    instruments().programs.add(1, &[]);
}

/// One FUSE request of kind `op` answered.
pub fn request(op: &'static str) {
    instruments().requests.add(1, &[KeyValue::new("op", op)]);
}

/// `bytes` of an opened file stored in the kernel's page cache.
pub fn stored(bytes: u64) {
    instruments().stored.add(bytes, &[]);
}
