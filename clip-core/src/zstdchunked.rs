//! zstd:chunked layers: a zstd-compressed tar whose every file (or chunk of a large file) starts
//! a zstd frame of its own, with a table of contents (TOC) in a frame near the end whose position
//! and sha256 the image manifest annotates.
//!
//! Such a layer is indexed from its TOC alone, with one range request: each chunk becomes a span
//! whose compressed bytes start at the chunk's frame and whose digest is the chunk's, as the TOC
//! records it. The files' bytes are laid out one after the other in the index's address space
//! (the tar headers between them are never needed), and a span's bytes are the first `size`
//! bytes its frames decompress to ([`FrameSpans`]). Every span is verified against the TOC's
//! digest before it is served or cached, as gzip spans are against theirs.

use crate::digest::Digest;
use crate::index::{BlobRef, Codec, Entry, EntryKind, IndexError, LayerIndex, Span};
use crate::limits::{MAX_ENTRIES, MAX_PATH, MAX_SPAN, MAX_XATTR_NAME, MAX_XATTR_VALUE};
use crate::registry::{LayerDescriptor, TocPosition};
use std::collections::HashMap;

/// The largest TOC accepted, decompressed (a layer of a million files lists ~300 MB of JSON at
/// most; anything beyond is refused and the layer unpacked).
pub const MAX_TOC: u64 = 512 << 20;

fn bad(why: impl Into<String>) -> IndexError {
    IndexError::Format(format!("zstd:chunked table of contents: {}", why.into()))
}

#[derive(serde::Deserialize)]
struct Toc {
    version: u32,
    entries: Vec<TocEntry>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default, rename_all = "camelCase")]
struct TocEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    size: u64,
    modtime: Option<String>,
    link_name: String,
    mode: u32,
    uid: u32,
    gid: u32,
    dev_major: u32,
    dev_minor: u32,
    xattrs: HashMap<String, String>,
    digest: String,
    offset: u64,
    chunk_offset: u64,
    chunk_size: u64,
    chunk_digest: String,
}

/// The TOC's compressed bytes checked against the manifest's annotation, decompressed within
/// the size the annotation states (and [`MAX_TOC`]).
pub fn open_toc(compressed: &[u8], pos: &TocPosition) -> Result<Vec<u8>, IndexError> {
    if Digest::of(compressed) != pos.checksum {
        return Err(bad(format!(
            "its bytes do not match the manifest's checksum {}",
            pos.checksum
        )));
    }
    if pos.uncompressed > MAX_TOC {
        return Err(bad(format!(
            "{} bytes decompressed (limit {MAX_TOC})",
            pos.uncompressed
        )));
    }
    let json = zstd::bulk::decompress(compressed, pos.uncompressed as usize)
        .map_err(|e| bad(format!("not a zstd frame of at most the stated size: {e}")))?;
    if json.len() as u64 != pos.uncompressed {
        return Err(bad(format!(
            "{} bytes decompressed, the manifest says {}",
            json.len(),
            pos.uncompressed
        )));
    }
    Ok(json)
}

fn parse_digest(s: &str, what: &str, name: &str) -> Result<Digest, IndexError> {
    s.parse()
        .map_err(|_| bad(format!("{name:?}: {what} {s:?} is not a sha256 digest")))
}

fn mtime(s: &Option<String>) -> (i64, u32) {
    s.as_deref().and_then(chrono_like).unwrap_or((0, 0))
}

