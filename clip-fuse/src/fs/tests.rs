//! The tree, the guesses and the errors, without a kernel.

use super::guess::{extension, interpreter_of};
use super::*;
use clip_core::digest::Digest;
use clip_core::index::{BlobRef, Entry, LayerIndex};

fn entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 7,
        gid: 8,
        mtime: 1,
        mtime_nsec: 0,
        xattrs: vec![],
    }
}

fn layer(entries: Vec<Entry>) -> Arc<LayerIndex> {
    Arc::new(LayerIndex {
        layer: Digest::of(b"l"),
        diff_id: Digest::of(b"d"),
        codec: Default::default(),
        compressed_size: 1,
        uncompressed_size: 4096,
        span_size: 1 << 20,
        windows: BlobRef {
            digest: Digest::of(b""),
            size: 0,
        },
        spans: vec![],
        entries,
        charge: Default::default(),
    })
}

fn fs() -> ClipFs {
    let mut ping = entry(
        "bin/ping",
        EntryKind::File {
            offset: 512,
            size: 4,
        },
    );
    ping.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2])];
    let layer = layer(vec![
        entry("bin", EntryKind::Dir),
        ping,
        entry(
            "bin/a",
            EntryKind::File {
                offset: 1024,
                size: 10,
            },
        ),
        entry(
            "bin/b",
            EntryKind::Hardlink {
                target: b"bin/a".to_vec(),
            },
        ),
        entry(
            "etc/deep/x",
            EntryKind::Symlink {
                target: b"../../bin/a".to_vec(),
            },
        ),
        entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }),
    ]);
    let view = ImageView::build(vec![layer]).unwrap();
    ClipFs::new(&view, vec![]).unwrap()
}

#[test]
fn siblings_are_files_of_the_same_kind_nearest_first_within_a_budget() {
    let file = |p: &str, offset: u64, size: u64| entry(p, EntryKind::File { offset, size });
    let mut l = layer(vec![
        entry("pkg/__pycache__", EntryKind::Dir),
        file("pkg/__pycache__/a.pyc", 0, 1000),
        file("pkg/__pycache__/b.pyc", 10_000, 1000),
        file("pkg/__pycache__/c.pyc", 20_000, 3000),
        file("pkg/__pycache__/d.pyc", 900_000, 1000),
        file("pkg/__pycache__/huge.pyc", 1 << 20, 600 << 10),
        file("pkg/__pycache__/notes.txt", 11_000, 100),
        file("pkg/__pycache__/empty.pyc", 12_000, 0),
        file("pkg/other.pyc", 13_000, 100),
        file("pkg/__init__.py", 14_000, 100),
        file("lib/libm.so.6", 15_000, 100),
        file("lib/libz.so.1.2.13", 16_000, 100),
        file("lib/libx.so", 17_000, 100),
        entry("pkg/__pycache__/sub", EntryKind::Dir),
    ]);
    Arc::get_mut(&mut l).unwrap().uncompressed_size = 4 << 20;
    let view = ImageView::build(vec![l]).unwrap();
    let fs = ClipFs::new(&view, vec![]).unwrap();
    let dir = fs.lookup(1, b"pkg").unwrap().attr.ino;
    let dir = fs.lookup(dir, b"__pycache__").unwrap().attr.ino;
    let b = fs.lookup(dir, b"b.pyc").unwrap().attr.ino;
    assert_eq!(fs.parents[b as usize - 1], dir);
    // From b.pyc: a.pyc and c.pyc are nearest, d.pyc further; huge.pyc is too big, the
    // text file another kind, the empty file has nothing to fetch, other.pyc elsewhere.
    let all = fs.siblings(dir, b, 1 << 20).unwrap();
    assert_eq!(all[&0], vec![(0, 1000), (20_000, 3000), (900_000, 1000)]);
    // A budget of 4000 bytes takes the nearest that fit, then stops.
    let some = fs.siblings(dir, b, 4000).unwrap();
    assert_eq!(some[&0], vec![(0, 1000), (20_000, 3000)]);
    // Once per directory: on its second cold open, or on the first if that is a package's
    // entry module.
    let a = fs.lookup(dir, b"a.pyc").unwrap().attr.ino;
    let c = fs.lookup(dir, b"c.pyc").unwrap().attr.ino;
    assert_eq!(fs.siblings_due(a), None);
    assert_eq!(fs.siblings_due(b), Some(dir));
    assert_eq!(fs.siblings_due(c), None);
    let pkg = fs.lookup(1, b"pkg").unwrap().attr.ino;
    let init = fs.lookup(pkg, b"__init__.py").unwrap().attr.ino;
    let other = fs.lookup(pkg, b"other.pyc").unwrap().attr.ino;
    assert_eq!(fs.siblings_due(init), Some(pkg));
    assert_eq!(fs.siblings_due(other), None);
    // Shared libraries do not count: two of them opened cold guess nothing.
    let libs = fs.lookup(1, b"lib").unwrap().attr.ino;
    for name in [&b"libm.so.6"[..], b"libz.so.1.2.13", b"libx.so"] {
        let lib = fs.lookup(libs, name).unwrap().attr.ino;
        assert_eq!(fs.siblings_due(lib), None);
    }
    assert_eq!(extension(b"x.tar.gz"), Some(&b"gz"[..]));
    assert_eq!(extension(b".bashrc"), None);
    assert_eq!(extension(b"README"), None);
}

