//! The shared libraries an ELF object asks the dynamic loader for (`DT_NEEDED`), and the
//! directories the loader searches for them: read from the object's own headers, so the
//! filesystem can fetch a program's libraries while the loader is still reading the program,
//! instead of one library after another as the loader opens them.
//!
//! Every byte comes from an image, so everything here is bounds-checked: a malformed object
//! gives an error (and the libraries are simply not guessed), never a panic or a large
//! allocation.

/// Program headers read at most (real objects have about a dozen).
const MAX_PHNUM: usize = 256;
/// Bytes of the dynamic section read at most (real ones are a few hundred).
pub const MAX_DYNAMIC: u64 = 64 << 10;
/// Libraries taken from one object at most.
pub const MAX_NEEDED: usize = 128;
/// Longest library name or search path taken.
pub const MAX_NAME: usize = 1024;
/// Bytes of the string table read at most (names past it are not guessed; the tables of big
/// libraries are a few hundred KiB, and the names they need come early).
pub const MAX_STRINGS: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF object")]
    NotElf,
    #[error("malformed ELF object: {0}")]
    Malformed(&'static str),
    #[error("no dynamic section")]
    NotDynamic,
}

/// What the ELF header says: word size, byte order, machine, and where the program headers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub wide: bool,
    big: bool,
    pub machine: u16,
    pub phoff: u64,
    phentsize: u64,
    phnum: u64,
}

/// Bytes of the ELF header to read (the 64-bit one; the 32-bit one is shorter).
pub const HEADER_LEN: u64 = 64;

impl Header {
    /// Parses the ELF header at the start of `b`.
    pub fn parse(b: &[u8]) -> Result<Header, ElfError> {
        if b.len() < 16 || &b[..4] != b"\x7fELF" {
            return Err(ElfError::NotElf);
        }
        let wide = match b[4] {
            1 => false,
            2 => true,
            _ => return Err(ElfError::Malformed("word size")),
        };
        let big = match b[5] {
            1 => false,
            2 => true,
            _ => return Err(ElfError::Malformed("byte order")),
        };
        let mut h = Header {
            wide,
            big,
            machine: 0,
            phoff: 0,
            phentsize: 0,
            phnum: 0,
        };
        h.machine = h.u16(b, 18)?;
        let (phoff, rest) = match wide {
            true => (h.u64(b, 32)?, 54),
            false => (u64::from(h.u32(b, 28)?), 42),
        };
        h.phoff = phoff;
        h.phentsize = u64::from(h.u16(b, rest)?);
        h.phnum = u64::from(h.u16(b, rest + 2)?);
        if h.phentsize < h.phdr_min() || h.phentsize > 256 {
            return Err(ElfError::Malformed("program header size"));
        }
        if h.phnum == 0 || h.phnum as usize > MAX_PHNUM {
            return Err(ElfError::Malformed("program header count"));
        }
        Ok(h)
    }

    /// Bytes of the program header table.
    pub fn phdrs_len(&self) -> u64 {
        self.phentsize * self.phnum
    }

    fn phdr_min(&self) -> u64 {
        match self.wide {
            true => 56,
            false => 32,
        }
    }

    fn u16(&self, b: &[u8], at: usize) -> Result<u16, ElfError> {
        let s: [u8; 2] = field(b, at)?;
        Ok(match self.big {
            true => u16::from_be_bytes(s),
            false => u16::from_le_bytes(s),
        })
    }

    fn u32(&self, b: &[u8], at: usize) -> Result<u32, ElfError> {
        let s: [u8; 4] = field(b, at)?;
        Ok(match self.big {
            true => u32::from_be_bytes(s),
            false => u32::from_le_bytes(s),
        })
    }

    fn u64(&self, b: &[u8], at: usize) -> Result<u64, ElfError> {
        let s: [u8; 8] = field(b, at)?;
        Ok(match self.big {
            true => u64::from_be_bytes(s),
            false => u64::from_le_bytes(s),
        })
    }

    /// A word: 8 bytes in a 64-bit object, 4 in a 32-bit one.
    fn word(&self, b: &[u8], at: usize) -> Result<u64, ElfError> {
        match self.wide {
            true => self.u64(b, at),
            false => self.u32(b, at).map(u64::from),
        }
    }

