//! The daemon's one memory budget (issue "Weeks of uptime"): a full warm of the large image,
//! every layer fetched and inflated at once and then every file read by a container, leaves the
//! daemon's peak resident memory within the budget plus a fixed overhead, even with a memory
//! tier configured far larger than the budget.

use crate::common::*;
use crate::snapshotter::{out, Node};

const MIB: u64 = 1 << 20;
/// The budget under test: the least the daemon accepts.
const BUDGET: u64 = 256 * MIB;
/// What the daemon holds outside the budget: code and static data, thread stacks touched, FUSE
/// request buffers, the gRPC and HTTP clients, the allocator's slack. On 2026-12-07 the peak
/// was 277 MiB (21 MiB over the budget; an idle daemon holds 21 MiB); without the budget's
/// accounting the same run peaked at 982 MiB.
const OVERHEAD: u64 = 64 * MIB;

/// (VmHWM, VmRSS) of a process, in bytes.
fn memory_of(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[test]
fn a_full_warm_of_the_large_image_stays_within_the_memory_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let served = crate::large_image::served(tmp.path());
    let dir = tmp.path().join("node");
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("clip.toml");
    // A memory tier eight times the budget: only the budget's accounting holds it back.
    std::fs::write(&cfg, "[cache]\nbudget = \"256MiB\"\nmemory = \"2GiB\"\n").unwrap();
    let node = Node::start_with(&dir, &["--config", cfg.to_str().unwrap()]);
    let pid = node.snapshotter_pid();
    let (idle, _) = memory_of(pid);
    // Every layer fetched and inflated in parallel at pull time (bulk runs on every core).
    let b0 = served.proxy.sent();
    let o = std::process::Command::new(clip_bin())
        .arg("--root")
        .arg(node.clip_root())
        .args(["pull", "--full", &served.image, "--address"])
        .arg(node.dir.join("containerd.sock"))
        .env("HOME", &node.dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let fetched = served.proxy.sent() - b0;
    assert!(
        fetched > served.bytes * 9 / 10,
        "the full pull fetched {fetched} of {} bytes",
        served.bytes
    );
    let (after_pull, _) = memory_of(pid);
    // Then a container reads every file of the image.
    let o = node.run(
        "clip",
        &served.image,
        "warm",
        &[
            "sh",
            "-c",
            "tar cf - --exclude=./proc --exclude=./sys --exclude=./dev -C / . | wc -c",
        ],
    );
    let tarred: u64 = out(&o)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{}", stderr(&o)));
    assert!(tarred > 600 * MIB, "the tar read {tarred} bytes");
    let (peak, rss) = memory_of(pid);
    let m = node.metrics();
    let used = metric(&m, "clip_memory_used_bytes");
    let budget = metric(&m, "clip_memory_budget_bytes");
    let evictions = metric(&m, "clip_cache_evictions_total");
    eprintln!(
        "memory budget {} MiB: daemon peak RSS {} MiB (idle {} MiB, after clip pull --full {} \
         MiB), RSS now {} MiB, charged now {} MiB; {} MiB fetched, {} MiB read by tar, {} \
         evictions",
        BUDGET / MIB,
        peak / MIB,
        idle / MIB,
        after_pull / MIB,
        rss / MIB,
        used as u64 / MIB,
        fetched / MIB,
        tarred / MIB,
        evictions
    );
    assert_eq!(budget as u64, BUDGET, "{m}");
    assert!(used as u64 <= BUDGET, "{used} bytes charged: {m}");
    // The budget was pressed: the spans went through a tier that could not keep them all.
    assert!(evictions > 0.0, "{m}");
    assert!(
        peak <= BUDGET + OVERHEAD,
        "peak RSS {} MiB is over the budget ({} MiB) plus the overhead ({} MiB)",
        peak / MIB,
        BUDGET / MIB,
        OVERHEAD / MIB
    );
}
