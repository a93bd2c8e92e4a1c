//! The node's CRI image service, in front of containerd's: the kubelet's
//! `--image-service-endpoint` points here. Every `runtime.v1.ImageService` call is forwarded to
//! containerd unchanged (bytes in, bytes out). A PullImage's credentials (the pod's pull
//! secret) are kept in memory, scoped to that image's registry and repository, so the lazy
//! reads of its layers after the pull can authenticate; RemoveImage drops them. They are never
//! written to disk or logged.

use bytes::{Buf, BufMut, Bytes};
use clip_core::reference::Reference;
use clip_core::registry::auth::Credentials;
use clip_core::registry::session::{Pull, SessionCredentials};
use std::sync::Arc;
use std::time::Duration;
use tonic14::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic14::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic14::server::NamedService;
use tonic14::transport::Channel;
use tonic14::{Request, Response, Status};

const SERVICE: &str = "runtime.v1.ImageService";
const PULL: &str = "/runtime.v1.ImageService/PullImage";
const REMOVE: &str = "/runtime.v1.ImageService/RemoveImage";
/// Larger requests are refused (a PullImage is a few KiB).
const MAX_MESSAGE: usize = 4 << 20;

/// The fields of PullImageRequest / RemoveImageRequest read here (k8s.io/cri-api api.proto).
#[derive(Clone, PartialEq, prost::Message)]
struct ImageSpec {
    #[prost(string, tag = "1")]
    image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AuthConfig {
    #[prost(string, tag = "1")]
    username: String,
    #[prost(string, tag = "2")]
    password: String,
    /// base64("username:password").
    #[prost(string, tag = "3")]
    auth: String,
    #[prost(string, tag = "5")]
    identity_token: String,
    #[prost(string, tag = "6")]
    registry_token: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    auth: Option<AuthConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PullImageResponse {
    #[prost(string, tag = "1")]
    image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RemoveImageRequest {
    #[prost(message, optional, tag = "1")]
    image: Option<ImageSpec>,
}

/// Messages as bytes: forwarded without being understood.
#[derive(Clone, Copy, Default)]
struct Raw;

impl Encoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        if src.remaining() > MAX_MESSAGE {
            return Err(Status::resource_exhausted("message too large"));
        }
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

impl Codec for Raw {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

/// The image service: forwards to containerd's, keeping pull credentials.
#[derive(Clone)]
pub struct ImageService {
    upstream: Channel,
    session: Arc<SessionCredentials>,
    ttl: Option<Duration>,
}

impl NamedService for ImageService {
    const NAME: &'static str = SERVICE;
}

impl ImageService {
    /// `upstream`: containerd's socket (its CRI plugin), dialled on first use (containerd may
    /// start after clip); `ttl`: how long a pull's credentials are kept (None: until the image
    /// is removed or the daemon stops).
    pub fn new(
        upstream: &std::path::Path,
        session: Arc<SessionCredentials>,
        ttl: Option<Duration>,
    ) -> ImageService {
        let upstream = crate::containerd::connect_lazy(upstream);
        ImageService {
            upstream,
            session,
            ttl,
        }
    }

    async fn forward(
        &self,
        path: &str,
        body: Bytes,
        timeout: Option<Duration>,
    ) -> Result<Bytes, Status> {
        let mut grpc = tonic14::client::Grpc::new(self.upstream.clone());
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd's image service: {e}")))?;
        let path = http::uri::PathAndQuery::try_from(path)
            .map_err(|_| Status::unimplemented("bad method path"))?;
        let mut req = Request::new(body);
        if let Some(t) = timeout {
            req.set_timeout(t);
        }
        grpc.unary(req, path, Raw).await.map(Response::into_inner)
    }

    /// The call, with PullImage's credentials kept before containerd pulls (the snapshotter
    /// reads the image while the pull runs) and dropped again if the pull fails.
    async fn handle(self, path: String, req: Request<Bytes>) -> Result<Response<Bytes>, Status> {
        let timeout = grpc_timeout(req.metadata());
        let body = req.into_inner();
        match path.as_str() {
            PULL => {
                let pulled = self.remember_pull(&body);
                let out = self.forward(&path, body, timeout).await;
                match (&pulled, &out) {
                    (Some(pull), Ok(resp)) => {
                        if let Ok(r) = <PullImageResponse as prost::Message>::decode(resp.clone()) {
                            self.session.alias(*pull, &r.image_ref);
                        }
                    }
                    (Some(pull), Err(_)) => {
                        // Only this pull's own entry: another tenant's pull of the same image
                        // keeps its credentials (its running pods read with them).
                        self.session.failed(*pull);
                    }
                    _ => {}
                }
                out.map(Response::new)
            }
            REMOVE => {
                let image = <RemoveImageRequest as prost::Message>::decode(body.clone())
                    .ok()
                    .and_then(|r| r.image)
                    .map(|i| i.image);
                let out = self.forward(&path, body, timeout).await?;
                if let Some(image) = image {
                    if self.session.remove(&image) {
                        tracing::info!(%image, "image removed: its pull credentials are dropped");
                    }
                }
                Ok(Response::new(out))
            }
            _ => self.forward(&path, body, timeout).await.map(Response::new),
        }
    }

    /// Keeps a PullImage's credentials; returns the name they are kept under.
    fn remember_pull(&self, body: &Bytes) -> Option<Pull> {
        let req = <PullImageRequest as prost::Message>::decode(body.clone()).ok()?;
        let name = req.image?.image;
        let creds = credentials(req.auth?)?;
        let r: Reference = match name.parse() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(image = %name, "PullImage of an unparsable reference; its credentials are not kept: {e}");
                return None;
            }
        };
        let pull = self
            .session
            .put(&name, &r.registry, &r.repository, creds, self.ttl);
        tracing::info!(image = %name, registry = %r.registry, "keeping the pull's credentials in memory for lazy reads");
        Some(pull)
    }
}

/// Username and password from a CRI AuthConfig (given directly or as `auth`). Tokens are not
/// used: such pulls read lazily with the node's own credentials.
fn credentials(a: AuthConfig) -> Option<Credentials> {
    if !a.username.is_empty() {
        return Some(Credentials {
            username: a.username,
            password: a.password,
        });
    }
    if !a.auth.is_empty() {
        use base64::Engine as _;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(a.auth.trim())
            .ok()?;
        let text = String::from_utf8(raw).ok()?;
        let (u, p) = text.split_once(':')?;
        return Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        });
    }
    if !a.identity_token.is_empty() || !a.registry_token.is_empty() {
        tracing::warn!("PullImage carried a token, not a username and password: lazy reads of this image use the node's own credentials");
    }
    None
}

