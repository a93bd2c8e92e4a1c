//! The encoded layer index: versioned, compact, checksummed and deterministic.
//!
//! ```text
//! magic     8 bytes   "CLIPLIDX"
//! version   u32 LE    1
//! flags     u32 LE    0 (reserved)
//! body      ...       see below
//! checksum  32 bytes  sha256 of everything before it
//! ```
//! The body: the layer digest, DiffID and windows digest (32 bytes each), then as unsigned LEB128
//! varints the windows size, compressed size, uncompressed size, span size, span count and entry
//! count; then each span (uncompressed and compressed offsets as deltas, bits, window length,
//! digest); then the entry table, zstd-compressed: each entry's path front-coded against the
//! previous path (shared prefix length, suffix), its kind, mode, uid, gid, mtime, kind payload and
//! xattrs. Window offsets are implied (the windows are stored back to back).
//!
//! The same index always encodes to the same bytes (fixed field order, fixed zstd level, no
//! timestamps), so two machines indexing the same layer publish the same blob, and registries
//! deduplicate it. Decoding treats its input as hostile: the checksum is checked first, every
//! length is bounded by the bytes actually present, and nothing panics.

use super::{BlobRef, Codec, Entry, EntryKind, IndexError, LayerIndex, Span};
use crate::digest::Digest;
use crate::limits::*;

pub const MAGIC: &[u8; 8] = b"CLIPLIDX";
pub const VERSION: u32 = 1;
/// Header flag: the spans are zstd frames ([`Codec::ZstdFrames`]).
const FLAG_ZSTD_FRAMES: u32 = 1;
/// Header flag: the spans are checkpointed zstd blocks ([`Codec::ZstdCheckpoints`]).
const FLAG_ZSTD_CHECKPOINTS: u32 = 2;
/// The media type of an encoded layer index blob.
pub const MEDIA_TYPE_INDEX: &str = "application/vnd.clip.layer-index.v1";
/// The media type of a windows blob.
pub const MEDIA_TYPE_WINDOWS: &str = "application/vnd.clip.layer-windows.v1";

const ZSTD_LEVEL: i32 = 12;

