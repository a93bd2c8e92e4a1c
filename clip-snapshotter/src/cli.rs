//! What the user typed. Resolved into settings in `commands`.

use clap::{Args, Parser, Subcommand};
use clip_core::cache::CacheConfig;
use clip_core::index::DEFAULT_SPAN_SIZE;
use clip_core::registry::RegistryConfig;
use clip_fuse::{MountOptions, DEFAULT_PASSTHROUGH_MIN_SIZE};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "clip",
    version,
    about = "Start containers from OCI images without downloading them first"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug)]
pub struct GlobalArgs {
    /// Directory for clip's database, indexes and cache.
    #[arg(long, env = "CLIP_ROOT", global = true)]
    pub root: Option<PathBuf>,
    /// A registry host (host[:port]) that may be reached over plain HTTP or unverified TLS.
    /// Repeatable. localhost and 127.0.0.0/8 may always use plain HTTP.
    #[arg(long = "insecure-registry", value_name = "HOST", global = true)]
    pub insecure: Vec<String>,
    /// A token server on another host than its registry that may receive the registry's
    /// credentials (host or host:port). Repeatable. The registry's own host name and Docker
    /// Hub's auth.docker.io need none; any other token server is asked without credentials.
    #[arg(long = "token-realm", value_name = "HOST", global = true)]
    pub token_realms: Vec<String>,
    /// containerd-style registry host configuration directory (HOST/hosts.toml files).
    #[arg(long, env = "CLIP_HOSTS_DIR", value_name = "DIR", global = true)]
    pub hosts_dir: Option<PathBuf>,
    /// Platform to select from multi-platform images (os/arch[/variant]); default: this machine.
    #[arg(long, global = true)]
    pub platform: Option<String>,
    /// Give up on a registry operation (including retries) after this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = RegistryConfig::default().deadline.as_secs(), global = true)]
    pub registry_timeout: u64,
    /// Retry a registry response whose headers or next body chunk take longer than this.
    #[arg(long, value_name = "SECONDS", default_value_t = RegistryConfig::default().stall_timeout.as_secs(), global = true)]
    pub stall_timeout: u64,
    /// Serve Prometheus metrics (OpenTelemetry instruments) on this address, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR", global = true)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// More log output (-v: info, -vv: debug). CLIP_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build the index of an image (one streaming pass per layer) and store it locally.
    Index(IndexArgs),
    /// Show an image's layers, files and index sizes, or where one file's bytes are.
    Inspect(InspectArgs),
    /// Write one file of an image to stdout, reading lazily through the cache tiers.
    Cat(CatArgs),
    /// Read every file of an image into the cache (pre-warming a node).
    Warm(WarmArgs),
    /// Fetch every span of an image into the cache in the background order (layer by layer),
    /// under a bandwidth cap; Ctrl-C stops it cleanly.
    Fill(FillArgs),
    /// Mount an image's merged root filesystem read-only at DIR (foreground; Ctrl-C or SIGTERM
    /// unmounts).
    Mount(MountArgs),
    /// Unmount a clip mount.
    Umount(UmountArgs),
    /// Pull an image into containerd for the clip snapshotter: layers with a clip index become
    /// lazy snapshots and are not downloaded; others are downloaded and unpacked as usual. Then
    /// `ctr run --snapshotter clip REF ...` starts it.
    Pull(PullArgs),
    /// Record an image's startup profile: run CMD in the image (mounted lazily, chrooted, in
    /// private mount and pid namespaces), note which byte ranges of which layers it reads, and
    /// publish the profile next to the image's index so that later cold starts on any node
    /// prefetch them. Run it where a publisher runs `clip index --push` (CI).
    Profile(ProfileArgs),
    /// Run the containerd snapshotter daemon (a proxy plugin serving the snapshots API on a
    /// unix socket; see docs/snapshotter.md).
    Snapshotter(SnapshotterArgs),
    /// Show what clip keeps under its root and why (indexes, windows, image records, profiles,
    /// temporaries, caches); with --apply, remove what nothing has used for the grace period.
    /// Asks the running daemon when there is one.
    Gc(GcArgs),
    /// Hold the snapshotter's FUSE connections so that they outlive a daemon restart (started
    /// by `clip snapshotter`; not run by hand).
    #[command(hide = true)]
    FuseKeeper(FuseKeeperArgs),
}

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Image reference (its index must be published or in the local store).
    pub reference: String,
    /// Record at most this many seconds after the first read (the command may run longer).
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Keep the profile in the local store only; do not push it to the registry.
    #[arg(long)]
    pub no_push: bool,
    /// The command to run inside the image, after `--`.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct GcArgs {
    /// Remove what can be collected (without it, only show).
    #[arg(long)]
    pub apply: bool,
    /// Seconds an unused item is kept (default: the daemon's `[gc] grace_secs`, else 3600).
    #[arg(long, value_name = "SECONDS")]
    pub grace: Option<u64>,
    /// List every item, not only the totals.
    #[arg(long)]
    pub all: bool,
    /// The report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct FuseKeeperArgs {
    /// The socket to listen on.
    #[arg(long, value_name = "SOCKET")]
    pub socket: PathBuf,
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference.
    pub reference: String,
    /// containerd's socket.
    #[arg(
        long,
        env = "CONTAINERD_ADDRESS",
        default_value = crate::containerd::DEFAULT_ADDRESS
    )]
    pub address: PathBuf,
    /// containerd namespace.
    #[arg(long, env = "CONTAINERD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The name the snapshotter has in containerd's proxy_plugins.
    #[arg(long, default_value = "clip")]
    pub snapshotter: String,
    /// Image name in containerd (default: the reference as given).
    #[arg(long)]
    pub name: Option<String>,
    /// Fetch every lazy layer whole before the pull ends (eager mode, for batch nodes and
    /// workloads that read most of the image): parallel range requests, inflated on every
    /// core, into the snapshotter's cache. Containers then start from local bytes.
    #[arg(long)]
    pub full: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotterArgs {
    /// Configuration file (default: /etc/clip/config.toml if it exists).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Socket to serve on (default: the configuration's `address`, else
    /// /run/clip/snapshotter.sock).
    #[arg(long, value_name = "SOCKET")]
    pub address: Option<PathBuf>,
    /// Index images without a published index while they are pulled.
    #[arg(long)]
    pub index_on_demand: bool,
    /// Memory the decoded layer indexes may hold together (default 1GiB; `[cache]
    /// index_memory`): an image whose index would take more than half of it is unpacked
    /// normally instead, with a warning saying why.
    #[arg(long, value_parser = parse_cap)]
    pub index_memory: Option<u64>,
    /// The daemon's one memory budget (default 1GiB, at least 256MiB; `[cache] budget`): the
    /// memory tier, decoded indexes (at most half of it), fetches in flight and the database's
    /// cache together. When it is spent, fetches wait and spans are served uncached.
    #[arg(long, value_parser = parse_cap)]
    pub memory_budget: Option<u64>,
    /// Which layer indexes to believe by default: "owner" (the default, safe for multi-tenant
    /// nodes: a published index serves its own repository's images, lazily from the first
    /// start; another repository's first use of the layer verifies it), "published" (trusts
    /// whoever can push to the repositories pulled, for every image), "local" (index on this
    /// node while pulling) or "signed". Per-repository scopes: [trust] in the config.
    #[arg(long, value_name = "owner|published|local|signed")]
    pub trust: Option<crate::trust::Trust>,
    /// A public key (cosign, PEM) whose signatures on index artifacts `signed` accepts.
    /// Repeatable; adds to [trust] keys.
    #[arg(long = "trust-key", value_name = "FILE")]
    pub trust_keys: Vec<PathBuf>,
    /// containerd's socket, where the layer of a Prepare without pull labels (plain `ctr
    /// pull`, nerdctl, the CRI without snapshot annotations) is looked up (default: the
    /// configuration's `containerd_address`, else /run/containerd/containerd.sock; the
    /// configuration's `containerd_address = ""` turns the lookup off).
    #[arg(long, value_name = "SOCKET")]
    pub containerd_address: Option<PathBuf>,
    /// Serve the node's CRI image service on this socket (the kubelet's
    /// --image-service-endpoint), forwarding to containerd and keeping each PullImage's
    /// credentials in memory for the lazy reads of that image (default: the configuration's
    /// [cri] address; off).
    #[arg(long, value_name = "SOCKET")]
    pub cri_address: Option<PathBuf>,
    /// Let lazy mounts die with the daemon (default: a keeper process holds their FUSE
    /// connections, so running containers keep reading across a restart).
    #[arg(long)]
    pub no_handover: bool,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Image reference.
    pub reference: String,
    /// Mount point (an existing directory).
    pub dir: PathBuf,
    /// FUSE worker threads.
    #[arg(long, default_value_t = MountOptions::default().threads)]
    pub threads: usize,
    /// Only the mounting user may access the mount (default: everyone, for containers'
    /// non-root users; permissions are still checked against the image's modes).
    #[arg(long)]
    pub no_allow_other: bool,
    /// Honour setuid/setgid bits and device nodes in the image (default: the mount is
    /// nosuid,nodev, so an image cannot give host users root or raw devices).
    #[arg(long)]
    pub suid_dev: bool,
    /// Files at least this big are served by FUSE passthrough (the kernel reads a local copy
    /// directly) once all their bytes are in the disk tier; --passthrough-cap 0 turns it off.
    #[arg(long, default_value = size_default(DEFAULT_PASSTHROUGH_MIN_SIZE), value_parser = parse_cap)]
    pub passthrough_min_size: u64,
    /// Run in the background once mounted (its log: --log, default ROOT/mount.log);
    /// `clip umount DIR` stops it.
    #[arg(long)]
    pub daemon: bool,
    /// The background mount's log file (with --daemon).
    #[arg(long, value_name = "FILE", requires = "daemon")]
    pub log: Option<PathBuf>,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Mount point.
    pub dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct FillArgs {
    /// Image reference.
    pub reference: String,
    /// Registry bandwidth cap in bytes per second (e.g. 20MiB); 0 = none.
    #[arg(long, default_value = "0", value_parser = parse_cap)]
    pub rate: u64,
    #[command(flatten)]
    pub cache: CacheArgs,
}

/// Cache tiers for commands that read file bytes.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Memory tier size.
    #[arg(long, default_value = size_default(CacheConfig::default().memory_bytes), value_parser = parse_cap)]
    pub memory_cap: u64,
    /// Memory the decoded layer indexes may hold together (an image whose index would take
    /// more than half of it is refused with a clear error).
    #[arg(long, default_value = size_default(clip_core::index::memory::DEFAULT_BUDGET), value_parser = parse_cap)]
    pub index_memory: u64,
    /// The process's one memory budget: the memory tier, decoded indexes, fetches in flight
    /// (at least 256MiB).
    #[arg(long, default_value = size_default(clip_core::budget::DEFAULT_BYTES), value_parser = parse_cap)]
    pub memory_budget: u64,
    /// Local disk tier size (0 disables it).
    #[arg(long, default_value = size_default(CacheConfig::default().disk_bytes), value_parser = parse_cap)]
    pub disk_cap: u64,
    /// Directory of the disk tier (default: ROOT/cache).
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Shared Redis tier (off by default): redis://HOST:PORT/, rediss://USER:PASSWORD@HOST:PORT/
    /// (TLS and an ACL user), or redis+cluster://H1:P1,H2:P2 (rediss+cluster:// with TLS). A URL
    /// with a password is refused here (every user can read a command line): give it in
    /// CLIP_REDIS.
    #[arg(long, env = "CLIP_REDIS", value_name = "URL")]
    pub redis: Option<String>,
    /// For rediss://: a CA file (PEM) to trust instead of the system's.
    #[arg(long, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// For rediss:// servers that require a client certificate: the certificate (PEM).
    #[arg(long, value_name = "FILE", requires = "redis_key")]
    pub redis_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "redis_cert")]
    pub redis_key: Option<PathBuf>,
    /// Bytes of whole files kept beside the disk tier for FUSE passthrough (default: a quarter
    /// of --disk-cap; 0 disables passthrough).
    #[arg(long, value_parser = parse_cap)]
    pub passthrough_cap: Option<u64>,
    /// Print what the read did (tier hits, registry requests and bytes, inflated bytes) as JSON
    /// on stderr.
    #[arg(long)]
    pub stats: bool,
}

