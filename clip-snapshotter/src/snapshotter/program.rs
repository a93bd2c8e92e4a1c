//! The program a container starts, read from containerd's record of the container, so that a
//! lazy mount fetches it before the runtime execs it.
//!
//! A container's root snapshot is prepared (and its lazy layers mounted) before containerd
//! records the container; the record, with its OCI spec and so its command, follows within
//! tens of milliseconds, and the runtime execs the command tens of milliseconds after that,
//! once it has set the container up. The record is read as soon as containerd announces it
//! (its `/containers/create` event), and the program's bytes and libraries are on their way
//! while the runtime works. containerd names a snapshot to a proxy plugin as
//! `<namespace>/<n>/<key>`; clients (ctr, nerdctl, the CRI, Docker) create a container's root
//! snapshot under the container's id, which is how the record is found.
//!
//! Everything read here comes over containerd's socket and is treated as hostile: the spec
//! is read only up to [`MAX_SPEC`] bytes, and anything malformed means no guess.
//!
//! A leaf module: it uses containerd's API and nothing of the crate but its request helper.

use containerd_client::services::v1::{
    containers_client::ContainersClient, events_client::EventsClient, GetContainerRequest,
    SubscribeRequest,
};
use containerd_client::tonic::transport::Channel;
use std::time::{Duration, Instant};

/// How long a container's record is waited for after its root snapshot is prepared.
const WAIT: Duration = Duration::from_secs(30);

/// Largest container spec read (real ones are a few KiB).
const MAX_SPEC: usize = 1 << 20;

/// What a container runs first, from its spec's `process`.
#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    /// `args[0]`.
    pub program: Vec<u8>,
    /// The last `PATH=` of its environment.
    pub path: Option<Vec<u8>>,
    /// Its working directory (`/` if unset).
    pub cwd: Vec<u8>,
}

/// The containerd namespace and the client's key of a snapshot key as containerd passes it to
/// a proxy plugin (`<namespace>/<n>/<key>`).
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    let (namespace, rest) = key.split_once('/')?;
    let (n, key) = rest.split_once('/')?;
    (!namespace.is_empty() && !key.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then_some((namespace, key))
}

/// The command of an OCI runtime spec (JSON).
pub fn command_of(spec: &[u8]) -> Option<Command> {
    #[derive(serde::Deserialize)]
    struct Spec {
        process: Option<Process>,
    }
    #[derive(serde::Deserialize)]
    struct Process {
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        env: Vec<String>,
        #[serde(default)]
        cwd: String,
    }
    if spec.len() > MAX_SPEC {
        return None;
    }
    let process = serde_json::from_slice::<Spec>(spec).ok()?.process?;
    let program = process.args.into_iter().next()?.into_bytes();
    let path = process
        .env
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH="))
        .map(|p| p.as_bytes().to_vec());
    let cwd = match process.cwd.is_empty() {
        true => b"/".to_vec(),
        false => process.cwd.into_bytes(),
    };
    Some(Command { program, path, cwd })
}

/// The command of the container whose root is snapshot `key` in `namespace`, once containerd
/// has recorded it (`None` after [`WAIT`], or if containerd is out of reach).
pub async fn container_command(channel: Channel, namespace: &str, key: &str) -> Option<Command> {
    let until = Instant::now() + WAIT;
    // Subscribed first, then looked up once: a record made in between is announced.
    let mut events = EventsClient::new(channel.clone());
    let subscribe = crate::containerd::request(
        namespace,
        None,
        SubscribeRequest {
            filters: vec![r#"topic=="/containers/create""#.to_string()],
        },
    );
    let subscription = tokio::spawn(async move { events.subscribe(subscribe).await });
    let get = || async {
        let r = ContainersClient::new(channel.clone())
            .get(crate::containerd::request(
                namespace,
                None,
                GetContainerRequest {
                    id: key.to_string(),
                },
            ))
            .await
            .ok()?;
        let c = r.into_inner().container?;
        // The record of a container on this root (a client whose ids are not its snapshot
        // keys has a container of that id on another root, or none).
        (c.snapshot_key == key).then_some(())?;
        command_of(&c.spec?.value)
    };
    if let Some(c) = get().await {
        subscription.abort();
        return Some(c);
    }
    let left = until.saturating_duration_since(Instant::now());
    let stream = tokio::time::timeout(left, subscription).await;
    let Ok(Ok(Ok(stream))) = stream else {
        return None;
    };
    let mut stream = stream.into_inner();
    loop {
        let left = until.saturating_duration_since(Instant::now());
        let envelope = tokio::time::timeout(left, stream.message())
            .await
            .ok()?
            .ok()??;
        let Some(event) = envelope.event else {
            continue;
        };
        if !event
            .type_url
            .ends_with("containerd.events.ContainerCreate")
        {
            continue;
        }
        let Ok(created) =
            <containerd_client::events::ContainerCreate as prost::Message>::decode(&*event.value)
        else {
            continue;
        };
        if created.id == key {
            return get().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_keys_give_the_namespace_and_the_clients_key() {
        assert_eq!(split_key("default/5/c1"), Some(("default", "c1")));
        assert_eq!(split_key("k8s.io/12/abc/def"), Some(("k8s.io", "abc/def")));
        assert_eq!(split_key("c1"), None);
        assert_eq!(split_key("default/x/c1"), None);
        assert_eq!(split_key("/5/c1"), None);
        assert_eq!(split_key("default/5/"), None);
    }

    #[test]
    fn a_spec_gives_its_program_search_path_and_directory() {
        let spec = br#"{"ociVersion":"1.0.2","process":{"args":["python3","-c","print(1)"],
            "env":["PATH=/bin","HOME=/root","PATH=/usr/local/bin:/usr/bin"],"cwd":"/app"}}"#;
        assert_eq!(
            command_of(spec),
            Some(Command {
                program: b"python3".to_vec(),
                path: Some(b"/usr/local/bin:/usr/bin".to_vec()),
                cwd: b"/app".to_vec(),
            })
        );
        let bare = br#"{"process":{"args":["/bin/sh"]}}"#;
        assert_eq!(
            command_of(bare),
            Some(Command {
                program: b"/bin/sh".to_vec(),
                path: None,
                cwd: b"/".to_vec(),
            })
        );
        // No process, no args, not JSON, the wrong shapes, too big: no guess.
        for bad in [
            &br#"{}"#[..],
            br#"{"process":{"args":[]}}"#,
            b"not json",
            br#"{"process":{"args":"sh"}}"#,
            br#"{"process":{"args":[1]}}"#,
        ] {
            assert_eq!(command_of(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let mut big = br#"{"process":{"args":["sh"],"env":[""#.to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_SPEC));
        big.extend(br#""]}}"#);
        assert_eq!(command_of(&big), None);
    }
}
