#!/usr/bin/env python
"""Load test of the prediction server, and the in-process cost of one prediction.

    # against a server you started (fmnist serve RUN --no-access-log):
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 -n 2000 -c 16
    # start one on a free loopback port, load it, stop it:
    python benchmarks/serve_load.py --run RUN -n 2000 -c 16
    # no HTTP: what one request costs the server (decode, preprocess, model, PNG of what it saw):
    python benchmarks/serve_load.py --in-process RUN
    # good, odd and hostile uploads together: innocent failures, p99 of the good ones, the server's peak memory
    python benchmarks/serve_load.py --run RUN --mixed -n 2000 -c 16
    # ordinary clients without, then with, one attacker (from 127.0.0.2) re-posting the costliest uploads and
    # holding 300 slow sockets: the ordinary clients' throughput and p50/p99 in both cases
    python benchmarks/serve_load.py --run RUN --attacker both --attacker-sockets 300 -n 2000 -c 16

The client is a small asyncio HTTP/1.1 client with one keep-alive connection per concurrent client and
the requests encoded in advance, so that it takes as little CPU as possible from the server it measures
(they share the machine). It only talks to loopback addresses. Requests cycle through official test
images (PNG) when the data set is present, else synthetic images, or the files given with --image.
Goals (--check makes the exit status say whether they are met): 0 errors, p99 <= 30 ms at 16 concurrent
clients; in-process p50 <= 2 ms. With --mixed, one request in ten is hostile (decompression bombs, tiny files of
extreme shapes, a 40-megapixel image, broken or malformed bodies) and two are odd but valid (CMYK, 16-bit,
transparency, animation, EXIF turns, large photos); the goals are then 0 innocent failures (a good or odd upload
not answered 200), 0 server errors on hostile ones (5xx, resets, timeouts; a 4xx is their right answer) and a
server peak resident memory under 1.5 GB (read from /proc: --run, or --server-pid with --url).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import io
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np

OFFICIAL = Path("/usr/share/datasets/fashion-mnist")
GOAL_P99_MS = 20.0  # at 16 clients on a Zen 4-class 2-core machine (30 ms on an AVX2-only one)
GOAL_RPS = 1000.0
GOAL_IN_PROCESS_P50_MS = 1.0
GOAL_PEAK_RSS_MB = 1536
MAX_REQUESTS, MAX_CONCURRENCY, MAX_SECONDS = 100_000, 256, 600


# --- inputs ---------------------------------------------------------------------------------------------

def sample_images(paths: list[str], count: int = 64) -> list[bytes]:
    """PNG/JPEG bytes to send: the given files, else official test images, else synthetic ones."""
    if paths:
        return [Path(p).read_bytes() for p in paths]
    from PIL import Image

    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        from fmnist.fit.data import read_idx

        arrays = np.asarray(read_idx(OFFICIAL / "t10k-images-idx3-ubyte.gz")[:count])
    else:
        rng = np.random.default_rng(0)
        arrays = rng.integers(0, 30, (count, 28, 28)).astype(np.uint8)
        for a in arrays:
            h, w = rng.integers(8, 26, 2)
            a[14 - h // 2:14 - h // 2 + h, 14 - w // 2:14 - w // 2 + w] = rng.integers(150, 255)
    out = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def multipart_request(host: str, port: int, image: bytes | list[bytes], path: str = "/api/predict",
                      field: str = "file", close: bool = True) -> bytes:
    """A raw HTTP request posting ``image`` (or several, each in its own part) as multipart/form-data;
    ``close=False`` leaves out the closing boundary (a malformed body)."""
    boundary = uuid.uuid4().hex
    body = b"".join((f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="image.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n").encode() + img + b"\r\n"
                    for img in (image if isinstance(image, list) else [image]))
    body += f"--{boundary}--\r\n".encode() if close else b""
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def _encode(a, fmt: str = "PNG", **kw) -> bytes:
    from PIL import Image

    im = Image.fromarray(a) if isinstance(a, np.ndarray) else a
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _png_bomb(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height pixels, a few KB on the wire."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def odd_images(good: list[bytes]) -> list[bytes]:
    """Valid uploads that are not plain 8-bit grey PNGs: the server must answer each 200."""
    from PIL import Image, ImageDraw

    photo = Image.new("RGB", (2000, 1500), (235, 232, 228))
    ImageDraw.Draw(photo).rectangle((600, 300, 1400, 1300), fill=(40, 50, 90))
    garment = Image.open(io.BytesIO(good[0])).convert("L")
    rgba = garment.convert("RGBA")
    rgba.putalpha(garment.point(lambda v: 255 if v > 40 else 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [garment.convert("P"), Image.new("P", garment.size, 0)]
    return [_encode(photo.convert("CMYK"), "JPEG"), _encode(np.asarray(garment).astype(np.uint16) * 257),
            _encode(rgba), _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
            _encode(photo, "JPEG", exif=exif.tobytes(), quality=85), _encode(photo.resize((400, 300)), "WEBP"),
            _encode(garment, "BMP"), _encode(garment.convert("RGB"), "TIFF"), _encode(np.array([[200]], np.uint8))]


def hostile_requests(host: str, port: int, good: bytes) -> list[bytes]:
    """Requests an attacker would send within the body limit; a 4xx (or a 200) is the right answer to each."""
    big = np.full((5000, 8000, 4), 230, np.uint8)  # 40 megapixels, 160 MB decoded, < 1 MB on the wire
    big[1000:4000, 2000:6000, :3] = 30
    thin16 = _encode(np.zeros((1, 2_000_000), np.uint16))  # 4 KB
    thin_float = _encode(np.zeros((1, 2_000_000), np.float32), "TIFF", compression="tiff_adobe_deflate")
    rng = np.random.default_rng(1)
    uploads = [_png_bomb(20000, 20000), thin16, thin_float, _encode(big), good[: len(good) // 2],
               rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), b"%PDF-1.7\n" + bytes(300)]
    return ([multipart_request(host, port, u) for u in uploads]
            + [multipart_request(host, port, [thin16] * 8, path="/api/predict/batch"),
               multipart_request(host, port, [good, good]),  # two 'file' fields on /api/predict
               multipart_request(host, port, good, close=False),  # no closing boundary
               multipart_request(host, port, good, field="image")])  # no 'file' field


def mixed_requests(host: str, port: int, images: list[bytes]) -> list[tuple[str, bytes]]:
    """(kind, request) in a fixed shuffled order: 70 % good, 20 % odd, 10 % hostile."""
    good = [("good", multipart_request(host, port, img)) for img in images]
    odd = [("odd", multipart_request(host, port, img)) for img in odd_images(images)]
    hostile = [("hostile", r) for r in hostile_requests(host, port, images[0])]
    n = 10 * max(len(hostile), len(odd) // 2 + 1)
    mix = ([good[i % len(good)] for i in range(7 * n // 10)] + [odd[i % len(odd)] for i in range(2 * n // 10)]
           + [hostile[i % len(hostile)] for i in range(n // 10)])
    order = np.random.default_rng(0).permutation(len(mix))
    return [mix[i] for i in order]


# --- the load client ----------------------------------------------------------------------------------------

async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
            body += await reader.readexactly(size + 2)
            body = body[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", 0)))
    return status, headers, body


async def client(host, port, requests, next_index, deadline, timeout, stats):
    """Send requests[i] for each i handed out, on one keep-alive connection; record (kind, seconds, outcome)."""
    reader = writer = None
    while (i := next_index()) is not None:
        if time.monotonic() > deadline:
            break
        kind, payload = requests[i % len(requests)]
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(payload)
            status, headers, body = await asyncio.wait_for(read_response(reader), timeout)
            outcome = f"HTTP {status}"
            if status == 200 and not _answers(json.loads(body)):
                outcome = "bad JSON"
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            outcome = type(e).__name__
            if writer is not None:
                writer.close()
            writer = None
        stats.append((kind, time.perf_counter() - start, outcome))
    if writer is not None:
        writer.close()


def _answers(data) -> bool:
    results = data if isinstance(data, list) else [data]
    return bool(results) and all(isinstance(r, dict) and "label" in r for r in results)


async def load(host: str, port: int, requests: list[tuple[str, bytes]], n: int, concurrency: int, warmup: int,
               time_limit: float, timeout: float) -> dict:
    for _phase, count in (("warm-up", warmup), ("measure", n)):
        next_index = functools.partial(next, iter(range(count)), None)  # shared by the clients: None = done
        stats: list[tuple[str, float, str]] = []
        deadline = time.monotonic() + time_limit
        start = time.perf_counter()
        await asyncio.gather(*(client(host, port, requests, next_index, deadline, timeout, stats)
                               for _ in range(min(concurrency, max(count, 1)))))
        wall = time.perf_counter() - start
    innocent = [(s, o) for k, s, o in stats if k != "hostile"]
    ms = np.array([s for s, _ in innocent]) * 1000 if innocent else np.zeros(1)
    errors = collections.Counter(o for _, o in innocent if o != "HTTP 200")
    result = {"requests": len(stats), "asked": n, "concurrency": concurrency, "seconds": round(wall, 3),
              "requests_per_s": round(len(stats) / wall, 1) if wall > 0 else 0.0,
              "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
              "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
              "errors": sum(errors.values()), "error_kinds": dict(errors), "stopped_early": len(stats) < n}
    kinds = sorted({k for k, _, _ in stats})
    if kinds != ["good"]:  # --mixed: latencies above are those of good and odd uploads
        result["innocent_failures"] = result.pop("errors")
        result["outcomes"] = {k: dict(collections.Counter(o for kk, _, o in stats if kk == k)) for k in kinds}
        result["hostile_server_errors"] = sum(1 for k, _, o in stats if k == "hostile"
                                              and not (o.startswith("HTTP 4") or o == "HTTP 200"))
    return result


# --- an attacker (--attacker) ----------------------------------------------------------------------------------

ATTACKER_ADDRESS = "127.0.0.2"  # another loopback address: the server sees another client


def costly_uploads() -> list[bytes]:
    """The costliest uploads we know under the default limits: a progressive JPEG whose smallest scan is
    repeated 1,000 times (decoding it would take seconds; refused from its structure), one with as many scans
    as the pixel-pass budget allows at 6000x6000, and a 40-megapixel PNG."""
    import re

    from PIL import Image

    from fmnist.core.images import MAX_DECODE_WORK, MAX_PIXELS

    def progressive(size: int, repeats: int) -> bytes:
        buf = io.BytesIO()
        Image.new("L", (size, size), 128).save(buf, "JPEG", progressive=True)
        data = buf.getvalue()
        starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
        end = data.rfind(b"\xff\xd9")
        smallest = min((data[a:b] for a, b in zip(starts[1:], starts[2:] + [end])), key=len)
        return data[:end] + smallest * repeats + data[end:]

    base_scans = progressive(64, 0).count(b"\xff\xda")
    under = MAX_DECODE_WORK // (6000 * 6000) - base_scans
    big = io.BytesIO()
    h, w = 5000, MAX_PIXELS // 5000
    Image.fromarray(((np.arange(h)[:, None] + np.arange(w)[None, :]) % 251).astype(np.uint8)).save(big, "PNG")
    return [progressive(2000, 1000), progressive(6000, max(under, 0)), big.getvalue()]


async def repost(host: str, port: int, payloads: list[bytes], stop: asyncio.Event, counts: collections.Counter):
    """Post the costly uploads again and again from the attacker's address, one at a time."""
    i = 0
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(ATTACKER_ADDRESS, 0))
            writer.write(payloads[i % len(payloads)])
            status, _, _ = await asyncio.wait_for(read_response(reader), 60)
            counts[f"repost HTTP {status}"] += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
            counts[f"repost {type(e).__name__}"] += 1
            await asyncio.sleep(0.05)
        finally:
            if writer is not None:
                writer.close()
        i += 1