#[derive(Args, Debug)]
pub struct CatArgs {
    /// Image reference.
    pub reference: String,
    /// Path of a file in the image.
    pub path: String,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct WarmArgs {
    /// Image reference.
    pub reference: String,
    /// Files read in parallel.
    #[arg(long, default_value_t = 4)]
    pub jobs: usize,
    #[command(flatten)]
    pub cache: CacheArgs,
}

#[derive(Args, Debug)]
pub struct IndexArgs {
    /// Image reference: [host[:port]/]repository[:tag][@digest].
    pub reference: String,
    /// Publish the index to the image's registry as an OCI artifact referring to the image.
    #[arg(long)]
    pub push: bool,
    /// Uncompressed bytes between checkpoints (e.g. 512KiB, 1MiB, 4MiB).
    #[arg(long, default_value = size_default(DEFAULT_SPAN_SIZE), value_parser = parse_size)]
    pub span_size: u64,
    /// Rebuild indexes already in the local store.
    #[arg(long)]
    pub force: bool,
    /// Layers indexed in parallel.
    #[arg(long, default_value_t = 2)]
    pub jobs: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Image reference.
    pub reference: String,
    /// A path in the image's root filesystem.
    pub path: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A default stated by the config structs, as a flag's default text ("256MiB"). Leaked: a few
/// bytes once per flag, when the command line is built.
fn size_default(n: u64) -> &'static str {
    Box::leak(format_size(n).into_boxed_str())
}

/// `n` in the largest unit that divides it exactly: 268435456 -> "256MiB".
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

/// Refuses a secret given as a command-line argument, where every user on the node can read it
/// (`ps`, `/proc/PID/cmdline`): a Redis URL with a password in `--redis`. The same URL is
/// accepted from `CLIP_REDIS` or the configuration file's `[cache] redis`.
pub fn refuse_secrets_in(args: impl IntoIterator<Item = String>) -> Result<(), String> {
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        let value = match a.as_str() {
            "--redis" => args.next(),
            _ => a.strip_prefix("--redis=").map(str::to_string),
        };
        if value.as_deref().is_some_and(has_password) {
            return Err(
                "--redis: a Redis URL with a password on the command line is visible to every \
                 user of this machine; give it in the CLIP_REDIS environment variable or the \
                 configuration file's [cache] redis"
                    .into(),
            );
        }
    }
    Ok(())
}