const K_DIR: u8 = 0;
const K_FILE: u8 = 1;
const K_SYMLINK: u8 = 2;
const K_HARDLINK: u8 = 3;
const K_CHAR: u8 = 4;
const K_BLOCK: u8 = 5;
const K_FIFO: u8 = 6;
const K_WHITEOUT: u8 = 7;
const K_OPAQUE: u8 = 8;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Encodes an index. Deterministic.
pub fn encode(ix: &LayerIndex) -> Vec<u8> {
    let mut out = Vec::with_capacity(4096 + ix.spans.len() * 48);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    let flags = match ix.codec {
        Codec::Gzip => 0u32,
        Codec::ZstdFrames => FLAG_ZSTD_FRAMES,
        Codec::ZstdCheckpoints => FLAG_ZSTD_CHECKPOINTS,
    };
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(ix.layer.as_bytes());
    out.extend_from_slice(ix.diff_id.as_bytes());
    out.extend_from_slice(ix.windows.digest.as_bytes());
    for v in [
        ix.windows.size,
        ix.compressed_size,
        ix.uncompressed_size,
        ix.span_size,
        ix.spans.len() as u64,
        ix.entries.len() as u64,
    ] {
        put_varint(&mut out, v);
    }
    let (mut pu, mut pc) = (0u64, 0u64);
    for s in &ix.spans {
        put_varint(&mut out, s.uncompressed.wrapping_sub(pu));
        put_varint(&mut out, s.compressed.wrapping_sub(pc));
        out.push(s.bits);
        put_varint(&mut out, u64::from(s.window_len));
        out.extend_from_slice(s.digest.as_bytes());
        pu = s.uncompressed;
        pc = s.compressed;
    }
    let table = encode_entries(&ix.entries);
    let z =
        zstd::bulk::compress(&table, ZSTD_LEVEL).expect("zstd compression of an in-memory buffer");
    put_varint(&mut out, table.len() as u64);
    put_bytes(&mut out, &z);
    let sum = Digest::of(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn encode_entries(entries: &[Entry]) -> Vec<u8> {
    let mut t = Vec::with_capacity(entries.len() * 40);
    let mut prev: &[u8] = b"";
    for e in entries {
        let shared = prev.iter().zip(&e.path).take_while(|(a, b)| a == b).count();
        put_varint(&mut t, shared as u64);
        put_bytes(&mut t, &e.path[shared..]);
        prev = &e.path;
        let kind = match &e.kind {
            EntryKind::Dir => K_DIR,
            EntryKind::File { .. } => K_FILE,
            EntryKind::Symlink { .. } => K_SYMLINK,
            EntryKind::Hardlink { .. } => K_HARDLINK,
            EntryKind::CharDevice { .. } => K_CHAR,
            EntryKind::BlockDevice { .. } => K_BLOCK,
            EntryKind::Fifo => K_FIFO,
            EntryKind::Whiteout => K_WHITEOUT,
            EntryKind::Opaque => K_OPAQUE,
        };
        t.push(kind);
        put_varint(&mut t, u64::from(e.mode));
        put_varint(&mut t, u64::from(e.uid));
        put_varint(&mut t, u64::from(e.gid));
        put_varint(&mut t, zigzag(e.mtime));
        put_varint(&mut t, u64::from(e.mtime_nsec));
        match &e.kind {
            EntryKind::File { offset, size } => {
                put_varint(&mut t, *offset);
                put_varint(&mut t, *size);
            }
            EntryKind::Symlink { target } | EntryKind::Hardlink { target } => {
                put_bytes(&mut t, target)
            }
            EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } => {
                put_varint(&mut t, u64::from(*major));
                put_varint(&mut t, u64::from(*minor));
            }
            _ => {}
        }
        put_varint(&mut t, e.xattrs.len() as u64);
        for (k, v) in &e.xattrs {
            put_bytes(&mut t, k);
            put_bytes(&mut t, v);
        }
    }
    t
}

/// A bounds-checked reader over untrusted bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8], what: &'static str) -> Self {
        Cursor { buf, pos: 0, what }
    }
    fn err(&self, msg: &str) -> IndexError {
        IndexError::Format(format!("{} at byte {}: {msg}", self.what, self.pos))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], IndexError> {
        if n > self.remaining() {
            return Err(self.err("unexpected end"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, IndexError> {
        Ok(self.take(1)?[0])
    }
    fn varint(&mut self) -> Result<u64, IndexError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            if shift == 63 && b > 1 {
                return Err(self.err("varint overflow"));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(self.err("varint too long"))
    }
    fn u32v(&mut self) -> Result<u32, IndexError> {
        u32::try_from(self.varint()?).map_err(|_| self.err("value exceeds 32 bits"))
    }
    fn len(&mut self) -> Result<usize, IndexError> {
        let n = self.varint()?;
        if n > self.remaining() as u64 {
            return Err(self.err("length exceeds the data"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], IndexError> {
        let n = self.len()?;
        self.take(n)
    }
    fn digest(&mut self) -> Result<Digest, IndexError> {
        let mut d = [0u8; 32];
        d.copy_from_slice(self.take(32)?);
        Ok(Digest::from_bytes(d))
    }
}

/// The windows blob an encoded index names, from its checked header alone (nothing decoded,
/// nothing charged to the memory budget).
pub fn windows_ref(data: &[u8]) -> Result<BlobRef, IndexError> {
    if data.len() < 16 + 32 || &data[..8] != MAGIC {
        return Err(IndexError::Format(
            "not a clip layer index (bad magic)".into(),
        ));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Digest::of(body).as_bytes() != sum {
        return Err(IndexError::Format(
            "checksum mismatch (index corrupted)".into(),
        ));
    }
    let mut c = Cursor::new(&body[16..], "index header");
    let _layer = c.digest()?;
    let _diff_id = c.digest()?;
    let digest = c.digest()?;
    let size = c.varint()?;
    Ok(BlobRef { digest, size })
}

/// Decodes and validates an encoded index.
pub fn decode(data: &[u8]) -> Result<LayerIndex, IndexError> {
    decode_within(data, super::memory::Budget::process())
}

/// [`decode`], charging the decoded index's memory to `budget`.
pub fn decode_within(
    data: &[u8],
    budget: &'static super::memory::Budget,
) -> Result<LayerIndex, IndexError> {
    if data.len() < 16 + 32 || &data[..8] != MAGIC {
        return Err(IndexError::Format(
            "not a clip layer index (bad magic)".into(),
        ));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(IndexError::Format(format!(
            "unsupported index version {version} (this clip reads {VERSION})"
        )));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if Digest::of(body).as_bytes() != sum {
        return Err(IndexError::Format(
            "checksum mismatch (index corrupted)".into(),
        ));
    }
    let flags = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    let codec = match flags {
        0 => Codec::Gzip,
        FLAG_ZSTD_FRAMES => Codec::ZstdFrames,
        FLAG_ZSTD_CHECKPOINTS => Codec::ZstdCheckpoints,
        f => {
            return Err(IndexError::Format(format!(
                "unknown index flags {f:#x} (a newer clip wrote it)"
            )))
        }
    };
    let mut c = Cursor::new(&body[16..], "index header");
    let layer = c.digest()?;
    let diff_id = c.digest()?;
    let windows_digest = c.digest()?;
    let windows_size = c.varint()?;
    let compressed_size = c.varint()?;
    let uncompressed_size = c.varint()?;
    let span_size = c.varint()?;
    let span_count = c.varint()?;
    let entry_count = c.varint()?;
    // A span takes at least 35 bytes; refuse counts the data cannot hold before allocating.
    if span_count > (c.remaining() / 35) as u64 {
        return Err(c.err("span count exceeds the data"));
    }
    let mut charge = super::memory::Charge::new(budget);
    let over = |(budget, available)| IndexError::Budget {
        layer,
        budget,
        available,
    };
    charge
        .add(span_count.saturating_mul(super::memory::SPAN_BYTES))
        .map_err(over)?;
    let mut spans = Vec::with_capacity(span_count as usize);
    let (mut pu, mut pc, mut woff) = (0u64, 0u64, 0u64);
    for i in 0..span_count {
        let du = c.varint()?;
        let dc = c.varint()?;
        let uncompressed = pu
            .checked_add(du)
            .ok_or_else(|| c.err("span offset overflow"))?;
        let compressed = pc
            .checked_add(dc)
            .ok_or_else(|| c.err("span offset overflow"))?;
        let bits = c.u8()?;
        let window_len = c.u32v()?;
        let digest = c.digest()?;
        if bits > 7 || (i == 0 && uncompressed != 0) || (i > 0 && du == 0) {
            return Err(c.err("invalid span"));
        }
        if i > 0 && (du > MAX_SPAN || dc > MAX_SPAN_COMPRESSED) {
            return Err(c.err("span larger than clip's limit"));
        }
        if window_len > codec.max_window_len() {
            return Err(c.err("checkpoint window larger than clip's limit"));
        }
        if uncompressed > uncompressed_size
            || compressed > compressed_size
            || (bits > 0 && compressed == 0)
        {
            return Err(c.err("span outside the layer"));
        }
        let window_offset = woff;
        woff = woff
            .checked_add(u64::from(window_len))
            .ok_or_else(|| c.err("window overflow"))?;
        if woff > windows_size {
            return Err(c.err("window outside the windows blob"));
        }
        spans.push(Span {
            uncompressed,
            compressed,
            bits,
            window_offset,
            window_len,
            digest,
        });
        pu = uncompressed;
        pc = compressed;
    }
    if woff != windows_size {
        return Err(c.err("windows blob size does not match its windows"));
    }
    if let Some(last) = spans.last() {
        if uncompressed_size - last.uncompressed > MAX_SPAN
            || compressed_size - last.compressed > MAX_SPAN_COMPRESSED
        {
            return Err(c.err("last span larger than clip's limit"));
        }
    } else if uncompressed_size > 0 {
        return Err(c.err("no spans for a non-empty layer"));
    }
    let table_len = c.varint()?;
    let z = c.bytes()?;
    if c.remaining() != 0 {
        return Err(c.err("trailing bytes"));
    }
    if table_len > MAX_TABLE || table_len > (z.len() as u64).saturating_mul(MAX_TABLE_RATIO) {
        return Err(IndexError::Format(format!(
            "entry table claims {table_len} bytes from {} compressed (limits: {MAX_TABLE} bytes, \
             {MAX_TABLE_RATIO}x)",
            z.len()
        )));
    }
    if entry_count > MAX_ENTRIES {
        return Err(IndexError::Format(format!(
            "{entry_count} entries (limit {MAX_ENTRIES})"
        )));
    }
    let table = inflate_table(z, table_len)?;
    let entries = decode_entries(&table, entry_count, uncompressed_size, &mut charge, &over)?;
    Ok(LayerIndex {
        layer,
        diff_id,
        codec,
        compressed_size,
        uncompressed_size,
        span_size,
        windows: BlobRef {
            digest: windows_digest,
            size: windows_size,
        },
        spans,
        entries,
        charge,
    })
}

/// Decompresses the entry table, growing the buffer with the output actually produced (never
/// reserving what the header claims) and stopping one byte past the claimed size.
fn inflate_table(z: &[u8], table_len: u64) -> Result<Vec<u8>, IndexError> {
    use std::io::Read;
    let err = |e: std::io::Error| IndexError::Format(format!("entry table: {e}"));
    let mut table = Vec::new();
    zstd::stream::read::Decoder::with_buffer(z)
        .map_err(err)?
        .take(table_len + 1)
        .read_to_end(&mut table)
        .map_err(err)?;
    if table.len() as u64 != table_len {
        return Err(IndexError::Format("entry table size mismatch".into()));
    }
    Ok(table)
}

/// A path as the builder writes it ([`super::builder::normalize`]d): relative, no empty, `.` or
/// `..` components, no NUL, at most [`MAX_PATH`] bytes.
fn normal_path(p: &[u8]) -> bool {
    p.len() <= MAX_PATH
        && !p.contains(&0)
        && (p.is_empty()
            || p.split(|&b| b == b'/')
                .all(|c| !matches!(c, b"" | b"." | b"..")))
}

/// The entries of a decoded table, their memory charged to `charge` as they are built (the
/// entry structs before they are reserved, then each one's heap data).
fn decode_entries(
    table: &[u8],
    count: u64,
    uncompressed_size: u64,
    charge: &mut super::memory::Charge,
    over: &dyn Fn((u64, u64)) -> IndexError,
) -> Result<Vec<Entry>, IndexError> {
    use super::memory::{ALLOC_OVERHEAD, ENTRY_OVERHEAD};
    let mut c = Cursor::new(table, "entry table");
    // An entry takes at least 9 bytes.
    if count > (table.len() / 9) as u64 {
        return Err(c.err("entry count exceeds the data"));
    }
    charge
        .add(count.saturating_mul(ENTRY_OVERHEAD))
        .map_err(over)?;
    let mut entries: Vec<Entry> = Vec::with_capacity(count as usize);
    // Heap bytes are charged in steps of 64 KiB (one atomic operation per step).
    let mut pending = 0u64;
    // Paths, targets and xattrs together: bounded by the table's size.
    let mut budget = (table.len() as u64).saturating_mul(MAX_NAME_RATIO);
    let mut spend = |c: &Cursor, n: usize| {
        budget = budget
            .checked_sub(n as u64)
            .ok_or_else(|| c.err("names exceed the limit for the table's size"))?;
        Ok::<(), IndexError>(())
    };
    for _ in 0..count {
        let shared = c.varint()?;
        let prev = entries.last().map_or(&b""[..], |e| &e.path);
        if shared > prev.len() as u64 {
            return Err(c.err("bad path prefix"));
        }
        let suffix = c.bytes()?;
        if shared as usize + suffix.len() > MAX_PATH {
            return Err(c.err("path longer than clip's limit"));
        }
        spend(&c, shared as usize + suffix.len())?;
        let mut path = prev[..shared as usize].to_vec();
        path.extend_from_slice(suffix);
        if !normal_path(&path) {
            return Err(c.err("path not normalised"));
        }
        let kind_tag = c.u8()?;
        let mode = c.u32v()?;
        let uid = c.u32v()?;
        let gid = c.u32v()?;
        let mtime = unzigzag(c.varint()?);
        let mtime_nsec = c.u32v()?;
        let kind = match kind_tag {
            K_DIR => EntryKind::Dir,
            K_FILE => {
                let offset = c.varint()?;
                let size = c.varint()?;
                if offset
                    .checked_add(size)
                    .is_none_or(|end| end > uncompressed_size)
                {
                    return Err(c.err("file outside the layer"));
                }
                EntryKind::File { offset, size }
            }
            K_SYMLINK | K_HARDLINK => {
                let target = c.bytes()?;
                if target.len() > MAX_PATH {
                    return Err(c.err("link target longer than clip's limit"));
                }
                spend(&c, target.len())?;
                let target = target.to_vec();
                if kind_tag == K_SYMLINK {
                    EntryKind::Symlink { target }
                } else if normal_path(&target) {
                    EntryKind::Hardlink { target }
                } else {
                    return Err(c.err("hard link target not normalised"));
                }
            }
            K_CHAR => EntryKind::CharDevice {
                major: c.u32v()?,
                minor: c.u32v()?,
            },
            K_BLOCK => EntryKind::BlockDevice {
                major: c.u32v()?,
                minor: c.u32v()?,
            },
            K_FIFO => EntryKind::Fifo,
            K_WHITEOUT => EntryKind::Whiteout,
            K_OPAQUE => EntryKind::Opaque,
            _ => return Err(c.err("unknown entry kind")),
        };
        let nx = c.varint()?;
        if nx > (c.remaining() / 2) as u64 {
            return Err(c.err("xattr count exceeds the data"));
        }
        let mut xattrs = Vec::with_capacity(nx as usize);
        for _ in 0..nx {
            let (k, v) = (c.bytes()?, c.bytes()?);
            if k.len() > MAX_XATTR_NAME || v.len() > MAX_XATTR_VALUE {
                return Err(c.err("extended attribute larger than clip's limit"));
            }
            spend(&c, k.len() + v.len())?;
            xattrs.push((k.to_vec(), v.to_vec()));
        }
        if path.is_empty() && !matches!(kind, EntryKind::Dir | EntryKind::Opaque) {
            return Err(c.err("the root is not a directory"));
        }
        pending += path.len() as u64
            + match &kind {
                EntryKind::Symlink { target } | EntryKind::Hardlink { target } => {
                    target.len() as u64 + ALLOC_OVERHEAD
                }
                _ => 0,
            }
            + xattrs
                .iter()
                .map(|(k, v)| (k.len() + v.len()) as u64 + 2 * ALLOC_OVERHEAD + 48)
                .sum::<u64>();
        if pending >= 64 << 10 {
            charge.add(pending).map_err(over)?;
            pending = 0;
        }
        entries.push(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec,
            xattrs,
        });
    }
    charge.add(pending).map_err(over)?;
    if c.remaining() != 0 {
        return Err(c.err("trailing bytes"));
    }
    Ok(entries)
}

/// Reads one checkpoint window out of the windows blob (or a range fetched from it).
pub fn decode_window(compressed: &[u8], codec: Codec) -> Result<Vec<u8>, IndexError> {
    if compressed.is_empty() {
        return Ok(Vec::new());
    }
    zstd::bulk::decompress(compressed, codec.max_window())
        .map_err(|e| IndexError::Format(format!("window: {e}")))
}
