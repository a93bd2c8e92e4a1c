//! clip's end-to-end tests: one test binary, real parts only (Debian's docker-registry, skopeo,
//! openssl, the built `clip` binary). Each test starts its own registry in a temp dir.
//!
//! A missing real part is a failure with a clear message, never a skip: run
//! `scripts/install-deps.sh` (or the README's test command) first.

mod bulk;
mod common;
mod conformance;
mod cri;
mod docker;
mod dropin;
mod faults;
mod fuse_mount;
mod gc;
mod index_cli;
mod large_image;
mod lazy_reads;
mod memory;
mod registry_auth;
mod snapshotter;
mod userns;
mod zstd;
