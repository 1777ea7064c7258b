"""The server and its image path under hostile input: bounded memory per image, one bad request never failing
another, connection limits against slow or oversized clients, and the small protocol items (Host allow-list,
JSON everywhere, duplicate fields, unterminated bodies, settings in one place).

Socket tests talk to a real uvicorn server on 127.0.0.1 only, with bounded loops and short timeouts."""
from __future__ import annotations

import asyncio
import errno
import http.client
import io
import json
import logging
import socket
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
with warnings.catch_warnings():  # Starlette suggests httpx2 over httpx; both work
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from fmnist import CLASS_NAMES
from fmnist.apps.serve.app import create_app
from fmnist.apps.serve.background import serve_in_thread
from fmnist.core.images import MAX_PIXELS, decode_image
from fmnist.core.preprocess import to_dataset_format

SRC = Path(__file__).resolve().parents[1] / "src"


def encode(a: np.ndarray | Image.Image, fmt: str = "PNG", **kw) -> bytes:
    im = Image.fromarray(a) if isinstance(a, np.ndarray) else a
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def garment_png(synthetic_data) -> bytes:
    return encode(synthetic_data.test_images[0].numpy())


def local_client(app) -> TestClient:
    return TestClient(app, base_url="http://localhost")


def assert_json_error(status: int, body: bytes, expected: int, *words: str) -> str:
    assert status == expected, body
    detail = json.loads(body)["detail"]
    for w in words:
        assert w in detail.lower(), detail
    return detail


# --- 1. tiny files that decode to extreme shapes ------------------------------------------------------------

EXTREME = {  # each a few KB on the wire
    "16-bit PNG 1x100000": lambda: encode(np.arange(100_000, dtype=np.uint16).reshape(1, -1) * 7),
    "16-bit PNG 1x2000000": lambda: encode(np.zeros((1, 2_000_000), np.uint16)),
    "16-bit PNG 2000000x1": lambda: encode(np.zeros((2_000_000, 1), np.uint16)),
    "float TIFF 1x2000000": lambda: encode(np.zeros((1, 2_000_000), np.float32), "TIFF",
                                           compression="tiff_adobe_deflate"),
    "8-bit PNG 3x2000000 RGBA": lambda: encode(np.zeros((3, 2_000_000, 4), np.uint8)),
}