/// Seconds and nanoseconds of an RFC 3339 UTC time (`2023-11-14T22:13:20Z`, fractions and
/// offsets allowed); `None` if it is not one.
fn chrono_like(t: &str) -> Option<(i64, u32)> {
    let (date, rest) = t.split_once('T')?;
    let mut d = date.split('-').map(|n| n.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    // Bounded fields keep the arithmetic below in range, whatever the TOC says.
    if !(0..=9999).contains(&y) || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let (clock, offset_secs) = if let Some(c) = rest.strip_suffix('Z') {
        (c, 0)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (c, o) = rest.split_at(i);
        let sign = if o.starts_with('-') { -1 } else { 1 };
        let (oh, om) = o[1..].split_once(':')?;
        let (oh, om) = (oh.parse::<i64>().ok()?, om.parse::<i64>().ok()?);
        if !(0..=23).contains(&oh) || !(0..=59).contains(&om) {
            return None;
        }
        (c, sign * (oh * 3600 + om * 60))
    };
    let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
    let mut h = hms.split(':').map(|n| n.parse::<i64>().ok());
    let (hh, mm, ss) = (h.next()??, h.next()??, h.next()??);
    if !(0..=23).contains(&hh) || !(0..=59).contains(&mm) || !(0..=60).contains(&ss) {
        return None;
    }
    let nsec = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().take(9).collect();
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    // Days since the epoch (civil from days, proleptic Gregorian).
    let (y, mo) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + da - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some((days * 86400 + hh * 3600 + mm * 60 + ss - offset_secs, nsec))
}

/// The index of a zstd:chunked layer `desc` from its TOC (`json`, already checked with
/// [`open_toc`]). The TOC starts at `toc_offset`: the last chunk's frames end there.
pub fn index_from_toc(desc: &LayerDescriptor, json: &[u8]) -> Result<LayerIndex, IndexError> {
    let toc_offset = desc
        .toc
        .map(|t| t.offset)
        .ok_or_else(|| bad("none annotated"))?;
    let toc: Toc = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    if toc.version != 1 {
        return Err(bad(format!("version {} (this clip reads 1)", toc.version)));
    }
    if toc.entries.len() as u64 > MAX_ENTRIES {
        return Err(bad(format!(
            "{} entries (limit {MAX_ENTRIES})",
            toc.entries.len()
        )));
    }
    let mut entries: Vec<Entry> = Vec::with_capacity(toc.entries.len());
    // (compressed offset, uncompressed address, size, digest), in the TOC's order.
    let mut chunks: Vec<(u64, u64, u64, Digest)> = Vec::new();
    // Where each frame's bytes were placed: a second entry naming the same frame shares them.
    let mut placed: HashMap<u64, (u64, u64, Digest)> = HashMap::new();
    let mut next_address = 0u64;
    // The regular file whose chunks follow: (index in entries, its address, its size).
    let mut open_file: Option<(usize, u64, u64)> = None;
    for e in &toc.entries {
        if e.name.len() > MAX_PATH || e.link_name.len() > MAX_PATH {
            return Err(bad(format!("a path longer than {MAX_PATH} bytes")));
        }
        let path = crate::index::builder::normalize(e.name.as_bytes())?;
        let chunk = |kind: &str, size: u64| -> Result<Option<(u64, u64, Digest)>, IndexError> {
            if size == 0 {
                return Ok(None);
            }
            if size > MAX_SPAN {
                return Err(bad(format!(
                    "{:?}: a {kind} of {size} bytes in one frame (limit {MAX_SPAN})",
                    e.name
                )));
            }
            if e.offset == 0 || e.offset >= toc_offset {
                return Err(bad(format!(
                    "{:?}: its frame at {} is outside the layer's data",
                    e.name, e.offset
                )));
            }
            let digest = match (e.chunk_digest.as_str(), e.digest.as_str()) {
                ("", d) | (d, _) if !d.is_empty() => parse_digest(d, "digest", &e.name)?,
                _ => return Err(bad(format!("{:?}: no digest", e.name))),
            };
            Ok(Some((e.offset, size, digest)))
        };
        match e.kind.as_str() {
            "chunk" => {
                let Some((i, addr, size)) = open_file else {
                    return Err(bad(format!("{:?}: a chunk of no file", e.name)));
                };
                // A chunk without a size runs to the end of its file (the last one, as
                // stargz-snapshotter writes it).
                let chunk_size = match e.chunk_size {
                    0 => size.saturating_sub(e.chunk_offset),
                    n => n,
                };
                if entries[i].path != path
                    || e.chunk_offset == 0
                    || e.chunk_offset.checked_add(chunk_size) > Some(size)
                {
                    return Err(bad(format!("{:?}: a chunk out of its file", e.name)));
                }
                let Some((off, len, d)) = chunk("chunk", chunk_size)? else {
                    continue;
                };
                chunks.push((off, addr + e.chunk_offset, len, d));
                continue;
            }
            "reg" => {
                // The first chunk is the entry itself: its size, or chunkSize when chunked.
                let first = if e.chunk_size > 0 {
                    e.chunk_size
                } else {
                    e.size
                };
                if first > e.size {
                    return Err(bad(format!("{:?}: a chunk longer than its file", e.name)));
                }
                let addr = match chunk("file", first)? {
                    None => next_address,
                    Some((off, len, d)) => match placed.get(&off) {
                        // The same frame again (a deduplicated file): its bytes are there.
                        Some(&(a, l, pd)) if l == len && pd == d && first == e.size => a,
                        Some(_) => {
                            return Err(bad(format!(
                                "{:?}: its frame at {off} is another chunk's",
                                e.name
                            )))
                        }
                        None => {
                            placed.insert(off, (next_address, len, d));
                            chunks.push((off, next_address, len, d));
                            next_address
                        }
                    },
                };
                if addr == next_address {
                    next_address = next_address
                        .checked_add(e.size)
                        .ok_or_else(|| bad("sizes overflow"))?;
                }
                open_file = Some((entries.len(), addr, e.size));
            }
            _ => open_file = None,
        }
        let mut path = path;
        let kind = match e.kind.as_str() {
            "reg" => {
                let (_, offset, size) = open_file.expect("set above");
                match crate::index::builder::whiteout_entry(&path) {
                    Some(Some((p, k))) => {
                        open_file = None;
                        path = p;
                        k
                    }
                    Some(None) => {
                        open_file = None;
                        continue;
                    }
                    None => EntryKind::File { offset, size },
                }
            }
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink {
                target: e.link_name.as_bytes().to_vec(),
            },
            "hardlink" => EntryKind::Hardlink {
                target: crate::index::builder::normalize(e.link_name.as_bytes())?,
            },
            "char" => EntryKind::CharDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "block" => EntryKind::BlockDevice {
                major: e.dev_major,
                minor: e.dev_minor,
            },
            "fifo" => EntryKind::Fifo,
            other => {
                return Err(bad(format!("{:?}: unknown entry type {other:?}", e.name)));
            }
        };
        // The TOC's own landmarks are not part of the image.
        if matches!(
            path.as_slice(),
            b".no.prefetch.landmark" | b".prefetch.landmark" | b"stargz.index.json"
        ) {
            continue;
        }
        let mut xattrs = Vec::with_capacity(e.xattrs.len());
        for (k, v) in &e.xattrs {
            use base64::Engine;
            let v = base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|_| bad(format!("{:?}: xattr {k:?} is not base64", e.name)))?;
            if k.len() > MAX_XATTR_NAME || v.len() > MAX_XATTR_VALUE {
                return Err(bad(format!("{:?}: xattr {k:?} too large", e.name)));
            }
            xattrs.push((k.as_bytes().to_vec(), v));
        }
        xattrs.sort();
        let (mtime, mtime_nsec) = mtime(&e.modtime);
        entries.push(Entry {
            path,
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            mtime,
            mtime_nsec,
            xattrs,
        });
    }
    // Spans in address order; each one's frames end where the next one's start.
    chunks.sort_by_key(|c| c.1);
    let mut spans = Vec::with_capacity(chunks.len());
    let mut expect = 0u64;
    for (i, &(off, addr, len, digest)) in chunks.iter().enumerate() {
        if addr != expect {
            return Err(bad("its chunks leave a hole in a file"));
        }
        let next = chunks.get(i + 1).map_or(toc_offset, |c| c.0);
        if next <= off {
            return Err(bad(
                "its chunks' frames are not in the order of their files",
            ));
        }
        expect = addr + len;
        spans.push(Span {
            uncompressed: addr,
            compressed: off,
            bits: 0,
            window_offset: 0,
            window_len: 0,
            digest,
        });
    }
    let ix = LayerIndex {
        layer: desc.digest,
        diff_id: desc.diff_id,
        codec: Codec::ZstdFrames,
        compressed_size: toc_offset,
        uncompressed_size: next_address,
        span_size: 0,
        windows: BlobRef {
            digest: Digest::of(b""),
            size: 0,
        },
        spans,
        entries,
        charge: Default::default(),
    };
    // Whatever the decoder refuses in a stored or published index (a root that is not a
    // directory, say) is refused here too: the index is checked as any other is read.
    crate::index::format::decode(&crate::index::format::encode(&ix))
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("zstd: {0}")]
    Zstd(String),
    #[error("span {span}: its frames gave {got} of its {want} bytes")]
    Short {
        span: usize,
        got: usize,
        want: usize,
    },
}

