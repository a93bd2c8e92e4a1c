//! A Kubernetes CRI client doing what the kubelet does (runtime.v1 over containerd's socket):
//! PullImage with the pod's credentials, RunPodSandbox, CreateContainer, StartContainer,
//! ContainerStatus. Only the message fields it uses are declared; field numbers follow
//! k8s.io/cri-api's api.proto (Debian's golang-k8s-cri-api-dev).

use containerd_client::tonic::{self, transport::Channel};
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageSpec {
    #[prost(string, tag = "1")]
    pub image: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, tag = "2")]
    pub password: String,
    #[prost(string, tag = "4")]
    pub server_address: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub uid: String,
    #[prost(string, tag = "3")]
    pub namespace: String,
    #[prost(uint32, tag = "4")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NamespaceOption {
    /// 0 POD, 1 CONTAINER, 2 NODE.
    #[prost(int32, tag = "1")]
    pub network: i32,
    #[prost(int32, tag = "2")]
    pub pid: i32,
    #[prost(int32, tag = "3")]
    pub ipc: i32,
    /// The pod's user namespace (`hostUsers: false`: mode POD with mappings).
    #[prost(message, optional, tag = "5")]
    pub userns_options: Option<UserNamespace>,
}

/// One range of a user namespace's id mapping.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IdMapping {
    #[prost(uint32, tag = "1")]
    pub host_id: u32,
    #[prost(uint32, tag = "2")]
    pub container_id: u32,
    #[prost(uint32, tag = "3")]
    pub length: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UserNamespace {
    /// 0 POD (a namespace of the pod's own), 2 NODE (the host's).
    #[prost(int32, tag = "1")]
    pub mode: i32,
    #[prost(message, repeated, tag = "2")]
    pub uids: Vec<IdMapping>,
    #[prost(message, repeated, tag = "3")]
    pub gids: Vec<IdMapping>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerSecurityContext {
    #[prost(message, optional, tag = "3")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxContainerConfig {
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxContainerSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxSandboxSecurityContext {
    #[prost(message, optional, tag = "1")]
    pub namespace_options: Option<NamespaceOption>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LinuxPodSandboxConfig {
    #[prost(string, tag = "1")]
    pub cgroup_parent: String,
    #[prost(message, optional, tag = "2")]
    pub security_context: Option<LinuxSandboxSecurityContext>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<PodSandboxMetadata>,
    #[prost(string, tag = "2")]
    pub hostname: String,
    #[prost(string, tag = "3")]
    pub log_directory: String,
    #[prost(map = "string, string", tag = "6")]
    pub labels: HashMap<String, String>,
    #[prost(message, optional, tag = "8")]
    pub linux: Option<LinuxPodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageRequest {
    #[prost(message, optional, tag = "1")]
    pub image: Option<ImageSpec>,
    #[prost(message, optional, tag = "2")]
    pub auth: Option<AuthConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PullImageResponse {
    #[prost(string, tag = "1")]
    pub image_ref: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxRequest {
    #[prost(message, optional, tag = "1")]
    pub config: Option<PodSandboxConfig>,
    #[prost(string, tag = "2")]
    pub runtime_handler: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RunPodSandboxResponse {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerMetadata {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(uint32, tag = "2")]
    pub attempt: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerConfig {
    #[prost(message, optional, tag = "1")]
    pub metadata: Option<ContainerMetadata>,
    #[prost(message, optional, tag = "2")]
    pub image: Option<ImageSpec>,
    #[prost(string, repeated, tag = "3")]
    pub command: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    pub args: Vec<String>,
    #[prost(string, tag = "11")]
    pub log_path: String,
    #[prost(message, optional, tag = "15")]
    pub linux: Option<LinuxContainerConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
    #[prost(message, optional, tag = "2")]
    pub config: Option<ContainerConfig>,
    #[prost(message, optional, tag = "3")]
    pub sandbox_config: Option<PodSandboxConfig>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateContainerResponse {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerIdRequest {
    #[prost(string, tag = "1")]
    pub container_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatus {
    #[prost(string, tag = "1")]
    pub id: String,
    /// 0 CREATED, 1 RUNNING, 2 EXITED, 3 UNKNOWN.
    #[prost(int32, tag = "3")]
    pub state: i32,
    #[prost(int32, tag = "7")]
    pub exit_code: i32,
    #[prost(string, tag = "10")]
    pub reason: String,
    #[prost(string, tag = "11")]
    pub message: String,
    #[prost(string, tag = "15")]
    pub log_path: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerStatusResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<ContainerStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandboxIdRequest {
    #[prost(string, tag = "1")]
    pub pod_sandbox_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionRequest {
    #[prost(string, tag = "1")]
    pub version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VersionResponse {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub runtime_name: String,
    #[prost(string, tag = "3")]
    pub runtime_version: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct PodSandbox {
    #[prost(string, tag = "1")]
    pub id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListPodSandboxResponse {
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<PodSandbox>,
}

pub const EXITED: i32 = 2;

/// A CRI connection (its own runtime: the tests are synchronous).
pub struct Cri {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

impl Cri {
    pub fn connect(sock: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let channel = rt
            .block_on(containerd_client::connect(sock))
            .expect("connect to the CRI socket");
        Cri { rt, channel }
    }

    fn call<Req, Resp>(&self, path: &'static str, req: Req) -> Result<Resp, tonic::Status>
    where
        Req: prost::Message + Send + Sync + 'static,
        Resp: prost::Message + Default + Send + Sync + 'static,
    {
        self.rt.block_on(async {
            let mut grpc = tonic::client::Grpc::new(self.channel.clone());
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
            let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
            let mut request = tonic::Request::new(req);
            request.set_timeout(std::time::Duration::from_secs(300));
            grpc.unary(request, path, codec)
                .await
                .map(|r| r.into_inner())
        })
    }

    pub fn version(&self) -> Result<VersionResponse, tonic::Status> {
        self.call(
            "/runtime.v1.RuntimeService/Version",
            VersionRequest {
                version: "v1".into(),
            },
        )
    }

    pub fn pull(
        &self,
        image: &str,
        auth: Option<AuthConfig>,
        pod: &PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let r: PullImageResponse = self.call(
            "/runtime.v1.ImageService/PullImage",
            PullImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                }),
                auth,
                sandbox_config: Some(pod.clone()),
            },
        )?;
        Ok(r.image_ref)
    }

    pub fn run_pod(&self, pod: &PodSandboxConfig) -> Result<String, tonic::Status> {
        let r: RunPodSandboxResponse = self.call(
            "/runtime.v1.RuntimeService/RunPodSandbox",
            RunPodSandboxRequest {
                config: Some(pod.clone()),
                runtime_handler: String::new(),
            },
        )?;
        Ok(r.pod_sandbox_id)
    }

    pub fn create_container(
        &self,
        pod_id: &str,
        pod: &PodSandboxConfig,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String, tonic::Status> {
        let r: CreateContainerResponse = self.call(
            "/runtime.v1.RuntimeService/CreateContainer",
            CreateContainerRequest {
                pod_sandbox_id: pod_id.into(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: name.into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.into(),
                    }),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    args: Vec::new(),
                    log_path: format!("{name}.log"),
                    // The kubelet repeats the pod's namespaces for each container.
                    linux: pod
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .map(|s| LinuxContainerConfig {
                            security_context: Some(LinuxContainerSecurityContext {
                                namespace_options: s.namespace_options.clone(),
                            }),
                        }),
                }),
                sandbox_config: Some(pod.clone()),
            },
        )?;
        Ok(r.container_id)
    }

    pub fn start_container(&self, id: &str) -> Result<(), tonic::Status> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/StartContainer",
            ContainerIdRequest {
                container_id: id.into(),
            },
        )?;
        Ok(())
    }

    pub fn container_status(&self, id: &str) -> Result<ContainerStatus, tonic::Status> {
        let r: ContainerStatusResponse = self.call(
            "/runtime.v1.RuntimeService/ContainerStatus",
            ContainerIdRequest {
                container_id: id.into(),
            },
        )?;
        r.status
            .ok_or_else(|| tonic::Status::internal("ContainerStatus without a status"))
    }

    pub fn remove_image(&self, image: &str) -> Result<(), tonic::Status> {
        let _: Empty = self.call(
            "/runtime.v1.ImageService/RemoveImage",
            PullImageRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                }),
                auth: None,
                sandbox_config: None,
            },
        )?;
        Ok(())
    }

    pub fn list_pods(&self) -> Result<Vec<String>, tonic::Status> {
        let r: ListPodSandboxResponse = self.call(
            "/runtime.v1.RuntimeService/ListPodSandbox",
            ListPodSandboxRequest {},
        )?;
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }

    /// Stops and removes every pod (their containers, network namespaces and shims go too).
    pub fn remove_all_pods(&self) {
        for id in self.list_pods().unwrap_or_default() {
            let _ = self.stop_pod(&id);
            let _ = self.remove_pod(&id);
        }
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/StopPodSandbox",
            PodSandboxIdRequest {
                pod_sandbox_id: id.into(),
            },
        )?;
        Ok(())
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), tonic::Status> {
        let _: Empty = self.call(
            "/runtime.v1.RuntimeService/RemovePodSandbox",
            PodSandboxIdRequest {
                pod_sandbox_id: id.into(),
            },
        )?;
        Ok(())
    }
}

/// A pod's configuration as the kubelet would send it (logs under `log_dir`).
pub fn pod_config(name: &str, log_dir: &Path, host_network: bool) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        // The kubelet sets no hostname for host-network pods (runc refuses one without a UTS
        // namespace of the pod's own).
        hostname: if host_network {
            String::new()
        } else {
            name.into()
        },
        log_directory: log_dir.display().to_string(),
        labels: HashMap::new(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: if host_network { 2 } else { 0 },
                    pid: 1,
                    ipc: 0,
                    userns_options: None,
                }),
            }),
        }),
    }
}

/// [`pod_config`] for a pod with `hostUsers: false`, as the kubelet sends it: a user namespace
/// of the pod's own mapping container ids 0-65535 to host ids `host_base`-`host_base+65535`.
pub fn userns_pod_config(name: &str, log_dir: &Path, host_base: u32) -> PodSandboxConfig {
    let mut pod = pod_config(name, log_dir, false);
    let range = vec![IdMapping {
        host_id: host_base,
        container_id: 0,
        length: 65536,
    }];
    let ns = pod
        .linux
        .as_mut()
        .and_then(|l| l.security_context.as_mut())
        .and_then(|s| s.namespace_options.as_mut())
        .expect("pod_config sets namespace options");
    ns.userns_options = Some(UserNamespace {
        mode: 0,
        uids: range.clone(),
        gids: range,
    });
    pod
}
