//! Just enough of a zstd block decoder to know the decoder's state between blocks: the
//! literals' Huffman table, the three sequence tables and the repeat offsets. Literals are
//! never decoded; sequences are, for their offsets and lengths. The real decoder (libzstd)
//! produces the bytes; this walker only follows along (RFC 8878, sections 3.1.1.3 and 4.1).
//!
//! Everything here reads hostile input: every length is checked against the bytes present,
//! every table against the format's limits, and nothing panics.

use super::ZstdSeekError as E;

/// The largest block a frame may hold (RFC 8878 3.1.1.2.4).
pub const MAX_BLOCK: usize = 128 << 10;

const LL_BITS: [u8; 36] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 7, 8, 9, 10, 11,
    12, 13, 14, 15, 16,
];
const ML_BITS: [u8; 53] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
];
const LL_DEFAULT: [i16; 36] = [
    4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1,
    -1, -1, -1, -1,
];
const ML_DEFAULT: [i16; 53] = [
    1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1,
];
const OF_DEFAULT: [i16; 29] = [
    1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1,
];

/// A block header (RFC 8878 3.1.1.2): whether the block is its frame's last, its type, its
/// size (what it decodes to for an RLE block) and the bytes of its body.
#[derive(Clone, Copy, Debug)]
pub struct BlockHeader {
    pub last: bool,
    /// 0 raw, 1 RLE, 2 compressed.
    pub kind: u8,
    pub size: usize,
    pub body: usize,
}

impl BlockHeader {
    /// Reads a header, refusing the reserved type and a block larger than `max`.
    pub fn read(h: [u8; 3], max: usize) -> Result<BlockHeader, E> {
        let v = u32::from(h[0]) | u32::from(h[1]) << 8 | u32::from(h[2]) << 16;
        let (last, kind, size) = (v & 1 == 1, ((v >> 1) & 3) as u8, (v >> 3) as usize);
        let body = match kind {
            0 | 2 => size,
            1 => 1,
            _ => return Err(E::Corrupt("reserved block type")),
        };
        if size > max {
            return Err(E::Corrupt("a block larger than the format allows"));
        }
        Ok(BlockHeader {
            last,
            kind,
            size,
            body,
        })
    }
}

/// The three sequence tables, in the order a block's header names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    LiteralLengths,
    Offsets,
    MatchLengths,
}

impl Kind {
    /// (largest symbol, largest accuracy log, predefined distribution, its log).
    fn limits(self) -> (usize, u8, &'static [i16], u8) {
        match self {
            Kind::LiteralLengths => (35, 9, &LL_DEFAULT, 6),
            Kind::Offsets => (31, 8, &OF_DEFAULT, 5),
            Kind::MatchLengths => (52, 9, &ML_DEFAULT, 6),
        }
    }
}

/// How a table was last defined, kept to write it into a checkpoint's dictionary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableDesc {
    Predefined,
    Rle(u8),
    /// The table's description as the stream wrote it (an FSE normalized-count header).
    Fse(Vec<u8>),
}

/// An FSE decoding table.
#[derive(Clone, Debug)]
pub struct Fse {
    log: u8,
    symbol: Vec<u8>,
    bits: Vec<u8>,
    base: Vec<u16>,
}

impl Fse {
    fn rle(symbol: u8) -> Fse {
        Fse {
            log: 0,
            symbol: vec![symbol],
            bits: vec![0],
            base: vec![0],
        }
    }

