"""The web server: the API's answers, every refusal, every kind of bad input, the limits, the page, the CLI."""
from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
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

MAX_BODY = 300_000
OFFICIAL = Path("/usr/share/datasets/fashion-mnist")


# --- images ---------------------------------------------------------------------------------------------

def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def garment(synthetic_data) -> np.ndarray:
    """A synthetic test image (a bright shape on a dark, noisy background), uint8 28x28."""
    return synthetic_data.test_images[0].numpy()


@pytest.fixture(scope="module")
def garment_png(garment) -> bytes:
    return encode(garment)


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-black PNG of width x height pixels that compresses to a few kilobytes."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed pixels
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --- clients --------------------------------------------------------------------------------------------

def local_client(app) -> TestClient:
    """A test client whose requests say ``Host: localhost``, a name the server answers by default."""
    return TestClient(app, base_url="http://localhost")


@pytest.fixture(scope="module")
def client(trained_run):
    with local_client(create_app(trained_run, max_body=MAX_BODY)) as c:
        yield c


def post_image(client, data: bytes, name="x.png", ctype="image/png", url="/api/predict"):
    return client.post(url, files={"file": (name, data, ctype)})


def assert_error(response, status: int, *words: str) -> str:
    """The status is right and the body is JSON {"detail": "<a message>"}, mentioning each of ``words``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for w in words:
        assert w in detail.lower(), detail
    return detail


# --- information ----------------------------------------------------------------------------------------

def test_health_and_model_info(client, trained_run):
    assert client.get("/api/health").json() == {"status": "ok"}
    info = client.get("/api/model").json()
    assert info["name"] == Path(trained_run).name
    assert info["model"] == "s2d-24" and info["parameters"] > 1000
    assert info["class_names"] == list(CLASS_NAMES)
    # The run's own default (0.60, seed B's value, or another when the run says so).
    assert info["thresholds"]["confidence"] == client.app.state.predictor.confidence_threshold
    assert "test" in info and "validation" in info
    assert [c["name"] for c in info["classes"]] == list(CLASS_NAMES)
    assert all(len(c["description"]) > 20 for c in info["classes"])
    assert {"blank", "low_confidence"} <= set(info["reasons"])
    assert "uncertain" in info["verdicts"]
    # Training fits candidate sets: the page says how they were made.
    assert info["candidate_sets"]["coverage"] == 0.95 and info["candidate_sets"]["method"] == "raps"
    assert info["limits"]["max_body_bytes"] == MAX_BODY


def test_threshold_setting_reaches_the_predictor(trained_run):
    with local_client(create_app(trained_run, threshold=0.9)) as c:
        assert c.get("/api/model").json()["thresholds"]["confidence"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="threshold"):
        create_app(trained_run, threshold=1.5)


def test_ood_threshold_setting_reaches_the_predictor(trained_run):
    with local_client(create_app(trained_run)) as c:
        default = c.get("/api/model").json()["thresholds"].get("ood")
    assert default is not None, "training fits an out-of-distribution detector: the run must have one"
    with local_client(create_app(trained_run, ood_threshold=default + 1.0)) as c:
        assert c.get("/api/model").json()["thresholds"]["ood"] == pytest.approx(default + 1.0)


# --- predictions ----------------------------------------------------------------------------------------

def test_predict_returns_the_documented_fields(client, garment_png):
    r = post_image(client, garment_png)
    assert r.status_code == 200, r.text
    p = r.json()
    assert {"label", "class_id", "score", "accepted", "reason", "verdict", "candidates", "top_k",
            "input_png"} <= set(p)
    assert p["verdict"] in ("answer", "uncertain", "refused") and p["accepted"] == (p["verdict"] == "answer")
    assert p["label"] == CLASS_NAMES[p["class_id"]]
    assert len(p["top_k"]) == 3
    assert p["top_k"][0] == {"label": p["label"], "score": p["score"]}
    scores = [t["score"] for t in p["top_k"]]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert p["accepted"] == (p["reason"] is None)


def test_input_png_is_the_image_the_model_saw(client, garment_png):
    p = post_image(client, garment_png).json()
    seen = Image.open(io.BytesIO(base64.b64decode(p["input_png"])))
    assert seen.size == (28, 28) and seen.mode == "L"
    expected = client.app.state.predictor.to_image28(garment_png)
    assert np.array_equal(np.asarray(seen), expected)


def test_predict_agrees_with_the_python_api(client, trained_run, synthetic_data):
    """The server (its model optimised for inference, requests batched) answers as fmnist.load(run) does."""
    import fmnist

    direct = fmnist.load(trained_run)
    for i in range(5):
        png = encode(synthetic_data.test_images[i].numpy())
        p, d = post_image(client, png).json(), direct.predict(png)
        assert (p["label"], p["reason"]) == (d["label"], d["reason"])
        assert [t["score"] for t in p["top_k"]] == pytest.approx([t["score"] for t in d["top_k"]], abs=1e-4)


def only_confidence_gate(monkeypatch, predictor) -> None:
    """Switch off the out-of-distribution gate (when the run has one) to test the confidence gate alone."""
    if getattr(predictor, "ood_threshold", None) is not None:
        monkeypatch.setattr(predictor, "ood_threshold", float("inf"))


def test_confident_answer_is_accepted(client, garment_png, monkeypatch):
    only_confidence_gate(monkeypatch, client.app.state.predictor)
    monkeypatch.setattr(client.app.state.predictor, "confidence_threshold", 0.0)
    p = post_image(client, garment_png).json()
    assert p["accepted"] is True and p["reason"] is None
    assert p["verdict"] == "answer" and p["candidates"][0] == {"label": p["label"], "score": p["score"]}


def test_low_confidence_is_refused_but_keeps_the_best_guess(client, garment_png, monkeypatch):
    only_confidence_gate(monkeypatch, client.app.state.predictor)
    monkeypatch.setattr(client.app.state.predictor, "confidence_threshold", 1.01)  # nothing reaches it
    p = post_image(client, garment_png).json()
    assert p["accepted"] is False and p["reason"] == "low_confidence"
    assert p["label"] == p["top_k"][0]["label"] and p["score"] == p["top_k"][0]["score"]
    # Not refused: hedged, with the labels it could be, most likely first (at least the two most likely).
    assert p["verdict"] == "uncertain"
    assert p["candidates"][:2] == [{"label": t["label"], "score": t["score"]} for t in p["top_k"][:2]]


def test_noise_is_refused_never_uncertain_even_when_nothing_is_confident(trained_run):
    # With the threshold at 1.0 no garment is confident enough, so anything that passes the gates is hedged;
    # noise must not be: it is no garment, and naming garments for it would pretend to know.
    rng = np.random.default_rng(0)
    with local_client(create_app(trained_run, threshold=1.0)) as c:
        for img in list(rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)) + [
                np.clip(rng.normal(128, 60, (64, 64)), 0, 255).astype(np.uint8)]:
            p = post_image(c, encode(img)).json()
            assert p["verdict"] == "refused" and p["candidates"] is None, p
            assert p["accepted"] is False and p["reason"] in ("out_of_distribution", "blank")


def _blank_images() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    speck = np.zeros((200, 200), np.uint8)
    speck[100:102, 100:102] = 255
    return {
        "black": encode(np.zeros((64, 64), np.uint8)),
        "white": encode(np.full((64, 64), 255, np.uint8)),
        "grey": encode(np.full((30, 50), 128, np.uint8), "JPEG"),
        "faint-noise": encode(rng.integers(120, 124, (100, 100), dtype=np.uint8)),
        "speck": encode(speck),
        "1x1": encode(np.array([[200]], np.uint8)),
        "transparent": encode(Image.new("RGBA", (40, 40), (255, 0, 0, 0))),
    }


@pytest.mark.parametrize("kind", list(_blank_images()))
def test_blank_images_are_refused(client, kind):
    r = post_image(client, _blank_images()[kind])
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["accepted"] is False and p["reason"] == "blank"
    assert p["label"] in CLASS_NAMES  # still the best guess


def test_mostly_black_garment_is_not_blank(client):
    """Seed B rejected images that are 50 % black; a sandal's thin straps on black are a real garment."""
    img = np.zeros((28, 28), np.uint8)
    img[20:24, 2:26] = 220  # sole
    for x in (5, 11, 17, 23):  # straps
        img[8:20, x:x + 2] = 200
    assert (img == 0).mean() > 0.5
    p = post_image(client, encode(img)).json()
    assert p["reason"] != "blank"


