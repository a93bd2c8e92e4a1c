//! The client against misbehaving HTTP servers (raw sockets, no registry): whatever a server
//! sends, what the client reads and holds stays bounded.

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A server that answers every request with `head` and then streams `body_len` bytes of a
/// pattern (`byte i = i % 251`), counting what it managed to write.
async fn serve(head: &'static str, body_len: u64) -> (String, Arc<AtomicU64>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = l.local_addr().unwrap().to_string();
    let sent = Arc::new(AtomicU64::new(0));
    let s = sent.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    req.push(b[0]);
                }
                let head = head.replace("{len}", &body_len.to_string());
                if c.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                let mut off = 0u64;
                let mut chunk = vec![0u8; 64 << 10];
                while off < body_len {
                    let n = chunk.len().min((body_len - off) as usize);
                    for (i, x) in chunk[..n].iter_mut().enumerate() {
                        *x = ((off + i as u64) % 251) as u8;
                    }
                    if c.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    off += n as u64;
                    s.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    (host, sent)
}

fn client() -> Client {
    Client::new(RegistryConfig {
        hosts_dir: None,
        docker_config: Some("/nonexistent".into()),
        deadline: Duration::from_secs(5),
        ..Default::default()
    })
}

/// A range read of `[start, start + len)` from a server answering `head` and then 1 GiB of
/// body: the result, and how many body bytes the server had sent when the client returned.
async fn range_from_a_1gib_answer(
    head: &'static str,
    start: u64,
    len: u64,
) -> (Result<Bytes, RegistryError>, u64) {
    let (host, sent) = serve(head, 1 << 30).await;
    let r: Reference = format!("{host}/repo:tag").parse().unwrap();
    let got = client()
        .get_blob_range(&r, &Digest::of(b"blob"), start, len)
        .await;
    (got, sent.load(Ordering::Relaxed))
}

#[tokio::test]
async fn a_server_ignoring_range_is_read_only_up_to_the_slice() {
    // The whole blob in answer to a range request near its start.
    let (got, sent) = range_from_a_1gib_answer(
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        1000,
        100,
    )
    .await;
    let want: Vec<u8> = (1000..1100u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(&got.unwrap()[..], &want[..]);
    assert!(
        sent < 64 << 20,
        "{sent} bytes sent before the client returned"
    );
}

#[tokio::test]
async fn an_error_body_is_not_read_whole() {
    let (got, sent) = range_from_a_1gib_answer(
        "HTTP/1.1 400 Bad Request\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        0,
        10,
    )
    .await;
    let e = got.unwrap_err();
    assert!(matches!(e, RegistryError::Http { status: 400, .. }), "{e}");
    assert!(
        sent < 64 << 20,
        "{sent} bytes sent before the client returned"
    );
}

type Log = Arc<std::sync::Mutex<Vec<String>>>;

/// Logged request heads that contain `what`.
fn requests_for(log: &Log, what: &str) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|h| h.contains(what))
        .count()
}

/// A server on `ip` that logs each request's head and answers with `answer(head)`.
async fn serve_with(
    ip: &str,
    answer: impl Fn(&str) -> String + Send + Sync + 'static,
) -> (String, Log) {
    serve_with_async(ip, move |head| {
        let a = answer(&head);
        Box::pin(async move { a })
    })
    .await
}

type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

/// [`serve_with`] whose answers may wait (for other requests, say).
async fn serve_with_async(
    ip: &str,
    answer: impl Fn(String) -> Answer + Send + Sync + 'static,
) -> (String, Log) {
    let l = tokio::net::TcpListener::bind(format!("{ip}:0"))
        .await
        .unwrap();
    let host = l.local_addr().unwrap().to_string();
    let log: Log = Arc::default();
    let (lg, answer) = (log.clone(), Arc::new(answer));
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let (lg, answer) = (lg.clone(), answer.clone());
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    req.push(b[0]);
                }
                let head = String::from_utf8_lossy(&req).to_ascii_lowercase();
                lg.lock().unwrap().push(head.clone());
                let _ = c.write_all(answer(head).await.as_bytes()).await;
            });
        }
    });
    (host, log)
}

