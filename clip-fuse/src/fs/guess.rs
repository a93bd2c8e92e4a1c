//! What opening a file fetches before anything reads it: the reads a program makes next,
//! guessed. A cold open fetches the whole file (up to a size); a second cold open in a
//! directory fetches its siblings of the same kind; opening a program or library fetches the
//! libraries its ELF headers name, where the loader would find them; a mount no startup
//! profile covers fetches the files nearly every start reads. Every guess yields to demand
//! reads, and none happens where a startup profile lists the reads.
//!
//! Part of [`ClipFs`]; uses the tree and clip-core's ELF reader.

use super::{ClipFs, Data, ScanError};
use clip_core::elf;
use std::collections::HashMap;
use std::sync::Arc;

/// Objects read for their libraries in one mount at most.
const MAX_SCANNED: usize = 4096;

/// The part of the loader's cache fetched with a program's libraries (a typical one is tens of
/// KiB).
const LOADER_CACHE_MAX: u64 = 1 << 20;

/// What [`ClipFs::prefetch_startup_files`] fetches, where the image has it (symbolic links
/// followed), before the loader's cache: the user and group databases the runtime reads, the
/// dynamic loaders of glibc and musl (x86-64, arm64), and glibc's C library; then what glibc
/// reads as a program sets its locale and tells the time: the C.UTF-8 character table (the
/// locale Python, Perl and others coerce to where none is set), the character-set converters'
/// cache and the local time zone. Each is one small file a start would otherwise wait a round
/// trip for, one after another.
const STARTUP_FILES: &[&[u8]] = &[
    b"/etc/passwd",
    b"/etc/group",
    b"/lib64/ld-linux-x86-64.so.2",
    b"/lib/ld-linux-aarch64.so.1",
    b"/lib/ld-musl-x86_64.so.1",
    b"/lib/ld-musl-aarch64.so.1",
    b"/lib/x86_64-linux-gnu/libc.so.6",
    b"/lib/aarch64-linux-gnu/libc.so.6",
    b"/usr/lib/locale/C.utf8/LC_CTYPE",
    b"/usr/lib/locale/C.UTF-8/LC_CTYPE",
    b"/usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache",
    b"/usr/lib/aarch64-linux-gnu/gconv/gconv-modules.cache",
    b"/etc/localtime",
];

/// `PATH` entries searched for a container's program at most.
const MAX_PATH_DIRS: usize = 64;

/// Interpreter lines (`#!`) followed from a container's program at most (a script run by an
/// interpreter that is itself a script: the kernel allows a few levels).
const MAX_INTERPRETERS: u32 = 2;

/// Bytes of a script read for its interpreter line (the kernel reads 256).
const INTERPRETER_LINE_MAX: u64 = 256;

