"""What one client may cost the server: decoding budgets counted before decoding (progressive scans, frames,
pixels per request), a deadline per image in a decoding process that can be killed, work stopped for a client
that has gone, and per-client caps on connections and uploads.

Socket tests talk to a real uvicorn server on 127.0.0.1; the other clients connect from 127.0.0.2 and
127.0.0.3 (every 127/8 address is the loopback), with bounded loops and short timeouts."""
from __future__ import annotations

import io
import re
import socket
import threading
import time
import warnings
from contextlib import contextmanager

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

from fmnist.apps.serve.app import create_app
from fmnist.apps.serve.background import serve_in_thread
from fmnist.apps.serve.limits import client_address
from fmnist.apps.serve.settings import Settings
from fmnist.core.images import ImageTooCostly, decode_image


def progressive_jpeg(size: int, repeats: int) -> bytes:
    """A grey progressive JPEG whose smallest scan is repeated ``repeats`` more times before its end: each
    copy makes the decoder go over every pixel once more, for a few bytes."""
    buf = io.BytesIO()
    Image.new("L", (size, size), 128).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    starts = [m.start() for m in re.finditer(b"\xff\xda", data)]
    end = data.rfind(b"\xff\xd9")
    smallest = min((data[a:b] for a, b in zip(starts[1:], starts[2:] + [end])), key=len)
    return data[:end] + smallest * repeats + data[end:]


def frames(fmt: str, count: int) -> bytes:
    images = [Image.new("RGB", (4, 4), (i * 5 % 256, 0, 0)) for i in range(count)]
    buf = io.BytesIO()
    images[0].save(buf, fmt, save_all=True, append_images=images[1:])
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, "PNG")
    return buf.getvalue()


# --- budgets counted before decoding ---------------------------------------------------------------------------

def test_progressive_scans_are_counted_before_decoding():
    bomb = progressive_jpeg(2000, 1000)  # 30 KB; about 4 s of decoding
    assert len(bomb) < 40_000
    start = time.process_time()
    with pytest.raises(ImageTooCostly, match="1,006 progressive scans of 2000x2000"):
        decode_image(bomb)
    assert time.process_time() - start < 0.5
    assert decode_image(progressive_jpeg(200, 20)).size == (200, 200)  # a few scans more is fine


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_frames_are_counted_before_decoding(fmt):
    data = frames(fmt, 30)
    with pytest.raises(ImageTooCostly, match="more than 10 frames"):
        decode_image(data, max_frames=10)
    assert decode_image(data, max_frames=30).size == (4, 4)


@pytest.fixture(scope="module")
def client(trained_run):
    with TestClient(create_app(trained_run, decode_timeout=1.0, max_request_pixels=5_000_000),
                    base_url="http://localhost") as c:
        yield c


def test_a_costly_jpeg_is_refused_by_the_server_at_once(client):
    start = time.monotonic()
    r = client.post("/api/predict", files={"file": ("bomb.jpg", progressive_jpeg(2000, 1000))})
    assert r.status_code == 413 and "progressive scans" in r.json()["detail"]
    assert time.monotonic() - start < 2


def test_a_request_over_its_pixel_budget_is_refused(client):
    files = [("file", (f"{i}.png", png(1000, 1000))) for i in range(6)]
    r = client.post("/api/predict/batch", files=files)
    assert r.status_code == 413, r.text
    assert "file 6" in r.json()["detail"] and "5,000,000 pixels" in r.json()["detail"]
    assert client.post("/api/predict/batch", files=files[:5]).status_code == 200


def test_a_decode_past_its_deadline_is_killed_and_the_server_goes_on(trained_run):
    app = create_app(trained_run, max_decode_work=10**12, decode_timeout=0.5)
    with TestClient(app, base_url="http://localhost") as c:
        start = time.monotonic()
        r = c.post("/api/predict", files={"file": ("slow.jpg", progressive_jpeg(2000, 1000))})
        assert r.status_code == 422 and "too long to decode" in r.json()["detail"], r.text
        assert time.monotonic() - start < 3
        assert _killed(app) == 1
        ok = c.post("/api/predict", files={"file": ("ok.png", png(28, 28))})
        assert ok.status_code == 200, ok.text


def test_decoding_stops_when_the_client_goes(trained_run):
    app = create_app(trained_run, max_decode_work=10**12, decode_timeout=30)
    body, ctype = _multipart(progressive_jpeg(2000, 3000))  # about 12 s of decoding
    with serve_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_head("/api/predict", ctype, len(body)) + body)
            started = time.monotonic() + 20  # a worker has the image (its process may take a while to start)
            while app.state.large_decoder.sent == 0 and time.monotonic() < started:
                time.sleep(0.05)
            assert app.state.large_decoder.sent == 1
            time.sleep(0.2)
        deadline = time.monotonic() + 5
        while _killed(app) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _killed(app) == 1
        assert _status(port, png(28, 28)) == 200


def _killed(app) -> int:
    return app.state.decoder.killed + app.state.large_decoder.killed