    /// The decoding table of a normalized distribution (RFC 8878 4.1.1).
    fn build(norm: &[i16], log: u8) -> Result<Fse, E> {
        let size = 1usize << log;
        let mut symbol = vec![0u8; size];
        let mut high = size - 1;
        let mut next = vec![0u32; norm.len()];
        for (s, &c) in norm.iter().enumerate() {
            if c == -1 {
                symbol[high] = s as u8;
                high = high
                    .checked_sub(1)
                    .ok_or(E::Corrupt("FSE table overfull"))?;
                next[s] = 1;
            } else {
                next[s] = c.max(0) as u32;
            }
        }
        let step = (size >> 1) + (size >> 3) + 3;
        let mask = size - 1;
        let mut pos = 0usize;
        for (s, &c) in norm.iter().enumerate() {
            for _ in 0..c.max(0) {
                symbol[pos] = s as u8;
                pos = (pos + step) & mask;
                while pos > high {
                    pos = (pos + step) & mask;
                }
            }
        }
        if pos != 0 {
            return Err(E::Corrupt("FSE distribution does not fill its table"));
        }
        let (mut bits, mut base) = (vec![0u8; size], vec![0u16; size]);
        for u in 0..size {
            let s = symbol[u] as usize;
            let n = next[s];
            next[s] += 1;
            if n == 0 {
                return Err(E::Corrupt("FSE symbol without probability"));
            }
            let b = log as u32 - (31 - n.leading_zeros());
            bits[u] = b as u8;
            base[u] = ((n << b) - size as u32) as u16;
        }
        Ok(Fse {
            log,
            symbol,
            bits,
            base,
        })
    }
}

/// A table: how it was defined and how it decodes.
#[derive(Clone, Debug)]
pub struct Table {
    pub desc: TableDesc,
    fse: Option<Fse>,
}

impl Table {
    fn undefined() -> Table {
        Table {
            desc: TableDesc::Predefined,
            fse: None,
        }
    }
}

/// A normalized distribution read from `data` (an FSE table description): the counts, the
/// accuracy log and the bytes it took.
pub fn read_ncount(data: &[u8], kind: Kind) -> Result<(Vec<i16>, u8, usize), E> {
    let (max_symbol, max_log, _, _) = kind.limits();
    let mut r = Forward { data, pos: 0 };
    let log = r.read(4)? as u8 + 5;
    if log > max_log {
        return Err(E::Corrupt("FSE accuracy log over the format's limit"));
    }
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nbits = log as u32 + 1;
    let mut norm: Vec<i16> = Vec::new();
    let mut previous0 = false;
    while remaining > 1 {
        if previous0 {
            loop {
                let flag = r.read(2)?;
                norm.extend(std::iter::repeat_n(0, flag as usize));
                if flag != 3 {
                    break;
                }
            }
            if norm.len() > max_symbol {
                return Err(E::Corrupt("FSE distribution names too many symbols"));
            }
        }
        if norm.len() > max_symbol {
            return Err(E::Corrupt("FSE distribution names too many symbols"));
        }
        let max = (2 * threshold - 1) - remaining;
        let low = r.peek(nbits - 1)? as i32;
        let mut count = if low < max {
            r.skip(nbits - 1);
            low
        } else {
            let v = r.peek(nbits)? as i32;
            r.skip(nbits);
            if v >= threshold {
                v - max
            } else {
                v
            }
        };
        count -= 1;
        remaining -= count.abs();
        norm.push(count as i16);
        previous0 = count == 0;
        while remaining < threshold {
            nbits -= 1;
            threshold >>= 1;
        }
    }
    if remaining != 1 {
        return Err(E::Corrupt("FSE distribution does not sum to its table"));
    }
    Ok((norm, log, r.pos.div_ceil(8)))
}

/// The description of a normalized distribution, as [`read_ncount`] reads it.
pub fn write_ncount(norm: &[i16], log: u8) -> Vec<u8> {
    let mut w = Writer::default();
    w.put(u64::from(log - 5), 4);
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nbits = log as u32 + 1;
    let mut symbol = 0usize;
    let mut previous0 = false;
    while symbol < norm.len() && remaining > 1 {
        if previous0 {
            let start = symbol;
            while symbol < norm.len() && norm[symbol] == 0 {
                symbol += 1;
            }
            let mut gap = symbol - start;
            while gap >= 3 {
                w.put(3, 2);
                gap -= 3;
            }
            w.put(gap as u64, 2);
            if symbol == norm.len() {
                break;
            }
        }
        let c = norm[symbol] as i32;
        symbol += 1;
        let max = (2 * threshold - 1) - remaining;
        remaining -= c.abs();
        let mut v = c + 1;
        if v >= threshold {
            v += max;
        }
        w.put(v as u64, nbits - u32::from(v < max));
        previous0 = v == 1;
        while remaining < threshold {
            nbits -= 1;
            threshold >>= 1;
        }
    }
    w.finish()
}