    /// The dynamic section's place and the loadable segments, from the program header table.
    pub fn segments(&self, table: &[u8]) -> Result<Segments, ElfError> {
        let mut out = Segments::default();
        for k in 0..self.phnum as usize {
            let at = k * self.phentsize as usize;
            let p_type = self.u32(table, at)?;
            // (offset, vaddr, filesz) sit in different places in the two layouts.
            let (offset, vaddr, filesz) = match self.wide {
                true => (
                    self.u64(table, at + 8)?,
                    self.u64(table, at + 16)?,
                    self.u64(table, at + 32)?,
                ),
                false => (
                    u64::from(self.u32(table, at + 4)?),
                    u64::from(self.u32(table, at + 8)?),
                    u64::from(self.u32(table, at + 16)?),
                ),
            };
            match p_type {
                PT_LOAD => out.loads.push((vaddr, offset, filesz)),
                PT_DYNAMIC => out.dynamic = Some((offset, filesz.min(MAX_DYNAMIC))),
                _ => {}
            }
        }
        Ok(out)
    }

    /// The entries of the dynamic section that name libraries and where to look for them.
    pub fn dynamic(&self, section: &[u8]) -> Result<Dynamic, ElfError> {
        let step = match self.wide {
            true => 16,
            false => 8,
        };
        let mut out = Dynamic::default();
        let mut at = 0;
        while at + step <= section.len() {
            let tag = self.word(section, at)?;
            let val = self.word(section, at + step / 2)?;
            at += step;
            match tag {
                DT_NULL => break,
                DT_NEEDED if out.needed.len() < MAX_NEEDED => out.needed.push(val),
                DT_STRTAB => out.strtab = Some(val),
                DT_STRSZ => out.strsz = val,
                DT_RPATH => out.rpath = Some(val),
                DT_RUNPATH => out.runpath = Some(val),
                _ => {}
            }
        }
        Ok(out)
    }
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

fn field<const N: usize>(b: &[u8], at: usize) -> Result<[u8; N], ElfError> {
    b.get(at..at + N)
        .and_then(|s| s.try_into().ok())
        .ok_or(ElfError::Malformed("truncated"))
}

/// Where an object's segments sit in its file.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Segments {
    /// (file offset, size) of the dynamic section.
    pub dynamic: Option<(u64, u64)>,
    /// (virtual address, file offset, size in the file) of each loadable segment.
    loads: Vec<(u64, u64, u64)>,
}

impl Segments {
    /// The file offset of virtual address `vaddr` (the dynamic section names its string table
    /// by address), if a loadable segment holds it.
    pub fn file_offset(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(v, _, size)| vaddr >= v && vaddr - v < size)
            // A segment's file offset is the object's word: one near u64::MAX is no offset.
            .and_then(|&(v, off, _)| off.checked_add(vaddr - v))
    }
}

/// The library-related entries of a dynamic section; names are offsets into its string table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dynamic {
    pub needed: Vec<u64>,
    /// The string table's virtual address.
    pub strtab: Option<u64>,
    pub strsz: u64,
    pub rpath: Option<u64>,
    pub runpath: Option<u64>,
}

impl Dynamic {
    /// Bytes of the string table to read to have every name this section refers to (at most
    /// [`MAX_STRINGS`]).
    pub fn strings_len(&self) -> u64 {
        let last = self
            .needed
            .iter()
            .chain(&self.rpath)
            .chain(&self.runpath)
            .max()
            .copied()
            .unwrap_or(0);
        self.strsz
            .min(last.saturating_add(MAX_NAME as u64 + 1))
            .min(MAX_STRINGS)
    }