@pytest.mark.realdata
@pytest.mark.skipif(not (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists(), reason="official data missing")
def test_real_sandals_sneakers_trousers_are_not_blank(client):
    from fmnist.fit.data import read_idx

    images = np.asarray(read_idx(OFFICIAL / "t10k-images-idx3-ubyte.gz"))
    labels = np.asarray(read_idx(OFFICIAL / "t10k-labels-idx1-ubyte.gz"))
    picked = np.concatenate([np.flatnonzero(labels == k)[:8] for k in (1, 5, 7)])  # trouser, sandal, sneaker
    assert np.mean([(images[i] == 0).mean() > 0.5 for i in picked]) > 0.5  # seed B would refuse most
    files = [("file", (f"{i}.png", encode(images[i]), "image/png")) for i in picked]
    results = client.post("/api/predict/batch", files=files).json()
    assert len(results) == len(picked) and all(p["reason"] != "blank" for p in results)


def test_odd_but_valid_images_are_classified(client, garment):
    rgb = Image.fromarray(garment).convert("RGB")
    frames = [Image.fromarray(garment).convert("P"), Image.new("P", (28, 28), 0)]
    palette = Image.fromarray(garment).convert("P")
    palette.info["transparency"] = 0
    cases = {
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG"),
        "16bit.png": encode(Image.fromarray(garment.astype(np.uint16) * 257)),
        "rgba.png": encode(Image.fromarray(garment).convert("RGBA")),
        "palette-transparent.png": encode(palette),
        "garment.tiff": encode(rgb, "TIFF"),
        "garment.bmp": encode(rgb, "BMP"),
        "garment.webp": encode(rgb, "WEBP", lossless=True),
        "animated.gif": encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100),
    }
    assert Image.open(io.BytesIO(cases["16bit.png"])).mode.startswith("I")
    assert Image.open(io.BytesIO(cases["animated.gif"])).n_frames == 2
    for name, data in cases.items():
        r = post_image(client, data, name=name, ctype="application/octet-stream")  # odd part types are fine
        assert r.status_code == 200, (name, r.text)
        assert r.json()["reason"] != "blank", name  # the garment was seen (the GIF's first frame)


