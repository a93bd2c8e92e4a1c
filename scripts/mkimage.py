#!/usr/bin/env python3
"""Builds OCI image layouts for clip's tests and benchmarks, with no registry or docker needed.

Layers come from directories (with overlayfs upper-dir whiteouts converted to OCI whiteouts),
from tar files, or from the built-in generators (tiny busybox, every-entry-type, hostile cases).
Output: an OCI image layout directory that `skopeo copy oci:DIR:TAG docker://...` pushes.

usage:
  mkimage.py layout OUT TAG LAYER...     LAYER = dir:PATH | tar:PATH | gen:NAME
  mkimage.py multiarch OUT TAG           an image index: linux/amd64 (busybox) + linux/arm64/v8 (a marker file)
  mkimage.py gen NAME OUT.tar            write a generated layer tar
Generators: busybox, users, bigfile, gigfile, manyfiles, everytype-base, everytype-top, orphan-whiteout, busybox-pwned, note-TEXT, dotdot, absolute, hardlink-forward, huge-size.
The image config's Cmd is ["/bin/sh"], or the JSON list in $MKIMAGE_CMD (e.g. a CRI pause image).
"""
import gzip
import hashlib
import io
import json
import os
import stat
import sys
import tarfile

MTIME = 1700000000


def sha256(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def xattr_pax(path):
    pax = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return pax
    for n in sorted(names):
        if n.startswith("trusted.overlay.") or n.startswith("security.selinux"):
            continue
        try:
            v = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
        pax["SCHILY.xattr." + n] = v.decode("utf-8", "surrogateescape")
    return pax


def tar_dir(root, out, overlay=True):
    """Tars a directory (numeric owners, sorted, xattrs, hardlinks). With overlay=True, char
    devices 0/0 become .wh. files and opaque dirs get .wh..wh..opq."""
    inodes = {}
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = os.path.relpath(dirpath, root)
            names = sorted(dirnames + filenames)
            for name in names:
                full = os.path.join(dirpath, name)
                arc = os.path.normpath(os.path.join(rel_dir, name))
                st = os.lstat(full)
                if overlay and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    ti = tarfile.TarInfo(os.path.join(os.path.dirname(arc), ".wh." + name))
                    ti.mtime = int(st.st_mtime)
                    tf.addfile(ti)
                    continue
                ti = tf.gettarinfo(full, arc)
                ti.uname = ti.gname = ""
                key = (st.st_dev, st.st_ino)
                if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                    if key in inodes:
                        ti.type = tarfile.LNKTYPE
                        ti.linkname = inodes[key]
                        ti.size = 0
                    else:
                        inodes[key] = arc
                pax = xattr_pax(full)
                if pax:
                    ti.pax_headers.update(pax)
                if ti.isreg():
                    with open(full, "rb") as f:
                        tf.addfile(ti, f)
                else:
                    tf.addfile(ti)
                if overlay and stat.S_ISDIR(st.st_mode):
                    try:
                        opaque = os.getxattr(full, "trusted.overlay.opaque", follow_symlinks=False)
                    except OSError:
                        opaque = b""
                    if opaque == b"y":
                        o = tarfile.TarInfo(os.path.join(arc, ".wh..wh..opq"))
                        o.mtime = int(st.st_mtime)
                        tf.addfile(o)


class RawTar:
    """Writes tar headers by hand, for entries tarfile refuses or normalises."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.tf = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def add(self, name, data=b"", kind=tarfile.REGTYPE, mode=0o644, uid=0, gid=0, link="", pax=None, dev=(0, 0)):
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = len(data) if kind == tarfile.REGTYPE else 0
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.mtime = MTIME
        ti.linkname = link
        ti.devmajor, ti.devminor = dev
        if pax:
            ti.pax_headers.update(pax)
        self.tf.addfile(ti, io.BytesIO(data) if ti.size else None)

    def bytes(self):
        self.tf.close()
        return self.buf.getvalue()


def prng(n, seed):
    out = bytearray()
    h = hashlib.sha256(seed.encode()).digest()
    while len(out) < n:
        h = hashlib.sha256(h).digest()
        out += h
    return bytes(out[:n])


def gen(name):
    t = RawTar()
    if name == "busybox":
        bb = open("/bin/busybox", "rb").read()
        for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev"]:
            t.add(d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        t.add("bin/busybox", bb, mode=0o755)
        for applet in ["sh", "ls", "cat", "echo", "id", "sha256sum", "find", "wc", "sleep", "stat", "head"]:
            t.add("bin/" + applet, kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        t.add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        t.add("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        t.add("etc/hello.txt", b"hello from clip\n")
    elif name == "users":
        # On top of busybox: a non-root user, files only root may read, a 4 MiB file, and a
        # busybox copy with a file capability (cap_net_raw, permitted + effective).
        bb = open("/bin/busybox", "rb").read()
        cap = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)
        t.add("etc", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n")
        t.add("etc/group", b"root:x:0:\nuser:x:1000:\n")
        t.add("etc/secret", b"root only\n", mode=0o600)
        t.add("etc/public", b"anyone\n", mode=0o644)
        t.add("home", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("home/user", kind=tarfile.DIRTYPE, mode=0o700, uid=1000, gid=1000)
        t.add("home/user/notes", b"user's notes\n", mode=0o600, uid=1000, gid=1000)
        t.add("home/user/big.bin", prng(4 << 20, "user"), mode=0o644, uid=1000, gid=1000)
        # Named busybox: busybox picks its applet from argv[0] unless it is called "busybox".
        t.add("opt", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("opt/cap", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("opt/cap/busybox", bb, mode=0o755,
              pax={"SCHILY.xattr.security.capability": cap.decode("utf-8", "surrogateescape")})
    elif name == "everytype-base":
        for d in ["etc", "bin", "dev", "data", "data/sub", "gone", "gone/deep", "opq", "usr", "usr/share"]:
            t.add(d, kind=tarfile.DIRTYPE, mode=0o755)
        t.add("etc/config", b"key=value\n", mode=0o640, uid=1000, gid=1000)
        t.add("bin/ping", b"\x7fELF fake ping", mode=0o755,
              pax={"SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00".decode("utf-8", "surrogateescape"),
                   "SCHILY.xattr.user.note": "hello"})
        t.add("bin/su", b"setuid binary", mode=0o4755)
        t.add("bin/sticky", kind=tarfile.DIRTYPE, mode=0o1777)
        t.add("data/random.bin", prng(6 << 20, "random"), mode=0o600, uid=123, gid=456)
        t.add("data/zeros.bin", bytes(24 << 20), mode=0o644)
        t.add("data/empty", b"")
        t.add("data/sub/link-to-config", kind=tarfile.SYMTYPE, link="../../etc/config", mode=0o777)
        t.add("data/abs-link", kind=tarfile.SYMTYPE, link="/etc/config", mode=0o777)
        t.add("data/hard-a", b"shared by three names\n")
        t.add("data/hard-b", kind=tarfile.LNKTYPE, link="data/hard-a")
        t.add("data/sub/hard-c", kind=tarfile.LNKTYPE, link="data/hard-a")
        t.add("dev/null", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 3))
        t.add("dev/loop9", kind=tarfile.BLKTYPE, mode=0o660, dev=(7, 9))
        t.add("dev/fifo", kind=tarfile.FIFOTYPE, mode=0o644)
        t.add("usr/share/" + "long-" * 40 + "name.txt", b"a long name\n")
        t.add("gone/deep/file", b"to be whited out")
        t.add("gone/file2", b"also gone")
        t.add("opq/old", b"hidden by the opaque dir above")
        t.add("data/to-delete", b"deleted in the top layer")
        t.add("utf8-\u00e9\u00e8.txt", "unicode name\n".encode())
    elif name == "everytype-top":
        t.add(".wh.gone", b"")
        t.add("data/.wh.to-delete", b"")
        t.add("opq", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("opq/.wh..wh..opq", b"")
        t.add("opq/new", b"only this survives in opq\n")
        t.add("etc/config", b"key=replaced\n", mode=0o644)
        t.add("implied/parent/dirs/file", b"parents not listed\n")
        t.add("data/hard-d", kind=tarfile.LNKTYPE, link="data/hard-a")
    elif name == "bigfile":
        t.add("data", kind=tarfile.DIRTYPE, mode=0o755)
        # 128 MiB: half incompressible, half text, so it spans many checkpoints.
        block = prng(1 << 20, "big")
        text = (b"clip lazy read benchmark line\n" * 40000)[: 1 << 20]
        t.add("data/big.bin", b"".join(block if i % 2 else text for i in range(128)))
    elif name == "gigfile":
        # 1 GiB in one file (a model's weights): half incompressible, half text, in 1 MiB
        # blocks, so about 512 MiB gzipped. For scripts/bench/bigfile.sh.
        t.add("data", kind=tarfile.DIRTYPE, mode=0o755)
        block = prng(1 << 20, "gig")
        text = (b"clip sequential read benchmark line\n" * 32000)[: 1 << 20]
        t.add("data/gig.bin", b"".join(block if i % 2 else text for i in range(1024)))
    elif name == "manyfiles":
        # 2048 files of 16 KiB (32 MiB, half incompressible, half text) in one directory: a
        # read-most workload reads them all, in whatever order.
        t.add("data", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("data/mf", kind=tarfile.DIRTYPE, mode=0o755)
        text = (b"clip read-most line\n" * 1000)[: 8 << 10]
        for i in range(2048):
            t.add("data/mf/%04d" % i, prng(8 << 10, "mf%d" % i) + text)
    elif name.startswith("note-"):
        # A small layer of its own: etc/note holding the rest of the generator's name.
        t.add("etc", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("etc/note", name[5:].encode() + b"\n")
    elif name == "busybox-pwned":
        # An attacker's copy of the busybox layer: same paths, one file changed.
        bb = open("/bin/busybox", "rb").read()
        for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev"]:
            t.add(d, kind=tarfile.DIRTYPE, mode=0o1777 if d == "tmp" else 0o755)
        t.add("bin/busybox", bb, mode=0o755)
        for applet in ["sh", "cat"]:
            t.add("bin/" + applet, kind=tarfile.SYMTYPE, link="busybox", mode=0o777)
        t.add("etc/hello.txt", b"pwned\n")
    elif name == "orphan-whiteout":
        # On top of busybox: lists tmp/kept, then whites out the lower tmp. The layer's own
        # tmp/kept stays, so tmp must stay a directory (a merged tree with an orphan crashed
        # clip's daemon at every start).
        t.add("tmp/kept", b"kept by its own layer\n")
        t.add(".wh.tmp", b"")
    elif name == "arm64-marker":
        t.add("etc", kind=tarfile.DIRTYPE, mode=0o755)
        t.add("etc/arch", b"arm64\n")
    elif name == "dotdot":
        t.add("ok", b"fine")
        t.add("../escape", b"evil")
    elif name == "absolute":
        t.add("/etc/evil", b"evil")
    elif name == "hardlink-forward":
        t.add("early-link", kind=tarfile.LNKTYPE, link="late-target")
        t.add("late-target", b"target")
    elif name == "huge-size":
        raw = RawTar()
        raw.add("huge", b"x" * 1024)
        b = bytearray(raw.bytes())
        # Claim 1 TiB in the ustar size field (octal) of the header and fix the checksum.
        b[124:136] = b"%011o\0" % (1 << 40)
        b[148:156] = b" " * 8
        b[148:156] = b"%06o\0 " % sum(b[:512])
        return bytes(b[:512 + 1024])
    else:
        raise SystemExit("unknown generator " + name)
    return t.bytes()


def blob_writer(out):
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)

    def put(b):
        d = sha256(b)
        with open(os.path.join(out, "blobs", "sha256", d[7:]), "wb") as f:
            f.write(b)
        return d
    return put


def write_index_json(out, tag, desc):
    desc = dict(desc)
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [desc]}, f)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def layout(out, tag, layers):
    put = blob_writer(out)
    desc = manifest(put, layers, "amd64")
    write_index_json(out, tag, desc)


def multiarch(out, tag):
    put = blob_writer(out)
    descs = []
    for arch, variant, layer in [("amd64", None, "gen:busybox"), ("arm64", "v8", "gen:arm64-marker")]:
        d = manifest(put, [layer], arch, variant)
        d["platform"] = {"architecture": arch, "os": "linux", **({"variant": variant} if variant else {})}
        descs.append(d)
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": descs}, sort_keys=True).encode()
    write_index_json(out, tag, {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": put(index), "size": len(index)})


def manifest(put, layers, arch, variant=None):
    descs, diff_ids = [], []
    for spec in layers:
        kind, _, arg = spec.partition(":")
        mode = "gzip"
        if kind == "dir":
            buf = io.BytesIO()
            tar_dir(arg, buf)
            raw = buf.getvalue()
        elif kind == "tar":
            raw = open(arg, "rb").read()
        elif kind == "gen":
            raw = gen(arg)
        elif kind in ("corrupt", "truncated", "diffid"):
            raw = gen(arg) if not os.path.exists(arg) else open(arg, "rb").read()
            mode = kind
        else:
            raise SystemExit("bad layer spec " + spec)
        gz = gzip.compress(raw, compresslevel=6, mtime=0)
        diff = sha256(raw)
        if mode == "corrupt":
            b = bytearray(gz)
            b[len(b) // 2] ^= 0xFF
            gz = bytes(b)
        elif mode == "truncated":
            gz = gz[: len(gz) // 2]
        elif mode == "diffid":
            diff = sha256(b"not the layer")
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
        diff_ids.append(diff)
        print(f"  layer {len(descs)}: {spec} -> {len(raw)} bytes tar, {len(gz)} bytes gzip", file=sys.stderr)
    config = json.dumps({
        "architecture": arch, "os": "linux", **({"variant": variant} if variant else {}),
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Cmd": json.loads(os.environ.get("MKIMAGE_CMD", '["/bin/sh"]'))},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "clip mkimage.py"} for _ in diff_ids],
    }, sort_keys=True).encode()
    cd = put(config)
    manifest_json = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(config)},
        "layers": descs,
    }, sort_keys=True).encode()
    return {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(manifest_json), "size": len(manifest_json)}


def main(argv):
    if len(argv) >= 4 and argv[1] == "layout":
        layout(argv[2], argv[3], argv[4:])
    elif len(argv) == 4 and argv[1] == "multiarch":
        multiarch(argv[2], argv[3])
    elif len(argv) == 4 and argv[1] == "gen":
        with open(argv[3], "wb") as f:
            f.write(gen(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