/// runc's search path when the container's environment sets none.
const DEFAULT_PATH: &[u8] = b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Symbolic links followed in one path at most (the kernel's limit).
const MAX_SYMLINKS: u32 = 40;

/// A directory's siblings of a cold-opened file are fetched on its second cold open there (on
/// the first for a package's `__init__`).
const SIBLINGS_AFTER: u32 = 2;

/// Siblings bigger than this are not fetched on a guess (a big file is seldom read whole).
const SIBLING_MAX_SIZE: u64 = 512 << 10;

/// The program a script's `#!` line runs, as the runtime would look it up: the interpreter's
/// path (`#!/bin/sh`), or the name `env` finds on the search path (`#!/usr/bin/env python3`).
/// `None` for anything else, an ELF object included; `env` with options is not followed.
pub(super) fn interpreter_of(head: &[u8]) -> Option<&[u8]> {
    let line = head.strip_prefix(b"#!")?;
    let line = &line[..line.iter().position(|&b| b == b'\n')?];
    let mut words = line
        .split(|&b| b == b' ' || b == b'\t' || b == b'\r')
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    if first.first() != Some(&b'/') {
        return None;
    }
    if first.rsplit(|&b| b == b'/').next() == Some(b"env") {
        let name = words.next()?;
        return (!name.starts_with(b"-") && !name.contains(&b'/')).then_some(name);
    }
    Some(first)
}

/// Whether a file name is a shared library's: `*.so` or `*.so.*`.
pub(super) fn library_name(name: &[u8]) -> bool {
    name.ends_with(b".so") || name.windows(4).any(|w| w == b".so.")
}

/// The file name's extension (after its last dot; none for dot files and names without one).
pub(super) fn extension(name: &[u8]) -> Option<&[u8]> {
    match name.iter().rposition(|&b| b == b'.') {
        Some(0) | None => None,
        Some(i) => Some(&name[i + 1..]),
    }
}

impl ClipFs {
    /// Starts fetching every span of regular file `ino` that no local tier has, if the file is
    /// at most `max` bytes: a program that opens a file reads it, so its runs are requested
    /// at once, concurrently, instead of read by read (no wait; demand reads join them), unless
    /// a startup profile says which parts of it are read.
    ///
    /// On the second cold open in a directory (where no startup profile knows better), the
    /// files next to it with the same extension, up to `siblings` bytes in all (those nearest
    /// in the layer first, each at most 512 KiB), are fetched on a guess, in the background
    /// and yielding to demand reads: a program that loads two modules from a directory
    /// (python's `__pycache__`, a node_modules package, a plugin directory) tends to load
    /// more, one at a time, and each would cost a round trip.
    pub fn prefetch_on_open(&self, ino: u64, max: u64, siblings: u64) {
        let Some((reader, offset, size)) = self.file_data(ino) else {
            return;
        };
        if size == 0 {
            return;
        }
        // Looked up only when guesses are on (every span of the file, on every open).
        let cold = siblings > 0 && !reader.is_local(offset, size) && !reader.profiled(offset, size);
        tracing::debug!(ino, path = %self.path_of(ino), layer = %reader.index().layer, offset, size, cold, "open");
        if size <= max {
            reader.prefetch_opened(offset, size);
        }
        if cold {
            self.note_cold_open(ino, siblings);
        }
    }

    /// Counts a cold open of `ino` in its directory and starts the sibling guess there when
    /// [`ClipFs::siblings_due`] says so.
    pub(super) fn note_cold_open(&self, ino: u64, budget: u64) {
        let Some(dir) = self.siblings_due(ino) else {
            return;
        };
        let Some(picked) = self.siblings(dir, ino, budget) else {
            return;
        };
        for (layer, ranges) in picked {
            let reader = self.readers[layer as usize].clone();
            tokio::spawn(async move { reader.speculate(&ranges).await });
        }
    }

    /// Counts a cold open of `ino` in its directory: `Some(dir)` once per directory, on the
    /// [`SIBLINGS_AFTER`]th cold open there, or on the first if it is a package's entry module
    /// (`__init__.*`: python imports a package's modules right after its `__init__`, one
    /// round trip each). Shared libraries (`lib*.so*`) are not counted: the loader opens those
    /// by name, from its programs' headers (see [`ClipFs::prefetch_libraries`]), and a
    /// directory of them (`/usr/lib/<triplet>`) says nothing about which come next.
    pub(super) fn siblings_due(&self, ino: u64) -> Option<u64> {
        let dir = *self.parents.get((ino as usize).checked_sub(1)?)?;
        let name = self.name_in(dir, ino)?;
        if name.starts_with(b"lib") && library_name(name) {
            return None;
        }
        let entry = name.starts_with(b"__init__.");
        let mut seen = self.cold_opens.lock().expect("cold opens lock");
        let n = seen.entry(dir).or_insert(0);
        // u32::MAX: the guess was made.
        if *n == u32::MAX {
            return None;
        }
        *n += 1;
        if *n < SIBLINGS_AFTER && !entry {
            return None;
        }
        *n = u32::MAX;
        Some(dir)
    }

    /// The regular files of `dir` with `ino`'s extension (other than `ino`), at most
    /// [`SIBLING_MAX_SIZE`] each, nearest to `ino` in its layer first, up to `budget` bytes:
    /// their (offset, size) ranges by layer.
    pub(super) fn siblings(
        &self,
        dir: u64,
        ino: u64,
        budget: u64,
    ) -> Option<HashMap<u32, Vec<(u64, u64)>>> {
        let kids = self.children(dir).ok()?;
        let ext = extension(self.name_in(dir, ino)?);
        let (home, at) = match self.get(ino).ok()?.data {
            Data::File { layer, offset } => (layer, offset),
            _ => return None,
        };
        let mut found: Vec<(u64, u32, u64, u64)> = kids
            .iter()
            .filter(|(n, i)| *i != ino && extension(n) == ext)
            .filter_map(|(_, i)| {
                let inode = self.get(*i).ok()?;
                match inode.data {
                    Data::File { layer, offset }
                        if inode.attr.size > 0 && inode.attr.size <= SIBLING_MAX_SIZE =>
                    {
                        let distance = match layer == home {
                            true => offset.abs_diff(at),
                            false => u64::MAX,
                        };
                        Some((distance, layer, offset, inode.attr.size))
                    }
                    _ => None,
                }
            })
            .collect();
        found.sort_unstable();
        let mut out: HashMap<u32, Vec<(u64, u64)>> = HashMap::new();
        let mut left = budget;
        for (_, layer, offset, size) in found {
            if size > left {
                break;
            }
            left -= size;
            out.entry(layer).or_default().push((offset, size));
        }
        Some(out)
    }

    /// Starts fetching, as opens would, the files that nearly every container start on Linux
    /// reads before the program's own, those of them the image has ([`STARTUP_FILES`]): the
    /// user and group databases (the runtime reads them before it starts the program), the
    /// dynamic loader, the C library and the loader's cache. For a mount no startup profile
    /// covers: it is made before the runtime starts the container, so these are in flight, or
    /// in, by the time the kernel asks for the loader. A file above `max` bytes is left alone;
    /// an image of a static program has none of them, and costs nothing. Returns at once (the
    /// fetches run on the current tokio runtime).
    pub fn prefetch_startup_files(&self, max: u64) {
        for path in STARTUP_FILES {
            let Some((reader, offset, size)) =
                self.resolve(1, path).and_then(|i| self.file_data(i))
            else {
                continue;
            };
            if size <= max {
                reader.prefetch_opened(offset, size);
            }
        }
        self.prefetch_loader_cache();
    }

    /// The program a container starts: `program` (its `process.args[0]`) found as the runtime
    /// finds it (a name with a `/` from `cwd`, else in the directories of `path`, the
    /// container's `PATH`), is fetched as an open would fetch it (whole if at most `max`
    /// bytes), with the libraries its ELF headers name and, for a script, its interpreter
    /// (`#!`, through `env` too); the libraries only with `libraries` (the library guess is
    /// on). The runtime execs it only after it has set the container up, so its bytes are on
    /// their way before the kernel asks. A name the image does not have costs nothing.
    /// Returns at once (the work runs on the current tokio runtime).
    pub fn prefetch_program(
        self: &Arc<Self>,
        program: &[u8],
        path: Option<&[u8]>,
        cwd: &[u8],
        max: u64,
        libraries: bool,
    ) {
        let path = path.unwrap_or(DEFAULT_PATH).to_vec();
        let Some(ino) = self.find_program(program, &path, cwd) else {
            tracing::debug!(program = %String::from_utf8_lossy(program), "the container's program is not in the image");
            return;
        };
        tracing::debug!(ino, path = %self.path_of(ino), "the container's program");
        let fetch = self
            .clone()
            .fetch_program(ino, path, max, libraries, MAX_INTERPRETERS);
        tokio::spawn(fetch);
    }

    /// Where the runtime finds `program`: a name with a `/` is a path (from `cwd` when
    /// relative); a bare name is looked for in the directories of `path`, the first regular
    /// file with an execute bit wins.
    pub(super) fn find_program(&self, program: &[u8], path: &[u8], cwd: &[u8]) -> Option<u64> {
        if program.is_empty() || program.len() > elf::MAX_NAME {
            return None;
        }
        let executable = |ino: u64| {
            self.get(ino)
                .is_ok_and(|i| matches!(i.data, Data::File { .. }) && i.attr.perm & 0o111 != 0)
        };
        if program.contains(&b'/') {
            let mut full = Vec::new();
            if program.first() != Some(&b'/') {
                full.extend_from_slice(cwd);
                full.push(b'/');
            }
            full.extend_from_slice(program);
            return self.resolve(1, &full).filter(|&i| executable(i));
        }
        path.split(|&b| b == b':')
            .take(MAX_PATH_DIRS)
            .filter(|d| d.first() == Some(&b'/'))
            .find_map(|d| {
                let mut full = d.to_vec();
                full.push(b'/');
                full.extend_from_slice(program);
                self.resolve(1, &full).filter(|&i| executable(i))
            })
    }

    /// The work of [`ClipFs::prefetch_program`] for file `ino`: its bytes, its libraries, and
    /// (`depth` levels at most) the interpreter its `#!` line names.
    pub(super) async fn fetch_program(
        self: Arc<Self>,
        ino: u64,
        path: Vec<u8>,
        max: u64,
        libraries: bool,
        depth: u32,
    ) {
        let Some((reader, offset, size)) = self.file_data(ino) else {
            return;
        };
        if size <= max {
            reader.prefetch_opened(offset, size);
        }
        crate::metrics::program_prefetched();
        if libraries {
            self.prefetch_libraries(ino, max);
        }
        if depth == 0 || size < 3 {
            return;
        }
        let Ok(head) = self
            .read(ino, 0, size.min(INTERPRETER_LINE_MAX) as u32)
            .await
        else {
            return;
        };
        let Some(interpreter) = interpreter_of(&head) else {
            return;
        };
        let found = self.find_program(interpreter, &path, b"/");
        if let Some(next) = found.filter(|&i| i != ino) {
            tracing::debug!(
                ino = next,
                of = ino,
                "the container's program's interpreter"
            );
            Box::pin(self.fetch_program(next, path, max, libraries, depth - 1)).await;
        }
    }

    /// Starts fetching the loader's cache (`/etc/ld.so.cache`, up to [`LOADER_CACHE_MAX`]
    /// bytes), once per mount: the loader reads it before it opens any library.
    pub(super) fn prefetch_loader_cache(&self) {
        if self
            .loader_cache
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some((reader, offset, size)) = self
            .resolve(1, b"/etc/ld.so.cache")
            .and_then(|c| self.file_data(c))
        {
            reader.prefetch_opened(offset, size.min(LOADER_CACHE_MAX));
        }
    }

    /// On the first open of a program or shared library (an executable file, or one named
    /// like a library), reads the libraries it needs from its ELF headers (`DT_NEEDED`), finds
    /// them where the dynamic loader would (its `DT_RUNPATH` or `DT_RPATH` with `$ORIGIN`, then
    /// the default directories), and starts fetching each as an open would (whole if at most
    /// `max` bytes), then does the same for their libraries; the loader's cache
    /// (`/etc/ld.so.cache`) is fetched with the first program's. The loader opens them one after
    /// another, each after reading the one before; here they are all requested as soon as the
    /// headers naming them are in. A wrong guess costs bandwidth, never correctness: the bytes
    /// are verified as any others, and an object that is not ELF, or is malformed, is skipped.
    ///
    /// Returns at once (the work runs on the current tokio runtime); an object is read once
    /// per mount.
    pub fn prefetch_libraries(self: &Arc<Self>, ino: u64, max: u64) {
        if self.scanned.lock().expect("scanned lock").contains(&ino)
            || !self.may_be_object(ino)
            || !self.first_scan(ino)
        {
            return;
        }
        tokio::spawn(self.clone().scan_libraries(ino, max));
    }

    /// The work of [`ClipFs::prefetch_libraries`] for object `ino`, and then for each library
    /// found, as their headers come in.
    pub(super) async fn scan_libraries(self: Arc<Self>, ino: u64, max: u64) {
        let mut scans = tokio::task::JoinSet::new();
        let scan = |scans: &mut tokio::task::JoinSet<_>, obj: u64| {
            let fs = self.clone();
            scans.spawn(async move { (obj, fs.needed_libraries(obj).await) });
        };
        scan(&mut scans, ino);
        while let Some(done) = scans.join_next().await {
            let Ok((obj, found)) = done else { continue };
            let libs = match found {
                Ok(libs) => libs,
                Err(e) => {
                    tracing::debug!(ino = obj, "libraries not read: {e}");
                    continue;
                }
            };
            for lib in libs {
                if !self.first_scan(lib) {
                    continue;
                }
                if let Some((reader, offset, size)) = self.file_data(lib) {
                    tracing::debug!(ino = lib, of = obj, size, "library");
                    if size <= max {
                        reader.prefetch_opened(offset, size);
                    }
                    crate::metrics::library_prefetched();
                }
                scan(&mut scans, lib);
            }
        }
    }

    /// Whether `ino` may be an ELF program or library: a regular file with an execute bit, or
    /// named like a library (`*.so`, `*.so.*`).
    pub(super) fn may_be_object(&self, ino: u64) -> bool {
        let Ok(inode) = self.get(ino) else {
            return false;
        };
        if !matches!(inode.data, Data::File { .. }) || inode.attr.size < elf::HEADER_LEN {
            return false;
        }
        if inode.attr.perm & 0o111 != 0 {
            return true;
        }
        let Some(&dir) = self.parents.get(ino as usize - 1) else {
            return false;
        };
        self.name_in(dir, ino).is_some_and(library_name)
    }

    /// The name of `ino` in directory `dir` (its first, if it has several there).
    pub(super) fn name_in(&self, dir: u64, ino: u64) -> Option<&[u8]> {
        let kids = self.children(dir).ok()?;
        kids.iter()
            .find(|(_, i)| *i == ino)
            .map(|(n, _)| n.as_slice())
    }

    /// The path of `ino` from the root (its first name), for logs; `?` where the tree is broken.
    pub(super) fn path_of(&self, ino: u64) -> String {
        let mut names: Vec<String> = Vec::new();
        let mut cur = ino;
        while cur > 1 && names.len() < 256 {
            let Some(&dir) = self.parents.get(cur as usize - 1) else {
                break;
            };
            let name = self.name_in(dir, cur).unwrap_or(b"?");
            names.push(String::from_utf8_lossy(name).into_owned());
            cur = dir;
        }
        names.reverse();
        format!("/{}", names.join("/"))
    }

    /// Marks `ino` as read for its libraries: false if it was already, or if this mount has
    /// read [`MAX_SCANNED`] objects.
    pub(super) fn first_scan(&self, ino: u64) -> bool {
        let mut seen = self.scanned.lock().expect("scanned lock");
        seen.len() < MAX_SCANNED && seen.insert(ino)
    }

    /// The inodes of the regular files that ELF object `ino` names as its libraries, each
    /// found in the first directory that has it (in the loader's order). Names with a `/`
    /// (paths the loader takes as they are, relative to its working directory) are skipped.
    pub async fn needed_libraries(&self, ino: u64) -> Result<Vec<u64>, ScanError> {
        // Every length asked for is bounded (at most MAX_STRINGS).
        let read = |off, len: u64| async move {
            self.read(ino, off, len as u32)
                .await
                .map_err(ScanError::from)
        };
        let (h, names) = elf::needed(read).await?;
        if names.libraries.is_empty() {
            return Ok(Vec::new());
        }
        self.prefetch_loader_cache();
        let origin = self.parents.get(ino as usize - 1).copied().unwrap_or(1);
        let mut dirs: Vec<(u64, Vec<u8>)> = Vec::new();
        for p in &names.search {
            // `$ORIGIN` (or `${ORIGIN}`) is the object's directory; other tokens are skipped.
            let (start, rest) = match p
                .strip_prefix(b"$ORIGIN")
                .or_else(|| p.strip_prefix(b"${ORIGIN}"))
            {
                Some(r) => (origin, r),
                None => (1, p.as_slice()),
            };
            if !rest.contains(&b'$') {
                dirs.push((start, rest.to_vec()));
            }
        }
        dirs.extend(elf::default_dirs(&h).into_iter().map(|d| (1, d)));
        let mut found = Vec::new();
        for lib in names.libraries.iter().filter(|l| !l.contains(&b'/')) {
            let hit = dirs.iter().find_map(|(start, dir)| {
                let mut path = dir.clone();
                path.push(b'/');
                path.extend_from_slice(lib);
                self.resolve(*start, &path)
            });
            if let Some(i) = hit {
                found.push(i);
            }
        }
        Ok(found)
    }

    /// The regular file at `path` from directory `dir` (from the root if `path` is absolute),
    /// following symbolic links (absolute targets from the image's root).
    pub(super) fn resolve(&self, dir: u64, path: &[u8]) -> Option<u64> {
        let mut cur = if path.first() == Some(&b'/') { 1 } else { dir };
        // Components still to walk, last first.
        let mut todo: Vec<Vec<u8>> = path
            .split(|&b| b == b'/')
            .rev()
            .map(<[u8]>::to_vec)
            .collect();
        let mut links = 0;
        while let Some(name) = todo.pop() {
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur = *self.parents.get(cur as usize - 1)?;
                    continue;
                }
                _ => {}
            }
            let inode = self.lookup(cur, &name).ok()?;
            match &inode.data {
                Data::Symlink(target) => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return None;
                    }
                    if target.first() == Some(&b'/') {
                        cur = 1;
                    }
                    todo.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                Data::Dir { .. } => cur = inode.attr.ino,
                Data::File { .. } if todo.iter().all(|c| c.is_empty() || c == b".") => {
                    return Some(inode.attr.ino)
                }
                _ => return None,
            }
        }
        None
    }
}
