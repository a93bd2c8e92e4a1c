//! FUSE passthrough: files whose bytes are all local are handed to the kernel as verified
//! whole-file copies (the passthrough file store), so their reads never reach the daemon.
//!
//! Part of [`ClipFs`]; uses the tree and clip-core's file store.

use super::ClipFs;
use clip_core::cache::files::FileStore;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// Passthrough copies are failing now (told once, until one succeeds again).
static COPIES_FAILING: AtomicBool = AtomicBool::new(false);

/// Whole-file copies for FUSE passthrough (see [`ClipFs::backing_file`]).
pub(super) struct Passthrough {
    store: Arc<FileStore>,
    min_size: u64,
    /// Inodes whose file is being verified or written.
    busy: Mutex<HashSet<u64>>,
    /// One file written at a time: it is background work.
    writer: Arc<tokio::sync::Semaphore>,
}

/// Runs blocking file I/O off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

impl ClipFs {
    /// Serves files of at least `min_size` bytes by FUSE passthrough once their bytes are all
    /// local, from whole-file copies kept in `store`.
    pub fn with_passthrough(mut self, store: Arc<FileStore>, min_size: u64) -> Self {
        self.passthrough = Some(Passthrough {
            store,
            min_size: min_size.max(1),
            busy: Mutex::new(HashSet::new()),
            writer: Arc::new(tokio::sync::Semaphore::new(1)),
        });
        self
    }

    /// A verified local copy of the whole file to hand the kernel for passthrough, if there is
    /// one (cheap: a lookup and an open). Without one, [`ClipFs::prepare_backing`] makes one
    /// in the background when the file qualifies.
    pub fn backing_file(&self, ino: u64) -> Option<std::fs::File> {
        let pt = self.passthrough.as_ref()?;
        let (reader, offset, size) = self.file_data(ino)?;
        if size < pt.min_size {
            return None;
        }
        let content = pt.store.lookup(&reader.index().layer, offset, size)?;
        pt.store.open_verified(&content)
    }

    /// Background work so that later opens of `ino` can use passthrough: hash a copy left by an
    /// earlier run, or write one when every span of the file is in a local tier (never fetches
    /// from the registry for this). Returns at once; at most one such task per inode.
    pub fn prepare_backing(self: &Arc<Self>, ino: u64, rt: &tokio::runtime::Handle) {
        let Some(pt) = self.passthrough.as_ref() else {
            return;
        };
        let Some((reader, offset, size)) = self.file_data(ino) else {
            return;
        };
        if size < pt.min_size {
            return;
        }
        let existing = pt.store.lookup(&reader.index().layer, offset, size);
        if existing.is_some_and(|c| pt.store.is_verified(&c))
            || (existing.is_none() && !reader.is_local(offset, size))
            || !pt.busy.lock().expect("busy lock").insert(ino)
        {
            return;
        }
        let me = self.clone();
        rt.spawn(async move {
            let pt = me.passthrough.as_ref().expect("checked above");
            let r = match existing {
                Some(content) => {
                    let store = pt.store.clone();
                    tokio::task::spawn_blocking(move || store.verify(&content))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                None => me.write_backing(ino).await,
            };
            match r {
                // Said once while copies keep failing (a full or failing disk fails every one
                // of them), and again once one has succeeded since.
                Err(e) => {
                    clip_core::metrics::cache_write_failure("passthrough");
                    if !COPIES_FAILING.swap(true, Relaxed) {
                        tracing::warn!(
                            ino,
                            "no passthrough copy: {e}; files are served through FUSE instead \
                             (said once until a copy succeeds; \
                             clip_cache_write_failures_total{{tier=\"passthrough\"}} counts them)"
                        );
                    }
                }
                Ok(()) => {
                    if COPIES_FAILING.swap(false, Relaxed) {
                        tracing::info!("passthrough copies succeed again");
                    }
                }
            }
            pt.busy.lock().expect("busy lock").remove(&ino);
        });
    }

    pub(super) async fn write_backing(&self, ino: u64) -> Result<(), String> {
        let pt = self.passthrough.as_ref().ok_or("passthrough is off")?;
        let (reader, base, size) = self.file_data(ino).ok_or("not a regular file")?;
        let _permit = pt.writer.acquire().await.map_err(|e| e.to_string())?;
        let store = pt.store.clone();
        let s = store.clone();
        let Some(mut file) = blocking(move || s.create(size)).await? else {
            return Ok(());
        };
        let index = reader.index().clone();
        for i in index.spans_covering(base, size) {
            let span = reader
                .spans(i..i + 1)
                .await
                .map_err(|e| e.to_string())?
                .pop()
                .ok_or("no span")?;
            let (start, _) = index.span_range(i);
            let lo = base.max(start) - start;
            let hi = (base + size - start).min(span.len() as u64);
            let part = span.slice(lo as usize..hi as usize);
            file = blocking(move || file.write(&part).map(|()| file)).await?;
        }
        let layer = index.layer;
        blocking(move || store.commit(file, &layer, base))
            .await
            .map(|_| ())
    }
}