@pytest.mark.parametrize("kind", list(EXTREME))
def test_extreme_shapes_are_prepared_without_large_intermediates(kind):
    data = EXTREME[kind]()
    assert len(data) < 50_000
    image = decode_image(data)
    tracemalloc.start()
    try:
        out = to_dataset_format(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.shape == (28, 28) and out.dtype == np.uint8
    # NumPy's arrays (tracked by tracemalloc): a few tiles, never a copy sized by the image's width. (Before,
    # the framing step padded a 1x100000 strip by width/56 on each side: 1.5 GB.)
    assert peak < 16e6, f"{peak / 1e6:.0f} MB"


def test_large_image_costs_little_more_than_its_decoded_pixels(tmp_path):
    """A fresh process decodes and prepares a 12-megapixel RGBA PNG: its peak memory grows by the decoded
    pixels (48 MB) and a fixed amount, not by copies of them (by 99 MB more than the pixels before)."""
    path = tmp_path / "big.png"
    a = np.full((3000, 4000, 4), 230, np.uint8)
    a[800:2200, 1000:3000, :3] = 20
    a[..., 3] = 255
    a[:100, :100, 3] = 0  # some transparency: the LA path, the costliest
    Image.fromarray(a).save(path, compress_level=1)
    script = textwrap.dedent(f"""
        from fmnist.core.images import decode_image
        from fmnist.core.preprocess import to_dataset_format
        data = open({str(path)!r}, "rb").read()
        def status(key):
            return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                        if line.startswith(key + ":"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        base = status("VmRSS")
        out = to_dataset_format(decode_image(data))
        print(status("VmHWM") - base)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    if "clear_refs" in done.stderr:
        pytest.skip("this system cannot reset a process's peak memory (/proc/self/clear_refs)")
    assert done.returncode == 0, done.stderr
    grew = int(done.stdout.split()[-1])
    decoded = 3000 * 4000 * 4
    # The decoded pixels, plus the working arrays at the fixed working size (1024 px a side): about 35 MB.
    assert grew < decoded + 48e6, f"peak grew by {grew / 1e6:.0f} MB for {decoded / 1e6:.0f} MB of pixels"


def _photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.integers(150, 256, (h, w, 4), dtype=np.uint8)
    a[h // 4:3 * h // 4, w // 3:2 * w // 3, :3] = rng.integers(0, 90, (3 * h // 4 - h // 4, 2 * w // 3 - w // 3, 3))
    return a


@pytest.mark.parametrize("mode", ["RGBA", "P+transparency", "CMYK", "L"])
def test_tiled_conversion_gives_exactly_the_whole_image_result(mode):
    from fmnist.core.preprocess import _factors, _luma, _shrink_pil, _tiled_reduce

    a = _photo(2501, 1733)
    im = Image.fromarray(a)
    if mode == "P+transparency":
        im = im.convert("RGB").convert("P")
        im.info["transparency"] = 5
    elif mode != "RGBA":
        im = im.convert(mode)
    whole = _shrink_pil(_luma(im), _factors(*im.size, 1024))
    assert np.array_equal(np.asarray(_tiled_reduce(im, 1024)), np.asarray(whole))


@pytest.mark.parametrize("dtype", ["uint16", "int32", "float32", "float32-wild"])
def test_tiled_wide_modes_give_exactly_the_whole_image_result(dtype):
    from fmnist.core.preprocess import _array_planes, _shrink, _wide_planes

    g = _photo(2203, 1501)[..., 0].astype(np.float64)
    a = {"uint16": g * 257, "int32": g * 1000 - 7, "float32": g / 255, "float32-wild": g * 3}[dtype]
    a = a.astype(dtype.split("-")[0])
    if dtype == "float32-wild":
        a[0, 0], a[5, 9] = np.nan, np.inf
    im = Image.fromarray(a)
    expected = _shrink(_array_planes(np.asarray(im))[0], 1024)
    got, alpha = _wide_planes(im, 1024)
    assert alpha is None and np.array_equal(got, expected)


def test_thin_arrays_shrink_along_their_long_side():
    from fmnist.core.preprocess import _shrink

    assert _shrink(np.ones((1, 100_000)), 1024).shape == (1, 1020)
    assert _shrink(np.ones((100_000, 3)), 1024).shape == (1020, 1)
    assert _shrink(np.ones((2000, 1500)), 1024).shape == (1000, 750)  # ordinary shapes as before


def test_extreme_shapes_through_the_server(trained_run, garment_png):
    with local_client(create_app(trained_run)) as c:
        for kind, make in EXTREME.items():
            r = c.post("/api/predict", files={"file": ("x", make(), "application/octet-stream")})
            assert r.status_code == 200, (kind, r.text)
        assert c.post("/api/predict", files={"file": ("g.png", garment_png, "image/png")}).status_code == 200


# --- 2. one image's failure is its own ----------------------------------------------------------------------

def _batcher_run(predictor, requests, workers=1):
    from fmnist.apps.serve.batching import Batcher

    async def go():
        batcher = Batcher(predictor, max_pixels=MAX_PIXELS, workers=workers)
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)

    return asyncio.run(go())


def _marker_png() -> bytes:
    a = np.zeros((28, 28), np.uint8)
    a[3:25, 9:19] = 250
    a[3, 9] = 77
    return encode(a)


def _break_model_on(predictor, monkeypatch, marker28: np.ndarray, error: type[Exception]):
    """The model call raises ``error`` whenever its batch holds ``marker28``: a bug tied to one image."""
    real = predictor.analyse

    def analyse(batch):
        if any(np.array_equal(img, marker28) for img in batch):
            raise error("an injected bug")
        return real(batch)

    monkeypatch.setattr(predictor, "analyse", analyse)


@pytest.mark.parametrize("error", [RuntimeError, ValueError, OSError])
def test_a_bug_in_the_model_call_fails_only_its_request(trained_run, synthetic_data, monkeypatch, caplog, error):
    import fmnist
    from fmnist.apps.serve.inference import UploadError

    predictor = fmnist.load(trained_run)
    marker = _marker_png()
    _break_model_on(predictor, monkeypatch, predictor.to_image28(marker), error)
    pngs = [encode(synthetic_data.test_images[i].numpy()) for i in range(6)]
    requests = [[("a.png", pngs[0])], [("b.png", pngs[1]), ("c.png", pngs[2])],
                [("m.png", marker)], [("d.png", pngs[3]), ("m.png", marker)], [("e.png", pngs[4])]]
    with caplog.at_level(logging.ERROR, logger="fmnist.apps.serve"):
        out = _batcher_run(predictor, requests)
    for k in (2, 3):
        assert isinstance(out[k], UploadError) and out[k].status == 500, out[k]  # a bug is a 500, not a 400
    assert any(r.exc_info and r.exc_info[0] is error for r in caplog.records)  # logged with its traceback
    for k, png in ((0, pngs[0]), (1, pngs[1]), (1, pngs[2]), (4, pngs[4])):
        got = out[k][0] if png is not pngs[2] else out[k][1]
        expected = fmnist.load(trained_run).predict(png)
        assert got["label"] == expected["label"]
        assert got["score"] == pytest.approx(expected["score"], abs=1e-5)


def test_a_bug_in_preparation_fails_only_its_request(trained_run, garment_png, monkeypatch):
    import fmnist
    from fmnist.apps.serve.inference import UploadError

    predictor = fmnist.load(trained_run)
    real = predictor.to_image28
    monkeypatch.setattr(predictor, "to_image28",
                        lambda im: (_ for _ in ()).throw(KeyError("bug")) if im.size == (13, 13) else real(im))
    odd = encode(np.zeros((13, 13), np.uint8))
    out = _batcher_run(predictor, [[("a.png", garment_png)], [("odd.png", odd)], [("b.png", garment_png)]])
    assert isinstance(out[1], UploadError) and out[1].status == 500
    assert out[0][0]["label"] in CLASS_NAMES and out[2][0]["label"] == out[0][0]["label"]


def test_hostile_uploads_among_innocent_ones(trained_run, synthetic_data):
    """The 4 KB 1x2,000,000 16-bit PNG that made 210 innocent requests fail, among good ones, at once."""
    import fmnist

    predictor = fmnist.load(trained_run)
    hostile = [EXTREME["16-bit PNG 1x2000000"](), EXTREME["float TIFF 1x2000000"](), b"\x89PNG garbage"]
    good = [encode(synthetic_data.test_images[i].numpy()) for i in range(6)]
    requests = [[(f"{i}", d)] for i, d in enumerate(good[:3] + hostile + good[3:])]
    out = _batcher_run(predictor, requests, workers=2)
    for r, (_, d) in zip(out, (req[0] for req in requests)):
        if d in good:
            assert isinstance(r, list) and r[0]["label"] == predictor.predict(d)["label"]
    assert getattr(out[5], "status", None) == 400  # the garbage: its own 400


def test_model_bug_over_http_is_a_json_500_and_the_connection_survives(trained_run, garment_png, monkeypatch):
    marker = _marker_png()
    with _server(trained_run) as (url, app):
        predictor = app.state.predictor
        _break_model_on(predictor, monkeypatch, predictor.to_image28(marker), RuntimeError)
        with _connection(url) as conn:
            status, body = _post(conn, marker)
            assert_json_error(status, body, 500, "internal server error")
            status, body = _post(conn, garment_png)  # same keep-alive connection
            assert status == 200 and json.loads(body)["label"] in CLASS_NAMES


def test_unhandled_error_anywhere_is_a_json_500(trained_run, garment_png, monkeypatch):
    with local_client(create_app(trained_run)) as c:
        async def broken(uploads):
            raise RuntimeError("a bug outside the per-image code")

        monkeypatch.setattr(c.app.state.batcher, "submit", broken)
        r = c.post("/api/predict", files={"file": ("g.png", garment_png, "image/png")})
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}
        assert c.get("/api/health").json() == {"status": "ok"}


# --- 3. memory per request ------------------------------------------------------------------------------

def test_memory_is_given_back_after_a_large_image():
    """In a fresh process, a 20-megapixel upload prepared on a worker thread as the server does: afterwards the
    process holds little more than before (glibc kept 30 MB per image, and 5 GB after a batch of them)."""
    script = textwrap.dedent("""
        import io, threading
        import numpy as np
        from PIL import Image
        from fmnist.core.predict import Predictor
        from fmnist.apps.serve.inference import prepare_upload
        a = np.full((4000, 5000, 4), 200, np.uint8)
        a[1000:3000, 1500:3500] = 20
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG", compress_level=1)
        data = buf.getvalue()
        del a, buf
        small = io.BytesIO()
        Image.new("L", (64, 64), 30).save(small, "PNG")
        def rss():
            return int(open("/proc/self/statm").read().split()[1]) * 4096
        def on_a_thread(payload):
            t = threading.Thread(target=prepare_upload, args=(Predictor, payload, 40_000_000))
            t.start()
            t.join()
        on_a_thread(small.getvalue())
        base = rss()
        on_a_thread(data)
        print(rss() - base)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    kept = int(done.stdout.split()[-1])
    assert kept < 12e6, f"{kept / 1e6:.0f} MB kept after the request"


def test_a_small_upload_waits_for_one_large_image_not_for_a_whole_batch(trained_run, garment_png, monkeypatch):
    """Uploads are prepared one job each, in order of arrival: a small request that arrives while a batch
    request's first image is being prepared goes next, before the batch's other images."""
    import fmnist
    from fmnist.apps.serve import inference

    predictor = fmnist.load(trained_run)
    order = []
    real = inference.prepare_upload

    def recording(p, data, max_pixels, **limits):
        order.append("small" if data == garment_png else "big")
        return real(p, data, max_pixels, **limits)

    monkeypatch.setattr(inference, "prepare_upload", recording)
    big = encode(Image.fromarray(_photo(1500, 1200)).convert("RGB"))
    out = _batcher_run(predictor, [[(f"b{i}.png", big) for i in range(6)], [("s.png", garment_png)]])
    assert all(isinstance(o, list) for o in out) and len(out[0]) == 6
    assert order.index("small") == 1, order


# --- 4. connection limits: a real server, real sockets, loopback only ------------------------------------------

@contextmanager
def _server(trained_run, **settings):
    app = create_app(trained_run, **settings)
    with serve_in_thread(app) as url:
        yield url, app


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("//")[1].split(":")
    assert host == "127.0.0.1"
    return host, int(port)


@contextmanager
def _connection(url: str):
    conn = http.client.HTTPConnection(*_address(url), timeout=20)
    try:
        yield conn
    finally:
        conn.close()


def _multipart(files: list[tuple[str, bytes]], boundary: str = "fmnistboundary") -> tuple[bytes, str]:
    parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="x.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + data + b"\r\n" for field, data in files)
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _post(conn, image: bytes, path: str = "/api/predict") -> tuple[int, bytes]:
    body, ctype = _multipart([("file", image)])
    conn.request("POST", path, body=body, headers={"Content-Type": ctype, "Host": "127.0.0.1"})
    r = conn.getresponse()
    return r.status, r.read()


def _raw(url: str, data: bytes = b"", wait: float = 10.0) -> tuple[int, bytes, float]:
    """Send ``data`` on a new connection and read until the server closes it: (status, body, seconds)."""
    start = time.monotonic()
    with socket.create_connection(_address(url), timeout=wait) as s:
        if data:
            s.sendall(data)
        received = b""
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0
    return status, body, time.monotonic() - start


HEAD = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture(scope="module")
def strict_server(trained_run):
    with _server(trained_run, header_timeout=0.5, body_timeout=0.5, keep_alive_timeout=0.5) as (url, app):
        yield url


def test_idle_keep_alive_connections_are_closed(strict_server):
    with socket.create_connection(_address(strict_server), timeout=10) as s:
        for _ in range(2):  # two requests on the connection, then silence
            s.sendall(HEAD + b"\r\n")
            answer = s.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" not in answer.lower()
        start = time.monotonic()
        assert s.recv(65536) == b""  # closed by the server, well before the socket's own 10 s timeout
        assert time.monotonic() - start < 8


def test_a_connection_that_sends_nothing_is_closed(strict_server):
    status, body, _ = _raw(strict_server)
    assert_json_error(status, body, 408, "headers not received within 0.5 s")


def test_slow_headers_are_cut_off(strict_server):
    with socket.create_connection(_address(strict_server), timeout=10) as s:
        s.sendall(HEAD)
        received = b""
        for _ in range(40):  # one header line every 0.1 s: would take 4 s
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.1)
        try:
            while chunk := s.recv(65536):
                received += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    assert received.startswith(b"HTTP/1.1 408"), received[:100]


def test_a_slow_body_is_cut_off(strict_server):
    head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    status, body, _ = _raw(strict_server, head)
    assert_json_error(status, body, 408, "body not received within 0.5 s")


@pytest.mark.parametrize("head, words", [
    (HEAD + b"X-Big: " + b"a" * 40_000 + b"\r\n\r\n", ["too large", "16,384"]),
    (HEAD + b"X-Big: " + b"a" * 40_000, ["too large"]),  # a header line that never ends
    (HEAD + b"".join(b"X-%d: 1\r\n" % i for i in range(150)) + b"\r\n", ["too many header fields", "100"]),
    (b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", ["too large"]),
], ids=["long-header", "endless-header", "many-headers", "long-url"])
def test_oversized_headers_get_431(strict_server, head, words):
    status, body, _ = _raw(strict_server, head)
    assert_json_error(status, body, 431, *words)


def test_protocol_errors_are_json(strict_server):
    status, body, _ = _raw(strict_server, b"NOT HTTP AT ALL\r\n\r\n")
    assert_json_error(status, body, 400, "invalid http request")
    status, body, _ = _raw(strict_server, HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert status in (400, 408)  # a broken chunked body: rejected by the parser, or never completed


def test_too_many_connections_get_503(trained_run):
    with _server(trained_run, max_connections=4) as (url, app):
        held = [socket.create_connection(_address(url), timeout=10) for _ in range(4)]
        try:
            status, body, _ = _raw(url, HEAD + b"\r\n")
            assert_json_error(status, body, 503, "connections")
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server notices the closes
            status, body, _ = _raw(url, HEAD + b"Connection: close\r\n\r\n")
            if status == 200:
                break
            time.sleep(0.05)
        assert status == 200


def test_trickling_uploads_do_not_stop_ordinary_requests(trained_run, garment_png):
    """40 connections sending their bodies a byte at a time; with --max-concurrency 4 (as in the report where
    four such sockets made every prediction get 503), ordinary predictions are still answered."""
    with _server(trained_run, max_concurrency=4, max_uploads_per_client=64,
                 max_connections_per_client=64) as (url, app):
        tricklers = []
        try:
            for _ in range(40):
                s = socket.create_connection(_address(url), timeout=10)
                s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n"
                          b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
                tricklers.append(s)
            stop = threading.Event()

            def trickle():
                for _ in range(100):  # at most 10 s
                    for s in tricklers:
                        s.send(b"x")
                    if stop.wait(0.1):
                        return

            t = threading.Thread(target=trickle, daemon=True)
            t.start()
            deadline = time.monotonic() + 10
            while app.state.uploads.active < 40 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert app.state.uploads.active == 40  # all forty are receiving their bodies
            with _connection(url) as conn:
                for _ in range(5):
                    status, body = _post(conn, garment_png)
                    assert status == 200, body
            assert app.state.gate.active == 0  # the tricklers hold no inference slot
            stop.set()
            t.join(5)
        finally:
            for s in tricklers:
                s.close()


# --- 5. Host allow-list, JSON, multipart, docs, limits quoted, settings ---------------------------------------

def test_host_allow_list(trained_run):
    app = create_app(trained_run)
    with TestClient(app, base_url="http://attacker.example") as c:
        r = c.get("/api/health")
        assert r.status_code == 400 and "attacker.example" in r.json()["detail"]
        assert c.get("/api/health", headers={"Host": "localhost:8000"}).status_code == 200
        assert c.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
        assert c.get("/api/health", headers={"Host": "127.0.0.1"}).status_code == 200
        assert c.get("/api/health", headers={"Host": "127.0.0.1.evil.example"}).status_code == 400
    with TestClient(create_app(trained_run, allowed_hosts=("Shop.Example",)), base_url="http://shop.example") as c:
        assert c.get("/api/health").status_code == 200
        assert c.get("/api/health", headers={"Host": "localhost"}).status_code == 400
    with TestClient(create_app(trained_run, allowed_hosts=("*",)), base_url="http://anything.example") as c:
        assert c.get("/api/health").status_code == 200


def test_default_allowed_hosts_follow_the_bound_address():
    from fmnist.apps.serve.settings import default_allowed_hosts

    assert default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert "192.168.1.5" in default_allowed_hosts("192.168.1.5")
    everywhere = default_allowed_hosts("0.0.0.0")
    assert "0.0.0.0" not in everywhere and socket.gethostname().lower() in everywhere
    assert "localhost" in everywhere


def test_two_file_fields_on_predict_are_refused(trained_run, garment_png):
    with local_client(create_app(trained_run)) as c:
        files = [("file", ("a.png", garment_png, "image/png")), ("file", ("b.png", garment_png, "image/png"))]
        r = c.post("/api/predict", files=files)
        assert r.status_code == 400 and "/api/predict/batch" in r.json()["detail"]
        assert c.post("/api/predict/batch", files=files).status_code == 200


def test_multipart_without_closing_boundary_gets_400(trained_run, garment_png):
    body, ctype = _multipart([("file", garment_png)])
    cut = body[: body.rindex(b"--fmnistboundary--")]
    with local_client(create_app(trained_run)) as c:
        r = c.post("/api/predict", content=cut, headers={"content-type": ctype})
        assert r.status_code == 400 and "closing boundary" in r.json()["detail"]
        assert c.post("/api/predict", content=body, headers={"content-type": ctype}).status_code == 200
        # The boundary split across network chunks is still found.
        chunks = iter([body[:-12], body[-12:]])
        r = c.post("/api/predict", content=chunks, headers={"content-type": ctype})
        assert r.status_code == 200, r.text


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG of width x height pixels that compresses to a few kilobytes."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp = zlib.compressobj(9)
    row = b"\x00" + bytes((width + 7) // 8)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_pixel_limit_messages_quote_the_servers_limit(trained_run):
    with local_client(create_app(trained_run, max_pixels=1_000_000)) as c:
        for size in ((20_000, 20_000), (12_000, 9_000), (1_001, 1_000)):  # past Pillow's error, warning, ours
            r = c.post("/api/predict", files={"file": ("x.png", _png_bomb(*size), "image/png")})
            assert r.status_code == 413
            detail = r.json()["detail"]
            assert "1,000,000" in detail and "178956970" not in detail and "89478485" not in detail, detail


def test_docs_are_off_unless_asked(trained_run):
    with local_client(create_app(trained_run)) as c:
        assert c.get("/docs").status_code == 404
        assert c.get("/docs").headers["content-type"].startswith("application/json")
        assert "/api/predict" in c.get("/openapi.json").json()["paths"]
    with local_client(create_app(trained_run, docs=True)) as c:
        assert c.get("/docs").status_code == 200


def test_full_disk_while_storing_an_upload_is_a_503(trained_run, garment_png, monkeypatch):
    import tempfile

    import starlette.formparsers

    class FullDisk(tempfile.SpooledTemporaryFile):
        def rollover(self):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", FullDisk)
    big = garment_png + bytes(2_000_000)  # past the 1 MB kept in memory: spooled to disk
    with local_client(create_app(trained_run)) as c:
        r = c.post("/api/predict", files={"file": ("x.png", big, "image/png")})
        assert r.status_code == 503 and "disk" in r.json()["detail"]
        assert c.post("/api/predict", files={"file": ("g.png", garment_png, "image/png")}).status_code == 200


@pytest.mark.parametrize("kwargs, flag", [
    ({"max_concurrency": 0}, "--max-concurrency"), ({"max_body": 0}, "--max-body-mb"),
    ({"header_timeout": float("nan")}, "--header-timeout"), ({"body_timeout": float("inf")}, "--body-timeout"),
    ({"threshold": float("nan")}, "--threshold"), ({"ood_threshold": float("nan")}, "--ood-threshold"),
    ({"allowed_hosts": ()}, "--allowed-hosts"), ({"threads": 1.5}, "--threads"),
])
def test_bad_settings_are_refused_in_one_place(tmp_path, kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        create_app(tmp_path, **kwargs)


@pytest.mark.parametrize("argv, flag", [
    (["--max-body-mb", "inf"], "--max-body-mb"), (["--max-body-mb", "nan"], "--max-body-mb"),
    (["--max-body-mb", "0"], "--max-body-mb"), (["--header-timeout", "0"], "--header-timeout"),
    (["--ood-threshold", "nan"], "--ood-threshold"), (["--allowed-hosts", ","], "--allowed-hosts"),
    (["--max-uploads", "0"], "--max-uploads"),
])
def test_serve_command_refuses_bad_flags_with_one_line(tmp_path, capsys, argv, flag):
    from fmnist.apps.cli import main

    assert main(["serve", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmnist serve: error: ") and flag in err and "Traceback" not in err


@pytest.mark.parametrize("error, status", [(RuntimeError("a bug"), 500), (MemoryError(), 413)])
def test_a_fault_while_receiving_the_body_is_not_a_400(trained_run, garment_png, monkeypatch, error, status):
    """FastAPI answers 400 to any exception while it reads a form: a bug of ours must not pass as bad input."""
    from fmnist.apps.serve import limits

    real = limits.BodyWatch.receive

    async def failing(self):
        message = await real(self)
        if message.get("body"):
            raise error
        return message

    monkeypatch.setattr(limits.BodyWatch, "receive", failing)
    with local_client(create_app(trained_run)) as c:
        r = c.post("/api/predict", files={"file": ("x.png", garment_png, "image/png")})
        assert r.status_code == status and "detail" in r.json()
