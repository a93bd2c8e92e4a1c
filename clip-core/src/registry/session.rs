//! Credentials that live only in memory: the ones a Kubernetes PullImage carried (the pod's
//! pull secret), kept for lazy reads of that image after the pull. Scoped to the image's
//! registry *and* repository; never written anywhere; dropped when the image is removed, when
//! they expire, or with the process.

use super::auth::Credentials;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most this many images' credentials are held (the oldest go first).
pub const MAX_ENTRIES: usize = 4096;

struct Entry {
    registry: String,
    repository: String,
    /// The ids the image is known by (the reference pulled, the image id containerd returned).
    names: Vec<String>,
    creds: Credentials,
    expires: Option<Instant>,
    added: Instant,
}

/// Shared between the CRI image service (which fills it) and the registry client (which reads
/// it); cloning a `RegistryConfig` shares it.
#[derive(Default)]
pub struct SessionCredentials {
    entries: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionCredentials({} images, <redacted>)", self.len())
    }
}

impl SessionCredentials {
    /// Keeps `creds` for image `name` (`registry/repository[:tag|@digest]`), for `ttl` (None:
    /// until the image is removed).
    pub fn put(
        &self,
        name: &str,
        registry: &str,
        repository: &str,
        creds: Credentials,
        ttl: Option<Duration>,
    ) {
        let now = Instant::now();
        let mut e = self.entries.lock().expect("session credentials");
        e.retain(|_, v| v.expires.is_none_or(|t| t > now));
        if e.len() >= MAX_ENTRIES && !e.contains_key(name) {
            if let Some(oldest) = e
                .iter()
                .min_by_key(|(_, v)| v.added)
                .map(|(k, _)| k.clone())
            {
                e.remove(&oldest);
            }
        }
        e.insert(
            name.to_string(),
            Entry {
                registry: registry.to_string(),
                repository: repository.to_string(),
                names: vec![name.to_string()],
                creds,
                expires: ttl.map(|t| now + t),
                added: now,
            },
        );
    }

    /// Records another id (containerd's image id) for the image pulled as `name`.
    pub fn alias(&self, name: &str, id: &str) {
        let mut e = self.entries.lock().expect("session credentials");
        if let Some(v) = e.get_mut(name) {
            if !v.names.iter().any(|n| n == id) {
                v.names.push(id.to_string());
            }
        }
    }

    /// The newest live credentials for `repository` on `registry`.
    pub fn get(&self, registry: &str, repository: &str) -> Option<Credentials> {
        let now = Instant::now();
        let e = self.entries.lock().expect("session credentials");
        e.values()
            .filter(|v| v.registry == registry && v.repository == repository)
            .filter(|v| v.expires.is_none_or(|t| t > now))
            .max_by_key(|v| v.added)
            .map(|v| v.creds.clone())
    }

    /// Forgets the image known as `id` (a name it was pulled as, or its image id). Returns
    /// whether anything was held for it.
    pub fn remove(&self, id: &str) -> bool {
        let mut e = self.entries.lock().expect("session credentials");
        let before = e.len();
        e.retain(|_, v| !v.names.iter().any(|n| n == id));
        e.len() != before
    }

    pub fn len(&self) -> usize {
        self.entries.lock().expect("session credentials").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(u: &str) -> Credentials {
        Credentials {
            username: u.into(),
            password: "p".into(),
        }
    }

    #[test]
    fn credentials_are_scoped_to_registry_and_repository_and_end_with_the_image() {
        let s = SessionCredentials::default();
        s.put("r.io/a:1", "r.io", "a", c("u1"), None);
        s.alias("r.io/a:1", "sha256:aaa");
        assert_eq!(s.get("r.io", "a").unwrap().username, "u1");
        assert!(s.get("r.io", "b").is_none(), "another repository");
        assert!(s.get("other.io", "a").is_none(), "another registry");
        assert!(!format!("{s:?}").contains('p'), "Debug never shows secrets");
        assert!(s.remove("sha256:aaa"), "removed by its image id");
        assert!(s.get("r.io", "a").is_none());
        assert!(!s.remove("sha256:aaa"));
    }

    #[test]
    fn expired_credentials_are_not_used_and_the_store_is_bounded() {
        let s = SessionCredentials::default();
        s.put("r.io/a:1", "r.io", "a", c("old"), Some(Duration::ZERO));
        assert!(s.get("r.io", "a").is_none());
        for i in 0..MAX_ENTRIES + 10 {
            s.put(
                &format!("r.io/x{i}:1"),
                "r.io",
                &format!("x{i}"),
                c("u"),
                None,
            );
        }
        assert_eq!(s.len(), MAX_ENTRIES);
        assert!(s.get("r.io", "x0").is_none(), "the oldest went first");
        assert!(s.get("r.io", &format!("x{}", MAX_ENTRIES + 9)).is_some());
    }
}