#[test]
fn library_paths_resolve_as_the_loader_would() {
    let file = |p: &str, offset: u64| entry(p, EntryKind::File { offset, size: 100 });
    let link = |p: &str, t: &str| {
        entry(
            p,
            EntryKind::Symlink {
                target: t.as_bytes().to_vec(),
            },
        )
    };
    let mut tool = file("opt/app/bin/tool", 0);
    tool.mode = 0o755;
    let l = layer(vec![
        link("lib", "usr/lib"),
        file("usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1", 512),
        link("usr/lib/x86_64-linux-gnu/liblzma.so.5", "liblzma.so.5.4.1"),
        file("usr/lib/x86_64-linux-gnu/blas/libblas.so.3", 1024),
        link(
            "usr/lib/x86_64-linux-gnu/libblas.so.3",
            "/etc/alternatives/libblas.so.3",
        ),
        link(
            "etc/alternatives/libblas.so.3",
            "/usr/lib/x86_64-linux-gnu/blas/libblas.so.3",
        ),
        tool,
        file("opt/app/lib/libx.so", 1536),
        file("opt/app/lib/notes.txt", 2048),
        link("loop/a", "b"),
        link("loop/b", "a"),
    ]);
    let view = ImageView::build(vec![l]).unwrap();
    let fs = ClipFs::new(&view, vec![]).unwrap();
    let ino = |p: &str| {
        p.split('/')
            .fold(1, |dir, n| fs.lookup(dir, n.as_bytes()).unwrap().attr.ino)
    };
    let lzma = ino("usr/lib/x86_64-linux-gnu/liblzma.so.5.4.1");
    // Through the usrmerge link and the soname link.
    assert_eq!(
        fs.resolve(1, b"/lib/x86_64-linux-gnu/liblzma.so.5"),
        Some(lzma)
    );
    // Through absolute links (Debian's alternatives).
    assert_eq!(
        fs.resolve(1, b"/usr/lib/x86_64-linux-gnu/libblas.so.3"),
        Some(ino("usr/lib/x86_64-linux-gnu/blas/libblas.so.3"))
    );
    // Relative to the object's directory, as $ORIGIN/../lib is.
    let bin = ino("opt/app/bin");
    assert_eq!(
        fs.resolve(bin, b"../lib/libx.so"),
        Some(ino("opt/app/lib/libx.so"))
    );
    assert_eq!(
        fs.resolve(bin, b"../lib//./libx.so"),
        Some(ino("opt/app/lib/libx.so"))
    );
    // A loop, a directory, a missing file, a path through a file: nothing.
    assert_eq!(fs.resolve(1, b"/loop/a"), None);
    assert_eq!(fs.resolve(1, b"/opt/app/lib"), None);
    assert_eq!(fs.resolve(1, b"/opt/app/lib/liby.so"), None);
    assert_eq!(fs.resolve(1, b"/opt/app/lib/libx.so/x"), None);
    // Executables and library-named files may be objects; other files are not read.
    assert!(fs.may_be_object(ino("opt/app/bin/tool")));
    assert!(fs.may_be_object(lzma));
    assert!(fs.may_be_object(ino("opt/app/lib/libx.so")));
    assert!(!fs.may_be_object(ino("opt/app/lib/notes.txt")));
    assert!(!fs.may_be_object(bin));
}