async def slow_socket(host: str, port: int, body: bool, stop: asyncio.Event, counts: collections.Counter):
    """One socket trickling a header line (or, with ``body``, an upload's body) a byte a second, reconnecting
    a second after the server closes it."""
    head = (f"POST /api/predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n").encode()
    while not stop.is_set():
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port, local_addr=(ATTACKER_ADDRESS, 0))
            counts["slow connections"] += 1
            writer.write(head + b"\r\n--b\r\n" if body else head + b"X-Slow: ")
            while not stop.is_set() and not reader.at_eof():
                writer.write(b"x")
                await writer.drain()
                try:
                    answer = await asyncio.wait_for(reader.read(65536), 1.0)
                    if answer[:12].startswith(b"HTTP/1.1 "):
                        counts[f"slow HTTP {answer[9:12].decode()}"] += 1
                except TimeoutError:
                    pass
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(1.0)


async def attack(host: str, port: int, mode: str, sockets: int, ready, stop) -> dict:
    """Run the attacker's ``mode`` (repost, slow, both), ``ready`` set once its uploads are built, until ``stop``
    (multiprocessing Events) is set."""
    done, counts = asyncio.Event(), collections.Counter()
    tasks = []
    if mode in ("repost", "both"):
        payloads = [multipart_request(host, port, img) for img in costly_uploads()]
        tasks += [asyncio.ensure_future(repost(host, port, payloads, done, counts)) for _ in range(2)]
    if mode in ("slow", "both"):
        tasks += [asyncio.ensure_future(slow_socket(host, port, i % 4 == 0, done, counts)) for i in range(sockets)]
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    done.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dict(counts)


