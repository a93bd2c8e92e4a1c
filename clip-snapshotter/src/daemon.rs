//! `clip snapshotter`: the containerd proxy snapshotter daemon and its TOML configuration.

use crate::cli::{parse_cap, GlobalArgs, SnapshotterArgs};
use crate::snapshotter::{ClipSnapshotter, Options};
use anyhow::{Context, Result};
use clip_core::cache::CacheConfig;
use clip_core::reader::ReadPath;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEFAULT_CONFIG: &str = "/etc/clip/config.toml";
pub const DEFAULT_ADDRESS: &str = "/run/clip/snapshotter.sock";

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
    /// "published" (default: lazy from the first start; trusts whoever can push to the
    /// repositories pulled) or "local" (index on this node while pulling; multi-tenant safe).
    pub default: Option<crate::snapshotter::Trust>,
    /// Per registry, registry/repository or repository prefix; the most specific wins.
    pub scopes: std::collections::BTreeMap<String, crate::snapshotter::Trust>,
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
    /// Keep lazy mounts alive across daemon restarts (a keeper process holds their FUSE
    /// connections; default true).
    pub handover: Option<bool>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("configuration {}", path.display()))
    }
}

fn size(v: &Option<String>, default: u64, what: &str) -> Result<u64> {
    match v {
        Some(s) => parse_cap(s).map_err(|e| anyhow::anyhow!("{what}: {e}")),
        None => Ok(default),
    }
}

/// Global flags with the configuration file's values filled in where a flag was not given.
fn merged_globals(g: &GlobalArgs, c: &Config) -> GlobalArgs {
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

pub async fn run(g: &GlobalArgs, a: SnapshotterArgs) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let cfg_path = a.config.clone().or_else(|| {
        Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG))
    });
    let cfg = match &cfg_path {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let g = merged_globals(g, &cfg);
    if g.metrics_address.is_some() {
        crate::settings::serve_metrics(g.metrics_address)?;
    }
    let ctx = crate::settings::context(&g)?;
    let root = ctx.store.root().to_path_buf();
    let defaults = CacheConfig::default();
    let cache_cfg = CacheConfig {
        memory_bytes: size(&cfg.cache.memory, defaults.memory_bytes, "cache.memory")?,
        disk_bytes: size(&cfg.cache.disk, defaults.disk_bytes, "cache.disk")?,
        disk_dir: Some(cfg.cache.dir.clone().unwrap_or_else(|| root.join("cache"))),
        remote: cfg.cache.redis.clone(),
        remote_tls: clip_core::cache::remote::RedisTls {
            ca: cfg.cache.redis_ca.clone(),
            cert: cfg.cache.redis_cert.clone(),
            key: cfg.cache.redis_key.clone(),
        },
        files_bytes: cfg
            .cache
            .passthrough
            .as_ref()
            .map(|s| parse_cap(s).map_err(|e| anyhow::anyhow!("cache.passthrough: {e}")))
            .transpose()?,
    };
    let store = Arc::new(ctx.store);
    let reads = ReadPath::open(&cache_cfg, &store)
        .await
        .context("opening the cache")?;
    let defaults = Options::default();
    let opts = Options {
        profile_window: cfg
            .profiles
            .window_secs
            .map_or(defaults.profile_window, std::time::Duration::from_secs),
        publish_profiles: cfg.profiles.publish.unwrap_or(defaults.publish_profiles),
        index_on_demand: cfg.index_on_demand || a.index_on_demand,
        trust: {
            let keys: Vec<&PathBuf> = cfg.trust.keys.iter().chain(&a.trust_keys).collect();
            let policy = crate::snapshotter::TrustPolicy {
                default: a
                    .trust
                    .or(cfg.trust.default)
                    .unwrap_or(defaults.trust.default),
                scopes: cfg.trust.scopes.clone().into_iter().collect(),
                keys: clip_core::signature::TrustedKeys::load(&keys)?,
            };
            policy.check().map_err(anyhow::Error::msg)?;
            policy
        },
        handover: cfg.fuse.handover.unwrap_or(true) && !a.no_handover,
        containerd: a
            .containerd_address
            .clone()
            .or(cfg.containerd_address.clone())
            .or(defaults.containerd.clone())
            .filter(|p| !p.as_os_str().is_empty()),
        fuse_threads: cfg
            .fuse
            .threads
            .unwrap_or(clip_fuse::MountOptions::default().threads)
            .max(1),
        prefetch_on_open: size(
            &cfg.fuse.prefetch_on_open,
            defaults.prefetch_on_open,
            "fuse.prefetch_on_open",
        )?,
        speculate_siblings: size(
            &cfg.fuse.speculate_siblings,
            defaults.speculate_siblings,
            "fuse.speculate_siblings",
        )?,
        prefetch_libraries: cfg
            .fuse
            .prefetch_libraries
            .unwrap_or(defaults.prefetch_libraries),
        passthrough_min_size: size(
            &cfg.fuse.passthrough_min_size,
            clip_fuse::DEFAULT_PASSTHROUGH_MIN_SIZE,
            "fuse.passthrough_min_size",
        )?,
    };
    let opts_containerd = opts.containerd.clone();
    let session = ctx.client.config().session.clone();
    let sn = ClipSnapshotter::open(&root, store, ctx.client, reads, opts)
        .await
        .context("opening the snapshotter state")?;

    let address = a
        .address
        .clone()
        .or(cfg.address.clone())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_ADDRESS));
    let listener = bind_socket(&address, 0o660)?;
    eprintln!(
        "clip snapshotter: serving on {} (root {}{})",
        address.display(),
        root.display(),
        cfg_path
            .map(|p| format!(", config {}", p.display()))
            .unwrap_or_default()
    );
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let cri_address = a.cri_address.clone().or(cfg.cri.address.clone());
    let cri = match &cri_address {
        Some(path) => {
            let Some(upstream) = opts_containerd.clone() else {
                anyhow::bail!(
                    "the CRI image service needs containerd_address (calls go on to containerd)"
                );
            };
            // It carries pull secrets: root's alone.
            let listener = bind_socket(path, 0o600)?;
            let svc = crate::cri::ImageService::new(
                &upstream,
                session,
                cfg.cri
                    .credentials_ttl_secs
                    .map(std::time::Duration::from_secs),
            );
            eprintln!(
                "clip snapshotter: CRI image service on {} (forwarding to {})",
                path.display(),
                upstream.display()
            );
            Some(tokio::spawn(async move {
                if let Err(e) = tonic14::transport::Server::builder()
                    .add_service(svc)
                    .serve_with_incoming(trusted_connections(listener))
                    .await
                {
                    tracing::error!("serving the CRI image service: {e}");
                }
            }))
        }
        None => None,
    };
    containerd_snapshots::tonic::transport::Server::builder()
        .add_service(containerd_snapshots::server(sn.clone()))
        .serve_with_incoming_shutdown(trusted_connections(listener), stop)
        .await
        .context("serving the snapshots API")?;
    eprintln!("clip snapshotter: stopping");
    if let Some(task) = cri {
        task.abort();
    }
    sn.shutdown().await;
    let _ = std::fs::remove_file(&address);
    if let Some(p) = &cri_address {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

/// A unix socket at `path` (a stale one replaced) with mode `mode`.
fn bind_socket(path: &Path, mode: u32) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing the old socket {}", path.display()))
        }
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("listening on {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("permissions of {}", path.display()))?;
    Ok(listener)
}

