#!/usr/bin/env python3
"""A TCP proxy for benchmarks: adds a one-way delay to every chunk in both directions (pipelined,
so it adds latency without capping throughput; there is no sch_netem here) and counts the bytes
the upstream sends, and the blob GET requests clients send (STATS_FILE.req). The counts are
written every 100 ms and on exit.

usage: proxy.py LISTEN_PORT UPSTREAM_HOST:PORT DELAY_MS STATS_FILE
With PROXY_TRACE=FILE, every request line (and its Range header) is appended to FILE with the
milliseconds since the proxy started, the UTC time (to line up with a daemon's log) and
the connection's number: the requests' timeline.
"""
import asyncio
import os
import re
import signal
import sys
import time

sent = 0
blob_gets = 0
BLOB_GET = re.compile(rb"GET /v2/[^ ]*/blobs/")
REQUEST = re.compile(rb"(GET|HEAD|PUT|POST|PATCH) (/v2/[^ ]*) HTTP/1\.1\r\n")
RANGE = re.compile(rb"\r\n[Rr]ange: (bytes=[0-9-]+)")
TRACE = os.environ.get("PROXY_TRACE")
START = time.monotonic()
connections = 0


def trace(conn, data):
    with open(TRACE, "a") as f:
        for m in REQUEST.finditer(data):
            t = (time.monotonic() - START) * 1000
            head = data[m.start():data.find(b"\r\n\r\n", m.start()) + 2]
            r = RANGE.search(head)
            rng = r.group(1).decode() if r else ""
            wall = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}"
            f.write(f"{t:9.1f} {wall} c{conn} {m.group(1).decode()} {m.group(2).decode()[:120]} {rng}\n")


async def pipe(reader, writer, delay, count, conn=0):
    global sent, blob_gets
    queue = asyncio.Queue()

    async def deliver():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    task = asyncio.create_task(deliver())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if count:
                sent += len(data)
            else:
                blob_gets += len(BLOB_GET.findall(data))
                if TRACE:
                    trace(conn, data)
            await queue.put((time.monotonic() + delay, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))
    try:
        await task
    except (ConnectionError, OSError):
        pass


async def handle(client_r, client_w, upstream, delay):
    global connections
    connections += 1
    conn = connections
    host, port = upstream.rsplit(":", 1)
    try:
        up_r, up_w = await asyncio.open_connection(host, int(port))
    except OSError:
        client_w.close()
        return
    await asyncio.gather(
        pipe(client_r, up_w, delay, False, conn),
        pipe(up_r, client_w, delay, True),
    )
    for w in (client_w, up_w):
        try:
            w.close()
        except OSError:
            pass


def write(path):
    for p, v in ((path, sent), (path + ".req", blob_gets)):
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(v))
        os.replace(tmp, p)


async def report(path):
    last = None
    while True:
        if (sent, blob_gets) != last:
            write(path)
            last = (sent, blob_gets)
        await asyncio.sleep(0.1)


async def main():
    port, upstream, delay_ms, stats = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, upstream, delay_ms / 1000.0), "127.0.0.1", port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    reporter = asyncio.create_task(report(stats))
    async with server:
        await stop.wait()
    reporter.cancel()
    write(stats)


if __name__ == "__main__":
    asyncio.run(main())