def _attacker_main(host, port, mode, sockets, ready, stop, results) -> None:
    results.put(asyncio.run(attack(host, port, mode, sockets, ready, stop)))


async def load_attacked(host, port, requests, args, mode: str) -> dict:
    """The ordinary clients' figures while an attacker (another address) runs ``mode``: repost, slow, both.

    The attacker runs in a process of its own, as it would on its own machine: in the ordinary clients'
    event loop its writes and 300 sockets would slow the measuring client, not only the server."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    attacker = ctx.Process(target=_attacker_main, daemon=True,
                           args=(host, port, mode, args.attacker_sockets, ready, stop, results))
    attacker.start()
    if not await asyncio.get_running_loop().run_in_executor(None, ready.wait, 120):
        raise SystemExit("the attacker process did not start")
    await asyncio.sleep(3)  # the attack in place before the ordinary clients start
    try:
        result = await load(host, port, requests, args.requests, args.concurrency, args.warmup, args.time_limit,
                            args.timeout)
    finally:
        stop.set()
        try:
            counts = await asyncio.get_running_loop().run_in_executor(None, functools.partial(results.get,
                                                                                              timeout=60))
        except Exception as e:  # noqa: BLE001 - queue.Empty, or the attacker process died
            counts = {"attacker failed": repr(e)}
        attacker.join(10)
    result["attacker"] = counts
    return result


def peak_memory_mb(pid: int) -> dict:
    """Peak and current resident memory of a process on this machine, from /proc (Linux)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out["server_peak_rss_mb" if key == "VmHWM" else "server_rss_mb"] = round(int(value.split()[0]) / 1024)
    except OSError:
        pass
    return out