fn reply(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn creds(user: &str) -> Credentials {
    Credentials {
        username: user.into(),
        password: format!("{user}-secret"),
    }
}

/// The `authorization:` value a request head carries (lower-cased), if any.
fn auth_of(head: &str) -> Option<&str> {
    head.lines().find_map(|l| l.strip_prefix("authorization: "))
}

#[tokio::test]
async fn a_mirror_never_gets_the_registrys_credentials() {
    let upstream_auth = creds("up").basic_header().to_ascii_lowercase();
    let want = upstream_auth.clone();
    let (up, up_log) = serve_with("127.0.0.1", move |h| match auth_of(h) {
        Some(a) if a == want => reply("200 OK", "", "hello"),
        _ => reply(
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"up\"\r\n",
            "",
        ),
    })
    .await;
    // The mirror asks for credentials of its own and never has the blob.
    let (mirror, mirror_log) = serve_with("127.0.0.2", |h| match auth_of(h) {
        Some(_) => reply("404 Not Found", "", ""),
        None => reply(
            "401 Unauthorized",
            "WWW-Authenticate: Basic realm=\"m\"\r\n",
            "",
        ),
    })
    .await;
    let hosts = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(hosts.path().join(&up)).unwrap();
    std::fs::write(
        hosts.path().join(&up).join("hosts.toml"),
        format!("[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"),
    )
    .unwrap();
    let r: Reference = format!("{up}/repo:tag").parse().unwrap();
    for mirror_creds in [false, true] {
        mirror_log.lock().unwrap().clear();
        let mut credentials = HashMap::from([(up.clone(), creds("up"))]);
        if mirror_creds {
            credentials.insert(mirror.clone(), creds("mirror"));
        }
        let c = Client::new(RegistryConfig {
            hosts_dir: Some(hosts.path().to_path_buf()),
            docker_config: Some("/nonexistent".into()),
            credentials,
            deadline: Duration::from_secs(5),
            ..Default::default()
        });
        let got = c.get_blob_range(&r, &Digest::of(b"x"), 0, 5).await.unwrap();
        assert_eq!(&got[..], b"hello");
        let seen = mirror_log.lock().unwrap().clone();
        assert!(!seen.is_empty(), "the mirror was asked first");
        for h in &seen {
            assert_ne!(auth_of(h), Some(upstream_auth.as_str()), "mirror saw: {h}");
        }
        let mirror_auth = creds("mirror").basic_header().to_ascii_lowercase();
        assert_eq!(
            seen.iter()
                .any(|h| auth_of(h) == Some(mirror_auth.as_str())),
            mirror_creds
        );
        assert!(up_log.lock().unwrap().iter().any(|h| auth_of(h).is_some()));
    }
}

#[tokio::test]
async fn a_token_server_on_another_host_gets_credentials_only_if_trusted() {
    let (token, token_log) =
        serve_with("127.0.0.2", |_| reply("200 OK", "", r#"{"token":"tok"}"#)).await;
    let realm = format!("http://{token}/token");
    let (up, _) = serve_with("127.0.0.1", move |h| match auth_of(h) {
        Some("bearer tok") => reply("200 OK", "", "hello"),
        _ => reply(
            "401 Unauthorized",
            &format!("WWW-Authenticate: Bearer realm=\"{realm}\",service=\"up\"\r\n"),
            "",
        ),
    })
    .await;
    let r: Reference = format!("{up}/repo:tag").parse().unwrap();
    let secret = creds("up").basic_header().to_ascii_lowercase();
    for trusted in [false, true] {
        token_log.lock().unwrap().clear();
        let c = Client::new(RegistryConfig {
            hosts_dir: None,
            docker_config: Some("/nonexistent".into()),
            credentials: HashMap::from([(up.clone(), creds("up"))]),
            token_realms: if trusted {
                vec!["127.0.0.2".into()]
            } else {
                vec![]
            },
            deadline: Duration::from_secs(5),
            ..Default::default()
        });
        let got = c.get_blob_range(&r, &Digest::of(b"x"), 0, 5).await.unwrap();
        assert_eq!(&got[..], b"hello");
        let seen = token_log.lock().unwrap().clone();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(
            auth_of(&seen[0]) == Some(secret.as_str()),
            trusted,
            "{seen:?}"
        );
    }
}

/// An image resolved by digest is resolved once per client; a referrers listing serves an
/// image's index and profile lookups together, and a registry without the referrers API is
/// asked by tag at once the next time.
#[tokio::test]
async fn pinned_images_and_referrers_listings_cost_one_round_trip_each() {
    let config =
        r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = Digest::of(config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MEDIA_OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[]}}"#,
        config.len()
    );
    let manifest_digest = Digest::of(manifest.as_bytes());
    let listing =
        format!(r#"{{"schemaVersion":2,"mediaType":"{MEDIA_OCI_INDEX}","manifests":[]}}"#);
    let (m, c, l) = (manifest.clone(), config.to_string(), listing.clone());
    let (host, log) = serve_with("127.0.0.1", move |head| {
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        if path.contains("/referrers/") {
            reply("404 Not Found", "", "")
        } else if path.contains("/manifests/sha256-") {
            reply(
                "200 OK",
                &format!("Content-Type: {MEDIA_OCI_INDEX}\r\n"),
                &l,
            )
        } else if path.contains("/manifests/") {
            reply(
                "200 OK",
                &format!("Content-Type: {MEDIA_OCI_MANIFEST}\r\n"),
                &m,
            )
        } else if path.contains("/blobs/") {
            reply("200 OK", "", &c)
        } else {
            reply("404 Not Found", "", "")
        }
    })
    .await;
    let c = client();
    let r: Reference = format!("{host}/app@{manifest_digest}").parse().unwrap();
    let requests = |what: &str| requests_for(&log, what);
    for _ in 0..2 {
        let image = c.resolve(&r).await.unwrap();
        assert_eq!(image.config_digest, config_digest);
        assert_eq!(&image.config_bytes[..], config.as_bytes());
    }
    assert_eq!(
        (requests("/manifests/sha256:"), requests("/blobs/")),
        (1, 1)
    );

    let tag = format!("sha256-{}", manifest_digest.hex());
    for _ in 0..2 {
        let got = c.referrers(&r, &manifest_digest, &tag).await.unwrap();
        assert_eq!(got.as_deref(), Some(listing.as_bytes()));
    }
    assert_eq!(
        (requests("/referrers/"), requests("/manifests/sha256-")),
        (1, 1)
    );
    // After a push the listing is asked again, by tag only.
    c.forget_referrers(&r, &manifest_digest);
    c.referrers(&r, &manifest_digest, &tag).await.unwrap();
    assert_eq!(
        (requests("/referrers/"), requests("/manifests/sha256-")),
        (1, 2)
    );
}

/// A registry that answers a referrers lookup only once both ways of asking (the API and the
/// tag) are in flight together: a client asking one after the other gets a 500 after 5 s.
async fn serve_referrers_needing_both(api: bool) -> (String, Log) {
    let both = Arc::new(tokio::sync::Barrier::new(2));
    let asked = Arc::new(AtomicU64::new(0));
    serve_with_async("127.0.0.1", move |head| {
        let (both, first_ask) = (both.clone(), asked.fetch_add(1, Ordering::SeqCst) < 2);
        Box::pin(async move {
            if first_ask
                && tokio::time::timeout(Duration::from_secs(5), both.wait())
                    .await
                    .is_err()
            {
                return reply("500 Internal Server Error", "", "");
            }
            let listing =
                format!(r#"{{"schemaVersion":2,"mediaType":"{MEDIA_OCI_INDEX}","manifests":[]}}"#);
            match (head.contains("/referrers/"), api) {
                (true, false) | (false, true) => reply("404 Not Found", "", ""),
                _ => reply(
                    "200 OK",
                    &format!("Content-Type: {MEDIA_OCI_INDEX}\r\n"),
                    &listing,
                ),
            }
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_referrers_lookup_asks_both_ways_at_once_and_concurrent_lookups_share_it() {
    for api in [false, true] {
        let (host, log) = serve_referrers_needing_both(api).await;
        let c = client();
        let subject = Digest::of(b"image");
        let r: Reference = format!("{host}/app@{subject}").parse().unwrap();
        let tag = crate::artifact::referrers_tag(&subject);
        let lookups = (0..3).map(|_| c.referrers(&r, &subject, &tag));
        for got in futures_util::future::join_all(lookups).await {
            assert!(got.unwrap().is_some(), "api={api}");
        }
        let count = |what: &str| requests_for(&log, what);
        assert_eq!(
            (count("/referrers/"), count("/manifests/sha256-")),
            (1, 1),
            "api={api}"
        );
        // Afterwards only the way that answered is asked.
        c.forget_referrers(&r, &subject);
        assert!(c.referrers(&r, &subject, &tag).await.unwrap().is_some());
        let expected = if api { (2, 1) } else { (1, 2) };
        assert_eq!(
            (count("/referrers/"), count("/manifests/sha256-")),
            expected,
            "api={api}"
        );
    }
}

#[test]
fn images_taken_from_elsewhere_are_checked_like_a_registrys_answer() {
    let config = r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]}}"#;
    let config_digest = Digest::of(config.as_bytes());
    let layer = Digest::of(b"layer");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{MEDIA_OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer}","size":5}}]}}"#,
        config.len()
    );
    let digest = Digest::of(manifest.as_bytes());
    let c = client();
    let r: Reference = format!("127.0.0.1:1/app@{digest}").parse().unwrap();
    let m = Bytes::from(manifest.clone());
    // Another manifest than the pinned one, a config that is not the manifest's, an index.
    let other: Reference = format!("127.0.0.1:1/app@{}", Digest::of(b"x"))
        .parse()
        .unwrap();
    assert!(c
        .resolve_from(&other, m.clone(), Bytes::from(config))
        .is_err());
    assert!(c.resolve_from(&r, m.clone(), Bytes::from("{}")).is_err());
    let index = format!(r#"{{"schemaVersion":2,"mediaType":"{MEDIA_OCI_INDEX}","manifests":[]}}"#);
    let ir: Reference = format!("127.0.0.1:1/app@{}", Digest::of(index.as_bytes()))
        .parse()
        .unwrap();
    assert!(c
        .resolve_from(&ir, Bytes::from(index), Bytes::from(config))
        .is_err());
    assert!(!c.is_resolved(&r));
    // The right documents: resolved with no registry (port 1 answers nothing).
    let image = c.resolve_from(&r, m, Bytes::from(config)).unwrap();
    assert_eq!(
        (image.manifest_digest, image.layers[0].digest),
        (digest, layer)
    );
    assert!(c.is_resolved(&r));
}

#[tokio::test]
async fn a_streamed_range_that_breaks_off_is_resumed_from_where_it_stopped() {
    // Answers `bytes=a-b` with a 206 for all of it, but the first answer breaks off halfway.
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (host, log) = serve_with("127.0.0.1", move |head| {
        let range = head
            .lines()
            .find_map(|l| l.strip_prefix("range: bytes="))
            .unwrap_or("0-0");
        let (a, b) = range.split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        let body: String = (a..=b).map(|i| (b'a' + (i % 26) as u8) as char).collect();
        let cut = match first.swap(false, Ordering::SeqCst) {
            true => body.len() / 2,
            false => body.len(),
        };
        format!(
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/100000\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            &body[..cut]
        )
    })
    .await;
    let r: Reference = format!("{host}/repo:tag").parse().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let c = client();
    let got = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(b) = rx.recv().await {
            all.extend_from_slice(&b);
        }
        all
    });
    c.get_blob_range_into(&r, &Digest::of(b"blob"), 1000, 100, tx)
        .await
        .unwrap();
    let want: Vec<u8> = (1000..1100u64).map(|i| b'a' + (i % 26) as u8).collect();
    assert_eq!(got.await.unwrap(), want);
    assert_eq!(requests_for(&log, "range: bytes=1000-1099"), 1);
    assert_eq!(requests_for(&log, "range: bytes=1050-1099"), 1);
}

#[tokio::test]
async fn a_presigned_redirect_never_shows_its_signature() {
    // The registry redirects blobs to object storage with a presigned URL. Whatever goes wrong
    // there (an error status, a host that refuses connections), the error says where, without
    // the query.
    let (storage, _) = serve_with("127.0.0.1", |_| {
        reply("400 Bad Request", "", "<Error>InvalidRequest</Error>")
    })
    .await;
    let refusing = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (registry, _) = serve_with("127.0.0.1", move |head| {
        let host = match head.contains("/denied/") {
            true => &storage,
            false => &refusing,
        };
        reply(
            "307 Temporary Redirect",
            &format!(
                "Location: http://{host}/blob?X-Amz-Credential=AKIA&X-Amz-Signature=s3cr3tsig\r\n"
            ),
            "",
        )
    })
    .await;
    let client = Client::new(RegistryConfig {
        hosts_dir: None,
        docker_config: Some("/nonexistent".into()),
        deadline: Duration::from_secs(1),
        ..Default::default()
    });
    let denied: Reference = format!("{registry}/denied:tag").parse().unwrap();
    let e = client
        .get_blob_range(&denied, &Digest::of(b"blob"), 0, 10)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("400") && e.contains("/blob?<redacted>"), "{e}");
    assert!(!e.contains("s3cr3tsig") && !e.contains("AKIA"), "{e}");
    let refused: Reference = format!("{registry}/refused:tag").parse().unwrap();
    let e = client
        .get_blob_range(&refused, &Digest::of(b"blob"), 0, 100)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Connection refused"), "{e}");
    assert!(!e.contains("s3cr3tsig") && !e.contains("AKIA"), "{e}");
}

#[tokio::test]
async fn a_wrong_port_fails_at_once_with_one_clear_error() {
    // A port nothing listens on (bound, then closed).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let client = Client::new(RegistryConfig::default());
    let r: Reference = format!("127.0.0.1:{port}/app:1").parse().unwrap();
    let Err(e) = client.resolve(&r).await else {
        panic!("nothing listens there")
    };
    assert!(
        matches!(e, RegistryError::Unreachable { .. }),
        "not retried until the deadline: {e}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains(&port.to_string()) && msg.contains("refused"),
        "{msg}"
    );
    // A host name that does not resolve, likewise.
    let r: Reference = "no-such-host.invalid:5000/app:1".parse().unwrap();
    let Err(e) = client.resolve(&r).await else {
        panic!("no such host")
    };
    assert!(matches!(e, RegistryError::Unreachable { .. }), "{e}");
}

/// What a closure logged at warning level and above.
fn warnings_during<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    let out = tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
    (out, text)
}

#[test]
fn a_transient_failure_is_retried_and_says_so() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ((got, log), warnings) = warnings_during(|| {
        rt.block_on(async {
            let n = Arc::new(AtomicU64::new(0));
            let (host, log) = serve_with("127.0.0.1", move |_| {
                if n.fetch_add(1, Ordering::SeqCst) < 2 {
                    reply("503 Service Unavailable", "", "busy")
                } else {
                    reply(
                        "200 OK",
                        "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
                        "{}",
                    )
                }
            })
            .await;
            let client = Client::new(RegistryConfig {
                initial_backoff: Duration::from_millis(10),
                ..Default::default()
            });
            let r: Reference = format!("{host}/app:1").parse().unwrap();
            (client.get_manifest(&r, "1").await.map(|(b, _, _)| b), log)
        })
    });
    assert_eq!(&got.unwrap()[..], b"{}");
    assert_eq!(requests_for(&log, "get /v2/app/manifests/1"), 3);
    let retries: Vec<&str> = warnings
        .lines()
        .filter(|l| l.contains("retrying in"))
        .collect();
    assert_eq!(retries.len(), 2, "{warnings}");
    assert!(
        retries[0].contains("attempt 1") && retries[0].contains("giving up"),
        "{warnings}"
    );
}

#[tokio::test]
async fn a_callers_deadline_shorter_than_the_registry_timeout_ends_the_retries() {
    let (host, log) = serve_with("127.0.0.1", |_| {
        reply("503 Service Unavailable", "", "busy")
    })
    .await;
    let client = Client::new(RegistryConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
        ..Default::default()
    });
    let r: Reference = format!("{host}/app:1").parse().unwrap();
    let start = std::time::Instant::now();
    let caller = start + Duration::from_millis(1500);
    let e = super::within_caller_deadline(Some(caller), client.get_manifest(&r, "1"))
        .await
        .unwrap_err();
    let took = start.elapsed();
    // The registry timeout is 120 s; the caller waits 1.5 s and hears why before it stops.
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(e.to_string().contains("the caller's deadline"), "{e}");
    assert!(e.to_string().contains("503"), "{e}");
    assert!(requests_for(&log, "get /v2/app/manifests/1") >= 3);
}
