//! A layer's windows blob as this node holds it: the 32 KiB checkpoint windows of every span,
//! each zstd-compressed (see [`super::format::decode_window`]), kept where the index was built.
//!
//! Owns [`LocalWindows`]; uses nothing of the crate but `bytes`. The store opens it
//! ([`crate::store::Store::windows_for_reads`]) and the fetcher reads windows from it.

use bytes::Bytes;
use std::sync::Arc;

/// A layer's windows blob on this node (its index was built here): in memory, or a file read by
/// range, so a node holding many built indexes does not hold their windows in memory.
#[derive(Clone)]
pub enum LocalWindows {
    Memory(Bytes),
    File(Arc<std::fs::File>, u64),
}

impl From<Bytes> for LocalWindows {
    fn from(b: Bytes) -> Self {
        LocalWindows::Memory(b)
    }
}

impl LocalWindows {
    /// Bytes `[off, off + len)`, or `None` when they are not all there (the published blob is
    /// read instead; a damaged window cannot produce the spans' digests either way).
    pub(crate) async fn read(&self, off: u64, len: u64) -> Option<Bytes> {
        match self {
            LocalWindows::Memory(w) => {
                let end = off.checked_add(len).filter(|&e| e <= w.len() as u64)?;
                Some(w.slice(off as usize..end as usize))
            }
            LocalWindows::File(f, size) => {
                off.checked_add(len).filter(|e| e <= size)?;
                let f = f.clone();
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut buf = vec![0u8; len as usize];
                    f.read_exact_at(&mut buf, off)
                        .ok()
                        .map(|_| Bytes::from(buf))
                })
                .await
                .ok()
                .flatten()
            }
        }
    }
}