def loopback_address(url: str) -> tuple[str, int]:
    """(host, port) of an http:// URL, refusing anything that is not a loopback address."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise SystemExit(f"--url must look like http://127.0.0.1:8000, got {url!r}")
    for info in socket.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM):
        if not ipaddress.ip_address(info[4][0]).is_loopback:
            raise SystemExit(f"refusing to load {parts.hostname}: this benchmark only targets loopback addresses")
    return parts.hostname, parts.port or 80


# --- a server of our own (--run) ------------------------------------------------------------------------------

def start_server(run: str, threads: int, max_concurrency: int, backend: str = "auto") -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fmnist.apps.serve", run, "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(threads), "--max-concurrency", str(max_concurrency), "--backend", backend, "--no-access-log",
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited during start-up (status {proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/api/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("the server did not start within 60 s")


# --- in-process ---------------------------------------------------------------------------------------------

def in_process(run: str, images: list[bytes], repeat: int, backend: str = "auto") -> dict:
    """Latency of one request's work without HTTP, of the Python API, and of the model alone."""
    import fmnist
    from fmnist.apps.serve.inference import classify_batch, prepare_upload, single_threaded_compute
    from fmnist.core.forward import forward
    from fmnist.core.images import MAX_PIXELS

    plain = fmnist.load(run, backend=backend)
    served = fmnist.load(run, backend=backend, fold_bn=True)  # as the server loads it
    single_threaded_compute()  # as the server runs it: one thread for the model and for NumPy's BLAS
    x = np.zeros((1, 1, 28, 28), np.float32)

    def model_only():
        forward(served.backend, x, tta=served.run.tta)

    cases = {
        "server work (decode, preprocess, model, PNG)": lambda i: classify_batch(
            served, [[prepare_upload(served, images[i % len(images)], MAX_PIXELS)]]),
        "Predictor.predict(png bytes), as loaded": lambda i: plain.predict(images[i % len(images)]),
        "model forward only (1 image, with its mirror if TTA)": lambda i: model_only(),
    }
    out = {"model": plain.run.model_name, "backend": served.backend.name, "tta": plain.run.tta, "repeat": repeat}
    for name, fn in cases.items():
        for i in range(min(50, repeat)):
            fn(i)
        times = []
        for i in range(repeat):
            start = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - start)
        ms = np.array(times) * 1000
        out[name] = {f"p{q}_ms": round(float(np.percentile(ms, q)), 3) for q in (50, 95, 99)}
    return out