/// The connections of root and of the daemon's own user (containerd runs as root); any other
/// local user is refused, whatever the socket's mode. A failed accept (out of descriptors, say)
/// is retried after a pause instead of ending the server or spinning.
fn trusted_connections(
    listener: tokio::net::UnixListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::UnixStream>> {
    // SAFETY: geteuid(2) has no preconditions.
    let me = unsafe { libc::geteuid() };
    futures_util::stream::unfold(listener, move |l| async move {
        loop {
            match l.accept().await {
                Ok((s, _)) => match s.peer_cred().map(|c| c.uid()) {
                    Ok(uid) if uid == 0 || uid == me => return Some((Ok(s), l)),
                    Ok(uid) => tracing::warn!(uid, "refused a connection from another user"),
                    Err(e) => tracing::warn!("refused a connection: {e}"),
                },
                Err(e) => {
                    tracing::warn!("accepting a connection failed: {e}; retrying in 100 ms");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_typos_are_refused() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/config.toml"
        ))
        .unwrap();
        let c: Config = toml::from_str(&text).unwrap();
        assert_eq!(c.address.unwrap(), PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.containerd_address, Options::default().containerd);
        assert!(c.cri.address.is_none() && c.cri.credentials_ttl_secs.is_none());
        // scripts/config.toml states the defaults: they must be the ones the code uses.
        let cache = CacheConfig::default();
        assert_eq!(size(&c.cache.memory, 0, "").unwrap(), cache.memory_bytes);
        assert_eq!(size(&c.cache.disk, 0, "").unwrap(), cache.disk_bytes);
        assert_eq!(c.trust.default, Some(Options::default().trust.default));
        let reg = clip_core::registry::RegistryConfig::default();
        assert_eq!(c.registry.timeout_secs, Some(reg.deadline.as_secs()));
        assert_eq!(c.registry.stall_secs, Some(reg.stall_timeout.as_secs()));
        assert_eq!(
            c.fuse.threads,
            Some(clip_fuse::MountOptions::default().threads)
        );
        assert_eq!(
            size(&c.fuse.passthrough_min_size, 0, "").unwrap(),
            clip_fuse::DEFAULT_PASSTHROUGH_MIN_SIZE
        );
        assert_eq!(c.fuse.handover, Some(true));
        assert_eq!(
            size(&c.fuse.prefetch_on_open, 0, "").unwrap(),
            clip_fuse::DEFAULT_PREFETCH_ON_OPEN
        );
        assert_eq!(
            size(&c.fuse.speculate_siblings, 0, "").unwrap(),
            clip_fuse::DEFAULT_SPECULATE_SIBLINGS
        );
        assert_eq!(
            c.fuse.prefetch_libraries,
            Some(Options::default().prefetch_libraries)
        );
        assert!(!c.index_on_demand);
        assert_eq!(c.root, Some(PathBuf::from("/var/lib/clip")));
        let sn = Options::default();
        assert_eq!(c.profiles.window_secs, Some(sn.profile_window.as_secs()));
        assert_eq!(c.profiles.publish, Some(sn.publish_profiles));
        let err = toml::from_str::<Config>("[cache]\nmemroy = \"1GiB\"\n").unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
    }
}
