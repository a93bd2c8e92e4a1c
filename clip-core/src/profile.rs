//! Startup profiles: which byte ranges of which layers a container read in its first seconds,
//! in order, so that later cold starts on any node fetch them ahead of the program.
//!
//! A profile belongs to one image manifest. Per layer (by compressed digest) it lists ranges of
//! the layer's uncompressed tar stream in first-read order; replaying maps them onto the spans of
//! the layer's index (whatever its span size) and fetches them in a few large runs. A profile is
//! a hint: a wrong or stale one costs bandwidth, never correctness (every span is verified), and
//! layers it names that the image does not have are ignored.
//!
//! Bounds: at most [`MAX_LAYERS`] layers, [`MAX_RANGES`] ranges per layer and [`MAX_BYTES`]
//! bytes covered in all; the encoded form is refused above [`MAX_ENCODED`] bytes.

use crate::digest::Digest;
use crate::index::LayerIndex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MEDIA_TYPE: &str = "application/vnd.clip.profile.v1+json";
pub const MAX_LAYERS: usize = 256;
pub const MAX_RANGES: usize = 8192;
pub const MAX_BYTES: u64 = 1 << 30;
pub const MAX_ENCODED: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("profile: {0}")]
    Invalid(String),
}

/// The ranges one layer's first seconds read, in first-read order, merged where they touch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerProfile {
    pub layer: Digest,
    /// `(offset, len)` in the uncompressed stream.
    pub ranges: Vec<(u64, u64)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    pub version: u32,
    /// The image manifest the profile was recorded on.
    pub manifest: Digest,
    pub layers: Vec<LayerProfile>,
}

impl Profile {
    pub fn new(manifest: Digest) -> Self {
        Profile {
            version: 1,
            manifest,
            layers: Vec::new(),
        }
    }

    /// Canonical JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("profile serialises")
    }

    /// Decodes and checks bounds; anything out of bounds is an error, not a truncation.
    pub fn decode(raw: &[u8]) -> Result<Self, ProfileError> {
        if raw.len() > MAX_ENCODED {
            return Err(ProfileError::Invalid(format!(
                "{} bytes, more than {MAX_ENCODED}",
                raw.len()
            )));
        }
        let p: Profile =
            serde_json::from_slice(raw).map_err(|e| ProfileError::Invalid(e.to_string()))?;
        if p.version != 1 {
            return Err(ProfileError::Invalid(format!("version {}", p.version)));
        }
        if p.layers.len() > MAX_LAYERS {
            return Err(ProfileError::Invalid(format!("{} layers", p.layers.len())));
        }
        let mut total = 0u64;
        for l in &p.layers {
            if l.ranges.len() > MAX_RANGES {
                return Err(ProfileError::Invalid(format!(
                    "layer {}: {} ranges",
                    l.layer,
                    l.ranges.len()
                )));
            }
            for &(o, n) in &l.ranges {
                if o.checked_add(n).is_none() {
                    return Err(ProfileError::Invalid(format!("range {o}+{n} overflows")));
                }
                total = total.saturating_add(n);
            }
        }
        if total > MAX_BYTES {
            return Err(ProfileError::Invalid(format!(
                "covers {total} bytes, more than {MAX_BYTES}"
            )));
        }
        Ok(p)
    }

    pub fn layer(&self, layer: &Digest) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| l.layer == *layer)
    }

    /// Adds another run's ranges: ranges already present keep their place, new ones follow;
    /// bounds are kept (what does not fit is dropped).
    pub fn merge(&mut self, other: &Profile) {
        let mut total: u64 = self.covered();
        for ol in &other.layers {
            let idx = match self.layers.iter().position(|l| l.layer == ol.layer) {
                Some(i) => i,
                None if self.layers.len() < MAX_LAYERS => {
                    self.layers.push(LayerProfile {
                        layer: ol.layer,
                        ranges: Vec::new(),
                    });
                    self.layers.len() - 1
                }
                None => continue,
            };
            let l = &mut self.layers[idx];
            for &(o, n) in &ol.ranges {
                let covered = l.ranges.iter().any(|&(s, m)| s <= o && o + n <= s + m);
                if covered || l.ranges.len() >= MAX_RANGES || total + n > MAX_BYTES {
                    continue;
                }
                l.ranges.push((o, n));
                total += n;
            }
        }
    }

    fn covered(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| l.ranges.iter().map(|r| r.1))
            .sum()
    }
}

