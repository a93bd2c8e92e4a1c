//! User-namespace id mappings a snapshot is asked for (containerd 2.x with `remap-ids`: the
//! CRI's `hostUsers: false` pods): the `containerd.io/snapshot/uidmapping` and `gidmapping`
//! labels, parsed strictly, and the `uidmap=`/`gidmap=` mount options that make containerd
//! id-map the snapshot's layers (every lowerdir, clip's FUSE mounts included) instead of
//! copying and chowning them.

use super::SnapshotError;
use std::collections::BTreeMap;

pub const UID_LABEL: &str = "containerd.io/snapshot/uidmapping";
pub const GID_LABEL: &str = "containerd.io/snapshot/gidmapping";

/// The kernel's limit on the ranges of one user namespace's map.
const MAX_RANGES: usize = 340;
/// Labels longer than this are not mappings (340 ranges of three 10-digit ids fit in 12 KiB).
const MAX_LABEL: usize = 12 << 10;

/// One range: container ids `inside..inside+len` are host ids `host..host+len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub inside: u32,
    pub host: u32,
    pub len: u32,
}

/// A snapshot's uid and gid mappings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdMap {
    pub uids: Vec<Range>,
    pub gids: Vec<Range>,
}

fn parse(label: &str, value: &str) -> Result<Vec<Range>, SnapshotError> {
    let bad = |why: String| SnapshotError::InvalidArgument(format!("label {label}: {why}"));
    if value.len() > MAX_LABEL {
        return Err(bad(format!("{} bytes, at most {MAX_LABEL}", value.len())));
    }
    let mut out = Vec::new();
    for part in value.split(',') {
        if out.len() == MAX_RANGES {
            return Err(bad(format!("more than {MAX_RANGES} ranges")));
        }
        let mut f = part.split(':').map(|n| n.parse::<u32>());
        let (Some(Ok(inside)), Some(Ok(host)), Some(Ok(len)), None) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return Err(bad(format!(
                "{part:?} is not CONTAINER:HOST:SIZE (unsigned 32-bit ids)"
            )));
        };
        let r = Range { inside, host, len };
        if len == 0 {
            return Err(bad(format!("{part:?} maps no ids")));
        }
        if inside.checked_add(len - 1).is_none() || host.checked_add(len - 1).is_none() {
            return Err(bad(format!("{part:?} runs past the last 32-bit id")));
        }
        let overlaps = |a: u32, b: u32, alen: u32, blen: u32| {
            u64::from(a) < u64::from(b) + u64::from(blen)
                && u64::from(b) < u64::from(a) + u64::from(alen)
        };
        if out.iter().any(|o: &Range| {
            overlaps(o.inside, inside, o.len, len) || overlaps(o.host, host, o.len, len)
        }) {
            return Err(bad(format!("{part:?} overlaps another range")));
        }
        out.push(r);
    }
    Ok(out)
}

fn host_of(ranges: &[Range], id: u32) -> Option<u32> {
    ranges
        .iter()
        .find(|r| id >= r.inside && id - r.inside < r.len)
        .map(|r| r.host + (id - r.inside))
}

fn render(ranges: &[Range]) -> String {
    ranges
        .iter()
        .map(|r| format!("{}:{}:{}", r.inside, r.host, r.len))
        .collect::<Vec<_>>()
        .join(",")
}

impl IdMap {
    /// The mappings `labels` ask for: none, or both, each a valid map that maps container
    /// root (the snapshot's own directories belong to it).
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<IdMap>, SnapshotError> {
        let (uids, gids) = match (labels.get(UID_LABEL), labels.get(GID_LABEL)) {
            (None, None) => return Ok(None),
            (Some(u), Some(g)) => (parse(UID_LABEL, u)?, parse(GID_LABEL, g)?),
            _ => {
                return Err(SnapshotError::InvalidArgument(format!(
                    "labels {UID_LABEL} and {GID_LABEL} come together"
                )))
            }
        };
        let map = IdMap { uids, gids };
        if map.root().is_none() {
            return Err(SnapshotError::InvalidArgument(format!(
                "labels {UID_LABEL} and {GID_LABEL} must map container id 0"
            )));
        }
        Ok(Some(map))
    }

    /// The host uid and gid of container root.
    pub fn root(&self) -> Option<(u32, u32)> {
        Some((host_of(&self.uids, 0)?, host_of(&self.gids, 0)?))
    }

    /// The mount options that have containerd id-map the mount's layers.
    pub fn options(&self) -> [String; 2] {
        [
            format!("uidmap={}", render(&self.uids)),
            format!("gidmap={}", render(&self.gids)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(u: &str, g: &str) -> BTreeMap<String, String> {
        [(UID_LABEL, u), (GID_LABEL, g)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_kubelets_mapping_gives_root_and_options() {
        let m = IdMap::from_labels(&labels("0:100000:65536", "0:200000:65536"))
            .unwrap()
            .unwrap();
        assert_eq!(m.root(), Some((100_000, 200_000)));
        assert_eq!(
            m.options(),
            ["uidmap=0:100000:65536", "gidmap=0:200000:65536"]
        );
        let m = IdMap::from_labels(&labels("1:5000:10,0:7:1", "0:0:4294967295"))
            .unwrap()
            .unwrap();
        assert_eq!(m.root(), Some((7, 0)));
        assert_eq!(m.options()[0], "uidmap=1:5000:10,0:7:1");
        assert_eq!(IdMap::from_labels(&BTreeMap::new()).unwrap(), None);
    }

    #[test]
    fn hostile_mappings_are_refused_with_the_label_named() {
        for (u, g) in [
            ("0:1:0", "0:1:1"),
            ("0:4294967295:2", "0:1:1"),
            ("0:1:1:1", "0:1:1"),
            ("0:-1:1", "0:1:1"),
            ("", "0:1:1"),
            ("0:1:10,5:100:1", "0:1:1"),
            ("0:1:10,20:5:1", "0:1:1"),
            ("1:1:10", "0:1:1"),
            ("0:1:1", "0:1:1 "),
        ] {
            let e = IdMap::from_labels(&labels(u, g)).unwrap_err();
            assert!(
                matches!(e, SnapshotError::InvalidArgument(_)) && e.to_string().contains("label"),
                "{u} {g}: {e}"
            );
        }
        let many = (0..400)
            .map(|i| format!("{}:{}:1", i, 1000 + i))
            .collect::<Vec<_>>()
            .join(",");
        assert!(IdMap::from_labels(&labels(&many, "0:1:1")).is_err());
        assert!(IdMap::from_labels(&labels(&"9".repeat(20_000), "0:1:1")).is_err());
        let only_uid: BTreeMap<String, String> =
            [(UID_LABEL.to_string(), "0:1:1".to_string())].into();
        assert!(IdMap::from_labels(&only_uid).is_err());
    }
}
