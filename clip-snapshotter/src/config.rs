//! Configuration: command-line flags + the configuration file + defaults -> one typed
//! configuration, in pure functions (no I/O but reading the file), unit-tested.
//!
//! Every default is stated once, by the type that uses it (`CacheConfig`, `RegistryConfig`,
//! the snapshotter's `Options`, clip-fuse's `MountOptions`); a flag given on the command line
//! wins over the file, and the file over the default.
//!
//! Uses the command line's types ([`crate::cli`]), the trust policy and the snapshotter's
//! options; nothing here starts anything.

use crate::cli::{parse_cap, CacheArgs, GlobalArgs, SnapshotterArgs};
use crate::snapshotter::Options;
use crate::trust::TrustPolicy;
use clip_core::cache::CacheConfig;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The daemon's configuration file when `--config` is not given (used if it exists).
pub const DEFAULT_CONFIG: &str = "/etc/clip/config.toml";
/// The snapshots API's socket when neither a flag nor the file names one.
pub const DEFAULT_ADDRESS: &str = "/run/clip/snapshotter.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the configuration {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("configuration {path}: {error}")]
    Parse {
        path: String,
        error: toml::de::Error,
    },
    #[error("{key}: {reason}")]
    Value { key: &'static str, reason: String },
}

/// `/etc/clip/config.toml` (every key optional; see docs/snapshotter.md).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// clip's root directory (database, indexes, cache, snapshots).
    pub root: Option<PathBuf>,
    /// The gRPC socket containerd's proxy_plugins entry points at.
    pub address: Option<PathBuf>,
    /// containerd's own socket, where the layer of a Prepare without pull labels is looked up
    /// (default /run/containerd/containerd.sock; "" turns the lookup off).
    pub containerd_address: Option<PathBuf>,
    /// Prometheus metrics endpoint, e.g. "127.0.0.1:9102".
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Index images that have no published index when they are pulled (streams every layer once).
    pub index_on_demand: bool,
    pub cache: CacheSection,
    pub registry: RegistrySection,
    pub fuse: FuseSection,
    pub profiles: ProfilesSection,
    pub trust: TrustSection,
    pub cri: CriSection,
    pub bulk: BulkSection,
    pub gc: GcSection,
}

/// Collection of what nothing uses any more (docs/snapshotter.md, "What clip keeps").
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcSection {
    /// Seconds an index, image record or profile stays after nothing uses it (default 3600).
    pub grace_secs: Option<u64>,
    /// Seconds between the daemon's collections (default 600; 0: only `clip gc --apply`).
    pub interval_secs: Option<u64>,
}

/// When a layer a workload reads most of is streamed whole (docs/snapshotter.md, bulk mode).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BulkSection {
    /// The share of a layer's spans read after which the rest is streamed, 0 to 1 (default
    /// 0.4; 0: never on share).
    pub share: Option<f64>,
    /// Bytes of a layer read in its order after which the rest is streamed, e.g. "32MiB" (the
    /// default; "0": never on order).
    pub sequential: Option<String>,
    /// A file with at least this much still to come once an eighth of `sequential` of it has
    /// been read in order switches its layer, e.g. "64MiB" (the default; "0": never on a file).
    pub large_file: Option<String>,
    /// Bulk range requests in flight at once, across every layer (default 4).
    pub requests: Option<usize>,
    /// containerd namespaces whose pulls fetch every lazy layer whole before the pull ends
    /// (eager mode for batch nodes), e.g. ["batch"]. Default: none.
    pub eager_namespaces: Vec<String>,
}

impl BulkSection {
    fn config(&self) -> Result<clip_core::fetch::BulkConfig, ConfigError> {
        let d = clip_core::fetch::BulkConfig::default();
        let share = self.share.unwrap_or(d.share);
        if !(0.0..=1.0).contains(&share) {
            return Err(ConfigError::Value {
                key: "bulk.share",
                reason: format!("{share} is not between 0 and 1"),
            });
        }
        let requests = self.requests.unwrap_or(d.concurrency);
        if !(1..=64).contains(&requests) {
            return Err(ConfigError::Value {
                key: "bulk.requests",
                reason: format!("{requests} is not between 1 and 64"),
            });
        }
        Ok(clip_core::fetch::BulkConfig {
            share,
            sequential_bytes: size(&self.sequential, d.sequential_bytes, "bulk.sequential")?,
            large_file_bytes: size(&self.large_file, d.large_file_bytes, "bulk.large_file")?,
            concurrency: requests,
            ..d
        })
    }
}