    /// Resolves the names against the string table (its first `strings_len()` bytes): the
    /// libraries, and the directories to search in the loader's order (`DT_RPATH` only when
    /// there is no `DT_RUNPATH`, as the loader does).
    pub fn names(&self, strings: &[u8]) -> Needed {
        let get = |off: u64| string_at(strings, off);
        let split = |off: Option<u64>| -> Vec<Vec<u8>> {
            off.and_then(get)
                .map(|s| {
                    s.split(|&b| b == b':')
                        .filter(|p| !p.is_empty())
                        .map(<[u8]>::to_vec)
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut search = match self.runpath {
            Some(_) => Vec::new(),
            None => split(self.rpath),
        };
        search.extend(split(self.runpath));
        Needed {
            libraries: self
                .needed
                .iter()
                .filter_map(|&o| get(o))
                .map(<[u8]>::to_vec)
                .collect(),
            search,
        }
    }
}

/// An object's libraries and its own search directories (which may use `$ORIGIN`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Needed {
    pub libraries: Vec<Vec<u8>>,
    pub search: Vec<Vec<u8>>,
}

/// The NUL-terminated string at `off`, if it ends within `strings` and is not too long.
fn string_at(strings: &[u8], off: u64) -> Option<&[u8]> {
    let rest = strings.get(usize::try_from(off).ok()?..)?;
    let end = rest.iter().take(MAX_NAME + 1).position(|&b| b == 0)?;
    Some(&rest[..end]).filter(|s| !s.is_empty())
}

/// The loader's default directories for an object of this machine and word size (Debian's
/// multiarch directories first, then the traditional ones).
pub fn default_dirs(h: &Header) -> Vec<Vec<u8>> {
    let triplet: Option<&str> = match (h.machine, h.wide, h.big) {
        (62, true, false) => Some("x86_64-linux-gnu"),
        (183, true, false) => Some("aarch64-linux-gnu"),
        (3, false, false) => Some("i386-linux-gnu"),
        (40, false, false) => Some("arm-linux-gnueabihf"),
        (243, true, false) => Some("riscv64-linux-gnu"),
        (21, true, false) => Some("powerpc64le-linux-gnu"),
        (22, true, true) => Some("s390x-linux-gnu"),
        _ => None,
    };
    let mut dirs = Vec::new();
    if let Some(t) = triplet {
        for base in ["/lib/", "/usr/lib/", "/usr/local/lib/"] {
            dirs.push(format!("{base}{t}").into_bytes());
        }
    }
    if h.wide {
        dirs.push(b"/lib64".to_vec());
        dirs.push(b"/usr/lib64".to_vec());
    }
    for d in ["/lib", "/usr/lib", "/usr/local/lib"] {
        dirs.push(d.as_bytes().to_vec());
    }
    dirs
}

/// The libraries object `read` gives the bytes of names, read step by step as a reader of a
/// lazily fetched object must: the header, the program headers, the dynamic section and (when
/// it names libraries) the string table, each a bounded range `read(offset, len)` (an answer
/// may be short at the end of the object). An object that names none gives an empty
/// [`Needed`] without reading its string table.
pub async fn needed<B, E, F, Fut>(mut read: F) -> Result<(Header, Needed), E>
where
    B: AsRef<[u8]>,
    E: From<ElfError>,
    F: FnMut(u64, u64) -> Fut,
    Fut: std::future::Future<Output = Result<B, E>>,
{
    let h = Header::parse(read(0, HEADER_LEN).await?.as_ref())?;
    let segs = h.segments(read(h.phoff, h.phdrs_len()).await?.as_ref())?;
    let (off, len) = segs.dynamic.ok_or(ElfError::NotDynamic)?;
    let d = h.dynamic(read(off, len).await?.as_ref())?;
    if d.needed.is_empty() {
        return Ok((h, Needed::default()));
    }
    let strtab = d
        .strtab
        .and_then(|v| segs.file_offset(v))
        .ok_or(ElfError::Malformed("string table outside the file"))?;
    let names = d.names(read(strtab, d.strings_len()).await?.as_ref());
    Ok((h, names))
}

/// [`needed`] of a whole object held in memory.
pub fn needed_in(b: &[u8]) -> Result<(Header, Needed), ElfError> {
    let slice = |off: u64, len: u64| {
        let s = usize::try_from(off).unwrap_or(usize::MAX).min(b.len());
        let e = usize::try_from(off.saturating_add(len))
            .unwrap_or(usize::MAX)
            .min(b.len());
        std::future::ready(Ok::<_, ElfError>(&b[s..e]))
    };
    let scan = std::pin::pin!(needed(slice));
    // Every read is ready at once, so one poll finishes it.
    match std::future::Future::poll(
        scan,
        &mut std::task::Context::from_waker(std::task::Waker::noop()),
    ) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Err(ElfError::Malformed("pending in-memory read")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This test program: a real object made by the system's linker, which links the C library.
    fn me() -> Vec<u8> {
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn a_linked_program_names_its_libraries() {
        let (h, n) = needed_in(&me()).unwrap();
        assert!(h.wide);
        assert!(
            n.libraries.iter().any(|l| l == b"libc.so.6"),
            "{:?}",
            n.libraries
                .iter()
                .map(|l| String::from_utf8_lossy(l))
                .collect::<Vec<_>>()
        );
        let dirs = default_dirs(&h);
        assert!(dirs.iter().any(|d| d == b"/usr/lib"));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(dirs[0], b"/lib/x86_64-linux-gnu");
        }
    }

    /// A minimal little-endian ELF64 object: one loadable segment holding a dynamic section
    /// and a string table with the given names.
    fn tiny(needed: &[&str], runpath: Option<&str>, rpath: Option<&str>) -> Vec<u8> {
        let mut strings = vec![0u8];
        let mut add = |s: &str| {
            let off = strings.len() as u64;
            strings.extend_from_slice(s.as_bytes());
            strings.push(0);
            off
        };
        let mut dynamic: Vec<(u64, u64)> = needed.iter().map(|n| (DT_NEEDED, add(n))).collect();
        if let Some(r) = runpath {
            dynamic.push((DT_RUNPATH, add(r)));
        }
        if let Some(r) = rpath {
            dynamic.push((DT_RPATH, add(r)));
        }
        let vbase = 0x40_0000u64;
        let dyn_off = 64 + 2 * 56;
        let dyn_len = (dynamic.len() as u64 + 3) * 16;
        let str_off = dyn_off + dyn_len;
        dynamic.push((DT_STRTAB, vbase + str_off));
        dynamic.push((DT_STRSZ, strings.len() as u64));
        dynamic.push((DT_NULL, 0));
        let total = str_off + strings.len() as u64;
        let mut b = vec![0u8; 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&2u16.to_le_bytes());
        let phdr = |t: u32, off: u64, vaddr: u64, size: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&t.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&vaddr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            p
        };
        b.extend(phdr(PT_LOAD, 0, vbase, total));
        b.extend(phdr(PT_DYNAMIC, dyn_off, vbase + dyn_off, dyn_len));
        for (t, v) in dynamic {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend(strings);
        b
    }

    #[test]
    fn runpath_replaces_rpath_and_paths_split_on_colons() {
        let b = tiny(
            &["libfoo.so.1", "libbar.so"],
            Some("$ORIGIN/../lib::/opt/x"),
            Some("/ignored"),
        );
        let (_, n) = needed_in(&b).unwrap();
        assert_eq!(
            n.libraries,
            vec![b"libfoo.so.1".to_vec(), b"libbar.so".to_vec()]
        );
        assert_eq!(
            n.search,
            vec![b"$ORIGIN/../lib".to_vec(), b"/opt/x".to_vec()]
        );
        let (_, n) = needed_in(&tiny(&["a.so"], None, Some("/r1:/r2"))).unwrap();
        assert_eq!(n.search, vec![b"/r1".to_vec(), b"/r2".to_vec()]);
    }

    #[test]
    fn a_name_far_into_the_string_table_does_not_make_the_read_unbounded() {
        let d = Dynamic {
            needed: vec![7, u64::MAX - 10],
            strsz: u64::MAX,
            ..Default::default()
        };
        assert_eq!(d.strings_len(), MAX_STRINGS);
        let d = Dynamic {
            needed: vec![7],
            strsz: 100,
            ..Default::default()
        };
        assert_eq!(d.strings_len(), 100);
    }

    #[test]
    fn a_segment_offset_near_the_end_of_the_address_space_is_no_offset() {
        // Found by the elf_needed fuzz target: a loadable segment whose file offset is
        // 0xffff_ffff_ffff_ff00; the dynamic section's string table 0x20 into it.
        let s = Segments {
            dynamic: None,
            loads: vec![(0x1000, 0xffff_ffff_ffff_ff00, 0x1000)],
        };
        assert_eq!(s.file_offset(0x1020), Some(0xffff_ffff_ffff_ff20));
        assert_eq!(s.file_offset(0x1100), None);
    }

    #[test]
    fn damaged_objects_give_errors_never_a_panic() {
        assert_eq!(Header::parse(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        for base in [me(), tiny(&["libfoo.so.1"], Some("/x"), None)] {
            let head = &base[..base.len().min(1 << 16)];
            // Every truncation of the first part, and single-byte damage all over it.
            for cut in (0..head.len()).step_by(7) {
                let _ = needed_in(&head[..cut]);
            }
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut b = head.to_vec();
                let at = (x as usize) % b.len().min(4096);
                b[at] = (x >> 32) as u8;
                if let Ok((_, n)) = needed_in(&b) {
                    assert!(n.libraries.len() <= MAX_NEEDED);
                    assert!(n.libraries.iter().all(|l| l.len() <= MAX_NAME));
                }
            }
        }
    }
}