# --- main ---------------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, on a loopback address (e.g. http://127.0.0.1:8000)")
    target.add_argument("--run", help="start `python -m fmnist.apps.serve RUN` on a free loopback port and load it")
    target.add_argument("--in-process", metavar="RUN", help="time one prediction in this process, no HTTP")
    p.add_argument("-n", "--requests", type=int, default=2000, help="requests to measure (default: 2000)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent clients (default: 16)")
    p.add_argument("--warmup", type=int, default=100, help="requests sent first and not counted (default: 100)")
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="stop sending after this many seconds (default: 120)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for one answer (default: 10)")
    p.add_argument("--repeat", type=int, default=1000, help="--in-process: timed calls per case (default: 1000)")
    p.add_argument("--threads", type=int, default=1, help="--run: server inference threads (default: 1)")
    p.add_argument("--max-concurrency", type=int, default=32,
                   help="--run: server's limit of predictions in flight (default: 32)")
    p.add_argument("--image", action="append", default=[], help="image file to send (repeatable; default: "
                   "64 official test images, or synthetic ones without the data set)")
    p.add_argument("--mixed", action="store_true",
                   help="mix odd and hostile uploads with the good ones; report innocent failures, the p99 of "
                        "the good and odd ones and the server's peak memory (default: good uploads only)")
    p.add_argument("--attacker", choices=["repost", "slow", "both"], default=None,
                   help="measure the ordinary clients alone, then while an attacker from 127.0.0.2 re-posts the "
                        "costliest uploads (repost), holds --attacker-sockets slow sockets (slow), or both")
    p.add_argument("--attacker-sockets", type=int, default=300,
                   help="--attacker slow/both: slow sockets the attacker holds (default: 300)")
    p.add_argument("--server-pid", type=int, default=None,
                   help="--url: the server's process id on this machine, to read its peak memory (default: none)")
    p.add_argument("--backends", default="auto",
                   help="comma-separated inference backends to measure one after the other, in this invocation: "
                        "torch, onnx, auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--check", action="store_true", help="exit with status 1 if a goal is missed")
    args = p.parse_args(argv)
    if not (0 < args.requests <= MAX_REQUESTS and 0 < args.concurrency <= MAX_CONCURRENCY
            and 0 < args.time_limit <= MAX_SECONDS and 0 < args.repeat <= MAX_REQUESTS
            and 0 <= args.attacker_sockets <= 1000):
        p.error(f"keep it bounded: requests/repeat 1-{MAX_REQUESTS}, concurrency 1-{MAX_CONCURRENCY}, "
                f"time limit up to {MAX_SECONDS} s, attacker sockets up to 1000")
    images = sample_images(args.image)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.url and backends != ["auto"]:
        p.error("--backends applies to --run and --in-process (a running server has its own)")
    ok = True
    for backend in backends:
        print(f"== backend {backend}", flush=True)
        ok &= measure(args, images, backend)
    return 0 if ok or not args.check else 1


