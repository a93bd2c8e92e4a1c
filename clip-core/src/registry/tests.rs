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

#[tokio::test]
async fn a_server_ignoring_range_is_read_only_up_to_the_slice() {
    // 1 GiB whole-blob answer to a range request near its start.
    let (host, sent) = serve(
        "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        1 << 30,
    )
    .await;
    let r: Reference = format!("{host}/repo:tag").parse().unwrap();
    let got = client()
        .get_blob_range(&r, &Digest::of(b"blob"), 1000, 100)
        .await
        .unwrap();
    let want: Vec<u8> = (1000..1100u64).map(|i| (i % 251) as u8).collect();
    assert_eq!(&got[..], &want[..]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = sent.load(Ordering::Relaxed);
    assert!(n < 64 << 20, "{n} bytes sent before the client hung up");
}

#[tokio::test]
async fn an_error_body_is_not_read_whole() {
    let (host, sent) = serve(
        "HTTP/1.1 400 Bad Request\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        1 << 30,
    )
    .await;
    let r: Reference = format!("{host}/repo:tag").parse().unwrap();
    let e = client()
        .get_blob_range(&r, &Digest::of(b"blob"), 0, 10)
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Http { status: 400, .. }), "{e}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let n = sent.load(Ordering::Relaxed);
    assert!(n < 64 << 20, "{n} bytes sent before the client hung up");
}
