//! Auth for real: TLS + htpasswd, and the bearer-token flow, against Debian's docker-registry.

use crate::common::*;

#[test]
fn tls_and_htpasswd() {
    let reg = Registry::start(Auth::TlsHtpasswd);
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "latest", &["gen:busybox"]);
    reg.push_layout(&l, "latest", "tiny");
    let image = reg.image("tiny");
    // Trust the registry's CA through a containerd hosts.toml.
    let hosts = tmp.path().join("certs.d");
    std::fs::create_dir_all(hosts.join(&reg.host)).unwrap();
    std::fs::write(
        hosts.join(&reg.host).join("hosts.toml"),
        format!(
            "server = \"https://{}\"\nca = \"{}\"\n",
            reg.host,
            reg.ca.as_ref().unwrap().display()
        ),
    )
    .unwrap();
    let hosts_arg = hosts.display().to_string();

    let good = docker_config(tmp.path(), &reg.host, USER, PASSWORD);
    let j = clip_json(
        &tmp.path().join("ok"),
        &[
            "--hosts-dir",
            &hosts_arg,
            "index",
            &image,
            "--push",
            "--json",
        ],
        &[("DOCKER_CONFIG", &good)],
    );
    assert_eq!(j["layers"].as_array().unwrap().len(), 1);
    assert!(j["artifact"].is_string());
    // A fresh node reads a file lazily (range requests). The registry offers HTTP/2 over TLS,
    // and every request of clip's arrives over it.
    let (_, stats) = cat_with(
        &tmp.path().join("lazy"),
        &["--hosts-dir", &hosts_arg],
        &image,
        "/bin/busybox",
        &[],
        &[("DOCKER_CONFIG", &good)],
    );
    assert!(stats["registry_requests"].as_u64().unwrap() > 0, "{stats}");
    let clip_requests = reg.requests_from("clip/");
    assert!(
        clip_requests.iter().any(|l| l.contains("/blobs/")),
        "{clip_requests:#?}"
    );
    assert!(
        clip_requests.iter().all(|l| l.contains(" HTTP/2.0\"")),
        "{clip_requests:#?}"
    );

    // No credentials, wrong credentials: clear auth errors, no secret in the output.
    let o = clip(
        &tmp.path().join("anon"),
        &["--hosts-dir", &hosts_arg, "index", &image],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("authentication failed") && stderr(&o).contains("no credentials"),
        "{}",
        stderr(&o)
    );
    let bad_dir = tmp.path().join("bad");
    let bad = docker_config(&bad_dir, &reg.host, USER, "wrong-password-xyz");
    let o = clip(
        &tmp.path().join("bad-root"),
        &["--hosts-dir", &hosts_arg, "index", &image],
        &[("DOCKER_CONFIG", &bad)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("credentials rejected"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("wrong-password-xyz"));
    // Without the CA the certificate is refused (TLS is verified by default).
    let o = clip(
        &tmp.path().join("noca"),
        &["index", &image, "--registry-timeout", "3"],
        &[("DOCKER_CONFIG", &good)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    // Marked insecure, it works without the CA.
    let o = clip(
        &tmp.path().join("insecure"),
        &["--insecure-registry", &reg.host, "index", &image],
        &[("DOCKER_CONFIG", &good)],
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bearer_token_flow() {
    let reg = Registry::start(Auth::Token(300));
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "latest", &["gen:busybox"]);
    reg.push_layout(&l, "latest", "team/tiny");
    let image = reg.image("team/tiny");
    let good = docker_config(tmp.path(), &reg.host, USER, PASSWORD);
    let j = clip_json(
        &tmp.path().join("a"),
        &["index", &image, "--push", "--json"],
        &[("DOCKER_CONFIG", &good)],
    );
    assert!(j["artifact"].is_string(), "{j}");
    // A fresh node pulls the published index with a token.
    let b = clip_json(
        &tmp.path().join("b"),
        &["inspect", &image, "--json"],
        &[("DOCKER_CONFIG", &good)],
    );
    assert_eq!(b["files"], j["files"]);
    // Tokens are cached: far fewer tokens than requests.
    let count: u64 = {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            reqwest::get(format!(
                "http://127.0.0.1:{}/count",
                reg.token_port.unwrap()
            ))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
        })
        .parse()
        .unwrap()
    };
    assert!((1..=8).contains(&count), "{count} tokens issued");
    // Anonymous: the token server grants nothing, the registry refuses.
    let o = clip(&tmp.path().join("anon"), &["index", &image], &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("authentication failed"),
        "{}",
        stderr(&o)
    );
    let bad = docker_config(&tmp.path().join("bad"), &reg.host, USER, "nope");
    let o = clip(
        &tmp.path().join("badroot"),
        &["index", &image],
        &[("DOCKER_CONFIG", &bad)],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("authentication failed"),
        "{}",
        stderr(&o)
    );
}

fn tokens_issued(reg: &Registry) -> u64 {
    let url = format!("http://127.0.0.1:{}/count", reg.token_port.unwrap());
    std::process::Command::new("python3")
        .args([
            "-c",
            &format!(
                "import urllib.request; print(urllib.request.urlopen('{url}').read().decode())"
            ),
        ])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_are_cached_and_refreshed_before_they_expire() {
    use clip_core::registry::{auth::Credentials, Client, RegistryConfig};
    let reg = Registry::start(Auth::Token(8));
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "latest", &["gen:busybox"]);
    reg.push_layout(&l, "latest", "tiny");
    let mut cfg = RegistryConfig {
        docker_config: Some(tmp.path().join("none.json")),
        ..Default::default()
    };
    cfg.credentials.insert(
        reg.host.clone(),
        Credentials {
            username: USER.into(),
            password: PASSWORD.into(),
        },
    );
    let client = Client::new(cfg);
    let r: clip_core::Reference = reg.image("tiny").parse().unwrap();
    client.resolve(&r).await.unwrap();
    let first = tokens_issued(&reg);
    client.resolve(&r).await.unwrap();
    assert_eq!(tokens_issued(&reg), first, "a fresh token is reused");
    // An 8 s token is renewed 2 s before it expires.
    tokio::time::sleep(std::time::Duration::from_millis(6500)).await;
    client.resolve(&r).await.unwrap();
    assert!(
        tokens_issued(&reg) > first,
        "an expiring token is refreshed"
    );
}

/// Docker config credential helpers (`credHelpers` for one registry, `credsStore` for the rest)
/// are asked, the way docker asks them (`docker-credential-NAME get`, the server on stdin); the
/// secret only ever lives in clip's memory.
#[test]
fn credential_helpers_are_asked_for_the_registrys_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let reg = Registry::start(Auth::Token(300));
    let tmp = tempfile::tempdir().unwrap();
    let l = layout(tmp.path(), "latest", &["gen:busybox"]);
    reg.push_layout(&l, "latest", "helped");
    let image = reg.image("helped");
    // A helper program that logs what it was asked and answers with the registry's credentials.
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let asked = tmp.path().join("asked");
    for name in ["fake", "store"] {
        let script = bin.join(format!("docker-credential-{name}"));
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nserver=$(cat)\necho \"{name} $server\" >> {}\n\
                 printf '{{\"ServerURL\":\"%s\",\"Username\":\"{USER}\",\"Secret\":\"{PASSWORD}\"}}' \"$server\"\n",
                asked.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (n, config) in [
        format!(r#"{{"credHelpers":{{"{}":"fake"}}}}"#, reg.host),
        r#"{"credsStore":"store"}"#.to_string(),
        r#"{"credsStore":"absent"}"#.to_string(),
    ]
    .iter()
    .enumerate()
    {
        let d = tmp.path().join(format!("docker{n}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), config).unwrap();
        let d = d.display().to_string();
        let o = clip(
            &tmp.path().join(format!("root{n}")),
            &["index", &image],
            &[("DOCKER_CONFIG", &d), ("PATH", &path)],
        );
        let (out, err) = (stdout(&o), stderr(&o));
        assert!(
            !out.contains(PASSWORD) && !err.contains(PASSWORD),
            "{out}{err}"
        );
        if n < 2 {
            assert!(o.status.success(), "{config}: {err}");
        } else {
            assert!(
                !o.status.success(),
                "no helper program, no credentials: {err}"
            );
        }
    }
    let asked = std::fs::read_to_string(&asked).unwrap();
    assert!(asked.contains(&format!("fake {}", reg.host)), "{asked}");
    assert!(asked.contains(&format!("store {}", reg.host)), "{asked}");
    // Nothing under clip's roots holds the secret.
    let grep = std::process::Command::new("grep")
        .args(["-r", "-l", PASSWORD])
        .arg(tmp.path().join("root0"))
        .output()
        .unwrap();
    assert!(stdout(&grep).is_empty(), "{}", stdout(&grep));
}
