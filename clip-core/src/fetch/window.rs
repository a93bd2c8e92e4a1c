//! A run's checkpoint window: the 32 KiB of output before its first span, which the inflater
//! needs to resume there. Cut from the span before when a tier has it (no request), else read
//! from this node's windows blob, else requested from the published one.
//!
//! Part of [`super::LayerFetcher`]; uses the cache tiers and the blob source.

use super::{LayerFetcher, ReadError};
use crate::index::format;
use bytes::Bytes;
use std::sync::atomic::Ordering::Relaxed;

/// Where a window came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WindowFrom {
    /// The span needs none (the start of the layer).
    None,
    /// The tail of the span before it, from a cache tier.
    PreviousSpan,
    /// This node's windows blob (not hashed before use: a failed run turns it off).
    LocalBlob,
    /// A range request to the published windows blob.
    Registry,
}

impl LayerFetcher {
    /// The 32 KiB checkpoint window of span `i`, inflated: the end of span `i - 1` when a tier
    /// has it (no registry request at all), else from the local windows blob (unless it
    /// proved damaged), else one small range read of the published one (concurrent with the
    /// span's data request). Where it came from is told even when it is unusable: a window
    /// from the local blob that does not decode turns that blob off like one that fails
    /// verification.
    pub(super) async fn window(&self, i: usize) -> (WindowFrom, Result<Vec<u8>, ReadError>) {
        let s = &self.index.spans[i];
        if s.window_len == 0 {
            return (WindowFrom::None, Ok(Vec::new()));
        }
        if let Some(w) = self.window_from_previous(i).await {
            return (WindowFrom::PreviousSpan, Ok(w));
        }
        let (from, raw) = self.window_compressed(i).await;
        let raw = match raw {
            Ok(r) => r,
            Err(e) => return (from, Err(e)),
        };
        // A wrong window cannot produce the right span digests, so the span check covers it.
        let window =
            format::decode_window(&raw, self.index.codec).map_err(|e| ReadError::Corrupt {
                layer: self.index.layer,
                span: i,
                detail: format!("window: {e}"),
            });
        (from, window)
    }

    /// Span `i`'s window as the windows blob holds it (zstd-compressed; empty for none): from
    /// this node's blob unless it proved damaged, else the published one. A zstd checkpoint
    /// is kept so until its span is decoded (compressed it is a few KiB, decoded up to 8 MiB).
    pub(super) async fn window_compressed(
        &self,
        i: usize,
    ) -> (WindowFrom, Result<Bytes, ReadError>) {
        let s = &self.index.spans[i];
        if s.window_len == 0 {
            return (WindowFrom::None, Ok(Bytes::new()));
        }
        let (off, len) = (s.window_offset, u64::from(s.window_len));
        let mut local = None;
        if let Some(blob) = &self.local_windows {
            if !self.local_windows_bad.load(Relaxed) {
                local = blob.read(off, len).await;
            }
        }
        let (from, raw) = match local {
            Some(w) => (WindowFrom::LocalBlob, w),
            None => {
                let got = self
                    .source
                    .read_range(&self.index.windows.digest, off, len)
                    .await;
                match got {
                    Ok(b) => {
                        self.fetcher.stats.fetched(b.len());
                        self.fetcher.stats.window_requests.fetch_add(1, Relaxed);
                        (WindowFrom::Registry, b)
                    }
                    Err(e) => return (WindowFrom::Registry, Err(e.into())),
                }
            }
        };
        (from, Ok(raw))
    }

    /// Span `i`'s window cut from the end of span `i - 1`, if a tier has that span (one on
    /// this node, or the shared tier: a window is the verified tail of the span before it, so
    /// the tiers hold every window of the spans they hold) and it holds a whole window.
    async fn window_from_previous(&self, i: usize) -> Option<Vec<u8>> {
        // A zstd checkpoint is more than the bytes before it (tables, repeat offsets).
        if self.index.codec != crate::index::Codec::Gzip {
            return None;
        }
        let prev = i.checked_sub(1)?;
        let local = self.is_local(prev);
        if !local && !self.fetcher.cache.has_shared() {
            return None;
        }
        let (ps, pe) = self.index.span_range(prev);
        let need = crate::gzip::WINDOW_SIZE as u64;
        if pe - ps < need && ps > 0 {
            return None;
        }
        // A probe: a miss here is not a miss of a span anyone asked for.
        let data = self.fetcher.cache.probe(&self.key(prev)).await?;
        let keep = (need as usize).min(data.len());
        self.fetcher.stats.windows_from_spans.fetch_add(1, Relaxed);
        Some(data[data.len() - keep..].to_vec())
    }
}
