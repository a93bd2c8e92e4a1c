#!/usr/bin/env python3
"""Soak run of the clip snapshotter (issue "Weeks of uptime"): real containerd, runc, the local
registry behind a fault-injecting proxy, many image versions (different top layers over shared
base layers), and containers started, read from and removed concurrently, while the daemon is
killed with SIGKILL every few minutes, the registry fails requests for a while, and the cache
disk (a small loop-mounted ext4) is filled to ENOSPC for a while.

Every file a container reads is hashed inside the container and compared with the image's real
content. The daemon's RSS, open descriptors, threads, the bytes under clip's root and cache,
and the bytes the registry sent are sampled every few seconds.

Pass: 0 wrong bytes, 0 failed container starts outside the disruptions, and plateaus after
warm-up (the last third of the run grows no more than 15 % plus a small slack over the middle
third) in RSS, descriptors, threads and disk.

usage: soak.py DURATION_SECONDS OUT_DIR   (run by soak.sh; as root)
Writes OUT_DIR/soak.csv (samples), OUT_DIR/summary.json, and OUT_DIR/soak.png when matplotlib
is installed. Exit status 0 when every criterion passes.
"""
import asyncio
import csv
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CLIP = os.environ.get("CLIP_BIN", os.path.join(REPO, "target", "release", "clip"))
MKIMAGE = os.path.join(REPO, "scripts", "mkimage.py")
MIB = 1 << 20


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_until(what, ok, timeout=60, proc=None, logfile=None):
    deadline = time.monotonic() + timeout
    while not ok():
        if proc is not None and proc.poll() is not None:
            tail = open(logfile).read()[-3000:] if logfile else ""
            raise SystemExit(f"{what} exited with {proc.returncode}:\n{tail}")
        if time.monotonic() > deadline:
            tail = open(logfile).read()[-3000:] if logfile else ""
            raise SystemExit(f"{what} did not become ready in {timeout} s:\n{tail}")
        time.sleep(0.05)


def connectable(path_or_port):
    try:
        if isinstance(path_or_port, int):
            socket.create_connection(("127.0.0.1", path_or_port), timeout=1).close()
        else:
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(path_or_port)
            s.close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# The registry's fault-injecting proxy.


