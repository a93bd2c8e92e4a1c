//! What every command opens on this node: the root directory (private), the registry client
//! and the store; and the metrics endpoint.
//!
//! Uses the global flags ([`crate::cli::GlobalArgs`]) and the Prometheus exporter.

use crate::cli::GlobalArgs;
use anyhow::{Context, Result};
use clip_core::registry::{Client, RegistryConfig};
use clip_core::store::Store;
use std::path::PathBuf;
use std::time::Duration;

/// Serves Prometheus metrics on `addr` (if given) for the life of the process.
pub(crate) fn serve_metrics(addr: Option<std::net::SocketAddr>) -> Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let exporter = crate::prometheus::install();
    let listener_check =
        std::net::TcpListener::bind(addr).with_context(|| format!("metrics address {addr}"))?;
    drop(listener_check);
    tokio::spawn(async move {
        if let Err(e) = exporter.serve(addr).await {
            tracing::error!("metrics endpoint on {addr} stopped: {e}");
        }
    });
    Ok(())
}

pub fn default_root() -> PathBuf {
    // SAFETY-free check for root: the effective uid via /proc.
    let is_root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false);
    if is_root {
        PathBuf::from("/var/lib/clip")
    } else {
        let base = std::env::var_os("XDG_DATA_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .unwrap_or_else(|| PathBuf::from("."));
        base.join("clip")
    }
}

/// The registry client and the store of this node's root.
pub struct Node {
    pub client: Client,
    pub store: Store,
}

/// The registry client the global flags describe.
pub fn registry_client(g: &GlobalArgs) -> Result<Client> {
    let mut cfg = RegistryConfig {
        insecure: g.insecure.clone(),
        token_realms: g.token_realms.clone(),
        deadline: Duration::from_secs(g.registry_timeout.max(1)),
        stall_timeout: Duration::from_secs(g.stall_timeout.max(1)),
        ..Default::default()
    };
    if let Some(d) = &g.hosts_dir {
        cfg.hosts_dir = Some(d.clone());
    }
    if let Some(p) = &g.platform {
        cfg.platform = p.parse().map_err(anyhow::Error::msg)?;
    }
    Ok(Client::new(cfg))
}

pub fn open_node(g: &GlobalArgs) -> Result<Node> {
    let client = registry_client(g)?;
    let root = g.root.clone().unwrap_or_else(default_root);
    private_root(&root)?;
    let store =
        Store::open(&root).with_context(|| format!("opening the store in {}", root.display()))?;
    Ok(Node { client, store })
}

/// The state root is 0700 (created so under clip's umask). A root an older clip left open to
/// other users is closed, with a warning: everything under it is image content.
fn private_root(root: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(root)
        .with_context(|| format!("creating {}", root.display()))?;
    let mode = std::fs::metadata(root)?.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        tracing::warn!(
            root = %root.display(),
            "the state root was open to other users (mode {mode:o}); making it 0700"
        );
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private", root.display()))?;
    }
    Ok(())
}
