//! Fault injection: an HTTP-aware proxy in front of the real registry breaks chosen requests
//! (5xx, 429 with Retry-After, connection reset mid-body, truncated body, stalled body, a flipped
//! byte). clip must succeed after retrying, or fail with a clear error after its deadline; never
//! accept a wrong byte, never hang.

use crate::common::*;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    Status503,
    TooMany429,
    /// Forward the headers and part of the body, then drop the connection.
    ResetMidBody,
    /// Forward headers and part of the body, then stall for this many seconds.
    Stall(u64),
    /// Flip one byte in the body.
    CorruptByte,
}

/// Faults to apply, in order, to requests whose path contains `pattern`.
pub struct FaultProxy {
    pub host: String,
    pub faults: Arc<Mutex<Vec<(String, Fault)>>>,
    pub seen: Arc<Mutex<Vec<String>>>,
    _rt: tokio::runtime::Runtime,
}

impl FaultProxy {
    pub fn start(upstream: &str) -> FaultProxy {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let faults: Arc<Mutex<Vec<(String, Fault)>>> = Arc::default();
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let (f, s, up) = (faults.clone(), seen.clone(), upstream.to_string());
        rt.spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (f, s, up) = (f.clone(), s.clone(), up.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &up, f, s).await;
                });
            }
        });
        FaultProxy {
            host,
            faults,
            seen,
            _rt: rt,
        }
    }

    pub fn inject(&self, pattern: &str, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .push((pattern.to_string(), fault));
    }
}

async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        buf.push(byte[0]);
        if buf.len() > 64 << 10 {
            return Ok(None);
        }
    }
    Ok(Some(buf))
}

/// One request per connection: requests carry no body here (GET/HEAD), responses are forced to
/// `Connection: close`.
async fn serve(
    mut conn: TcpStream,
    upstream: &str,
    faults: Arc<Mutex<Vec<(String, Fault)>>>,
    seen: Arc<Mutex<Vec<String>>>,
) -> std::io::Result<()> {
    let Some(head) = read_head(&mut conn).await? else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&head).to_string();
    let line = text.lines().next().unwrap_or("").to_string();
    seen.lock().unwrap().push(line.clone());
    let fault = {
        let mut f = faults.lock().unwrap();
        let i = f.iter().position(|(p, _)| line.contains(p.as_str()));
        i.map(|i| f.remove(i).1)
    };
    match fault {
        Some(Fault::Status503) => {
            return conn.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        }
        Some(Fault::TooMany429) => {
            return conn.write_all(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        }
        _ => {}
    }
    let mut up = TcpStream::connect(upstream).await?;
    let mut req = String::new();
    for l in text.split("\r\n").filter(|l| !l.is_empty()) {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            req.push_str(l);
            req.push_str("\r\n");
        }
    }
    req.push_str("Connection: close\r\n\r\n");
    up.write_all(req.as_bytes()).await?;
    let Some(resp_head) = read_head(&mut up).await? else {
        return Ok(());
    };
    let mut out = String::new();
    for l in String::from_utf8_lossy(&resp_head)
        .split("\r\n")
        .filter(|l| !l.is_empty())
    {
        if !l.to_ascii_lowercase().starts_with("connection:") {
            out.push_str(l);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    conn.write_all(out.as_bytes()).await?;
    let mut body = Vec::new();
    up.read_to_end(&mut body).await?;
    match fault {
        Some(Fault::ResetMidBody) => {
            conn.write_all(&body[..body.len() / 3]).await?;
            // Dropping the socket with unread data pending makes the kernel send a reset.
            return Ok(());
        }
        Some(Fault::Stall(secs)) => {
            conn.write_all(&body[..body.len() / 2]).await?;
            tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
            return Ok(());
        }
        Some(Fault::CorruptByte) if !body.is_empty() => {
            let mid = body.len() / 2;
            body[mid] ^= 0x01;
        }
        _ => {}
    }
    conn.write_all(&body).await?;
    conn.shutdown().await
}

fn setup() -> (Registry, FaultProxy, tempfile::TempDir, String) {
    let reg = Registry::start(Auth::None);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "v1", &["gen:everytype-base", "gen:busybox"]);
    reg.push_layout(&l, "v1", "faulty");
    let proxy = FaultProxy::start(&reg.host);
    let image = format!("{}/faulty:v1", proxy.host);
    (reg, proxy, tmp, image)
}