/// Whether a URL carries a password (`scheme://user:password@...` or `scheme://:password@...`).
fn has_password(url: &str) -> bool {
    let Some((_, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(userinfo, _)| userinfo.contains(':'))
}

/// `n` bytes for people: "1.5 MiB".
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses a cache capacity: like [`parse_size`] without its span-size range; `0` allowed.
pub fn parse_cap(s: &str) -> Result<u64, String> {
    parse_bytes(s)
}

/// Parses sizes like `1048576`, `512KiB`, `1MiB`, `4M` for span sizes (64 KiB to 64 MiB).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let v = parse_bytes(s)?;
    if !(64 << 10..=64 << 20).contains(&v) {
        return Err(format!("span size {s:?} out of range (64KiB to 64MiB)"));
    }
    Ok(v)
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(format!("invalid size unit in {s:?} (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("4m"), Ok(4 << 20));
        assert!(parse_size("1").is_err());
        assert!(parse_size("1XB").is_err());
        assert!(parse_size("1GiB").is_err());
        assert_eq!(parse_cap("0"), Ok(0));
        assert_eq!(parse_cap("10GiB"), Ok(10 << 30));
        for n in [0, 1, 1000, 512 << 10, 256 << 20, 10 << 30, (1 << 20) + 1] {
            assert_eq!(parse_cap(&format_size(n)), Ok(n));
        }
        assert_eq!(format_size(256 << 20), "256MiB");
    }

    #[test]
    fn a_redis_password_on_the_command_line_is_refused() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for bad in [
            &[
                "clip",
                "cat",
                "x",
                "y",
                "--redis",
                "rediss://u:s3cret@h:6380/",
            ][..],
            &["clip", "warm", "--redis=redis://:s3cret@h:6379/", "x"],
        ] {
            let e = refuse_secrets_in(args(bad)).unwrap_err();
            assert!(e.contains("CLIP_REDIS") && !e.contains("s3cret"), "{e}");
        }
        for good in [
            &["clip", "cat", "x", "y", "--redis", "rediss://clip@h:6380/"][..],
            &["clip", "cat", "--redis", "redis+cluster://h1:1,h2:2"],
            &["clip", "cat", "x", "user:pass@host"],
        ] {
            assert!(refuse_secrets_in(args(good)).is_ok(), "{good:?}");
        }
    }
}