/// The spans of `index` that `ranges` touch, in first-touch order, without repeats; ranges
/// outside the layer are ignored.
pub fn spans_of(index: &LayerIndex, ranges: &[(u64, u64)]) -> Vec<usize> {
    let mut seen = vec![false; index.spans.len()];
    let mut out = Vec::new();
    for &(o, n) in ranges {
        if n == 0 || o >= index.uncompressed_size {
            continue;
        }
        let n = n.min(index.uncompressed_size - o);
        for i in index.spans_covering(o, n) {
            if let Some(s) = seen.get_mut(i) {
                if !*s {
                    *s = true;
                    out.push(i);
                }
            }
        }
    }
    out
}

/// The bytes `ranges` cover in a layer: (uncompressed, compressed), the compressed part
/// pro-rated by span (what fetching exactly those bytes would cost at best). Overlapping
/// ranges count once.
pub fn floor_bytes(index: &LayerIndex, ranges: &[(u64, u64)]) -> (u64, u64) {
    let merged = merge_intervals(
        ranges
            .iter()
            .filter(|r| r.1 > 0 && r.0 < index.uncompressed_size)
            .map(|&(o, n)| (o, (o + n).min(index.uncompressed_size)))
            .collect(),
    );
    let (mut u, mut c) = (0u64, 0f64);
    for (s, e) in merged {
        u += e - s;
        for i in index.spans_covering(s, e - s) {
            let (us, ue) = index.span_range(i);
            let (cs, ce) = index.span_compressed_range(i);
            let overlap = e.min(ue).saturating_sub(s.max(us));
            if ue > us {
                c += overlap as f64 * (ce - cs) as f64 / (ue - us) as f64;
            }
        }
    }
    (u, c as u64)
}

