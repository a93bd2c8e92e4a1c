//! `clip`: lazy container images. This binary hosts the command line and the containerd
//! snapshotter daemon (`clip snapshotter`).

mod cli;
mod commands;
mod config;
mod containerd;
mod cri;
mod daemon;
mod gc;
mod labels;
mod node;
mod os;
mod prometheus;
mod pull;
mod snapshotter;
mod trust;

use clap::Parser;

/// Threads for blocking work (tokio's default is 512): with 64, a disk tier stalled on I/O
/// holds at most 64 threads and their descriptors.
const BLOCKING_THREADS: usize = 64;

fn main() {
    limit_malloc_arenas();
    // Everything clip creates (state, caches, sockets, logs) is private to root from the moment it
    // exists: the cache holds image files other users must not read (0600 files in images, keys).
    // The few paths that must be wider say so where they are made.
    // SAFETY: umask(2) only sets this process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    if let Err(e) = cli::refuse_secrets_in(std::env::args()) {
        eprintln!("clip: error: {e}");
        std::process::exit(2);
    }
    let cli = cli::Cli::parse();
    let filter = match cli.global.verbose {
        // fuser logs every request it has no handler for at warn; those are answered correctly.
        0 => "warn,fuser=error",
        1 => "info,clip_core=info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CLIP_LOG")
                .unwrap_or_else(|_| filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let cli::Command::FuseKeeper(a) = &cli.command {
        // No runtime: a small single-threaded process that must outlive the daemon.
        if let Err(e) = clip_fuse::handover::run_keeper(&a.socket) {
            eprintln!("clip fuse-keeper: error: {e}");
            std::process::exit(1);
        }
        return;
    }
    // Blocking work (inflating, disk-tier reads and writes, mounting) runs on at most
    // BLOCKING_THREADS threads; more waits its turn. FUSE mounts have their own bounded pool
    // (clip_fuse::MAX_WORKER_THREADS).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("clip: error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(commands::run(cli)) {
        eprintln!("clip: error: {e:#}");
        std::process::exit(1);
    }
}

/// Keeps RSS close to live data. glibc gives threads their own arenas, and after large frees it
/// raises its mmap threshold so later span buffers come from (fragmenting) arenas instead of
/// being mapped and unmapped. Two arenas and a fixed 64 KiB mmap threshold (which also turns the
/// dynamic adjustment off; spans are 64-128 KiB and up) return span memory to the system as soon
/// as it is freed. At 256 KiB, 128 KiB spans fragmented the arenas: +17 MiB of peak RSS in the
/// memory-cap test.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 64 * 1024);
    }
}