/// The caller's `grpc-timeout`, passed on.
fn grpc_timeout(md: &tonic14::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

struct Unary {
    svc: ImageService,
    path: String,
}

impl tonic14::server::UnaryService<Bytes> for Unary {
    type Response = Bytes;
    type Future = BoxFuture<Response<Bytes>, Status>;
    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let (svc, path) = (self.svc.clone(), self.path.clone());
        Box::pin(svc.handle(path, req))
    }
}

impl<B> Service<http::Request<B>> for ImageService
where
    B: tonic14::codegen::Body + Send + 'static,
    B::Error: Into<tonic14::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic14::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let unary = Unary {
            svc: self.clone(),
            path: req.uri().path().to_string(),
        };
        Box::pin(async move {
            let mut grpc = tonic14::server::Grpc::new(Raw);
            Ok(grpc.unary(unary, req).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn credentials_come_from_username_or_auth_and_tokens_are_not_used() {
        let direct = credentials(AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (direct.username.as_str(), direct.password.as_str()),
            ("u", "p")
        );
        let encoded = credentials(AuthConfig {
            auth: "dTpwOnE=".into(), // u:p:q
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (encoded.username.as_str(), encoded.password.as_str()),
            ("u", "p:q")
        );
        assert!(credentials(AuthConfig {
            registry_token: "t".into(),
            ..Default::default()
        })
        .is_none());
        assert!(credentials(AuthConfig {
            auth: "not base64!".into(),
            ..Default::default()
        })
        .is_none());
    }

    #[test]
    fn grpc_timeouts_are_read() {
        let mut md = tonic14::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&md), None);
        md.insert("grpc-timeout", "120S".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(Duration::from_secs(120)));
        md.insert("grpc-timeout", "5m".parse().unwrap());
        assert_eq!(grpc_timeout(&md), Some(Duration::from_millis(5)));
        md.insert("grpc-timeout", "x".parse().unwrap());
        assert_eq!(grpc_timeout(&md), None);
    }

    #[test]
    fn a_pull_request_is_read_without_changing_what_is_forwarded() {
        let req = PullImageRequest {
            image: Some(ImageSpec {
                image: "r.io:5000/team/app:1".into(),
            }),
            auth: Some(AuthConfig {
                username: "u".into(),
                password: "p".into(),
                ..Default::default()
            }),
        };
        let body = Bytes::from(req.encode_to_vec());
        let session = Arc::new(SessionCredentials::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A socket nobody serves (dialled lazily): only remember_pull is exercised.
        let _guard = rt.enter();
        let svc = ImageService::new(std::path::Path::new("/nonexistent"), session.clone(), None);
        assert!(svc.remember_pull(&body).is_some());
        assert_eq!(session.get("r.io:5000", "team/app").unwrap().username, "u");
        assert!(svc
            .remember_pull(&Bytes::from_static(b"\xff\xff"))
            .is_none());
    }
}
