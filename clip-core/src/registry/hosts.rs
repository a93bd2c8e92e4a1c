//! Which endpoints serve a registry: containerd's `hosts.toml` (mirrors, `skip_verify`, `ca`,
//! `server`) and the user's insecure list.

use std::path::{Path, PathBuf};

/// One place to send a registry's requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port]` with an optional path prefix (mirrors may have one), no trailing `/`.
    pub base: String,
    /// Accept any TLS certificate (insecure hosts, `skip_verify = true`).
    pub skip_verify: bool,
    /// Extra CA certificates (PEM files) to trust.
    pub ca: Vec<PathBuf>,
    /// The endpoint may speak plain HTTP: try TLS, fall back to HTTP if the server is not TLS.
    pub http_fallback: bool,
    /// A mirror (vs the registry itself): a mirror's 404 means "try the next one".
    pub mirror: bool,
    /// Listed with the `push` capability (the registry itself always may be pushed to).
    pub push: bool,
    /// The registry itself (its `server`), which gets the registry's credentials; a `[host]`
    /// entry (a mirror) gets only credentials configured for its own host.
    pub is_server: bool,
}

impl Endpoint {
    /// `host[:port]` of the endpoint's base URL.
    pub fn authority(&self) -> &str {
        authority(&self.base)
    }
}

/// `host[:port]` of a URL (`scheme://host[:port]/path`).
pub fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split(['/', '?', '#']).next().unwrap_or(rest)
}

/// The host name of `host[:port]` (brackets of an IPv6 literal kept).
pub fn hostname(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') => h,
        _ => authority,
    }
}

/// True for hosts that are this machine (plain HTTP allowed, as containerd and docker do).
pub fn is_local(host: &str) -> bool {
    let h = host.rsplit_once(':').map_or(host, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let h = h.trim_start_matches('[').trim_end_matches(']');
    h == "localhost" || h.starts_with("127.") || h == "::1"
}

/// The endpoints for `registry_host` (the API host, e.g. `registry-1.docker.io`), in the order
/// to try them: mirrors from `hosts.toml`, then the registry itself.
pub fn endpoints(
    registry: &str,
    api_host: &str,
    hosts_dir: Option<&Path>,
    insecure: &[String],
) -> Vec<Endpoint> {
    let marked_insecure = insecure.iter().any(|h| h == registry || h == api_host);
    let mut eps = Vec::new();
    // As containerd does: localhost speaks plain HTTP; insecure hosts try TLS (unverified) and
    // fall back to HTTP; everything else is verified TLS. hosts.toml schemes are taken as written.
    let local_plain = is_local(api_host) && !marked_insecure;
    let mut server = Endpoint {
        base: format!(
            "{}://{api_host}",
            if local_plain { "http" } else { "https" }
        ),
        skip_verify: marked_insecure,
        ca: Vec::new(),
        http_fallback: marked_insecure,
        mirror: false,
        push: true,
        is_server: true,
    };
    if let Some(dir) = hosts_dir {
        let candidates = [
            dir.join(registry).join("hosts.toml"),
            dir.join("_default").join("hosts.toml"),
        ];
        if let Some((path, text)) = candidates
            .into_iter()
            .find_map(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t)))
        {
            match text.parse::<toml::Table>() {
                Ok(table) => {
                    if let Some(s) = table.get("server").and_then(|v| v.as_str()) {
                        server.base = s.trim_end_matches('/').to_string();
                    }
                    apply_tls(&mut server, &table, &path);
                    if let Some(hosts) = table.get("host").and_then(|h| h.as_table()) {
                        for (url, cfg) in hosts {
                            let Some(cfg) = cfg.as_table() else { continue };
                            let caps: Vec<&str> = cfg
                                .get("capabilities")
                                .and_then(|c| c.as_array())
                                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                                .unwrap_or_else(|| vec!["pull", "resolve"]);
                            if !caps.contains(&"pull") && !caps.contains(&"push") {
                                continue;
                            }
                            let mut ep = Endpoint {
                                base: url.trim_end_matches('/').to_string(),
                                skip_verify: marked_insecure,
                                ca: Vec::new(),
                                http_fallback: marked_insecure,
                                mirror: caps.contains(&"pull"),
                                push: caps.contains(&"push"),
                                is_server: false,
                            };
                            if !ep.base.contains("://") {
                                ep.base = format!("https://{}", ep.base);
                            }
                            apply_tls(&mut ep, cfg, &path);
                            eps.push(ep);
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring malformed hosts.toml: {e}")
                }
            }
        }
    }
    eps.push(server);
    eps
}

fn apply_tls(ep: &mut Endpoint, t: &toml::Table, file: &Path) {
    if t.get("skip_verify").and_then(|v| v.as_bool()) == Some(true) {
        ep.skip_verify = true;
    }
    let base = file.parent().unwrap_or(Path::new("/"));
    match t.get("ca") {
        Some(toml::Value::String(s)) => ep.ca.push(base.join(s)),
        Some(toml::Value::Array(a)) => ep
            .ca
            .extend(a.iter().filter_map(|v| v.as_str()).map(|s| base.join(s))),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_local() {
        let e = endpoints("example.com", "example.com", None, &[]);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].base, "https://example.com");
        assert!(!e[0].http_fallback && !e[0].skip_verify);
        let e = endpoints("127.0.0.1:5000", "127.0.0.1:5000", None, &[]);
        assert_eq!(e[0].base, "http://127.0.0.1:5000");
        let e = endpoints("reg:5000", "reg:5000", None, &["reg:5000".into()]);
        assert!(e[0].http_fallback && e[0].skip_verify);
        assert!(is_local("localhost:5000") && is_local("[::1]:5000") && !is_local("example.com"));
    }

    #[test]
    fn hosts_toml_mirrors() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("reg.example:5000");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("hosts.toml"),
            r#"server = "https://reg.example:5000"
ca = "ca.pem"
[host."http://mirror-b:5000"]
  capabilities = ["pull", "resolve"]
[host."https://mirror-a"]
  capabilities = ["pull"]
  skip_verify = true
[host."https://push-only"]
  capabilities = ["push"]
"#,
        )
        .unwrap();
        let e = endpoints(
            "reg.example:5000",
            "reg.example:5000",
            Some(dir.path()),
            &[],
        );
        let bases: Vec<&str> = e.iter().map(|e| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "http://mirror-b:5000",
                "https://mirror-a",
                "https://push-only",
                "https://reg.example:5000"
            ]
        );
        assert!(!e[2].mirror && e[2].push && !e[0].push);
        assert!(!e[0].http_fallback && e[0].mirror);
        assert!(e[1].skip_verify);
        assert_eq!(e[3].ca, vec![d.join("ca.pem")]);
    }
}