/// The node's CRI image service in front of containerd's (docs/snapshotter.md, Kubernetes).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriSection {
    /// Serve the CRI image service here (the kubelet's `--image-service-endpoint`); off when
    /// unset. Calls go on to containerd at `containerd_address`.
    pub address: Option<PathBuf>,
    /// Forget a pull's credentials this long after it (default: keep them until the image is
    /// removed or the daemon stops).
    pub credentials_ttl_secs: Option<u64>,
}

/// Which layer indexes to believe (docs/security.md).
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrustSection {
    /// "owner" (default, multi-tenant safe: published indexes serve their own repository;
    /// another repository's first use of a layer verifies it), "published" (trusts whoever can
    /// push to the repositories pulled), "local" (index on this node while pulling) or
    /// "signed" (see docs/security.md).
    pub default: Option<crate::trust::Trust>,
    /// Per registry, registry/repository or repository prefix; the most specific wins.
    pub scopes: std::collections::BTreeMap<String, crate::trust::Trust>,
    /// Public keys (cosign, PEM) whose signatures "signed" accepts.
    pub keys: Vec<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfilesSection {
    /// Seconds after a lazy mount's first read during which an image without a startup
    /// profile records one (default 20; 0: never record).
    pub window_secs: Option<u64>,
    /// Push recorded profiles to the image's registry next to its index (default false:
    /// nodes rarely have push access; `clip profile` publishes from CI).
    pub publish: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Memory tier, e.g. "256MiB".
    pub memory: Option<String>,
    /// Local disk tier, e.g. "10GiB" ("0" disables it).
    pub disk: Option<String>,
    /// Directory of the disk tier (default ROOT/cache).
    pub dir: Option<PathBuf>,
    /// Shared Redis tier: "redis://host:6379/", "rediss://user:password@host:6380/" (TLS, ACL
    /// user), or "redis+cluster://h1:p1,h2:p2" / "rediss+cluster://...".
    pub redis: Option<String>,
    /// For rediss://: a CA file to trust instead of the system's.
    pub redis_ca: Option<PathBuf>,
    /// For rediss:// servers that require client certificates: the certificate and its key.
    pub redis_cert: Option<PathBuf>,
    pub redis_key: Option<PathBuf>,
    /// Whole-file copies for FUSE passthrough (default: a quarter of the disk tier; "0": off).
    pub passthrough: Option<String>,
    /// Memory the decoded layer indexes may hold together, e.g. "1GiB" (the default).
    pub index_memory: Option<String>,
    /// The daemon's one memory budget, e.g. "1GiB" (the default; at least "256MiB"): the memory
    /// tier, decoded indexes, fetches in flight and the database's cache together.
    pub budget: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySection {
    /// Hosts (host[:port]) that may use plain HTTP or unverified TLS.
    pub insecure: Vec<String>,
    /// Token servers on other hosts trusted with their registries' credentials.
    pub token_realms: Vec<String>,
    /// containerd-style hosts directory (HOST/hosts.toml), e.g. "/etc/containerd/certs.d".
    pub hosts_dir: Option<PathBuf>,
    /// Give up on a registry operation after this many seconds (default 120).
    pub timeout_secs: Option<u64>,
    /// Retry a response that stalls this long (default 30).
    pub stall_secs: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FuseSection {
    /// FUSE worker threads per mount (default 4).
    pub threads: Option<usize>,
    /// Smallest file served by passthrough once local (default "1MiB").
    pub passthrough_min_size: Option<String>,
    /// Largest file whose spans are all requested when it is opened cold (default "8MiB";
    /// "0": files are fetched read by read).
    pub prefetch_on_open: Option<String>,
    /// After two cold opens in a directory, fetch up to this many bytes of the files next to
    /// them with the same extension on a guess, yielding to demand reads (default "4MiB";
    /// "0": off). Not where a startup profile lists the reads.
    pub speculate_siblings: Option<String>,
    /// Opening a program or shared library starts fetching the libraries its ELF headers name
    /// (`DT_NEEDED`, found where the dynamic loader looks), each as an open would; a mount no
    /// startup profile covers starts fetching the loader, the C library and the user databases
    /// (default true).
    pub prefetch_libraries: Option<bool>,
    /// A container starting on a mount no startup profile covers has its program (read from
    /// containerd's record of the container) fetched before the runtime execs it, with its
    /// libraries and a script's interpreter (default true).
    pub prefetch_program: Option<bool>,
    /// Keep lazy mounts alive across daemon restarts (a keeper process holds their FUSE
    /// connections; default true).
    pub handover: Option<bool>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        toml::from_str(&text).map_err(|error| ConfigError::Parse {
            path: path.display().to_string(),
            error,
        })
    }
}

fn size(v: &Option<String>, default: u64, key: &'static str) -> Result<u64, ConfigError> {
    match v {
        Some(s) => parse_cap(s).map_err(|reason| ConfigError::Value { key, reason }),
        None => Ok(default),
    }
}

/// The cache tiers the cache flags (or the file's `[cache]`, turned into flags) ask for; the
/// disk tier under `root/cache` unless a directory is named.
pub fn cache_config(c: &CacheArgs, root: &Path) -> CacheConfig {
    CacheConfig {
        memory_bytes: c.memory_cap,
        disk_bytes: c.disk_cap,
        disk_dir: Some(c.cache_dir.clone().unwrap_or_else(|| root.join("cache"))),
        remote: c.redis.clone(),
        remote_tls: clip_core::cache::remote::RedisTls {
            ca: c.redis_ca.clone(),
            cert: c.redis_cert.clone(),
            key: c.redis_key.clone(),
        },
        files_bytes: c.passthrough_cap,
    }
}

impl CacheSection {
    /// The section as the cache flags would say it, defaults filled in.
    fn as_args(&self) -> Result<CacheArgs, ConfigError> {
        let d = CacheConfig::default();
        Ok(CacheArgs {
            memory_cap: size(&self.memory, d.memory_bytes, "cache.memory")?,
            disk_cap: size(&self.disk, d.disk_bytes, "cache.disk")?,
            cache_dir: self.dir.clone(),
            redis: self.redis.clone(),
            redis_ca: self.redis_ca.clone(),
            redis_cert: self.redis_cert.clone(),
            redis_key: self.redis_key.clone(),
            passthrough_cap: self
                .passthrough
                .as_ref()
                .map(|s| size(&Some(s.clone()), 0, "cache.passthrough"))
                .transpose()?,
            stats: false,
            index_memory: size(
                &self.index_memory,
                clip_core::index::memory::DEFAULT_BUDGET,
                "cache.index_memory",
            )?,
            memory_budget: size(
                &self.budget,
                clip_core::budget::DEFAULT_BYTES,
                "cache.budget",
            )?,
        })
    }
}

/// A memory budget too small to hold the database's cache, indexes and the largest fetch is
/// refused, naming the least.
pub fn check_budget(bytes: u64) -> Result<(), ConfigError> {
    if bytes < clip_core::budget::MIN_BYTES {
        return Err(ConfigError::Value {
            key: "cache.budget",
            reason: format!(
                "{bytes} bytes is below the least memory budget, {} (256MiB)",
                clip_core::budget::MIN_BYTES
            ),
        });
    }
    Ok(())
}

/// Sets the process's memory budget and, inside it, the decoded indexes' (at most half of
/// the budget). Returns the indexes' budget in effect.
pub fn apply_memory(budget: u64, index_memory: u64) -> u64 {
    clip_core::budget::set_process_limit(budget);
    let indexes = index_memory.min(budget / 2);
    clip_core::index::memory::set_process_budget(indexes);
    indexes
}

/// Global flags with the file's values filled in where a flag was not given.
pub fn merged_globals(g: &GlobalArgs, c: &Config) -> GlobalArgs {
    let mut insecure = g.insecure.clone();
    insecure.extend(c.registry.insecure.iter().cloned());
    let mut token_realms = g.token_realms.clone();
    token_realms.extend(c.registry.token_realms.iter().cloned());
    GlobalArgs {
        root: g.root.clone().or_else(|| c.root.clone()),
        insecure,
        token_realms,
        hosts_dir: g.hosts_dir.clone().or_else(|| c.registry.hosts_dir.clone()),
        platform: g.platform.clone(),
        registry_timeout: c.registry.timeout_secs.unwrap_or(g.registry_timeout),
        stall_timeout: c.registry.stall_secs.unwrap_or(g.stall_timeout),
        metrics_address: g.metrics_address.or(c.metrics_address),
        verbose: g.verbose,
    }
}

/// The CRI image service's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CriConfig {
    /// Where it is served.
    pub address: PathBuf,
    /// containerd's socket, where its calls go on to.
    pub upstream: PathBuf,
    /// How long a pull's credentials are kept (None: until the image is removed).
    pub credentials_ttl: Option<Duration>,
}

/// Everything `clip snapshotter` runs with.
#[derive(Debug)]
pub struct DaemonConfig {
    /// The global flags, with the file's values merged in.
    pub globals: GlobalArgs,
    /// clip's root directory.
    pub root: PathBuf,
    /// The snapshots API's socket.
    pub address: PathBuf,
    pub cache: CacheConfig,
    /// When layers switch to bulk streaming.
    pub bulk: clip_core::fetch::BulkConfig,
    /// Memory the decoded layer indexes may hold together.
    pub index_memory: u64,
    /// The process's one memory budget (indexes, memory tier, fetches in flight).
    pub memory_budget: u64,
    /// The snapshotter's options; its trust policy has no keys yet (`trust_keys` are loaded by
    /// the caller, the one step here that reads files).
    pub snapshotter: Options,
    pub trust_keys: Vec<PathBuf>,
    pub cri: Option<CriConfig>,
    pub gc: crate::gc::Settings,
}

/// The daemon's configuration from its flags `g` and `a`, the file `file`, and defaults;
/// `default_root` is clip's root when neither names one.
pub fn daemon_config(
    g: &GlobalArgs,
    a: &SnapshotterArgs,
    file: &Config,
    default_root: impl FnOnce() -> PathBuf,
) -> Result<DaemonConfig, ConfigError> {
    let mut globals = merged_globals(g, file);
    let root = globals.root.clone().unwrap_or_else(default_root);
    globals.root = Some(root.clone());
    let cache_args = file.cache.as_args()?;
    let cache = cache_config(&cache_args, &root);
    let index_memory = a.index_memory.unwrap_or(cache_args.index_memory);
    let memory_budget = a.memory_budget.unwrap_or(cache_args.memory_budget);
    check_budget(memory_budget)?;
    let d = Options::default();
    let fuse = &file.fuse;
    let guesses = clip_fuse::Guesses {
        prefetch_on_open: size(
            &fuse.prefetch_on_open,
            d.fuse.guesses.prefetch_on_open,
            "fuse.prefetch_on_open",
        )?,
        speculate_siblings: size(
            &fuse.speculate_siblings,
            d.fuse.guesses.speculate_siblings,
            "fuse.speculate_siblings",
        )?,
        prefetch_libraries: fuse
            .prefetch_libraries
            .unwrap_or(d.fuse.guesses.prefetch_libraries),
        prefetch_program: fuse
            .prefetch_program
            .unwrap_or(d.fuse.guesses.prefetch_program),
    };
    let containerd = a
        .containerd_address
        .clone()
        .or(file.containerd_address.clone())
        .or(d.containerd.clone())
        .filter(|p| !p.as_os_str().is_empty());
    let trust = TrustPolicy {
        default: a.trust.or(file.trust.default).unwrap_or(d.trust.default),
        scopes: file.trust.scopes.clone().into_iter().collect(),
        keys: Default::default(),
    };
    let snapshotter = Options {
        index_on_demand: file.index_on_demand || a.index_on_demand,
        fuse: clip_fuse::MountOptions {
            threads: fuse.threads.unwrap_or(d.fuse.threads).max(1),
            passthrough_min_size: size(
                &fuse.passthrough_min_size,
                d.fuse.passthrough_min_size,
                "fuse.passthrough_min_size",
            )?,
            guesses,
            ..d.fuse
        },
        handover: fuse.handover.unwrap_or(d.handover) && !a.no_handover,
        profile_window: file
            .profiles
            .window_secs
            .map_or(d.profile_window, Duration::from_secs),
        publish_profiles: file.profiles.publish.unwrap_or(d.publish_profiles),
        trust,
        containerd,
        eager_namespaces: file.bulk.eager_namespaces.clone(),
    };
    let cri = match a.cri_address.clone().or(file.cri.address.clone()) {
        None => None,
        Some(address) => Some(CriConfig {
            address,
            upstream: snapshotter.containerd.clone().ok_or(ConfigError::Value {
                key: "cri.address",
                reason: "the CRI image service needs containerd_address (calls go on to \
                         containerd)"
                    .into(),
            })?,
            credentials_ttl: file.cri.credentials_ttl_secs.map(Duration::from_secs),
        }),
    };
    let gcd = crate::gc::Settings::default();
    Ok(DaemonConfig {
        gc: crate::gc::Settings {
            grace: file.gc.grace_secs.map_or(gcd.grace, Duration::from_secs),
            interval: file
                .gc
                .interval_secs
                .map_or(gcd.interval, Duration::from_secs),
        },
        index_memory,
        memory_budget,
        bulk: file.bulk.config()?,
        address: a
            .address
            .clone()
            .or(file.address.clone())
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS)),
        trust_keys: file
            .trust
            .keys
            .iter()
            .chain(&a.trust_keys)
            .cloned()
            .collect(),
        globals,
        root,
        cache,
        snapshotter,
        cri,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `clip ARGS snapshotter SUB` with `file` as the configuration file.
    fn parse_sub(args: &[&str], sub: &[&str], file: &str) -> Result<DaemonConfig, ConfigError> {
        let cli = crate::cli::Cli::try_parse_from(
            ["clip"]
                .iter()
                .chain(args)
                .chain(&["snapshotter"])
                .chain(sub)
                .copied(),
        )
        .unwrap();
        let crate::cli::Command::Snapshotter(a) = cli.command else {
            unreachable!()
        };
        let file: Config = toml::from_str(file).unwrap();
        daemon_config(&cli.global, &a, &file, || PathBuf::from("/default-root"))
    }

    fn parse(args: &[&str], file: &str) -> Result<DaemonConfig, ConfigError> {
        parse_sub(args, &[], file)
    }

    #[test]
    fn a_memory_budget_below_the_least_is_refused_with_the_least_named() {
        let e = parse(&[], "[cache]\nbudget = \"64MiB\"\n").unwrap_err();
        assert!(e.to_string().contains("256MiB"), "{e}");
        let c = parse_sub(
            &[],
            &["--memory-budget", "512MiB"],
            "[cache]\nbudget = \"64MiB\"\n",
        );
        assert_eq!(c.unwrap().memory_budget, 512 << 20, "the flag wins");
    }

    #[test]
    fn example_config_parses_and_states_the_defaults_the_code_uses() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/config.toml"
        ))
        .unwrap();
        let c = parse(&[], &text).unwrap();
        let none = parse(&[], "").unwrap();
        // scripts/config.toml states the defaults: resolving it or nothing gives the same.
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.address, none.address);
        assert_eq!(c.root, PathBuf::from("/var/lib/clip"));
        assert_eq!(none.root, PathBuf::from("/default-root"));
        assert_eq!(c.cache.memory_bytes, none.cache.memory_bytes);
        assert_eq!(c.cache.disk_bytes, none.cache.disk_bytes);
        assert_eq!(c.cache.memory_bytes, CacheConfig::default().memory_bytes);
        assert_eq!(c.memory_budget, none.memory_budget);
        assert_eq!(c.memory_budget, clip_core::budget::DEFAULT_BYTES);
        let (s, n) = (&c.snapshotter, &none.snapshotter);
        assert_eq!(s.fuse.threads, n.fuse.threads);
        assert_eq!(s.fuse.passthrough_min_size, n.fuse.passthrough_min_size);
        assert_eq!(s.fuse.guesses, n.fuse.guesses);
        assert_eq!(s.fuse.guesses, clip_fuse::Guesses::default());
        assert_eq!(s.handover, n.handover);
        assert_eq!(s.profile_window, n.profile_window);
        assert_eq!(s.publish_profiles, n.publish_profiles);
        assert_eq!(s.trust.default, n.trust.default);
        assert_eq!(s.containerd, n.containerd);
        assert_eq!(s.index_on_demand, n.index_on_demand);
        let reg = clip_core::registry::RegistryConfig::default();
        assert_eq!(c.globals.registry_timeout, reg.deadline.as_secs());
        assert_eq!(c.globals.stall_timeout, reg.stall_timeout.as_secs());
        assert!(c.cri.is_none());
        assert_eq!(c.gc.grace, none.gc.grace);
        assert_eq!(c.gc.interval, none.gc.interval);
        assert_eq!(c.gc.grace, crate::gc::DEFAULT_GRACE);
    }

    #[test]
    fn typos_in_the_file_are_refused() {
        let err = toml::from_str::<Config>("[cache]\nmemroy = \"1GiB\"\n").unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file_and_the_file_over_defaults() {
        let file =
            "root = \"/file-root\"\naddress = \"/file.sock\"\n[trust]\ndefault = \"local\"\n\
                    [fuse]\nthreads = 9\nprefetch_on_open = \"1MiB\"\nhandover = false\n\
                    [cache]\nmemory = \"64MiB\"\n";
        let c = parse(&["--root", "/flag-root"], file).unwrap();
        assert_eq!(c.root, PathBuf::from("/flag-root"));
        assert_eq!(c.address, PathBuf::from("/file.sock"));
        assert_eq!(c.cache.memory_bytes, 64 << 20);
        assert_eq!(c.cache.disk_dir, Some(PathBuf::from("/flag-root/cache")));
        assert_eq!(c.snapshotter.trust.default, crate::trust::Trust::Local);
        assert_eq!(c.snapshotter.fuse.threads, 9);
        assert_eq!(c.snapshotter.fuse.guesses.prefetch_on_open, 1 << 20);
        assert!(!c.snapshotter.handover);
        // Containers' mounts keep setuid and devices, whatever the file says of FUSE.
        assert!(c.snapshotter.fuse.suid_dev && c.snapshotter.fuse.allow_other);
        let c = parse_sub(&[], &["--trust", "published", "--no-handover"], file).unwrap();
        assert_eq!(c.snapshotter.trust.default, crate::trust::Trust::Published);
        assert_eq!(c.root, PathBuf::from("/file-root"));
        let c = parse_sub(&[], &["--no-handover"], "").unwrap();
        assert!(
            !c.snapshotter.handover,
            "--no-handover wins over the default"
        );
    }

    #[test]
    fn an_empty_containerd_address_turns_discovery_off_and_the_cri_needs_it() {
        let c = parse(&[], "containerd_address = \"\"\n").unwrap();
        assert_eq!(c.snapshotter.containerd, None);
        let err = parse(
            &[],
            "containerd_address = \"\"\n[cri]\naddress = \"/cri.sock\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("containerd_address"), "{err}");
        let c = parse(
            &[],
            "[cri]\naddress = \"/cri.sock\"\ncredentials_ttl_secs = 60\n",
        )
        .unwrap();
        let cri = c.cri.unwrap();
        assert_eq!(
            cri.upstream,
            PathBuf::from(crate::containerd::DEFAULT_ADDRESS)
        );
        assert_eq!(cri.credentials_ttl, Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_bad_size_names_its_key() {
        let err = parse(&[], "[fuse]\nspeculate_siblings = \"4 parsecs\"\n").unwrap_err();
        assert!(
            err.to_string().starts_with("fuse.speculate_siblings:"),
            "{err}"
        );
        let err = parse(&[], "[cache]\npassthrough = \"x\"\n").unwrap_err();
        assert!(err.to_string().starts_with("cache.passthrough:"), "{err}");
    }

    #[test]
    fn bulk_settings_are_read_and_checked() {
        let c = parse(
            &[],
            "[bulk]\nshare = 0.5\nsequential = \"0\"\nlarge_file = \"1GiB\"\nrequests = 8\neager_namespaces = [\"batch\"]\n",
        )
        .unwrap();
        assert_eq!(c.bulk.share, 0.5);
        assert_eq!(c.bulk.sequential_bytes, 0);
        assert_eq!(c.bulk.large_file_bytes, 1 << 30);
        assert_eq!(c.bulk.concurrency, 8);
        assert_eq!(c.snapshotter.eager_namespaces, ["batch"]);
        for (bad, key) in [
            ("share = 1.5", "bulk.share:"),
            ("share = -0.1", "bulk.share:"),
            ("requests = 0", "bulk.requests:"),
            ("sequential = \"lots\"", "bulk.sequential:"),
            ("large_file = \"huge\"", "bulk.large_file:"),
        ] {
            let err = parse(&[], &format!("[bulk]\n{bad}\n")).unwrap_err();
            assert!(err.to_string().starts_with(key), "{bad}: {err}");
        }
    }
}
