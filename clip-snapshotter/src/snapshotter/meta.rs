//! Snapshot metadata in sled (tree `snapshots`): one JSON record per snapshot, keyed by its
//! name (the key of an active or view snapshot, the name of a committed one). Every change is
//! one sled operation or transaction, so a killed daemon leaves either the old or the new state.

use super::SnapshotError;
use clip_core::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// A committed snapshot whose content is a layer served lazily from its index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remote {
    /// The compressed layer's digest (its index is in the store under this digest).
    pub layer: Digest,
    /// Where the layer's bytes are read from: `registry/repository@manifest-digest`.
    pub reference: String,
}

impl Remote {
    /// The manifest digest of the layer's pinned reference.
    pub fn manifest(&self) -> Option<Digest> {
        self.reference
            .parse::<clip_core::reference::Reference>()
            .ok()?
            .digest
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Names the snapshot's directory: `snapshots/<id>`.
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: u128,
    pub updated: u128,
    pub remote: Option<Remote>,
    /// Disk usage recorded at commit (bytes, inodes).
    pub size: i64,
    pub inodes: i64,
}

pub fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub fn time(nanos: u128) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos.min(u64::MAX as u128) as u64)
}

pub struct Meta {
    db: sled::Db,
    tree: sled::Tree,
    /// Records that could not be decoded, moved aside at open (kept for inspection, never
    /// served): tree `snapshots-unreadable`.
    unreadable: sled::Tree,
}

fn decode(name: &[u8], v: &[u8]) -> Result<Record, SnapshotError> {
    serde_json::from_slice(v).map_err(|e| SnapshotError::Corrupt {
        name: String::from_utf8_lossy(name).into_owned(),
        reason: e.to_string(),
    })
}

fn encode(r: &Record) -> Vec<u8> {
    serde_json::to_vec(r).expect("records serialize")
}

impl Meta {
    /// Opens the records. One that does not decode is reported, moved aside and skipped: the
    /// daemon starts and serves every other snapshot.
    pub fn open(db: sled::Db) -> Result<Self, SnapshotError> {
        let tree = db.open_tree("snapshots")?;
        let unreadable = db.open_tree("snapshots-unreadable")?;
        let mut moved = 0;
        for kv in tree.iter() {
            let (k, v) = kv?;
            if let Err(e) = decode(&k, &v) {
                tracing::error!("{e}; moved aside to the database's snapshots-unreadable tree");
                unreadable.insert(&k, v)?;
                tree.remove(&k)?;
                moved += 1;
            }
        }
        if moved > 0 {
            db.flush()?;
        }
        Ok(Meta {
            db,
            tree,
            unreadable,
        })
    }

    /// The snapshot ids that unreadable records may still name: their directories must not be
    /// cleaned up. `None` when some record is too damaged to tell (then nothing may be).
    pub fn unreadable_ids(&self) -> Option<Vec<u64>> {
        let mut ids = Vec::new();
        for kv in self.unreadable.iter() {
            let (_, v) = kv.ok()?;
            let id = serde_json::from_slice::<serde_json::Value>(&v)
                .ok()?
                .get("id")?
                .as_u64()?;
            ids.push(id);
        }
        Some(ids)
    }

    pub fn next_id(&self) -> Result<u64, SnapshotError> {
        Ok(self.db.generate_id()? + 1)
    }

    pub fn get(&self, name: &str) -> Result<Option<Record>, SnapshotError> {
        self.tree
            .get(name)?
            .map(|v| decode(name.as_bytes(), &v))
            .transpose()
    }

    /// The record, or NotFound.
    pub fn must(&self, name: &str) -> Result<Record, SnapshotError> {
        self.get(name)?
            .ok_or_else(|| SnapshotError::NotFound(name.to_string()))
    }

    /// Adds a snapshot; AlreadyExists if the name is taken.
    pub fn create(&self, name: &str, r: &Record) -> Result<(), SnapshotError> {
        self.tree
            .compare_and_swap(name, None as Option<&[u8]>, Some(encode(r)))?
            .map_err(|_| SnapshotError::AlreadyExists(name.to_string()))
    }

    pub fn put(&self, name: &str, r: &Record) -> Result<(), SnapshotError> {
        self.tree.insert(name, encode(r))?;
        Ok(())
    }

    /// Renames active snapshot `key` to committed `name` in one transaction.
    pub fn commit(&self, key: &str, name: &str, r: &Record) -> Result<(), SnapshotError> {
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let res = self.tree.transaction(|t| {
            if t.get(name)?.is_some() {
                return Err(Abort::Abort(SnapshotError::AlreadyExists(name.to_string())));
            }
            if t.remove(key)?.is_none() {
                return Err(Abort::Abort(SnapshotError::NotFound(key.to_string())));
            }
            t.insert(name, encode(r))?;
            Ok(())
        });
        match res {
            Ok(()) => Ok(()),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    pub fn remove(&self, name: &str) -> Result<(), SnapshotError> {
        self.tree.remove(name)?;
        Ok(())
    }

    /// Every snapshot, by name (a record that stopped decoding since open is reported and
    /// skipped).
    pub fn list(&self) -> Result<Vec<(String, Record)>, SnapshotError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (k, v) = kv?;
            match decode(&k, &v) {
                Ok(r) => out.push((String::from_utf8_lossy(&k).into_owned(), r)),
                Err(e) => tracing::error!("{e}; skipped"),
            }
        }
        Ok(out)
    }

    pub fn has_children(&self, name: &str) -> Result<bool, SnapshotError> {
        Ok(self.list()?.iter().any(|(_, r)| r.parent == name))
    }

    pub async fn flush(&self) -> Result<(), SnapshotError> {
        self.tree.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> Record {
        Record {
            id,
            kind: Kind::Committed,
            parent: String::new(),
            labels: BTreeMap::new(),
            created: 1,
            updated: 1,
            remote: None,
            size: 0,
            inodes: 0,
        }
    }

    #[test]
    fn an_unreadable_record_is_moved_aside_and_the_rest_still_served() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = Meta::open(sled::open(dir.path()).unwrap()).unwrap();
            m.put("good", &record(1)).unwrap();
            m.put("damaged", &record(2)).unwrap();
            m.tree.insert("garbage", &b"\xff not json"[..]).unwrap();
            let mut bad = encode(&record(2));
            bad.truncate(bad.len() - 3);
            m.tree.insert("damaged", bad).unwrap();
            m.db.flush().unwrap();
        }
        let m = Meta::open(sled::open(dir.path()).unwrap()).unwrap();
        let names: Vec<String> = m.list().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["good"]);
        assert_eq!(m.unreadable.len(), 2, "kept for inspection");
        // "garbage" names no id: nothing may be cleaned up.
        assert_eq!(m.unreadable_ids(), None);
        m.unreadable.remove("garbage").unwrap();
        // A truncated record is not JSON either.
        assert_eq!(m.unreadable_ids(), None);
        m.unreadable.insert("damaged", encode(&record(2))).unwrap();
        assert_eq!(m.unreadable_ids(), Some(vec![2]));
    }
}