/// A forward little-endian bit reader (FSE table descriptions).
struct Forward<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Forward<'_> {
    fn peek(&self, n: u32) -> Result<u64, E> {
        let mut v = 0u64;
        for i in 0..n as usize {
            let bit = self.pos + i;
            // Bits past the end read as zero, as libzstd does; a table that needs them ends
            // past the data and is refused below.
            let b = self.data.get(bit / 8).copied().unwrap_or(0);
            v |= u64::from((b >> (bit % 8)) & 1) << i;
        }
        if (self.pos + n as usize).div_ceil(8) > self.data.len() {
            return Err(E::Corrupt("FSE table description runs past its block"));
        }
        Ok(v)
    }

    fn skip(&mut self, n: u32) {
        self.pos += n as usize;
    }

    fn read(&mut self, n: u32) -> Result<u64, E> {
        let v = self.peek(n)?;
        self.skip(n);
        Ok(v)
    }
}

#[derive(Default)]
struct Writer {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl Writer {
    fn put(&mut self, v: u64, bits: u32) {
        self.acc |= (v & ((1u64 << bits) - 1)) << self.n;
        self.n += bits;
        while self.n >= 8 {
            self.out.push(self.acc as u8);
            self.acc >>= 8;
            self.n -= 8;
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc as u8);
        }
        self.out
    }
}

/// The backward bit reader of a sequences bitstream.
struct Backward<'a> {
    data: &'a [u8],
    /// Bits not yet read, counted from the start of `data`.
    pos: usize,
}

impl<'a> Backward<'a> {
    fn new(data: &'a [u8]) -> Result<Self, E> {
        let last = *data.last().ok_or(E::Corrupt("empty sequences bitstream"))?;
        if last == 0 {
            return Err(E::Corrupt("sequences bitstream without its end mark"));
        }
        let high = 7 - last.leading_zeros() as usize;
        Ok(Backward {
            data,
            pos: (data.len() - 1) * 8 + high,
        })
    }

    fn read(&mut self, n: u32) -> Result<u64, E> {
        if n == 0 {
            return Ok(0);
        }
        let n = n as usize;
        let start = self
            .pos
            .checked_sub(n)
            .ok_or(E::Corrupt("sequences bitstream read past its start"))?;
        let first = start / 8;
        let mut w = 0u64;
        for (i, b) in self.data[first..].iter().take(8).enumerate() {
            w |= u64::from(*b) << (8 * i);
        }
        self.pos = start;
        Ok((w >> (start % 8)) & ((1u64 << n) - 1))
    }
}

/// The decoder state that carries from one block to the next within a frame.
#[derive(Clone, Debug)]
pub struct BlockState {
    /// The Huffman tree description of the last compressed literals, as written.
    pub huffman: Option<Vec<u8>>,
    /// Literal lengths, offsets, match lengths.
    pub tables: [Table; 3],
    /// Repeat offsets, each with the set of checkpoint slots its value came from.
    pub reps: [(u32, u8); 3],
}

impl Default for BlockState {
    fn default() -> Self {
        BlockState {
            huffman: None,
            tables: [Table::undefined(), Table::undefined(), Table::undefined()],
            reps: [(1, 0), (4, 0), (8, 0)],
        }
    }
}

/// What one compressed block did: its output size, and how far before `reach_from` its
/// matches reached (0: not at all).
pub struct BlockEffect {
    pub output: u64,
    pub reach: u64,
}

impl BlockState {
    /// Marks the repeat offsets as the checkpoint's own (slots 0, 1, 2).
    pub fn tag_reps(&mut self) {
        for (i, r) in self.reps.iter_mut().enumerate() {
            r.1 = 1 << i;
        }
    }

