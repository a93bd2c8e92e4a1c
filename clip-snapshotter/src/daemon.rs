//! `clip snapshotter`: the containerd proxy snapshotter daemon. Its configuration is resolved
//! in [`crate::config`]; this module starts what it describes (the store, the cache, the
//! snapshotter, the CRI image service, the metrics endpoint), serves until SIGTERM or SIGINT,
//! and shuts down in order.

use crate::cli::{GlobalArgs, SnapshotterArgs};
use crate::config::{self, CriConfig, DaemonConfig, DEFAULT_CONFIG};
use crate::snapshotter::ClipSnapshotter;
use anyhow::{Context, Result};
use clip_core::reader::ReadPath;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The configuration file `--config` names, else [`DEFAULT_CONFIG`] if it exists.
fn config_file(a: &SnapshotterArgs) -> Option<PathBuf> {
    a.config.clone().or_else(|| {
        Path::new(DEFAULT_CONFIG)
            .exists()
            .then(|| PathBuf::from(DEFAULT_CONFIG))
    })
}

pub async fn run(g: &GlobalArgs, a: SnapshotterArgs) -> Result<()> {
    let cfg_path = config_file(&a);
    let file = match &cfg_path {
        Some(p) => config::Config::load(p)?,
        None => config::Config::default(),
    };
    let mut cfg = config::daemon_config(g, &a, &file, crate::node::default_root)?;
    let keys: Vec<&PathBuf> = cfg.trust_keys.iter().collect();
    cfg.snapshotter.trust.keys = clip_core::signature::TrustedKeys::load(&keys)?;
    cfg.snapshotter.trust.check().map_err(anyhow::Error::msg)?;
    if cfg.globals.metrics_address.is_some() {
        crate::node::serve_metrics(cfg.globals.metrics_address)?;
        clip_core::metrics::init();
    }
    let indexes = config::apply_memory(cfg.memory_budget, cfg.index_memory);
    tracing::info!(
        budget = cfg.memory_budget,
        indexes,
        memory_tier = cfg.cache.memory_bytes,
        "memory budget"
    );
    let ctx = crate::node::open_node(&cfg.globals)?;
    let root = cfg.root.clone();
    let store = Arc::new(ctx.store);
    let reads = ReadPath::open(&cfg.cache, cfg.bulk.clone(), &store)
        .await
        .context("opening the cache")?;
    let session = ctx.client.config().session.clone();
    let (sn, mounts) = ClipSnapshotter::open_on_node(
        &root,
        store.clone(),
        ctx.client,
        reads.clone(),
        cfg.snapshotter.clone(),
    )
    .await
    .context("opening the snapshotter state")?;
    let admin = bind_socket(&root.join(crate::gc::ADMIN_SOCKET), 0o600)?;
    let gc = crate::gc::Daemon::start(store, sn.clone(), reads, cfg.gc, admin);
    let listener = bind_socket(&cfg.address, 0o660)?;
    eprintln!(
        "clip snapshotter: serving on {} (root {}{})",
        cfg.address.display(),
        root.display(),
        cfg_path
            .map(|p| format!(", config {}", p.display()))
            .unwrap_or_default()
    );
    let cri = match &cfg.cri {
        Some(c) => Some(serve_cri(c, session)?),
        None => None,
    };
    containerd_snapshots::tonic::transport::Server::builder()
        .add_service(WithNamespace(containerd_snapshots::server(sn.clone())))
        .serve_with_incoming_shutdown(crate::os::trusted_connections(listener), stop_signal()?)
        .await
        .context("serving the snapshots API")?;
    eprintln!("clip snapshotter: stopping");
    gc.abort();
    let _ = std::fs::remove_file(root.join(crate::gc::ADMIN_SOCKET));
    shutdown(&cfg, cri, &sn, &mounts).await;
    Ok(())
}

/// The snapshots service, each request served knowing the containerd namespace it is for
/// ([`crate::containerd::request_namespace`]): label-free discovery looks for a layer only
/// among the images of the caller's namespace. A request with a deadline has its registry
/// work end before it.
#[derive(Clone)]
struct WithNamespace<S>(S);

impl<S, B>
    containerd_snapshots::tonic::codegen::Service<
        containerd_snapshots::tonic::codegen::http::Request<B>,
    > for WithNamespace<S>
where
    S: containerd_snapshots::tonic::codegen::Service<
        containerd_snapshots::tonic::codegen::http::Request<B>,
    >,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = containerd_snapshots::tonic::codegen::BoxFuture<S::Response, S::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(
        &mut self,
        req: containerd_snapshots::tonic::codegen::http::Request<B>,
    ) -> Self::Future {
        let ns = crate::containerd::namespace_header(
            req.headers()
                .get("containerd-namespace")
                .map(|v| v.as_bytes()),
        );
        // containerd passes its caller's deadline on (a kubelet's, a `ctr --timeout`): the
        // registry work of this request ends in time for its answer to be heard.
        let deadline = crate::containerd::grpc_timeout(
            req.headers().get("grpc-timeout").map(|v| v.as_bytes()),
        )
        .and_then(crate::containerd::answer_by);
        let fut = self.0.call(req);
        Box::pin(crate::containerd::in_request_namespace(
            ns,
            clip_core::registry::within_caller_deadline(deadline, fut),
        ))
    }
}

impl<S: containerd_snapshots::tonic::server::NamedService>
    containerd_snapshots::tonic::server::NamedService for WithNamespace<S>
{
    const NAME: &'static str = S::NAME;
}

/// Resolves when SIGTERM or SIGINT arrives.
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Serves the CRI image service `c` describes, in the background; it carries pull secrets, so
/// its socket is root's alone.
fn serve_cri(
    c: &CriConfig,
    session: Arc<clip_core::registry::session::SessionCredentials>,
) -> Result<tokio::task::JoinHandle<()>> {
    let listener = bind_socket(&c.address, 0o600)?;
    let svc = crate::cri::ImageService::new(&c.upstream, session, c.credentials_ttl);
    eprintln!(
        "clip snapshotter: CRI image service on {} (forwarding to {})",
        c.address.display(),
        c.upstream.display()
    );
    Ok(tokio::spawn(async move {
        if let Err(e) = tonic14::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(crate::os::trusted_connections(listener))
            .await
        {
            tracing::error!("serving the CRI image service: {e}");
        }
    }))
}

/// After the snapshots API has stopped: the CRI service, the records, the mounts (kept with the
/// keeper, or unmounted) and pending cache writes; then the sockets.
async fn shutdown(
    cfg: &DaemonConfig,
    cri: Option<tokio::task::JoinHandle<()>>,
    sn: &ClipSnapshotter,
    mounts: &crate::snapshotter::mounts::FuseMounts,
) {
    if let Some(task) = cri {
        task.abort();
    }
    sn.shutdown().await;
    mounts.shutdown().await;
    let _ = std::fs::remove_file(&cfg.address);
    if let Some(c) = &cfg.cri {
        let _ = std::fs::remove_file(&c.address);
    }
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