/// Decodes consecutive spans of a zstd:chunked layer from their compressed bytes as they
/// arrive: each span is the first `len` bytes its frames decompress to; what follows (tar
/// padding and headers) is skipped.
pub struct FrameSpans {
    /// (uncompressed bytes wanted, compressed bytes) per span.
    spans: Vec<(usize, u64)>,
    i: usize,
    fed: u64,
    out: Vec<u8>,
    dec: zstd::stream::raw::Decoder<'static>,
}

impl FrameSpans {
    pub fn new(spans: Vec<(usize, u64)>) -> Result<Self, FrameError> {
        Ok(FrameSpans {
            spans,
            i: 0,
            fed: 0,
            out: Vec::new(),
            dec: zstd::stream::raw::Decoder::new().map_err(|e| FrameError::Zstd(e.to_string()))?,
        })
    }

    /// Takes the next compressed bytes; returns the spans completed by them, in order.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Vec<Vec<u8>>, FrameError> {
        use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
        let mut done = Vec::new();
        while !input.is_empty() && self.i < self.spans.len() {
            let (want, comp) = self.spans[self.i];
            let take = (comp - self.fed).min(input.len() as u64) as usize;
            let (mine, rest) = input.split_at(take);
            input = rest;
            self.fed += take as u64;
            let mut src = InBuffer::around(mine);
            while self.out.len() < want && src.pos() < mine.len() {
                let have = self.out.len();
                self.out.resize(want, 0);
                let mut dst = OutBuffer::around_pos(&mut self.out[..], have);
                let r = self.dec.run(&mut src, &mut dst);
                let produced = dst.pos();
                self.out.truncate(produced);
                if let Err(e) = r {
                    return Err(FrameError::Zstd(e.to_string()));
                }
                if produced == have && src.pos() == 0 {
                    break;
                }
            }
            if self.fed == comp {
                if self.out.len() < want {
                    return Err(FrameError::Short {
                        span: self.i,
                        got: self.out.len(),
                        want,
                    });
                }
                done.push(std::mem::take(&mut self.out));
                self.i += 1;
                self.fed = 0;
                self.dec = zstd::stream::raw::Decoder::new()
                    .map_err(|e| FrameError::Zstd(e.to_string()))?;
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zstd:chunked-like layer: each file's bytes start a frame, followed by frames of
    /// "padding and the next header"; the TOC in a frame at the end.
    fn layer(files: &[(&str, &[u8])]) -> (Vec<u8>, LayerDescriptor) {
        let mut blob = zstd::bulk::compress(b"header of the first entry", 3).unwrap();
        let mut entries = vec![serde_json::json!({"name": "etc/", "type": "dir", "mode": 493})];
        for (name, data) in files {
            let offset = blob.len();
            let mut frame = data.to_vec();
            frame.extend_from_slice(&[0u8; 300]);
            blob.extend(zstd::bulk::compress(&frame, 3).unwrap());
            blob.extend(zstd::bulk::compress(b"next header", 3).unwrap());
            let d = Digest::of(data).to_string();
            entries.push(serde_json::json!({
                "name": name, "type": "reg", "size": data.len(), "mode": 420, "uid": 7,
                "modtime": "2023-11-14T22:13:20Z", "offset": offset, "digest": d,
                "chunkDigest": d,
            }));
        }
        let desc = with_toc(&mut blob, serde_json::Value::Array(entries));
        (blob, desc)
    }

    /// Appends a TOC of `entries` to `blob` (in a frame of its own) and describes the layer.
    fn with_toc(blob: &mut Vec<u8>, entries: serde_json::Value) -> LayerDescriptor {
        let json =
            serde_json::to_vec(&serde_json::json!({"version": 1, "entries": entries})).unwrap();
        let toc = zstd::bulk::compress(&json, 3).unwrap();
        let offset = blob.len() as u64;
        blob.extend(&toc);
        LayerDescriptor {
            digest: Digest::of(blob),
            size: blob.len() as u64,
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            diff_id: Digest::of(b"diff"),
            toc: Some(TocPosition {
                offset,
                length: toc.len() as u64,
                uncompressed: json.len() as u64,
                checksum: Digest::of(&toc),
            }),
        }
    }

    fn toc_of(blob: &[u8], desc: &LayerDescriptor) -> Result<Vec<u8>, IndexError> {
        let t = desc.toc.unwrap();
        open_toc(&blob[t.offset as usize..(t.offset + t.length) as usize], &t)
    }

    #[test]
    fn files_are_read_from_their_frames_and_checked_against_the_toc() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (blob, desc) = layer(&[("etc/passwd", b"root:x:0:0"), ("usr/big", &big)]);
        let ix = index_from_toc(&desc, &toc_of(&blob, &desc).unwrap()).unwrap();
        assert_eq!(ix.codec, Codec::ZstdFrames);
        assert_eq!(ix.spans.len(), 2);
        // No span size: read-ahead and bulk mode count spans by their mean length.
        assert_eq!(ix.span_size, 0);
        assert_eq!(ix.typical_span(), ix.uncompressed_size / 2);
        let passwd = ix.entries.iter().find(|e| e.path == b"etc/passwd").unwrap();
        assert_eq!(
            (passwd.uid, passwd.mode, passwd.mtime),
            (7, 0o644, 1_700_000_000)
        );
        // Decode both spans from one stream of their compressed bytes, split anywhere.
        let (start, _) = ix.span_compressed_range(0);
        let (_, end) = ix.span_compressed_range(1);
        let lens: Vec<(usize, u64)> = (0..2)
            .map(|i| {
                let (s, e) = ix.span_range(i);
                let (cs, ce) = ix.span_compressed_range(i);
                ((e - s) as usize, ce - cs)
            })
            .collect();
        for cut in [1usize, 7, 4096] {
            let mut d = FrameSpans::new(lens.clone()).unwrap();
            let mut got = Vec::new();
            for c in blob[start as usize..end as usize].chunks(cut) {
                got.extend(d.feed(c).unwrap());
            }
            assert_eq!(got.len(), 2);
            assert_eq!(Digest::of(&got[0]), ix.spans[0].digest);
            assert_eq!(got[1], big);
        }
    }

    /// stargz-snapshotter's converter cuts files over 4 MiB into chunks and leaves the last
    /// chunk's size out: it runs to the end of the file.
    #[test]
    fn a_last_chunk_without_a_size_runs_to_the_end_of_its_file() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let mut blob = zstd::bulk::compress(b"header", 3).unwrap();
        let first = blob.len();
        blob.extend(zstd::bulk::compress(&data[..120_000], 3).unwrap());
        let second = blob.len();
        let mut tail = data[120_000..].to_vec();
        tail.extend_from_slice(&[0u8; 300]);
        blob.extend(zstd::bulk::compress(&tail, 3).unwrap());
        blob.extend(zstd::bulk::compress(b"next header", 3).unwrap());
        let d = |b: &[u8]| Digest::of(b).to_string();
        let entries = serde_json::json!([
            {"name": "big", "type": "reg", "size": data.len(), "mode": 420, "offset": first,
             "chunkSize": 120_000, "digest": d(&data), "chunkDigest": d(&data[..120_000])},
            {"name": "big", "type": "chunk", "offset": second, "chunkOffset": 120_000,
             "chunkDigest": d(&data[120_000..])},
        ]);
        let desc = with_toc(&mut blob, entries);
        let ix = index_from_toc(&desc, &toc_of(&blob, &desc).unwrap()).unwrap();
        assert_eq!(ix.spans.len(), 2);
        assert_eq!(ix.span_range(1), (120_000, 200_000));
        assert_eq!(ix.spans[1].digest, Digest::of(&data[120_000..]));
    }

