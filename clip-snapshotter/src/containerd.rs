//! The connection to containerd's own API (not the snapshots service clip serves): its socket,
//! dialling it, and the request metadata every call carries.
//!
//! A leaf module: `clip pull`, label-free discovery and the CRI proxy all connect through here,
//! and it uses nothing of the crate.

use containerd_client::tonic::{transport::Channel, Request};
use std::path::Path;
use std::time::Duration;

/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";

#[derive(Debug, thiserror::Error)]
#[error("connecting to containerd at {address}: {reason}")]
pub struct ConnectError {
    pub address: String,
    pub reason: String,
}

/// A connection to containerd at `address`, made now (within `timeout`).
pub async fn connect(address: &Path, timeout: Duration) -> Result<Channel, ConnectError> {
    let err = |reason: String| ConnectError {
        address: address.display().to_string(),
        reason,
    };
    tokio::time::timeout(timeout, containerd_client::connect(address))
        .await
        .map_err(|_| err(format!("timed out after {timeout:?}")))?
        .map_err(|e| err(e.to_string()))
}

/// A connection to containerd at `address`, dialled on first use (containerd may start after
/// clip) and again after it breaks.
pub fn connect_lazy(address: &Path) -> Channel {
    let path = address.to_path_buf();
    containerd_client::tonic::transport::Endpoint::from_static("http://[::]")
        .connect_with_connector_lazy(tower05::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
}

/// `msg` as a request in containerd namespace `namespace`, under `lease` if given (what the
/// request writes is kept from garbage collection until the lease ends).
pub fn request<T>(namespace: &str, lease: Option<&str>, msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    let md = r.metadata_mut();
    if let Ok(v) = namespace.parse() {
        md.insert("containerd-namespace", v);
    }
    if let Some(Ok(v)) = lease.map(str::parse) {
        md.insert("containerd-lease", v);
    }
    r
}
