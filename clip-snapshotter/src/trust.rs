//! Which layer indexes a node believes (see docs/security.md).
//!
//! An index says what a layer contains. A published one is the publisher's word: its layer
//! digest and DiffID are checked against the image, but its entries and span digests are not
//! checked against the layer until the bytes are read, and the image config that names the
//! DiffID is the publisher's too. Because containerd shares committed layers between images by
//! chain ID, believing a published index means trusting its publisher for every image on the
//! node that has a layer with the DiffID it claims. The default, `owner`, believes a published
//! index only for its own repository's images and has the node verify a layer before any other
//! repository's image reads it.

use clip_core::reference::Reference;
use serde::Deserialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trust {
    /// The default, for shared nodes: a published index serves the images of the repository
    /// that published it, lazily from the first start. Before an image of any other
    /// repository uses a layer whose index another repository published (through the store,
    /// or through a committed snapshot it shares by chain ID), the node indexes that layer
    /// from its own bytes, checks its digest and DiffID, and serves the node's index from then
    /// on. Indexes built here or signed by a configured key serve every image.
    Owner,
    /// Use published indexes (lazy from the first start). Trusts everyone who can push to the
    /// repositories in scope.
    Published,
    /// Never use a published index: index on this node while pulling (one streaming pass over
    /// each layer, its digest and DiffID checked, the cache filled on the way). Safe for
    /// multi-tenant nodes.
    Local,
    /// Use a published index only if it is signed by one of the configured keys (`cosign sign
    /// --key` on the index artifact); otherwise the image is unpacked normally (or indexed on
    /// this node with `index_on_demand`). Safe for multi-tenant nodes when the keys are.
    Signed,
}

impl std::str::FromStr for Trust {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "owner" => Ok(Trust::Owner),
            "published" => Ok(Trust::Published),
            "local" => Ok(Trust::Local),
            "signed" => Ok(Trust::Signed),
            _ => Err(format!(
                "unknown trust {s:?} (owner, published, local or signed)"
            )),
        }
    }
}

/// The trust for each image: the most specific scope (`registry`, `registry/repository`
/// or a repository prefix, whole path segments) that matches, else the default.
#[derive(Clone, Debug)]
pub struct TrustPolicy {
    pub default: Trust,
    pub scopes: Vec<(String, Trust)>,
    /// The keys `signed` accepts.
    pub keys: clip_core::signature::TrustedKeys,
}

impl Default for TrustPolicy {
    fn default() -> Self {
        TrustPolicy {
            default: Trust::Owner,
            scopes: Vec::new(),
            keys: Default::default(),
        }
    }
}

impl TrustPolicy {
    /// Whether the policy can be applied: `signed` anywhere needs keys.
    pub fn check(&self) -> Result<(), String> {
        let signed =
            self.default == Trust::Signed || self.scopes.iter().any(|(_, t)| *t == Trust::Signed);
        if signed && self.keys.is_empty() {
            return Err(
                "trust \"signed\" needs at least one public key ([trust] keys, --trust-key)".into(),
            );
        }
        Ok(())
    }

    pub fn for_image(&self, r: &Reference) -> Trust {
        let name = format!("{}/{}", r.registry, r.repository);
        self.scopes
            .iter()
            .filter(|(s, _)| {
                let s = s.trim_end_matches('/');
                name == s || name.starts_with(&format!("{s}/"))
            })
            .max_by_key(|(s, _)| s.len())
            .map_or(self.default, |(_, t)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_specific_scope_wins_on_whole_segments() {
        let p = TrustPolicy {
            default: Trust::Local,
            scopes: vec![
                ("reg.internal:5000".into(), Trust::Published),
                ("reg.internal:5000/tenants".into(), Trust::Local),
            ],
            keys: Default::default(),
        };
        let t = |s: &str| p.for_image(&s.parse().unwrap());
        assert_eq!(t("reg.internal:5000/base/python:3"), Trust::Published);
        assert_eq!(t("reg.internal:5000/tenants/a/app:1"), Trust::Local);
        assert_eq!(t("reg.internal:5000/tenantsx/app:1"), Trust::Published);
        assert_eq!(t("docker.io/library/busybox:1"), Trust::Local);
        assert_eq!(
            TrustPolicy::default().for_image(&"x/y:1".parse().unwrap()),
            Trust::Owner,
            "the default is the multi-tenant-safe one"
        );
    }
}