    /// Follows one compressed block (its body) starting at output position `at`; `reach_from`
    /// is the checkpoint whose history matches may reach back into, `used` collects the
    /// checkpoint's repeat-offset slots that were read, and `refs` the ranges of history
    /// (before `reach_from`) that matches copy from.
    pub fn block(
        &mut self,
        body: &[u8],
        at: u64,
        reach_from: u64,
        used: &mut u8,
        refs: &mut Vec<(u64, u64)>,
    ) -> Result<BlockEffect, E> {
        let (lits, rest) = self.literals(body)?;
        let mut seq = rest;
        let b0 = *seq
            .first()
            .ok_or(E::Corrupt("block without a sequences section"))?;
        let count = match b0 {
            0 => {
                return Ok(BlockEffect {
                    output: lits,
                    reach: 0,
                })
            }
            1..=127 => {
                seq = &seq[1..];
                usize::from(b0)
            }
            128..=254 => {
                let b1 = *seq.get(1).ok_or(E::Corrupt("short sequences header"))?;
                seq = &seq[2..];
                (usize::from(b0 - 128) << 8) + usize::from(b1)
            }
            255 => {
                let (b1, b2) = match seq.get(1..3) {
                    Some(b) => (b[0], b[1]),
                    None => return Err(E::Corrupt("short sequences header")),
                };
                seq = &seq[3..];
                usize::from(b1) + (usize::from(b2) << 8) + 0x7F00
            }
        };
        let modes = *seq.first().ok_or(E::Corrupt("short sequences header"))?;
        seq = &seq[1..];
        if modes & 3 != 0 {
            return Err(E::Corrupt("reserved bits set in the sequence modes"));
        }
        for (slot, kind, shift) in [
            (0, Kind::LiteralLengths, 6),
            (1, Kind::Offsets, 4),
            (2, Kind::MatchLengths, 2),
        ] {
            let used_bytes = self.table(slot, kind, (modes >> shift) & 3, seq)?;
            seq = &seq[used_bytes..];
        }
        let [ll, of, ml] = [0, 1, 2].map(|i| self.tables[i].fse.clone());
        let (ll, of, ml) = match (ll, of, ml) {
            (Some(a), Some(b), Some(c)) => (a, b, c),
            _ => {
                return Err(E::Corrupt(
                    "a repeated sequence table that was never defined",
                ))
            }
        };
        let mut bits = Backward::new(seq)?;
        let mut s_ll = bits.read(u32::from(ll.log))? as usize;
        let mut s_of = bits.read(u32::from(of.log))? as usize;
        let mut s_ml = bits.read(u32::from(ml.log))? as usize;
        let (mut pos, mut lit_used, mut matched) = (at, 0u64, 0u64);
        let mut reach = 0u64;
        for n in 0..count {
            let (c_of, c_ml, c_ll) = (
                *of.symbol.get(s_of).ok_or(E::Corrupt("FSE state"))?,
                *ml.symbol.get(s_ml).ok_or(E::Corrupt("FSE state"))?,
                *ll.symbol.get(s_ll).ok_or(E::Corrupt("FSE state"))?,
            );
            if c_of > 31 || usize::from(c_ml) >= ML_BITS.len() || usize::from(c_ll) >= LL_BITS.len()
            {
                return Err(E::Corrupt("sequence code out of range"));
            }
            let of_value = (1u64 << c_of) + bits.read(u32::from(c_of))?;
            let ml_v = ml_base(c_ml) + bits.read(u32::from(ML_BITS[c_ml as usize]))?;
            let ll_v = ll_base(c_ll) + bits.read(u32::from(LL_BITS[c_ll as usize]))?;
            let offset = self.offset(of_value, ll_v == 0, used)?;
            pos += ll_v;
            lit_used += ll_v;
            if lit_used > lits {
                return Err(E::Corrupt("sequences use more literals than the block has"));
            }
            let src = pos
                .checked_sub(offset)
                .ok_or(E::Corrupt("a match reaches before the frame"))?;
            if src < reach_from {
                reach = reach.max(reach_from - src);
                refs.push((src, (src + ml_v).min(reach_from)));
            }
            pos += ml_v;
            matched += ml_v;
            if n + 1 < count {
                s_ll = usize::from(*ll.base.get(s_ll).ok_or(E::Corrupt("FSE state"))?)
                    + bits.read(u32::from(ll.bits[s_ll]))? as usize;
                s_ml = usize::from(*ml.base.get(s_ml).ok_or(E::Corrupt("FSE state"))?)
                    + bits.read(u32::from(ml.bits[s_ml]))? as usize;
                s_of = usize::from(*of.base.get(s_of).ok_or(E::Corrupt("FSE state"))?)
                    + bits.read(u32::from(of.bits[s_of]))? as usize;
            }
        }
        if bits.pos != 0 {
            return Err(E::Corrupt("sequences bitstream not fully used"));
        }
        Ok(BlockEffect {
            output: lits + matched,
            reach,
        })
    }

