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

tokio::task_local! {
    /// The containerd namespace of the snapshots request being served, as containerd 1.7 and
    /// later forward it to a proxy plugin (metadata `containerd-namespace`); unset where it
    /// does not (containerd 1.6) and outside a request.
    static NAMESPACE: Option<String>;
}

/// The namespace of the snapshots request being served, when containerd said.
pub fn request_namespace() -> Option<String> {
    NAMESPACE.try_with(Clone::clone).ok().flatten()
}

/// Runs `fut` as the serving of a request in `namespace` (see [`request_namespace`]).
pub async fn in_request_namespace<F: std::future::Future>(
    namespace: Option<String>,
    fut: F,
) -> F::Output {
    NAMESPACE.scope(namespace, fut).await
}

/// The name in a `containerd-namespace` header, if it is one containerd would accept (a
/// label-like identifier, at most 76 bytes).
pub fn namespace_header(value: Option<&[u8]>) -> Option<String> {
    let v = std::str::from_utf8(value?).ok()?;
    let ok = !v.is_empty()
        && v.len() <= 76
        && v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    ok.then(|| v.to_string())
}

/// The time a `grpc-timeout` header gives the request (gRPC over HTTP/2: at most 8 digits and
/// a unit, H M S m u n), if it is one.
pub fn grpc_timeout(value: Option<&[u8]>) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = std::str::from_utf8(value?).ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When registry work for a request with `timeout` must end so that its answer reaches the
/// caller in time: a tenth of the time (at most 2 s) is left for the answer. None when it is
/// too far away to say (thousands of years: no deadline).
pub fn answer_by(timeout: std::time::Duration) -> Option<std::time::Instant> {
    let margin = (timeout / 10).min(std::time::Duration::from_secs(2));
    std::time::Instant::now().checked_add(timeout - margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_or_are_ignored() {
        use std::time::Duration;
        let t = |s: &str| grpc_timeout(Some(s.as_bytes()));
        assert_eq!(t("120S"), Some(Duration::from_secs(120)));
        assert_eq!(t("9999m"), Some(Duration::from_millis(9999)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "123456789S", "12X", "-1S", "1.5S", "12 S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(None), None);
        let far = t("99999999H").unwrap();
        assert!(answer_by(far).is_none() || answer_by(far).unwrap() > std::time::Instant::now());
        let soon = answer_by(Duration::from_secs(10)).unwrap();
        let left = soon - std::time::Instant::now();
        assert!(
            left <= Duration::from_secs(9) && left > Duration::from_secs(8),
            "{left:?}"
        );
    }

    #[test]
    fn namespace_headers_are_names_or_nothing() {
        assert_eq!(namespace_header(Some(b"k8s.io")).as_deref(), Some("k8s.io"));
        assert_eq!(
            namespace_header(Some(b"default")).as_deref(),
            Some("default")
        );
        for bad in [&b""[..], b"../x", b"a/b", b"-x", &[0xff, 0x61], &[b'a'; 77]] {
            assert_eq!(namespace_header(Some(bad)), None, "{bad:?}");
        }
        assert_eq!(namespace_header(None), None);
    }

    #[tokio::test]
    async fn the_namespace_is_known_only_inside_its_request() {
        assert_eq!(request_namespace(), None);
        let inside = in_request_namespace(Some("tenant-a".into()), async { request_namespace() });
        assert_eq!(inside.await.as_deref(), Some("tenant-a"));
        assert_eq!(request_namespace(), None);
    }
}