def measure(args, images: list[bytes], backend: str) -> bool:
    """One measurement (in-process, or HTTP against --url or a server of our own); whether its goal was met."""
    if args.in_process:
        result = in_process(args.in_process, images, args.repeat, backend)
        p50 = result["server work (decode, preprocess, model, PNG)"]["p50_ms"]
        ok = p50 <= GOAL_IN_PROCESS_P50_MS
        report(result, args.json, f"goal: server work p50 <= {GOAL_IN_PROCESS_P50_MS:g} ms: "
                                  f"{'met' if ok else 'MISSED'}")
        return ok
    proc = None
    url = args.url
    if args.run:
        proc, url = start_server(args.run, args.threads, args.max_concurrency, backend)
    try:
        host, port = loopback_address(url)
        requests = (mixed_requests(host, port, images) if args.mixed
                    else [("good", multipart_request(host, port, img)) for img in images])
        result = asyncio.run(load(host, port, requests, args.requests, args.concurrency, args.warmup,
                                  args.time_limit, args.timeout))
        if args.attacker:
            attacked = asyncio.run(load_attacked(host, port, requests, args, args.attacker))
            result = {"idle": result, "attacked": attacked,
                      "throughput_kept": round(attacked["requests_per_s"] / max(result["requests_per_s"], 1e-9), 3),
                      "p99_ratio": round(attacked["p99_ms"] / max(result["p99_ms"], 1e-9), 2),
                      "answered_200_share": round(1 - attacked["errors"] / max(attacked["requests"], 1), 4)}
        pid = proc.pid if proc is not None else args.server_pid
        if pid is not None:
            result.update(peak_memory_mb(pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
    result["url"] = url
    ok, verdict = attack_goals(result) if args.attacker else goals(result, args.mixed)
    report(result, args.json, verdict)
    return ok


def goals(result: dict, mixed: bool) -> tuple[bool, str]:
    """Whether the load test met its goals, and a line saying so."""
    if not mixed:
        ok = (result["errors"] == 0 and result["p99_ms"] <= GOAL_P99_MS and result["requests_per_s"] >= GOAL_RPS
              and not result["stopped_early"])
        return ok, (f"goal: 0 errors, p99 <= {GOAL_P99_MS:g} ms and >= {GOAL_RPS:g} requests/s: "
                    f"{'met' if ok else 'MISSED'}")
    peak = result.get("server_peak_rss_mb")
    ok = (result["innocent_failures"] == 0 and result["hostile_server_errors"] == 0
          and result["p99_ms"] <= GOAL_P99_MS and not result["stopped_early"]
          and (peak is None or peak <= GOAL_PEAK_RSS_MB))
    return ok, (f"goal: 0 innocent failures, 0 server errors on hostile uploads, p99 <= {GOAL_P99_MS:g} ms, "
                f"peak memory <= {GOAL_PEAK_RSS_MB} MB{'' if peak is not None else ' (not measured)'}: "
                f"{'met' if ok else 'MISSED'}")


def attack_goals(result: dict) -> tuple[bool, str]:
    """Under attack: >= 80 % of the idle throughput, p99 <= 3x idle, >= 95 % of ordinary requests answered."""
    ok = (result["throughput_kept"] >= 0.8 and result["p99_ratio"] <= 3.0 and result["answered_200_share"] >= 0.95)
    return ok, ("goal under attack: >= 80 % of idle throughput, p99 <= 3x idle, >= 95 % answered 200: "
                f"{'met' if ok else 'MISSED'}")


def report(result: dict, as_json: bool, verdict: str) -> None:
    if as_json:
        print(json.dumps({**result, "verdict": verdict}))
        return
    for key, value in result.items():
        print(f"{key:<48} {value}")
    print(verdict)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