#[test]
fn a_containers_program_is_found_as_the_runtime_finds_it() {
    let exe = |p: &str, offset: u64| {
        let mut e = entry(p, EntryKind::File { offset, size: 100 });
        e.mode = 0o755;
        e
    };
    let l = layer(vec![
        exe("usr/local/bin/python3", 0),
        exe("usr/bin/python3.11", 512),
        entry(
            "usr/bin/python3",
            EntryKind::Symlink {
                target: b"python3.11".to_vec(),
            },
        ),
        entry(
            "usr/bin/notes",
            EntryKind::File {
                offset: 1024,
                size: 100,
            },
        ),
        exe("usr/bin/notes2", 1536),
        exe("app/run.sh", 2048),
        entry("app/bin", EntryKind::Dir),
    ]);
    let view = ImageView::build(vec![l]).unwrap();
    let fs = ClipFs::new(&view, vec![]).unwrap();
    let ino = |p: &str| {
        p.split('/')
            .fold(1, |dir, n| fs.lookup(dir, n.as_bytes()).unwrap().attr.ino)
    };
    let path: &[u8] = b"/usr/local/bin:/usr/bin";
    let long = [b'a'; 5000];
    // (program, PATH, working directory, what the runtime would exec)
    type Case<'a> = (&'a [u8], &'a [u8], &'a [u8], Option<&'a str>);
    let cases: &[Case] = &[
        // A bare name: the first directory of PATH that has it as an executable file.
        (b"python3", path, b"/", Some("usr/local/bin/python3")),
        (
            b"python3",
            b"/nowhere::relative:/usr/bin",
            b"/",
            Some("usr/bin/python3.11"),
        ),
        // Not executable: skipped for the next directory, or not found.
        (b"notes", path, b"/", None),
        (b"notes2", path, b"/", Some("usr/bin/notes2")),
        // A path: absolute, or from the working directory; a directory is no program.
        (b"/usr/bin/python3", b"", b"/", Some("usr/bin/python3.11")),
        (b"./run.sh", path, b"/app", Some("app/run.sh")),
        (b"bin", path, b"/app", None),
        (b"./bin", path, b"/app", None),
        (b"", path, b"/", None),
        (&long, path, b"/", None),
    ];
    for (program, search, cwd, expected) in cases {
        assert_eq!(
            fs.find_program(program, search, cwd),
            expected.map(ino),
            "{}",
            String::from_utf8_lossy(program)
        );
    }
}

#[test]
fn interpreter_lines_name_the_program_that_runs_a_script() {
    assert_eq!(
        interpreter_of(b"#!/bin/sh\nset -e\n"),
        Some(&b"/bin/sh"[..])
    );
    assert_eq!(
        interpreter_of(b"#! /usr/bin/python3 -u\r\n"),
        Some(&b"/usr/bin/python3"[..])
    );
    assert_eq!(
        interpreter_of(b"#!/usr/bin/env python3\nimport sys\n"),
        Some(&b"python3"[..])
    );
    // `env` with options, a relative interpreter, no line end within the bytes read, an ELF
    // object, nothing at all: no guess.
    assert_eq!(interpreter_of(b"#!/usr/bin/env -S python3 -u\n"), None);
    assert_eq!(interpreter_of(b"#!python3\n"), None);
    assert_eq!(interpreter_of(b"#!/bin/sh"), None);
    assert_eq!(interpreter_of(b"\x7fELF\x02\x01\x01"), None);
    assert_eq!(interpreter_of(b"#!\n"), None);
    assert_eq!(interpreter_of(b""), None);
}