    #[test]
    fn a_toc_that_is_not_the_annotated_one_or_lies_is_refused() {
        let (blob, mut desc) = layer(&[("a", b"x")]);
        let mut t = desc.toc.unwrap();
        t.checksum = Digest::of(b"other");
        assert!(open_toc(&blob[t.offset as usize..], &t).is_err());
        let mut t = desc.toc.unwrap();
        t.uncompressed = MAX_TOC + 1;
        assert!(open_toc(&blob[t.offset as usize..], &t).is_err());
        // Frames outside the layer's data, a chunk of nothing, paths that climb out.
        for bad_entry in [
            serde_json::json!({"name": "a", "type": "reg", "size": 1, "offset": 1u64 << 40, "digest": Digest::of(b"x").to_string()}),
            serde_json::json!({"name": "a", "type": "chunk", "size": 1, "offset": 3, "chunkOffset": 1, "chunkSize": 1}),
            serde_json::json!({"name": "../a", "type": "dir"}),
            serde_json::json!({"name": "a", "type": "reg", "size": 1u64 << 40, "offset": 3, "digest": Digest::of(b"x").to_string()}),
            serde_json::json!({"name": "a", "type": "whatever"}),
        ] {
            let json =
                serde_json::to_vec(&serde_json::json!({"version": 1, "entries": [bad_entry]}))
                    .unwrap();
            desc.toc = Some(TocPosition {
                offset: 100,
                length: 1,
                uncompressed: json.len() as u64,
                checksum: Digest::of(b""),
            });
            assert!(index_from_toc(&desc, &json).is_err(), "{bad_entry}");
        }
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(chrono_like("1970-01-01T00:00:00Z"), Some((0, 0)));
        assert_eq!(
            chrono_like("2023-11-14T22:13:20.5Z"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(
            chrono_like("2023-11-14T23:13:20+01:00"),
            Some((1_700_000_000, 0))
        );
        assert_eq!(chrono_like("yesterday"), None);
        assert_eq!(chrono_like("9223372036854775807-01-01T00:00:00Z"), None);
        assert_eq!(chrono_like("2023-11-14T99999999999:00:00Z"), None);
        assert_eq!(chrono_like("2023-11-14T00:00:00+99999999999:00"), None);
    }
}