/// Sorts `[start, end)` intervals and merges those that overlap or touch.
pub fn merge_intervals(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// Groups spans into runs of adjacent spans (at most `max_run` each), keeping the order of each
/// run's first span.
pub fn runs(spans: &[usize], max_run: usize) -> Vec<Range<usize>> {
    let mut sorted = spans.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<Range<usize>> = Vec::new();
    for i in sorted {
        match runs.last_mut() {
            Some(r) if r.end == i && r.len() < max_run.max(1) => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    // First-read order: a run goes where its earliest span was first read.
    let order: HashMap<usize, usize> = spans.iter().enumerate().map(|(k, &s)| (s, k)).collect();
    runs.sort_by_key(|r| r.clone().filter_map(|s| order.get(&s)).min().copied());
    runs
}

/// Records the ranges a layer's reads touch until its window closes.
pub struct Recorder {
    window: Duration,
    state: Mutex<RecState>,
}

struct RecState {
    started: Option<Instant>,
    ranges: Vec<(u64, u64)>,
    bytes: u64,
}

impl Recorder {
    /// Records for `window` from the first read.
    pub fn new(window: Duration) -> Self {
        Recorder {
            window,
            state: Mutex::new(RecState {
                started: None,
                ranges: Vec::new(),
                bytes: 0,
            }),
        }
    }

    /// Notes a read of `[offset, offset + len)`; extends the previous range when contiguous.
    pub fn note(&self, offset: u64, len: u64) {
        let mut s = self.state.lock().expect("recorder lock");
        let started = *s.started.get_or_insert_with(Instant::now);
        if started.elapsed() > self.window || len == 0 {
            return;
        }
        if let Some(&(start, n)) = s.ranges.last() {
            let end = start + n;
            if offset >= start && offset <= end {
                let new_end = end.max(offset + len);
                s.bytes += new_end - end;
                if let Some(last) = s.ranges.last_mut() {
                    last.1 = new_end - start;
                }
                return;
            }
        }
        if s.ranges.len() >= MAX_RANGES || s.bytes + len > MAX_BYTES {
            return;
        }
        s.ranges.push((offset, len));
        s.bytes += len;
    }

    /// True once something was read.
    pub fn started(&self) -> bool {
        self.state.lock().expect("recorder lock").started.is_some()
    }

    /// True once the window has closed (after the first read).
    pub fn done(&self) -> bool {
        let s = self.state.lock().expect("recorder lock");
        s.started.is_some_and(|t| t.elapsed() > self.window)
    }

    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.state.lock().expect("recorder lock").ranges.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_bounds_and_merge() {
        let m = Digest::of(b"manifest");
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let mut p = Profile::new(m);
        p.layers.push(LayerProfile {
            layer: a,
            ranges: vec![(100, 10), (0, 5)],
        });
        assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        let mut q = Profile::new(m);
        q.layers.push(LayerProfile {
            layer: a,
            ranges: vec![(102, 3), (500, 1)],
        });
        q.layers.push(LayerProfile {
            layer: b,
            ranges: vec![(7, 7)],
        });
        p.merge(&q);
        assert_eq!(
            p.layer(&a).unwrap().ranges,
            vec![(100, 10), (0, 5), (500, 1)]
        );
        assert_eq!(p.layer(&b).unwrap().ranges, vec![(7, 7)]);
        // Hostile input: too many ranges, overflowing ranges, too many bytes, junk.
        let mut big = Profile::new(m);
        big.layers.push(LayerProfile {
            layer: a,
            ranges: vec![(0, 1); MAX_RANGES + 1],
        });
        assert!(Profile::decode(&big.encode()).is_err());
        big.layers[0].ranges = vec![(u64::MAX, 2)];
        assert!(Profile::decode(&big.encode()).is_err());
        big.layers[0].ranges = vec![(0, MAX_BYTES), (0, 1)];
        assert!(Profile::decode(&big.encode()).is_err());
        assert!(Profile::decode(b"{\"version\":1").is_err());
        assert!(Profile::decode(&vec![b' '; MAX_ENCODED + 1]).is_err());
    }

    #[test]
    fn recorder_merges_contiguous_reads_and_stops_after_its_window() {
        let r = Recorder::new(Duration::from_secs(3600));
        r.note(0, 4096);
        r.note(4096, 4096);
        r.note(1 << 20, 10);
        r.note(0, 100);
        assert_eq!(r.ranges(), vec![(0, 8192), (1 << 20, 10), (0, 100)]);
        let r = Recorder::new(Duration::from_millis(20));
        r.note(0, 1);
        assert!(!r.done());
        std::thread::sleep(Duration::from_millis(30));
        r.note(5, 1);
        assert!(r.done());
        assert_eq!(r.ranges(), vec![(0, 1)]);
    }

    #[test]
    fn floor_counts_overlaps_once_and_prorates_compressed_bytes() {
        let (_, ix, _, _) = crate::testutil::layer(8, 48 << 10, 16 << 10);
        let (u, c) = floor_bytes(&ix, &[(0, 1000), (500, 1000), (ix.uncompressed_size, 9)]);
        assert_eq!(u, 1500);
        assert!(c > 0 && c < 1500, "{c}");
        let (u, c) = floor_bytes(&ix, &[(0, ix.uncompressed_size)]);
        assert_eq!(u, ix.uncompressed_size);
        let whole = ix.compressed_size as f64;
        assert!((c as f64 - whole).abs() / whole < 0.01, "{c} vs {whole}");
    }

    #[test]
    fn runs_keep_first_read_order() {
        assert_eq!(runs(&[9, 3, 4, 10, 1], 4), vec![9..11, 3..5, 1..2]);
        assert_eq!(runs(&[1, 2, 3, 4, 5], 2), vec![1..3, 3..5, 5..6]);
    }
}