#[test]
fn tables_without_a_kernel() {
    let fs = fs();
    let root = fs.get(1).unwrap();
    assert_eq!(root.attr.kind, Kind::Dir);
    // root: ".", "..", and subdirectories bin, dev, etc.
    assert_eq!(root.attr.nlink, 5);
    let bin = fs.lookup(1, b"bin").unwrap().attr.ino;
    let names: Vec<&[u8]> = fs
        .children(bin)
        .unwrap()
        .iter()
        .map(|(n, _)| n.as_slice())
        .collect();
    assert_eq!(names, [&b"a"[..], b"b", b"ping"]);
    let a = fs.lookup(bin, b"a").unwrap();
    let b = fs.lookup(bin, b"b").unwrap();
    assert_eq!(a.attr.ino, b.attr.ino, "hard links share an inode");
    assert_eq!(a.attr.nlink, 2);
    assert_eq!((a.attr.uid, a.attr.gid, a.attr.size), (7, 8, 10));
    let ping = fs.lookup(bin, b"ping").unwrap().attr.ino;
    assert_eq!(
        fs.xattr(ping, b"security.capability").unwrap(),
        &[1, 0, 0, 2]
    );
    assert_eq!(
        fs.xattr(ping, b"user.none").unwrap_err().errno(),
        libc::ENODATA
    );
    let etc = fs.lookup(1, b"etc").unwrap();
    assert_eq!(
        (etc.attr.perm, etc.attr.uid),
        (0o755, 0),
        "implied directories"
    );
    let deep = fs.lookup(etc.attr.ino, b"deep").unwrap().attr.ino;
    let x = fs.lookup(deep, b"x").unwrap().attr.ino;
    assert_eq!(fs.readlink(x).unwrap(), b"../../bin/a");
    let dev = fs.lookup(1, b"dev").unwrap().attr.ino;
    assert_eq!(fs.lookup(dev, b"null").unwrap().attr.rdev, (1 << 8) | 3);
    assert_eq!(fs.lookup(1, b"nope").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(fs.lookup(ping, b"x").unwrap_err().errno(), libc::ENOTDIR);
    assert_eq!(fs.get(9999).unwrap_err().errno(), libc::ENOENT);
}

#[tokio::test]
async fn reads_map_to_errno() {
    let fs = fs();
    let bin = fs.lookup(1, b"bin").unwrap().attr.ino;
    assert_eq!(fs.read(bin, 0, 10).await.unwrap_err().errno(), libc::EISDIR);
    let a = fs.lookup(bin, b"a").unwrap().attr.ino;
    // Past the end of the file: empty, no read issued.
    assert!(fs.read(a, 10, 10).await.unwrap().is_empty());
    // No reader for the layer (a broken setup): EINVAL, not a panic.
    assert_eq!(fs.read(a, 0, 4).await.unwrap_err().errno(), libc::EINVAL);
}

#[test]
fn malformed_layer_sets_build_a_tree_or_an_error_never_a_panic() {
    let f = || EntryKind::File { offset: 0, size: 1 };
    // A lower `a` whited out by a layer that also lists a/b; a whiteout naming the root.
    let sets = [
        vec![
            layer(vec![entry("a", EntryKind::Dir), entry("a/old", f())]),
            layer(vec![entry("a/b", f()), entry("a", EntryKind::Whiteout)]),
        ],
        vec![
            layer(vec![entry("etc", EntryKind::Dir), entry("etc/x", f())]),
            layer(vec![entry("", EntryKind::Whiteout)]),
        ],
    ];
    for set in sets {
        let view = ImageView::build(set).unwrap();
        let fs = ClipFs::new(&view, vec![]).unwrap();
        assert_eq!(fs.get(1).unwrap().attr.kind, Kind::Dir);
    }
    // A view that breaks the invariant (built by hand): an error for this image.
    let mut view = ImageView::build(vec![layer(vec![entry("a/b", f())])]).unwrap();
    view.nodes.remove(&b"a"[..]);
    assert!(matches!(ClipFs::new(&view, vec![]), Err(FsError::Tree(_))));
    view.nodes.clear();
    assert!(matches!(ClipFs::new(&view, vec![]), Err(FsError::Tree(_))));
}
