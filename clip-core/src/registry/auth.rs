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

/// Reads `auths` from a docker config file. A missing file is no credentials; a malformed one
/// is reported (without its contents) and ignored.
pub fn load_docker_config(path: &Path) -> HashMap<String, Credentials> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    let json: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(path = %path.display(), "ignoring unreadable docker config: {e}");
            return out;
        }
    };
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
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"localhost:5000":{"username":"a","password":"b:c"}}}"#,
        )
        .unwrap();
        let c = load_docker_config(&p);
        assert_eq!(
            c["docker.io"],
            Credentials {
                username: "user".into(),
                password: "pass".into()
            }
        );
        assert_eq!(c["localhost:5000"].password, "b:c");
        assert!(!format!("{:?}", c["docker.io"]).contains("pass"));
        std::fs::write(&p, "{not json").unwrap();
        assert!(load_docker_config(&p).is_empty());
    }
}