    /// The match offset of an offset value, updating the repeat offsets (RFC 8878 3.1.1.5).
    fn offset(&mut self, value: u64, ll_zero: bool, used: &mut u8) -> Result<u64, E> {
        if value > 3 {
            let o = u32::try_from(value - 3).map_err(|_| E::Corrupt("offset too large"))?;
            self.reps = [(o, 0), self.reps[0], self.reps[1]];
            return Ok(u64::from(o));
        }
        let idx = value as usize - 1 + usize::from(ll_zero);
        let (o, tag) = match idx {
            0..=2 => self.reps[idx],
            _ => {
                let (r0, t0) = self.reps[0];
                let o = r0
                    .checked_sub(1)
                    .filter(|&o| o > 0)
                    .ok_or(E::Corrupt("repeat offset of zero"))?;
                (o, t0)
            }
        };
        *used |= tag;
        match idx {
            0 => {}
            1 => self.reps.swap(0, 1),
            _ => self.reps = [(o, tag), self.reps[0], self.reps[1]],
        }
        Ok(u64::from(o))
    }

    /// Reads one table's definition (mode `mode`) from `data`; the bytes it took.
    fn table(&mut self, slot: usize, kind: Kind, mode: u8, data: &[u8]) -> Result<usize, E> {
        let (_, _, default, default_log) = kind.limits();
        let t = &mut self.tables[slot];
        match mode {
            0 => {
                *t = Table {
                    desc: TableDesc::Predefined,
                    fse: Some(Fse::build(default, default_log)?),
                };
                Ok(0)
            }
            1 => {
                let s = *data.first().ok_or(E::Corrupt("short RLE table"))?;
                if usize::from(s) > kind.limits().0 {
                    return Err(E::Corrupt("RLE symbol out of range"));
                }
                *t = Table {
                    desc: TableDesc::Rle(s),
                    fse: Some(Fse::rle(s)),
                };
                Ok(1)
            }
            2 => {
                let (norm, log, n) = read_ncount(data, kind)?;
                *t = Table {
                    desc: TableDesc::Fse(data[..n].to_vec()),
                    fse: Some(Fse::build(&norm, log)?),
                };
                Ok(n)
            }
            _ => Ok(0),
        }
    }

