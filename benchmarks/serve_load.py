#!/usr/bin/env python
"""Load test of the prediction server, and the in-process cost of one prediction.

    # against a server you started (fmnist serve RUN --no-access-log):
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 -n 2000 -c 16
    # start one on a free loopback port, load it, stop it:
    python benchmarks/serve_load.py --run RUN -n 2000 -c 16
    # no HTTP: what one request costs the server (decode, preprocess, model, PNG of what it saw):
    python benchmarks/serve_load.py --in-process RUN

The client is a small asyncio HTTP/1.1 client with one keep-alive connection per concurrent client and
the requests encoded in advance, so that it takes as little CPU as possible from the server it measures
(they share the machine). It only talks to loopback addresses. Requests cycle through official test
images (PNG) when the data set is present, else synthetic images, or the files given with --image.
Goals (--check makes the exit status say whether they are met): 0 errors, p99 <= 30 ms at 16 concurrent
clients; in-process p50 <= 2 ms.
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
GOAL_P99_MS = 30.0
GOAL_IN_PROCESS_P50_MS = 2.0
MAX_REQUESTS, MAX_CONCURRENCY, MAX_SECONDS = 100_000, 256, 600


# --- inputs ---------------------------------------------------------------------------------------------

def sample_images(paths: list[str], count: int = 64) -> list[bytes]:
    """PNG/JPEG bytes to send: the given files, else official test images, else synthetic ones."""
    if paths:
        return [Path(p).read_bytes() for p in paths]
    from PIL import Image

    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        from fmnist.data import read_idx

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


def multipart_request(host: str, port: int, image: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /api/predict HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


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


async def client(host, port, requests, next_index, deadline, timeout, latencies, errors):
    reader = writer = None
    while (i := next_index()) is not None:
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(requests[i % len(requests)])
            status, headers, body = await asyncio.wait_for(read_response(reader), timeout)
            if status != 200:
                errors[f"HTTP {status}"] += 1
            elif "label" not in json.loads(body):
                errors["bad JSON"] += 1
            if headers.get("connection", "").lower() == "close":
                writer.close()
                writer = None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            errors[type(e).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
        latencies.append(time.perf_counter() - start)
    if writer is not None:
        writer.close()


async def load(host: str, port: int, images: list[bytes], n: int, concurrency: int, warmup: int,
               time_limit: float, timeout: float) -> dict:
    requests = [multipart_request(host, port, img) for img in images]
    for _phase, count in (("warm-up", warmup), ("measure", n)):
        next_index = functools.partial(next, iter(range(count)), None)  # shared by the clients: None = done
        latencies: list[float] = []
        errors: collections.Counter = collections.Counter()
        deadline = time.monotonic() + time_limit
        start = time.perf_counter()
        await asyncio.gather(*(client(host, port, requests, next_index, deadline, timeout, latencies, errors)
                               for _ in range(min(concurrency, max(count, 1)))))
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": len(latencies), "asked": n, "concurrency": concurrency, "seconds": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 1) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
            "errors": sum(errors.values()), "error_kinds": dict(errors),
            "stopped_early": len(latencies) < n}


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

def start_server(run: str, threads: int, max_concurrency: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "fmnist.serve", run, "--host", "127.0.0.1", "--port", str(port),
           "--threads", str(threads), "--max-concurrency", str(max_concurrency), "--no-access-log",
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

def in_process(run: str, images: list[bytes], repeat: int) -> dict:
    """Latency of one request's work without HTTP, of the Python API, and of the model alone."""
    import fmnist
    from fmnist.forward import forward
    from fmnist.images import MAX_PIXELS
    from fmnist.serve.inference import run_batch, single_threaded_compute

    single_threaded_compute()  # as the server runs it: one PyTorch and one BLAS thread
    plain = fmnist.load(run)
    served = fmnist.load(run, fold_bn=True)  # as the server loads it
    x = np.zeros((1, 1, 28, 28), np.float32)

    def model_only():
        forward(served.backend, x, tta=served.run.tta)

    cases = {
        "server work (decode, preprocess, model, PNG)": lambda i: run_batch(
            served, [[("image.png", images[i % len(images)])]], MAX_PIXELS),
        "Predictor.predict(png bytes), as loaded": lambda i: plain.predict(images[i % len(images)]),
        "model forward only (1 image, with its mirror if TTA)": lambda i: model_only(),
    }
    out = {"model": plain.run.model_name, "tta": plain.run.tta, "repeat": repeat}
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
    target.add_argument("--run", help="start `python -m fmnist.serve RUN` on a free loopback port and load it")
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
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--check", action="store_true", help="exit with status 1 if a goal is missed")
    args = p.parse_args(argv)
    if not (0 < args.requests <= MAX_REQUESTS and 0 < args.concurrency <= MAX_CONCURRENCY
            and 0 < args.time_limit <= MAX_SECONDS and 0 < args.repeat <= MAX_REQUESTS):
        p.error(f"keep it bounded: requests/repeat 1-{MAX_REQUESTS}, concurrency 1-{MAX_CONCURRENCY}, "
                f"time limit up to {MAX_SECONDS} s")
    images = sample_images(args.image)

    if args.in_process:
        result = in_process(args.in_process, images, args.repeat)
        p50 = result["server work (decode, preprocess, model, PNG)"]["p50_ms"]
        ok = p50 <= GOAL_IN_PROCESS_P50_MS
        report(result, args.json, f"goal: server work p50 <= {GOAL_IN_PROCESS_P50_MS:g} ms: "
                                  f"{'met' if ok else 'MISSED'}")
        return 0 if ok or not args.check else 1

    proc = None
    url = args.url
    if args.run:
        proc, url = start_server(args.run, args.threads, args.max_concurrency)
    try:
        host, port = loopback_address(url)
        result = asyncio.run(load(host, port, images, args.requests, args.concurrency, args.warmup,
                                  args.time_limit, args.timeout))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
    result["url"] = url
    ok = result["errors"] == 0 and result["p99_ms"] <= GOAL_P99_MS and not result["stopped_early"]
    report(result, args.json, f"goal: 0 errors and p99 <= {GOAL_P99_MS:g} ms: {'met' if ok else 'MISSED'}")
    return 0 if ok or not args.check else 1


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