#[test]
fn transient_faults_are_retried_and_resumed() {
    let (_reg, proxy, tmp, image) = setup();
    let clean = clip_json(&tmp.path().join("clean"), &["index", &image, "--json"], &[]);
    proxy.seen.lock().unwrap().clear();
    for f in [Fault::Status503, Fault::TooMany429] {
        proxy.inject("/manifests/", f);
    }
    for f in [
        Fault::Status503,
        Fault::ResetMidBody,
        Fault::TooMany429,
        Fault::Stall(30),
        Fault::ResetMidBody,
    ] {
        proxy.inject("/blobs/sha256:", f);
    }
    let start = std::time::Instant::now();
    let j = clip_json(
        &tmp.path().join("faulty"),
        &["index", &image, "--json", "--stall-timeout", "2"],
        &[],
    );
    assert!(start.elapsed().as_secs() < 60, "took {:?}", start.elapsed());
    // Same bytes, same index, despite the faults.
    for i in 0..2 {
        assert_eq!(
            j["layers"][i]["index_digest"],
            clean["layers"][i]["index_digest"]
        );
    }
    assert!(
        proxy.faults.lock().unwrap().is_empty(),
        "every fault was exercised"
    );
    // Interrupted layer downloads resumed with range requests rather than starting over.
    let seen = proxy.seen.lock().unwrap().clone();
    assert!(seen.len() >= 9, "{seen:#?}");
}

#[test]
fn a_corrupted_byte_is_never_accepted() {
    let (_reg, proxy, tmp, image) = setup();
    let clean = clip_json(&tmp.path().join("clean"), &["index", &image, "--json"], &[]);
    // A damaged config blob fails its digest check and is fetched again.
    proxy.inject("/blobs/sha256:", Fault::CorruptByte);
    let j = clip_json(&tmp.path().join("a"), &["index", &image, "--json"], &[]);
    assert_eq!(
        j["layers"][0]["index_digest"],
        clean["layers"][0]["index_digest"]
    );
    assert!(proxy.faults.lock().unwrap().is_empty());
    // A layer streamed with a flipped byte: the gzip check or the layer digest refuses it, and
    // nothing is stored.
    let layer = format!("/blobs/{}", clean["layers"][0]["digest"].as_str().unwrap());
    proxy.inject(&layer, Fault::CorruptByte);
    let o = clip(&tmp.path().join("c"), &["index", &image], &[]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("mismatch") || e.contains("corrupt"), "{e}");
    let o = clip(&tmp.path().join("c"), &["inspect", &image], &[]);
    assert!(stderr(&o).contains("no clip index"), "{}", stderr(&o));
}

#[test]
fn persistent_failure_ends_at_the_deadline_with_a_clear_error() {
    let (_reg, proxy, tmp, image) = setup();
    for _ in 0..200 {
        proxy.inject("/manifests/", Fault::Status503);
    }
    let start = std::time::Instant::now();
    let o = clip(
        &tmp.path().join("a"),
        &["index", &image, "--registry-timeout", "4"],
        &[],
    );
    let took = start.elapsed();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("gave up after") && stderr(&o).contains("503"),
        "{}",
        stderr(&o)
    );
    assert!(took.as_secs_f64() < 10.0, "deadline not honoured: {took:?}");
    assert!(
        proxy.seen.lock().unwrap().len() >= 4,
        "expected several attempts with backoff"
    );
}

/// containerd passes its caller's deadline to the snapshotter (`ctr --timeout`, a kubelet's
/// request timeout): a Prepare whose index lookup keeps failing gives up before that deadline
/// with the registry's reason, rather than retrying for the registry timeout (120 s) after the
/// caller has stopped waiting.
#[test]
fn a_prepare_ends_its_registry_retries_within_containerds_deadline() {
    let (_reg, proxy, tmp, image) = setup();
    crate::snapshotter::publish_index(tmp.path(), &format!("{}/faulty:v1", _reg.host));
    // containerd drops the port from an image's source; the hosts directory names it.
    let hosts = crate::dropin::hosts_dir(tmp.path(), &proxy.host, None);
    let node = crate::snapshotter::Node::start_on(
        &tmp.path().join("node"),
        crate::snapshotter::Containerd::debian(crate::dropin::CONTAINERD_2_1),
        &["--hosts-dir", hosts.to_str().unwrap()],
    );
    // Every lookup of the image's index fails (both ways of asking: the referrers API and the
    // referrers tag), for longer than the test runs.
    for _ in 0..2000 {
        proxy.inject("/referrers/", Fault::Status503);
        proxy.inject("/manifests/sha256-", Fault::Status503);
    }
    let o = node.ctr(&[
        "--timeout",
        "8s",
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "clip",
        &image,
    ]);
    eprintln!("ctr pull: {}{}", stdout(&o), stderr(&o));
    // The snapshotter says why it stopped, and that it stopped for the caller's deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let log = loop {
        let log = without_colours(&node.snapshotter_log());
        if log.contains("the caller's deadline") {
            break log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no registry work ended at the caller's deadline: {log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let line = log
        .lines()
        .find(|l| l.contains("the caller's deadline") && l.contains("gave up after"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains("503"), "{line}");
    eprintln!("{line}");
}