    /// Reads the literals section: (regenerated size, the rest of the block).
    fn literals<'a>(&mut self, body: &'a [u8]) -> Result<(u64, &'a [u8]), E> {
        let b0 = *body.first().ok_or(E::Corrupt("empty compressed block"))?;
        let kind = b0 & 3;
        let format = (b0 >> 2) & 3;
        let byte = |i: usize| -> Result<u64, E> {
            body.get(i)
                .map(|&b| u64::from(b))
                .ok_or(E::Corrupt("short literals header"))
        };
        let (header, regenerated, content) = if kind < 2 {
            let (h, r) = match format {
                0 | 2 => (1, u64::from(b0 >> 3)),
                1 => (2, u64::from(b0 >> 4) + (byte(1)? << 4)),
                _ => (3, u64::from(b0 >> 4) + (byte(1)? << 4) + (byte(2)? << 12)),
            };
            (h, r, if kind == 0 { r } else { 1 })
        } else {
            let (h, bits) = match format {
                0 | 1 => (3, 10),
                2 => (4, 14),
                _ => (5, 18),
            };
            let mut v = 0u64;
            for i in 0..h {
                v |= byte(i)? << (8 * i);
            }
            let mask = (1u64 << bits) - 1;
            (h, (v >> 4) & mask, (v >> (4 + bits)) & mask)
        };
        let end = header as u64 + content;
        if end > body.len() as u64 || regenerated > MAX_BLOCK as u64 {
            return Err(E::Corrupt("literals section larger than its block"));
        }
        let end = end as usize;
        if kind == 2 {
            let tree = &body[header..end];
            let h = *tree.first().ok_or(E::Corrupt("missing Huffman tree"))? as usize;
            let len = if h < 128 {
                1 + h
            } else {
                1 + (h - 127).div_ceil(2)
            };
            if len > tree.len() {
                return Err(E::Corrupt("Huffman tree larger than its literals"));
            }
            self.huffman = Some(tree[..len].to_vec());
        } else if kind == 3 && self.huffman.is_none() {
            return Err(E::Corrupt("treeless literals before any Huffman tree"));
        }
        Ok((regenerated, &body[end..]))
    }

    /// The start of a zstd dictionary that puts a decoder in this state (RFC 8878 5): the
    /// entropy tables and the repeat offsets named in `reps`. The history (the output before
    /// the checkpoint that the next blocks reach into) follows as its content.
    pub fn dictionary_head(&self, reps: [u32; 3]) -> Vec<u8> {
        let mut d = Vec::with_capacity(512);
        d.extend_from_slice(&0xEC30A437u32.to_le_bytes());
        d.extend_from_slice(&0x50494C43u32.to_le_bytes()); // "CLIP"
                                                           // Any valid tree will do when none was seen: nothing can use it.
        d.extend_from_slice(self.huffman.as_deref().unwrap_or(&[128, 0x10]));
        for (slot, kind) in [
            (1, Kind::Offsets),
            (2, Kind::MatchLengths),
            (0, Kind::LiteralLengths),
        ] {
            let (_, _, default, default_log) = kind.limits();
            match &self.tables[slot].desc {
                TableDesc::Predefined => d.extend_from_slice(&write_ncount(default, default_log)),
                TableDesc::Rle(s) => {
                    let mut norm = vec![0i16; usize::from(*s) + 1];
                    norm[usize::from(*s)] = 32;
                    d.extend_from_slice(&write_ncount(&norm, 5));
                }
                TableDesc::Fse(raw) => d.extend_from_slice(raw),
            }
        }
        for r in reps {
            d.extend_from_slice(&r.to_le_bytes());
        }
        d
    }
}

/// Baselines of the literal and match length codes, from their extra bits.
const fn baselines<const N: usize>(bits: [u8; N], first: u64) -> [u64; N] {
    let mut out = [0u64; N];
    let mut b = first;
    let mut c = 0;
    while c < N {
        out[c] = b;
        b += 1 << bits[c];
        c += 1;
    }
    out
}

const LL_BASE: [u64; 36] = baselines(LL_BITS, 0);
const ML_BASE: [u64; 53] = baselines(ML_BITS, 3);

fn ll_base(code: u8) -> u64 {
    LL_BASE[usize::from(code)]
}

fn ml_base(code: u8) -> u64 {
    ML_BASE[usize::from(code)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn predefined_distributions_round_trip_through_their_description() {
        for kind in [Kind::LiteralLengths, Kind::Offsets, Kind::MatchLengths] {
            let (_, _, norm, log) = kind.limits();
            let raw = write_ncount(norm, log);
            let (back, l, n) = read_ncount(&raw, kind).unwrap();
            assert_eq!((back.as_slice(), l, n), (norm, log, raw.len()));
            Fse::build(norm, log).unwrap();
        }
        let mut rle = vec![0i16; 21];
        rle[20] = 32;
        let raw = write_ncount(&rle, 5);
        assert_eq!(read_ncount(&raw, Kind::MatchLengths).unwrap().0, rle);
    }

    #[test]
    fn baselines_follow_the_format() {
        assert_eq!((ll_base(16), ll_base(25), ll_base(35)), (16, 64, 65536));
        assert_eq!(
            (ml_base(0), ml_base(32), ml_base(43), ml_base(52)),
            (3, 35, 131, 65539)
        );
    }
}