def test_animated_gif_uses_the_first_frame(client, garment):
    frames = [Image.new("P", (28, 28), 0), Image.fromarray(garment).convert("P")]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert post_image(client, data).json()["reason"] == "blank"


# --- bad input: a clear 4xx, never a 5xx, and the server keeps answering ------------------------------------

def _bad_uploads(garment_png: bytes) -> dict[str, tuple[bytes, str]]:
    return {
        "empty": (b"", "empty"),
        "truncated": (garment_png[: len(garment_png) // 2], "truncated"),
        "random": (np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes(), "cannot identify"),
        "text": (b"this is not an image, only text posing as one\n" * 20, "cannot identify"),
        "pdf": (b"%PDF-1.7\n" + b"0" * 200, "unsupported image format"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"/>', "unsupported image format"),
    }


@pytest.mark.parametrize("kind", ["empty", "truncated", "random", "text", "pdf", "svg"])
def test_undecodable_uploads_get_400(client, garment_png, kind):
    data, words = _bad_uploads(garment_png)[kind]
    assert_error(post_image(client, data), 400, words)


@pytest.mark.parametrize("size", [(8000, 8000), (20000, 20000)])
def test_decompression_bomb_is_refused_without_decoding(client, size):
    data = huge_png(*size)
    assert len(data) < 100_000  # tiny on the wire, 64-400 megapixels once decoded
    start = time.perf_counter()
    r = post_image(client, data)
    assert time.perf_counter() - start < 2.0  # refused from the header, not after decoding
    assert_error(r, 413, "too large")
    assert client.get("/api/health").status_code == 200


def test_pixel_limit_is_configurable(trained_run):
    with local_client(create_app(trained_run, max_pixels=10_000)) as c:
        assert_error(post_image(c, encode(np.zeros((200, 200), np.uint8))), 413, "10,000")
        assert post_image(c, encode(np.zeros((100, 100), np.uint8))).status_code == 200


def test_oversized_body_gets_413(client):
    r = post_image(client, bytes(MAX_BODY + 1))
    assert_error(r, 413, "too large", f"{MAX_BODY:,}")
    assert r.headers.get("connection") == "close"  # the server drops the rest of the upload


@pytest.mark.parametrize("kwargs", [
    {"json": {"file": "x"}},
    {"data": {"file": "x"}},  # application/x-www-form-urlencoded
    {"content": b"\x89PNG...", "headers": {"content-type": "image/png"}},
    {"content": b"abc"},  # no content type at all
], ids=["json", "urlencoded", "raw-png", "none"])
@pytest.mark.parametrize("url", ["/api/predict", "/api/predict/batch"])
def test_wrong_content_type_gets_415(client, url, kwargs):
    assert_error(client.post(url, **kwargs), 415, "multipart/form-data")


def test_missing_file_field_gets_422(client, garment_png):
    r = client.post("/api/predict", files={"image": ("x.png", garment_png, "image/png")})
    assert_error(r, 422, "file")
    r = client.post("/api/predict/batch", files={"other": ("x.png", garment_png, "image/png")})
    assert_error(r, 422, "file")
    r = client.post("/api/predict", data={"file": "not a file"}, files={"x": ("x", b"", "text/plain")})
    assert_error(r, 422, "file")


def test_malformed_multipart_gets_400(client):
    r = client.post("/api/predict", content=b"--nope\r\ngarbage",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert_error(r, 400, "closing boundary")
    r = client.post("/api/predict", content=b"abc", headers={"content-type": "multipart/form-data"})
    assert_error(r, 400)


def test_server_keeps_answering_after_bad_input(client, garment_png):
    for data, _ in _bad_uploads(garment_png).values():
        assert post_image(client, data).status_code == 400
    post_image(client, huge_png(8000, 8000))
    post_image(client, bytes(MAX_BODY + 10))
    assert client.get("/api/health").json() == {"status": "ok"}
    assert post_image(client, garment_png).status_code == 200


def test_unknown_paths_and_methods_answer_json(client):
    assert_error(client.get("/api/nope"), 404)
    assert_error(client.get("/api/predict"), 405)


# --- batch ----------------------------------------------------------------------------------------------

def test_batch_returns_one_result_per_file_in_order(client, synthetic_data):
    pngs = [encode(synthetic_data.test_images[i].numpy()) for i in range(3)] + [encode(np.zeros((9, 9), np.uint8))]
    r = client.post("/api/predict/batch", files=[("file", (f"{i}.png", d, "image/png")) for i, d in enumerate(pngs)])
    assert r.status_code == 200, r.text
    results = r.json()
    assert len(results) == 4 and results[3]["reason"] == "blank"
    for d, p in zip(pngs, results):
        single = post_image(client, d).json()
        assert p["label"] == single["label"] and p["score"] == pytest.approx(single["score"], abs=1e-5)
        assert p["input_png"] == single["input_png"]


def test_batch_names_the_bad_file(client, garment_png):
    files = [("file", ("good.png", garment_png, "image/png")), ("file", ("broken.png", b"nope", "image/png"))]
    assert_error(client.post("/api/predict/batch", files=files), 400, "file 2", "broken.png")


def test_batch_size_is_limited(trained_run, garment_png):
    with local_client(create_app(trained_run, max_batch=2)) as c:
        files = [("file", (f"{i}.png", garment_png, "image/png")) for i in range(3)]
        assert_error(c.post("/api/predict/batch", files=files), 413, "too many")
        assert c.post("/api/predict/batch", files=files[:2]).status_code == 200


# --- concurrency limit, pass-through of new result keys -------------------------------------------------------

def test_saturated_server_answers_503_with_retry_after(trained_run, garment_png, monkeypatch):
    from fmnist.apps.serve import inference

    entered, release = threading.Event(), threading.Event()
    real = inference.prepare_upload

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "prepare_upload", slow)
    with local_client(create_app(trained_run, max_concurrency=1, decode_workers=0)) as c:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", post_image(c, garment_png)))
        t.start()
        try:
            assert entered.wait(10)
            busy = post_image(c, garment_png)
            assert_error(busy, 503, "busy")
            assert int(busy.headers["retry-after"]) >= 1
            assert c.get("/api/health").status_code == 200  # only predictions are limited
        finally:
            release.set()
            t.join(10)
        assert first["r"].status_code == 200
        assert post_image(c, garment_png).status_code == 200  # the slot was given back


def test_new_result_keys_and_reasons_pass_through(client, garment_png, monkeypatch):
    predictor = client.app.state.predictor
    real = predictor._result

    def with_ood(*args):
        out = real(*args)
        out.update(accepted=False, reason="out_of_distribution", ood_score=np.float32(7.5),
                   extra={"nan": float("nan")})
        return out

    monkeypatch.setattr(predictor, "_result", with_ood)
    p = post_image(client, garment_png).json()
    assert p["reason"] == "out_of_distribution" and p["ood_score"] == 7.5
    assert p["extra"] == {"nan": None}  # strict JSON: no NaN


# --- inference internals: batching, per-request failures, the optimised model -----------------------------------

def test_concurrent_requests_share_model_calls(trained_run, synthetic_data, monkeypatch):
    import asyncio

    import fmnist
    from fmnist.apps.serve import inference
    from fmnist.apps.serve.batching import Batcher

    predictor = fmnist.load(trained_run)
    calls = []
    real = inference.classify_batch
    monkeypatch.setattr(inference, "classify_batch", lambda p, reqs: calls.append(len(reqs)) or real(p, reqs))
    pngs = [encode(synthetic_data.test_images[i].numpy()) for i in range(8)] + [b"not an image"]

    async def submit_all(max_images):
        batcher = Batcher(predictor, max_pixels=10**7, workers=1, max_images=max_images)
        return await asyncio.gather(*(batcher.submit([(f"{i}.png", d)]) for i, d in enumerate(pngs)),
                                    return_exceptions=True)

    results = asyncio.run(submit_all(64))
    assert calls == [8]  # the eight good ones, ready together, went through one model call
    for d, r in zip(pngs, results):
        if d == pngs[-1]:
            assert isinstance(r, inference.UploadError) and r.status == 400  # failed alone, before the model
        else:
            expected = predictor.predict(d)
            assert r[0]["label"] == expected["label"]
            assert r[0]["score"] == pytest.approx(expected["score"], abs=1e-5)
    calls.clear()
    asyncio.run(submit_all(4))
    assert calls == [4, 4]


def _run_batcher(predictor, requests, max_images=64):
    """Submit each request (a list of (name, bytes)) at once to one Batcher; their results or errors."""
    import asyncio

    from fmnist.apps.serve.batching import Batcher

    async def go():
        batcher = Batcher(predictor, max_pixels=10**7, workers=1, max_images=max_images)
        return await asyncio.gather(*(batcher.submit(r) for r in requests), return_exceptions=True)

    return asyncio.run(go())


def test_an_image_that_cannot_be_prepared_fails_only_its_request(trained_run, garment_png, monkeypatch):
    import fmnist
    from fmnist.apps.serve.inference import UploadError
    from fmnist.core.images import ImageError

    predictor = fmnist.load(trained_run)
    real = predictor.to_image28

    def picky(image):
        if image.size == (13, 13):
            raise ImageError("cannot prepare this one")
        if image.size == (14, 14):
            raise MemoryError
        return real(image)

    monkeypatch.setattr(predictor, "to_image28", picky)
    odd, huge = encode(np.zeros((13, 13), np.uint8)), encode(np.zeros((14, 14), np.uint8))
    out = _run_batcher(predictor, [[("a.png", garment_png)], [("odd.png", odd)],
                                   [("b.png", garment_png), ("odd.png", odd)], [("huge.png", huge)]])
    assert isinstance(out[0], list) and out[0][0]["label"] in CLASS_NAMES
    assert isinstance(out[1], UploadError) and out[1].status == 400
    assert isinstance(out[2], UploadError) and "file 2 ('odd.png')" in out[2].detail
    assert isinstance(out[3], UploadError) and out[3].status == 413  # out of memory: its own 413


def test_server_computes_on_one_thread():
    """In a process of its own, as the server is: the suite's process holds the BLAS libraries and threads that
    earlier tests loaded and left running, which may set their threads back at any moment."""
    code = (
        "import json, numpy, scipy.linalg, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "from fmnist.apps.serve.inference import single_threaded_compute\n"
        "single_threaded_compute()\n"
        "print(json.dumps([torch.get_num_threads(), [p['num_threads'] for p in threadpool_info()\n"
        "                                            if p['user_api'] == 'blas']]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch_threads, blas = json.loads(done.stdout.strip().splitlines()[-1])
    assert torch_threads == 1
    assert blas and all(n == 1 for n in blas)


def test_png_encoder_round_trips():
    from fmnist.apps.serve.inference import png_base64

    img = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    back = Image.open(io.BytesIO(base64.b64decode(png_base64(img))))
    assert back.mode == "L" and np.array_equal(np.asarray(back), img)


# --- body limit while streaming (the middleware alone, then a real server) -------------------------------------

def _run_asgi(app, scope_headers, chunks):
    """Drive an ASGI app with a body in chunks; return (status, number of chunks it pulled)."""
    import anyio

    pulled, sent = [0], []

    async def receive():
        if pulled[0] < len(chunks):
            pulled[0] += 1
            return {"type": "http.request", "body": chunks[pulled[0] - 1], "more_body": pulled[0] < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": scope_headers}
    anyio.run(app, scope, receive, send)
    return sent[0]["status"], pulled[0]


def test_body_limit_refuses_while_streaming():
    from fmnist.apps.serve.limits import BodySizeLimit

    async def reads_everything(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = BodySizeLimit(reads_everything, max_body=100_000)
    chunks = [bytes(65_536)] * 50  # 3.2 MB, chunked (no Content-Length)
    assert _run_asgi(app, [], chunks) == (413, 2)  # stopped at the first chunk past the limit
    declared = [(b"content-length", str(len(chunks) * 65_536).encode())]
    assert _run_asgi(app, declared, chunks) == (413, 0)  # refused from the header, no byte read
    assert _run_asgi(app, [], [bytes(1000)] * 3) == (200, 3)


def _raw_request(url: str, head: bytes, body_chunks=(), timeout=10.0) -> tuple[bytes, bytes, bytes]:
    """Send a hand-made request; return (status line, headers, body) of the answer."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head)
        try:
            for chunk in body_chunks:
                s.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while we were still sending: expected
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536) or b"\r\n\r\n"
        head_part, body = data.split(b"\r\n\r\n", 1)
        status, _, headers = head_part.partition(b"\r\n")
        length = int(next((line.split(b":")[1] for line in headers.lower().split(b"\r\n")
                           if line.startswith(b"content-length:")), b"0"))
        while len(body) < length:
            body += s.recv(65536) or b"x" * (length - len(body))
        return status, headers.lower(), body


def test_real_server_refuses_big_bodies_before_reading_them(trained_run):
    from fmnist.apps.serve.background import serve_in_thread

    with serve_in_thread(create_app(trained_run, max_body=MAX_BODY)) as url:
        # Declares 50 MB and sends none of it: the answer comes at once, the connection is closed.
        head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Content-Length: 50000000\r\n\r\n")
        start = time.perf_counter()
        status, headers, body = _raw_request(url, head)
        assert status.startswith(b"HTTP/1.1 413") and time.perf_counter() - start < 5
        assert b"connection: close" in headers
        assert json.loads(body)["detail"].startswith("request body too large")
        # A chunked upload (no length) of a valid multipart file part: refused once the count passes the limit.
        head = (b"POST /api/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
                b"Content-Type: image/png\r\n\r\n")
        chunks = [b"%x\r\n%s\r\n" % (len(part), part)] + [b"10000\r\n" + bytes(0x10000) + b"\r\n"] * 20
        status, headers, body = _raw_request(url, head, chunks)
        assert status.startswith(b"HTTP/1.1 413"), body
        assert json.loads(body)["detail"].startswith("request body too large")
        status, _, body = _raw_request(url, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 200") and json.loads(body) == {"status": "ok"}


# --- page, OpenAPI, CLI -------------------------------------------------------------------------------------

def test_page_and_assets_are_served_by_the_app(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in page.text
        r = client.get(asset)
        assert r.status_code == 200
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    assert "http://" not in page.text and "https://" not in page.text
    for element in ('id="file-input"', 'id="drop-zone"', 'id="canvas"', 'id="verdict"', 'id="top-k"',
                    'id="input-image"', 'id="description"'):
        assert element in page.text


def test_openapi_documents_the_api(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/predict", "/api/predict/batch", "/api/health", "/api/model"} <= set(spec["paths"])
    body = spec["paths"]["/api/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert {"400", "413", "415", "422", "503"} <= set(spec["paths"]["/api/predict"]["post"]["responses"])
    prediction = spec["components"]["schemas"]["Prediction"]["properties"]
    assert {"verdict", "candidates", "accepted", "reason", "top_k"} <= set(prediction)
    assert "uncertain" in prediction["verdict"]["description"]
    assert prediction["candidates"]["anyOf"][0]["items"] == {"$ref": "#/components/schemas/TopK"}


def _serve_parser():
    import argparse

    from fmnist.apps.cli import Formatter
    from fmnist.apps.cli.serve import register

    parser = argparse.ArgumentParser(prog="fmnist")
    register(parser.add_subparsers(dest="command"), Formatter)
    return parser


def test_cli_flags_and_defaults(capsys):
    parser = _serve_parser()
    args = parser.parse_args(["serve", "RUN"])
    assert (args.host, args.port, args.threshold, args.max_body_mb) == ("127.0.0.1", 8000, None, 8.0)
    assert args.max_concurrency >= 16 and args.threads >= 1 and args.docs is False
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    flags = ("--host", "--port", "--threshold", "--max-body-mb", "--max-concurrency", "--threads",
             "--max-uploads", "--max-connections", "--header-timeout", "--body-timeout", "--keep-alive-timeout",
             "--allowed-hosts", "--docs")
    for flag in flags:
        assert flag in help_text
    assert help_text.count("(default") >= len(flags)


def test_cli_refuses_bad_settings_and_missing_runs(tmp_path):
    from fmnist.fit.checkpoint import CheckpointError

    parser = _serve_parser()
    args = parser.parse_args(["serve", str(tmp_path), "--threshold", "1.5"])
    with pytest.raises(ValueError, match="threshold"):
        args.func(args)
    args = parser.parse_args(["serve", str(tmp_path / "missing")])
    with pytest.raises(CheckpointError, match="not found"):
        args.func(args)
