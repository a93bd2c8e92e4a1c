//! Registry authentication: credentials, `WWW-Authenticate` challenges and bearer tokens.

use base64::Engine;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A user name and secret. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Where `docker login` keeps credentials: `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
}

/// What a docker config says about credentials: stored `auths`, per-registry `credHelpers` and
/// the default `credsStore` (helpers are programs `docker-credential-<name>` on the PATH).
#[derive(Clone, Debug, Default)]
pub struct DockerConfig {
    pub auths: HashMap<String, Credentials>,
    pub helpers: HashMap<String, String>,
    pub store: Option<String>,
}

impl DockerConfig {
    /// The helper that holds `registry`'s credentials, if any (as docker: `credHelpers` first,
    /// then `credsStore`).
    pub fn helper_for(&self, registry: &str) -> Option<&str> {
        self.helpers
            .get(registry)
            .or(self.store.as_ref())
            .map(String::as_str)
    }
}

/// The most bytes read from a credential helper.
const MAX_HELPER_OUTPUT: u64 = 64 << 10;

/// Asks `docker-credential-<helper> get` for `registry`'s credentials (in memory only; the
/// secret is never logged). `None` when the helper has none, fails, or takes over 10 s.
pub async fn from_helper(helper: &str, registry: &str) -> Option<Credentials> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if helper.is_empty()
        || !helper
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        tracing::warn!(helper, "ignoring a credential helper with an unusual name");
        return None;
    }
    let server = match registry {
        "docker.io" => "https://index.docker.io/v1/".to_string(),
        r => r.to_string(),
    };
    let program = format!("docker-credential-{helper}");
    let run = async {
        let mut child = tokio::process::Command::new(&program)
            .arg("get")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .ok()?;
        let mut stdin = child.stdin.take()?;
        stdin.write_all(server.as_bytes()).await.ok()?;
        drop(stdin);
        let mut out = Vec::new();
        child
            .stdout
            .take()?
            .take(MAX_HELPER_OUTPUT)
            .read_to_end(&mut out)
            .await
            .ok()?;
        let status = child.wait().await.ok()?;
        status.success().then_some(out)
    };
    let out = match tokio::time::timeout(std::time::Duration::from_secs(10), run).await {
        Ok(Some(out)) => out,
        Ok(None) => {
            tracing::debug!(helper = %program, registry, "credential helper has no credentials");
            return None;
        }
        Err(_) => {
            tracing::warn!(helper = %program, registry, "credential helper timed out");
            return None;
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out).ok()?;
    let (user, secret) = (v["Username"].as_str()?, v["Secret"].as_str()?);
    if user == "<token>" {
        tracing::warn!(helper = %program, registry, "identity tokens from credential helpers are not supported");
        return None;
    }
    Some(Credentials {
        username: user.into(),
        password: secret.into(),
    })
}

/// Reads a docker config file. A missing file is no credentials; a malformed one is reported
/// (without its contents) and ignored.
pub fn load_docker_config(path: &Path) -> DockerConfig {
    let mut cfg = DockerConfig::default();
    let Ok(text) = std::fs::read_to_string(path) else {
        return cfg;
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring unreadable docker config: {e}");
            return cfg;
        }
    };
    if let Some(h) = json.get("credHelpers").and_then(|h| h.as_object()) {
        for (k, v) in h {
            if let Some(name) = v.as_str() {
                cfg.helpers.insert(normalize_auth_key(k), name.to_string());
            }
        }
    }
    cfg.store = json
        .get("credsStore")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    cfg.auths = load_auths(&json);
    cfg
}

fn load_auths(json: &serde_json::Value) -> HashMap<String, Credentials> {
    let mut out = HashMap::new();
    let Some(auths) = json.get("auths").and_then(|a| a.as_object()) else {
        return out;
    };
    for (key, v) in auths {
        let creds = if let Some(auth) = v
            .get("auth")
            .and_then(|a| a.as_str())
            .filter(|a| !a.is_empty())
        {
            base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .ok()
                .and_then(|raw| String::from_utf8(raw).ok())
                .and_then(|s| {
                    s.split_once(':').map(|(u, p)| Credentials {
                        username: u.into(),
                        password: p.into(),
                    })
                })
        } else {
            match (
                v.get("username").and_then(|u| u.as_str()),
                v.get("password").and_then(|p| p.as_str()),
            ) {
                (Some(u), Some(p)) => Some(Credentials {
                    username: u.into(),
                    password: p.into(),
                }),
                _ => None,
            }
        };
        if let Some(c) = creds {
            out.insert(normalize_auth_key(key), c);
        }
    }
    out
}

/// `https://index.docker.io/v1/` -> `docker.io`; `https://host:5000/` -> `host:5000`.
pub fn normalize_auth_key(key: &str) -> String {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io".into(),
        h => h.to_string(),
    }
}

/// A parsed `WWW-Authenticate` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    // key="value", key=value, with commas inside quotes allowed.
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim()
            .to_ascii_lowercase();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.insert(key, value.trim().to_string());
    }
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.remove("realm")?,
            service: params.remove("service"),
            scope: params.remove("scope"),
        }),
        _ => None,
    }
}

/// A bearer token and when to replace it.
#[derive(Clone)]
pub struct Token {
    pub value: String,
    /// Ahead of the real expiry (by min(5 s, a quarter of the lifetime)), so no request goes
    /// out with a token that expires in flight.
    pub refresh_at: Instant,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Token(<redacted>, refresh in {:?})",
            self.refresh_at.saturating_duration_since(Instant::now())
        )
    }
}

impl Token {
    pub fn fresh(&self) -> bool {
        Instant::now() < self.refresh_at
    }
}

#[derive(serde::Deserialize)]
pub struct TokenResponse {
    pub token: Option<String>,
    pub access_token: Option<String>,
    pub expires_in: Option<u64>,
}

impl TokenResponse {
    pub fn into_token(self) -> Option<Token> {
        let value = self.token.or(self.access_token).filter(|t| !t.is_empty())?;
        // The distribution spec's default lifetime is 60 s.
        let ttl = Duration::from_secs(self.expires_in.unwrap_or(60));
        let margin = (ttl / 4).min(Duration::from_secs(5));
        Some(Token {
            value,
            refresh_at: Instant::now() + ttl - margin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge("Basic realm=\"Registry\""),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("reg.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(parse_challenge("Bearer service=x"), None);
        assert_eq!(parse_challenge("Negotiate"), None);
    }

    #[test]
    fn docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"localhost:5000":{"username":"a","password":"b:c"}},"credHelpers":{"https://reg.example":"ecr-login"},"credsStore":"pass"}"#,
        )
        .unwrap();
        let c = load_docker_config(&p);
        assert_eq!(
            c.auths["docker.io"],
            Credentials {
                username: "user".into(),
                password: "pass".into()
            }
        );
        assert_eq!(c.auths["localhost:5000"].password, "b:c");
        assert!(!format!("{:?}", c.auths["docker.io"]).contains("pass"));
        assert_eq!(c.helper_for("reg.example"), Some("ecr-login"));
        assert_eq!(c.helper_for("other:5000"), Some("pass"));
        std::fs::write(&p, "{not json").unwrap();
        let c = load_docker_config(&p);
        assert!(c.auths.is_empty() && c.helper_for("x").is_none());
    }
}
