//! clip-fuse: one read-only FUSE mount per image presenting the **merged** root filesystem of all
//! its layers (whiteouts and opaque directories applied at index-merge time), with file bytes
//! read lazily through clip-core's tiered cache.
//!
//! One merged mount instead of one FUSE mount per layer stacked by overlayfs: every lookup is
//! answered once, from prebuilt in-memory tables, not once per layer.
//!
//! [`fs::ClipFs`] is the filesystem as a plain type (inodes, lookups, directory listings, reads)
//! that knows nothing of FUSE and is tested without a kernel; [`adapter`] is the thin fuser
//! binding that answers kernel requests from it, mapping errors to errno at that edge.

pub mod adapter;
pub mod fs;
pub mod handover;
mod metrics;

pub use adapter::{
    kernel_allows_idmap, mount, mount_with, resume, Guesses, Handover, MountOptions,
    DEFAULT_PASSTHROUGH_MIN_SIZE, DEFAULT_PREFETCH_ON_OPEN, DEFAULT_SPECULATE_SIBLINGS,
    MAX_WORKER_THREADS,
};
pub use fs::{ClipFs, FsError, ScanError};
pub use fuser::BackgroundSession;