def test_small_uploads_do_not_wait_behind_a_large_one(trained_run):
    app = create_app(trained_run, max_decode_work=10**12, decode_timeout=30)
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post("/api/predict", files={"file": ("ok.png", png(28, 28))}).status_code == 200
        slow = threading.Thread(target=c.post, args=("/api/predict",),
                                kwargs={"files": {"file": ("slow.jpg", progressive_jpeg(2000, 1500))}})
        slow.start()  # about 6 s of decoding, in the low-priority process
        try:
            time.sleep(0.5)
            start = time.monotonic()
            for _ in range(5):
                assert c.post("/api/predict", files={"file": ("ok.png", png(28, 28))}).status_code == 200
            assert time.monotonic() - start < 3
        finally:
            slow.join(30)


# --- fairness between clients ------------------------------------------------------------------------------------

def _multipart(data: bytes, boundary: str = "b0undary") -> tuple[bytes, str]:
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _head(path: str, ctype: str, length: int, extra: bytes = b"") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\nContent-Length: {length}\r\n"
            ).encode() + extra + b"\r\n"


def _status(port: int, image: bytes, source: str = "127.0.0.3", extra: bytes = b"") -> int:
    body, ctype = _multipart(image)
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(_head("/api/predict", ctype, len(body), extra) + body)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    return int(answer.split()[1]) if answer.startswith(b"HTTP/1.1 ") else 0


@contextmanager
def _server(trained_run, **settings):
    app = create_app(trained_run, **settings)
    with serve_in_thread(app) as url:
        yield int(url.rsplit(":", 1)[1]), app


def test_one_clients_slow_sockets_leave_room_for_the_others(trained_run):
    """One address opens 150 sockets that trickle headers and 40 that trickle bodies; another client's
    predictions are all answered."""
    with _server(trained_run, max_connections=100, max_uploads=16, max_connections_per_client=32,
                 max_uploads_per_client=4) as (port, app):
        held, refused = [], 0
        try:
            for i in range(190):
                s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
                held.append(s)
                s.sendall(b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i < 150 else
                          _head("/api/predict", "multipart/form-data; boundary=b", 100_000) + b"--b\r\n")
            time.sleep(0.5)
            for s in held:  # those over the caps were answered 503 and closed
                s.settimeout(0.05)
                try:
                    refused += s.recv(100).startswith(b"HTTP/1.1 503")
                except (TimeoutError, ConnectionResetError):
                    pass
            assert refused >= 150
            assert app.state.uploads.active <= 4
            answers = [_status(port, png(28, 28)) for _ in range(20)]
            assert answers == [200] * 20
        finally:
            for s in held:
                s.close()


def test_uploads_in_progress_are_capped_per_client(trained_run):
    with _server(trained_run, max_uploads_per_client=2) as (port, app):
        body_start = _head("/api/predict", "multipart/form-data; boundary=b", 100_000) + b"--b\r\n"
        held = []
        try:
            for _ in range(2):
                s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
                s.sendall(body_start)
                held.append(s)
            deadline = time.monotonic() + 5
            while app.state.uploads.active < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _status(port, png(28, 28), source="127.0.0.2") == 503
            assert _status(port, png(28, 28), source="127.0.0.3") == 200
        finally:
            for s in held:
                s.close()


def test_forwarded_for_is_believed_from_trusted_proxies_only():
    scope = {"client": ("10.0.0.5", 1234), "headers": [(b"x-forwarded-for", b"1.2.3.4, 10.0.0.6")]}
    assert client_address(scope) == "10.0.0.5"  # no proxy trusted: the header is anyone's to write
    trusted = Settings(trusted_proxies=("10.0.0.5", "10.0.0.6")).trusted_proxies
    assert client_address(scope, trusted) == "1.2.3.4"
    assert client_address({"client": ("1.2.3.4", 1), "headers": scope["headers"]}, trusted) == "1.2.3.4"


def test_forwarded_for_from_an_untrusted_peer_cannot_dodge_the_cap(trained_run):
    with _server(trained_run, max_uploads_per_client=1) as (port, app):
        body_start = _head("/api/predict", "multipart/form-data; boundary=b", 100_000) + b"--b\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0)) as s:
            s.sendall(body_start)
            deadline = time.monotonic() + 5
            while app.state.uploads.active < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _status(port, png(28, 28), source="127.0.0.2", extra=b"X-Forwarded-For: 9.9.9.9\r\n") == 503


@pytest.mark.parametrize("kwargs, flag", [
    ({"decode_workers": -1}, "--decode-workers"), ({"decode_timeout": 0}, "--decode-timeout"),
    ({"max_decode_work": 0}, "--max-decode-work"), ({"max_frames": 0}, "--max-frames"),
    ({"max_request_pixels": 0}, "--max-request-pixels"),
    ({"max_connections_per_client": 0}, "--max-connections-per-client"),
    ({"max_uploads_per_client": 0}, "--max-uploads-per-client"), ({"trusted_proxies": ("proxy",)}, "--trusted-proxies"),
])
def test_bad_budget_settings_are_refused(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        Settings(**kwargs)
