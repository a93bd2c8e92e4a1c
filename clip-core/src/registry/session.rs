//! Credentials that live only in memory: the ones a Kubernetes PullImage carried (the pod's
//! pull secret), kept for lazy reads of that image after the pull. Scoped to the image's
//! registry *and* repository; never written anywhere; dropped when the image is removed, when
//! they expire, or with the process.
//!
//! They are kept per pull, that is per (image, credentials): two tenants pulling one image with
//! their own secrets hold two entries, and a pull that fails takes back only the entry it
//! added, never one another pull holds.

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

/// One pull's hold on credentials (see [`SessionCredentials::put`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pull {
    id: u64,
    /// The pull added the entry (an entry with the same image and credentials existed
    /// otherwise, and another pull holds it).
    added: bool,
}

/// Shared between the CRI image service (which fills it) and the registry client (which reads
/// it); cloning a `RegistryConfig` shares it.
#[derive(Default)]
pub struct SessionCredentials {
    entries: Mutex<HashMap<u64, Entry>>,
    next: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionCredentials({} images, <redacted>)", self.len())
    }
}

impl SessionCredentials {
    /// Keeps `creds` for a pull of image `name` (`registry/repository[:tag|@digest]`), for
    /// `ttl` (None: until the image is removed). The same image with the same credentials is
    /// one entry (refreshed); other credentials for it are another entry.
    pub fn put(
        &self,
        name: &str,
        registry: &str,
        repository: &str,
        creds: Credentials,
        ttl: Option<Duration>,
    ) -> Pull {
        let now = Instant::now();
        let mut e = self.entries.lock().expect("session credentials");
        e.retain(|_, v| v.expires.is_none_or(|t| t > now));
        let expires = ttl.map(|t| now + t);
        if let Some((&id, v)) = e
            .iter_mut()
            .find(|(_, v)| v.names.iter().any(|n| n == name) && v.creds == creds)
        {
            v.added = now;
            v.expires = match (v.expires, expires) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
            return Pull { id, added: false };
        }
        if e.len() >= MAX_ENTRIES {
            if let Some(oldest) = e.iter().min_by_key(|(_, v)| v.added).map(|(k, _)| *k) {
                e.remove(&oldest);
            }
        }
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        e.insert(
            id,
            Entry {
                registry: registry.to_string(),
                repository: repository.to_string(),
                names: vec![name.to_string()],
                creds,
                expires,
                added: now,
            },
        );
        Pull { id, added: true }
    }

    /// Records another id (containerd's image id) for the image of `pull`.
    pub fn alias(&self, pull: Pull, id: &str) {
        let mut e = self.entries.lock().expect("session credentials");
        if let Some(v) = e.get_mut(&pull.id) {
            if !v.names.iter().any(|n| n == id) {
                v.names.push(id.to_string());
            }
        }
    }

    /// `pull` failed: the entry it added goes (one it found and refreshed stays: another pull
    /// holds it).
    pub fn failed(&self, pull: Pull) {
        if pull.added {
            self.entries
                .lock()
                .expect("session credentials")
                .remove(&pull.id);
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
    fn a_failed_pull_takes_back_only_its_own_credentials() {
        let s = SessionCredentials::default();
        let first = s.put("r.io/a:1", "r.io", "a", c("tenant-a"), None);
        s.alias(first, "sha256:aaa");
        // Another tenant pulls the same image with its own (wrong) secret, and fails.
        let other = s.put("r.io/a:1", "r.io", "a", c("tenant-b"), None);
        assert_eq!(s.len(), 2);
        s.failed(other);
        assert_eq!(s.get("r.io", "a").unwrap().username, "tenant-a");
        // A failed pull with the same credentials as a held entry leaves it too.
        let again = s.put("r.io/a:1", "r.io", "a", c("tenant-a"), None);
        s.failed(again);
        assert_eq!(s.get("r.io", "a").unwrap().username, "tenant-a");
        // Removing the image drops every pull's credentials for it.
        s.put("r.io/a:1", "r.io", "a", c("tenant-c"), None);
        assert!(s.remove("r.io/a:1"));
        assert!(s.get("r.io", "a").is_none());
    }

    #[test]
    fn credentials_are_scoped_to_registry_and_repository_and_end_with_the_image() {
        let s = SessionCredentials::default();
        let pull = s.put("r.io/a:1", "r.io", "a", c("u1"), None);
        s.alias(pull, "sha256:aaa");
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