class Proxy:
    """Forwards to the registry; while `active`, breaks a share of blob GETs: a 503, a
    connection reset after a few KiB of the answer, or one flipped byte in the body."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.port = free_port()
        self.active = False
        self.share = 0.08
        self.sent = 0
        self.faults = {"503": 0, "reset": 0, "corrupt": 0}
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port)
        )
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _handle(self, cr, cw):
        host, port = self.upstream.rsplit(":", 1)
        try:
            ur, uw = await asyncio.open_connection(host, int(port))
        except OSError:
            cw.close()
            return
        st = {"fault": None, "headers": False, "seen": 0}

        def close():
            for w in (cw, uw):
                try:
                    w.close()
                except Exception:
                    pass

        async def client_to_upstream():
            try:
                while True:
                    data = await cr.read(65536)
                    if not data:
                        break
                    m = re.match(rb"([A-Z]+) (\S+) HTTP/1\.1\r\n", data)
                    if m:
                        st["fault"] = None
                        if (
                            self.active
                            and m.group(1) == b"GET"
                            and b"/blobs/" in m.group(2)
                            and random.random() < self.share
                        ):
                            kind = random.choice(["503", "reset", "corrupt"])
                            self.faults[kind] += 1
                            if kind == "503":
                                cw.write(
                                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                                    b"Connection: close\r\n\r\n"
                                )
                                await cw.drain()
                                close()
                                return
                            st.update(fault=kind, headers=False, seen=0)
                    uw.write(data)
                    await uw.drain()
            except (OSError, ConnectionError):
                pass
            try:
                uw.write_eof()
            except Exception:
                pass

        async def upstream_to_client():
            try:
                while True:
                    data = await ur.read(65536)
                    if not data:
                        break
                    f = st["fault"]
                    if f == "reset":
                        st["seen"] += len(data)
                        if st["seen"] > 4096:
                            cw.write(data[:512])
                            await cw.drain()
                            close()
                            return
                    elif f == "corrupt":
                        start = 0
                        if not st["headers"]:
                            i = data.find(b"\r\n\r\n")
                            if i >= 0:
                                st["headers"] = True
                                start = i + 4
                            else:
                                start = len(data)
                        if start < len(data):
                            j = random.randrange(start, len(data))
                            data = data[:j] + bytes([data[j] ^ 0xFF]) + data[j + 1 :]
                            st["fault"] = None
                    self.sent += len(data)
                    cw.write(data)
                    await cw.drain()
            except (OSError, ConnectionError):
                pass
            close()

        await asyncio.gather(client_to_upstream(), upstream_to_client())


# ---------------------------------------------------------------------------------------------
# Images: shared base layers and one top layer per version, content known file by file.


def write_files(root, sub, count, seed, sizes, big=None):
    """Writes the files of one layer; returns their hashes by path, and puts their sizes in
    `sizes`."""
    rnd = random.Random(seed)
    d = os.path.join(root, "soak", sub)
    os.makedirs(d, exist_ok=True)
    sums = {}
    for i in range(count):
        size = rnd.choice([512, 4096, 20000, 70000, 200000, 600000])
        if rnd.random() < 0.5:
            data = rnd.randbytes(size)
        else:
            words = [rnd.choice([b"clip", b"lazy", b"span", b"layer", b"soak", str(i).encode()]) for _ in range(size // 5 + 1)]
            data = b" ".join(words)[:size]
        name = f"f{i:04d}"
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        sums[f"/soak/{sub}/{name}"] = hashlib.sha256(data).hexdigest()
        sizes[f"/soak/{sub}/{name}"] = len(data)
    if big:
        data = rnd.randbytes(big)
        with open(os.path.join(d, "big"), "wb") as f:
            f.write(data)
        sums[f"/soak/{sub}/big"] = hashlib.sha256(data).hexdigest()
        sizes[f"/soak/{sub}/big"] = big
    for p in [d, os.path.dirname(d)] + [os.path.join(d, n) for n in os.listdir(d)]:
        os.utime(p, (1700000000, 1700000000))
    return sums


def build_images(work, registry, versions, base_files, top_files):
    """Returns the images (tag, hashes by path) and every file's size by path."""
    src = os.path.join(work, "src")
    base = os.path.join(src, "base")
    sizes = {}
    sums_base = write_files(base, "base", base_files, 1, sizes, big=16 * MIB)
    images = []
    for v in range(versions):
        top = os.path.join(src, f"top{v}")
        sums_top = write_files(top, f"top{v}", top_files, 1000 + v, sizes)
        layout = os.path.join(work, "layouts", f"v{v}")
        tag = f"v{v}"
        subprocess.run(
            [sys.executable, MKIMAGE, "layout", layout, tag, "gen:busybox", f"dir:{base}", f"dir:{top}"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        subprocess.run(
            ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{tag}", f"docker://{registry}/soak:{tag}"],
            check=True,
        )
        subprocess.run(
            [CLIP, "--root", os.path.join(work, "publisher"), "index", "--push", f"{registry}/soak:{tag}"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        images.append({"tag": tag, "sums": {**sums_base, **sums_top}})
        log(f"image soak:{tag} built, pushed, index published")
    return images, sizes


# ---------------------------------------------------------------------------------------------
# The node: containerd and the clip snapshotter (killed and restarted), its cache on a small
# loop-mounted filesystem.


class Node:
    def __init__(self, work):
        self.dir = os.path.join(work, "node")
        self.root = os.path.join(self.dir, "clip")
        self.cache = os.path.join(self.dir, "cache")
        os.makedirs(self.cache, exist_ok=True)
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.img = os.path.join(work, "cache.img")
        subprocess.run(["truncate", "-s", "192M", self.img], check=True)
        subprocess.run(["mkfs.ext4", "-q", "-F", self.img], check=True)
        subprocess.run(["mount", "-o", "loop", self.img, self.cache], check=True)
        self.sock = os.path.join(self.dir, "clip.sock")
        self.cdsock = os.path.join(self.dir, "containerd.sock")
        self.metrics = free_port()
        self.cfg = os.path.join(self.dir, "clip.toml")
        with open(self.cfg, "w") as f:
            f.write(
                f'[cache]\nmemory = "32MiB"\nbudget = "256MiB"\ndisk = "48MiB"\n'
                f'passthrough = "16MiB"\ndir = "{self.cache}/spans"\n'
                "[gc]\ngrace_secs = 60\ninterval_secs = 30\n"
            )
        self.log = os.path.join(self.dir, "snapshotter.log")
        self.daemon = None
        self.restarts = 0
        self.start_daemon()
        toml = os.path.join(self.dir, "containerd.toml")
        with open(toml, "w") as f:
            f.write(
                f'version = 2\nroot = "{self.dir}/containerd/root"\nstate = "{self.dir}/containerd/state"\n'
                'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
                f'[grpc]\n  address = "{self.cdsock}"\n'
                f'[proxy_plugins.clip]\n  type = "snapshot"\n  address = "{self.sock}"\n'
            )
        cdlog = os.path.join(self.dir, "containerd.log")
        self.containerd = subprocess.Popen(
            ["containerd", "--config", toml], stdout=subprocess.DEVNULL, stderr=open(cdlog, "a")
        )
        wait_until(
            "containerd",
            lambda: os.path.exists(self.cdsock) and self.ctr(["version"]).returncode == 0,
            proc=self.containerd,
            logfile=cdlog,
        )

    def start_daemon(self):
        self.daemon = subprocess.Popen(
            [CLIP, "--root", self.root, "--metrics-address", f"127.0.0.1:{self.metrics}",
             "snapshotter", "--address", self.sock, "--containerd-address", self.cdsock, "--config", self.cfg],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),
            env={**os.environ, "CLIP_LOG": os.environ.get("CLIP_LOG", "warn")},
        )
        wait_until("clip snapshotter", lambda: connectable(self.sock), proc=self.daemon, logfile=self.log)

    def kill_and_restart(self):
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait()
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        self.start_daemon()
        self.restarts += 1

    def ctr(self, args, timeout=600):
        return subprocess.run(["ctr", "-a", self.cdsock] + args, capture_output=True, text=True, timeout=timeout)

    def pull(self, image):
        return subprocess.run(
            [CLIP, "--root", self.root, "pull", image, "--address", self.cdsock],
            capture_output=True, text=True, timeout=600, env={**os.environ, "CLIP_LOG": "warn", "HOME": self.dir},
        )

    def sample(self):
        pid = self.daemon.pid
        status = open(f"/proc/{pid}/status").read()
        field = lambda k: int(re.search(rf"^{k}:\s+(\d+)", status, re.M).group(1))
        return {
            "rss_mib": field("VmRSS") / 1024,
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": field("Threads"),
            "root_mib": du(self.root, skip={"snapshots"}) / MIB,
            "cache_mib": du(self.cache, skip={"lost+found", "filler"}) / MIB,
        }

    def stop(self):
        for line in self.ctr(["tasks", "ls", "-q"]).stdout.split():
            self.ctr(["tasks", "kill", "-s", "SIGKILL", line])
        for line in self.ctr(["containers", "ls", "-q"]).stdout.split():
            self.ctr(["tasks", "delete", "-f", line])
            self.ctr(["containers", "delete", line])
        keeper = re.findall(r"started the FUSE keeper pid=(\d+)", open(self.log).read())
        for p in (self.daemon, self.containerd):
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        for k in keeper:
            try:
                os.kill(int(k), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        mounts = [l.split()[4] for l in open("/proc/self/mountinfo") if l.split()[4].startswith(self.dir)]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)


def du(path, skip=()):
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        if dirpath == path:
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for f in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
            except OSError:
                pass
    return total


# ---------------------------------------------------------------------------------------------
# The workload and the disruptions.


class Soak:
    def __init__(self, duration, out):
        self.duration = duration
        self.out = out
        short = duration <= 900
        self.versions = int(os.environ.get("SOAK_VERSIONS", 4 if short else 12))
        self.workers = int(os.environ.get("SOAK_WORKERS", 3 if short else 4))
        self.kill_every = float(os.environ.get("SOAK_KILL_EVERY", 60 if short else 240))
        self.fault_every = float(os.environ.get("SOAK_FAULT_EVERY", 75 if short else 300))
        self.fault_for = float(os.environ.get("SOAK_FAULT_FOR", 20 if short else 60))
        self.enospc_every = float(os.environ.get("SOAK_ENOSPC_EVERY", 150 if short else 900))
        self.enospc_for = float(os.environ.get("SOAK_ENOSPC_FOR", 30 if short else 90))
        self.base_files = 150 if short else 300
        self.top_files = 30 if short else 40
        self.lock = threading.Lock()
        self.windows = []  # (start, end, what): disruptions
        self.users = {}  # tag -> containers using it now
        self.pulled = set()
        self.stats = {"starts_ok": 0, "starts_failed_disrupted": 0, "starts_failed": 0,
                      "files_checked": 0, "bytes_checked": 0, "wrong_files": 0, "lost_output": 0,
                      "pulls": 0,
                      "removals": 0, "enospc_windows": 0}
        self.failures = []
        self.stop = threading.Event()
        # Container ids unique to this run: a killed run's leftovers never collide.
        self.run_id = f"{os.getpid() % 100000}"

    def disrupted(self, t0, t1):
        with self.lock:
            return any(s <= t1 and t0 <= e for s, e, _ in self.windows)

    def open_window(self, what):
        """A disruption starts now: failures from now on are put down to it."""
        with self.lock:
            self.windows.append((time.monotonic(), float("inf"), what))
            return len(self.windows) - 1

    def close_window(self, i, after=0.0):
        """It ended (`after` seconds from now, for what it leaves behind)."""
        with self.lock:
            s, _, what = self.windows[i]
            self.windows[i] = (s, time.monotonic() + after, what)

    # One worker: pull if needed, run a container that hashes a sample of files, compare.
    def worker(self, n):
        rnd = random.Random(n)
        i = 0
        while not self.stop.is_set():
            i += 1
            img = rnd.choice(self.images)
            tag = img["tag"]
            image = f"{self.proxy_host}/soak:{tag}"
            with self.lock:
                self.users[tag] = self.users.get(tag, 0) + 1
                need_pull = tag not in self.pulled
            t0 = time.monotonic()
            try:
                if need_pull:
                    p = self.node.pull(image)
                    if p.returncode != 0:
                        self.failed(t0, f"pull {tag}: {p.stderr.strip()[-400:]}")
                        self.stop.wait(1)
                        continue
                    with self.lock:
                        self.pulled.add(tag)
                        self.stats["pulls"] += 1
                paths = rnd.sample(sorted(img["sums"]), min(25, len(img["sums"])))
                cid = f"soak-{self.run_id}-{n}-{i}"
                # The hashes go to a file on the host (ctr's stdout copy can lose the end of a
                # short-lived task's output); the trailer tells a read that failed (sha256sum's
                # status) and output that never arrived apart from wrong bytes.
                result = os.path.join(self.results, cid)
                r = self.node.ctr(["run", "--rm", "--snapshotter", "clip", "--mount",
                                   f"type=bind,src={self.results},dst=/out,options=rbind:rw",
                                   image, cid, "sh", "-c",
                                   f'sha256sum "$@" > /out/{cid}; echo "END $?" >> /out/{cid}',
                                   "sh"] + paths, timeout=900)
                try:
                    with open(result) as f:
                        r.stdout = f.read()
                    os.unlink(result)
                except FileNotFoundError:
                    r.stdout = ""
                end = re.search(r"^END (\d+)$", r.stdout, re.M)
                if r.returncode == 0 and end is None:
                    with self.lock:
                        self.stats["lost_output"] += 1
                    self.failed(t0, f"run {cid} ({tag}): no output (stdout {r.stdout[:200]!r})")
                    continue
                if r.returncode == 0 and end.group(1) != "0":
                    self.failed(t0, f"run {cid} ({tag}): a read failed: {r.stdout[-300:]!r}")
                    continue
                if r.returncode != 0:
                    self.node.ctr(["containers", "delete", cid])
                    self.failed(t0, f"run {cid} ({tag}): {r.stderr.strip()[-400:]}")
                    self.stop.wait(1)
                    continue
                got = {}
                for line in r.stdout.splitlines():
                    parts = line.split()
                    if len(parts) == 2:
                        got[parts[1]] = parts[0]
                with self.lock:
                    self.stats["starts_ok"] += 1
                    wrong = [p for p in paths if got.get(p) != img["sums"][p]]
                    self.stats["files_checked"] += len(paths)
                    self.stats["wrong_files"] += len(wrong)
                    if wrong:
                        self.failures.append(
                            f"WRONG BYTES: {cid} ({tag}) {len(wrong)} of {len(paths)} files, e.g. "
                            f"{wrong[0]}: {got.get(wrong[0])} != {img['sums'][wrong[0]]}; "
                            f"stdout {r.stdout[:300]!r} stderr {r.stderr[:300]!r}"
                        )
                        log(self.failures[-1])
                    self.stats["bytes_checked"] += sum(self.sizes[p] for p in paths)
            finally:
                with self.lock:
                    self.users[tag] -= 1

    def failed(self, t0, what):
        t1 = time.monotonic()
        if self.disrupted(t0, t1):
            with self.lock:
                self.stats["starts_failed_disrupted"] += 1
            log(f"failed during a disruption (allowed): {what}")
        else:
            with self.lock:
                self.stats["starts_failed"] += 1
                self.failures.append(f"FAILED START: {what}")
            log(self.failures[-1])

    # Image churn: now and then an image nobody runs is removed; gc collects it later.
    def churn(self):
        rnd = random.Random(99)
        while not self.stop.wait(20):
            with self.lock:
                idle = [t for t in self.pulled if self.users.get(t, 0) == 0]
                if len(idle) < 2:
                    continue
                tag = rnd.choice(idle)
                self.pulled.discard(tag)
                self.users[tag] = self.users.get(tag, 0) + 1  # nobody pulls it while it goes
            r = self.node.ctr(["images", "rm", "--sync", f"{self.proxy_host}/soak:{tag}"])
            with self.lock:
                self.users[tag] -= 1
                if r.returncode == 0:
                    self.stats["removals"] += 1

    def disruptions(self):
        start = time.monotonic()
        next_kill = start + self.kill_every
        next_fault = start + self.fault_every / 2
        next_enospc = start + self.enospc_every
        while not self.stop.wait(1):
            now = time.monotonic()
            if now >= next_kill:
                log("SIGKILL to the snapshotter, restart")
                w = self.open_window("kill")
                self.node.kill_and_restart()
                self.close_window(w, after=10)
                next_kill += self.kill_every
            if now >= next_fault:
                log(f"registry faults for {self.fault_for:.0f} s")
                w = self.open_window("faults")
                self.proxy.active = True
                self.stop.wait(self.fault_for)
                self.proxy.active = False
                self.close_window(w)
                next_fault += self.fault_every
            if now >= next_enospc and now + self.enospc_for < start + self.duration:
                free = os.statvfs(self.node.cache)
                filler = os.path.join(self.node.cache, "filler")
                log(f"cache disk full (ENOSPC) for {self.enospc_for:.0f} s")
                w = self.open_window("enospc")
                subprocess.run(["fallocate", "-l", str(free.f_bavail * free.f_frsize), filler])
                with open(filler, "ab") as f:  # whatever fallocate left
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                            f.flush()
                    except OSError:
                        pass
                self.stop.wait(self.enospc_for)
                os.unlink(filler)
                self.close_window(w)
                with self.lock:
                    self.stats["enospc_windows"] += 1
                next_enospc += self.enospc_every

    def run(self):
        work = self.out
        os.makedirs(work, exist_ok=True)
        reg_dir = os.path.join(work, "registry")
        os.makedirs(reg_dir, exist_ok=True)
        port = free_port()
        with open(os.path.join(reg_dir, "config.yml"), "w") as f:
            f.write(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {reg_dir}/data\n"
                f"http:\n  addr: 127.0.0.1:{port}\n"
            )
        reg_log = os.path.join(reg_dir, "registry.log")
        registry = subprocess.Popen(["docker-registry", "serve", os.path.join(reg_dir, "config.yml")],
                                    stdout=subprocess.DEVNULL, stderr=open(reg_log, "w"))
        self.node = None
        try:
            wait_until("docker-registry", lambda: connectable(port), proc=registry, logfile=reg_log)
            self.images, self.sizes = build_images(
                work, f"127.0.0.1:{port}", self.versions, self.base_files, self.top_files
            )
            self.proxy = Proxy(f"127.0.0.1:{port}")
            self.proxy_host = f"127.0.0.1:{self.proxy.port}"
            self.node = Node(work)
            self.results = os.path.join(work, "results")
            os.makedirs(self.results, exist_ok=True)
            return self.drive()
        finally:
            self.stop.set()
            if self.node:
                self.node.stop()
                subprocess.run(["umount", "-l", self.node.cache], stderr=subprocess.DEVNULL)
            registry.terminate()
            registry.wait()

    def drive(self):
        log(f"soak for {self.duration:.0f} s: {self.versions} image versions, {self.workers} "
            f"workers, SIGKILL every {self.kill_every:.0f} s, registry faults {self.fault_for:.0f} s "
            f"every {self.fault_every:.0f} s, ENOSPC {self.enospc_for:.0f} s every {self.enospc_every:.0f} s")
        threads = [threading.Thread(target=self.worker, args=(n,), daemon=True) for n in range(self.workers)]
        threads += [threading.Thread(target=self.churn, daemon=True),
                    threading.Thread(target=self.disruptions, daemon=True)]
        for t in threads:
            t.start()
        start = time.monotonic()
        self.started = start
        rows = []
        csv_path = os.path.join(self.out, "soak.csv")
        with open(csv_path, "w", newline="") as f:
            w = None
            while time.monotonic() - start < self.duration:
                time.sleep(5)
                try:
                    s = self.node.sample()
                except (OSError, AttributeError):
                    continue  # the daemon is being restarted
                with self.lock:
                    s.update(t_s=round(time.monotonic() - start, 1),
                             registry_mib=round(self.proxy.sent / MIB, 2),
                             starts_ok=self.stats["starts_ok"],
                             wrong_files=self.stats["wrong_files"],
                             restarts=self.node.restarts)
                if w is None:
                    w = csv.DictWriter(f, fieldnames=list(s))
                    w.writeheader()
                w.writerow({k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()})
                f.flush()
                rows.append(s)
        self.stop.set()
        log("stopping: waiting for the containers running now")
        for t in threads:
            t.join(timeout=900)
        return self.judge(rows)

    def judge(self, rows):
        third = max(1, len(rows) // 3)
        middle, last = rows[third:2 * third], rows[2 * third:]
        checks = {}
        slack = {"rss_mib": 24, "fds": 16, "threads": 8, "root_mib": 8, "cache_mib": 16}
        for k, extra in slack.items():
            m = max(r[k] for r in middle) if middle else 0
            l = max(r[k] for r in last) if last else 0
            checks[k] = {"max_middle_third": round(m, 1), "max_last_third": round(l, 1),
                         "plateau": l <= m * 1.15 + extra}
        st = self.stats
        summary = {
            "duration_s": self.duration,
            "versions": self.versions,
            "workers": self.workers,
            "restarts": self.node.restarts,
            "registry_faults": self.proxy.faults,
            "registry_mib": round(self.proxy.sent / MIB, 1),
            **st,
            "resources": checks,
            "peak": {k: round(max(r[k] for r in rows), 1) for k in slack},
            "failures": self.failures[:50],
        }
        ok = (st["wrong_files"] == 0 and st["starts_failed"] == 0 and st["starts_ok"] > 0
              and all(c["plateau"] for c in checks.values()))
        summary["pass"] = ok
        with open(os.path.join(self.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary, indent=2))
        plot(rows, self.windows, self.started, os.path.join(self.out, "soak.png"))
        return ok


def plot(rows, windows, start, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (apt-get install python3-matplotlib): no plot")
        return
    t = [r["t_s"] / 60 for r in rows]
    series = [("rss_mib", "daemon RSS (MiB)"), ("fds", "open descriptors"), ("threads", "threads"),
              ("root_mib", "clip root (MiB)"), ("cache_mib", "cache disk (MiB)"),
              ("registry_mib", "registry sent (MiB)")]
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 13), sharex=True)
    colors = {"kill": "#d33", "faults": "#f90", "enospc": "#39c"}
    for ax, (k, label) in zip(axes, series):
        ax.plot(t, [r[k] for r in rows], lw=1.2, color="#2f80ed")
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        for s, e, what in windows:
            e = min(e, start + rows[-1]["t_s"])
            ax.axvspan((s - start) / 60, (e - start) / 60, color=colors[what], alpha=0.15, lw=0)
    axes[-1].set_xlabel("minutes (shaded: red SIGKILL + restart, orange registry faults, blue ENOSPC)")
    fig.suptitle("clip soak: resources over time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    log(f"plot: {path}")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        sys.exit(2)
    duration, out = float(sys.argv[1]), sys.argv[2]
    # SIGTERM (a stopped run) still stops containers, daemons and mounts (the `finally`s).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ok = Soak(duration, out).run()
    log("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
