"""The blocking part of prediction requests, run on a worker thread: decode, predict, shape the JSON.

Kept free of any web framework so the benchmark can time exactly what a request costs the server.
"""
from __future__ import annotations

import base64
import logging
import math
import struct
import zlib

import numpy as np
import torch

from fmnist.images import ImageError, decode_image

log = logging.getLogger("fmnist.serve")

# What preparing a decoded image for the model may raise when the image is at fault (odd modes, arrays).
_PREPARE_ERRORS = (ImageError, ValueError, OSError)


class UploadError(Exception):
    """A user's upload could not be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def run_batch(predictor, requests: list[list[tuple[str, bytes]]], max_pixels: int) -> list:
    """Serve several requests with one model call: for each request, its list of API-ready dicts, or the
    :class:`UploadError` of its first bad upload (a bad upload fails its own request, not the others).

    A request is a list of (name, bytes) uploads: one for /api/predict, several for /api/predict/batch.
    """
    outcomes: list = [_decode_all(uploads, max_pixels) for uploads in requests]
    good = [k for k, o in enumerate(outcomes) if not isinstance(o, UploadError)]
    try:
        results = _classify(predictor, [img for k in good for img in outcomes[k]])
    except _PREPARE_ERRORS:
        # Rare: an image decoded but could not be prepared. Redo one image at a time to find it, so that
        # only its own request fails.
        for k in good:
            outcomes[k] = _classify_one_by_one(predictor, requests[k], outcomes[k])
        return outcomes
    start = 0
    for k in good:
        n = len(outcomes[k])
        outcomes[k] = results[start:start + n]
        start += n
    return outcomes


def _classify(predictor, images) -> list[dict]:
    if not images:
        return []
    with torch.inference_mode():  # no autograd bookkeeping: faster, and nothing kept alive between calls
        return [to_api(r) for r in predictor.predict_batch(images, return_image=True)]


def _classify_one_by_one(predictor, uploads, images):
    results = []
    for i, image in enumerate(images):
        try:
            results += _classify(predictor, [image])
        except _PREPARE_ERRORS as e:
            return _upload_error(e, uploads[i][0], many=len(uploads) > 1, index=i)
    return results


def _decode_all(uploads: list[tuple[str, bytes]], max_pixels: int):
    """The decoded images of one request, or the UploadError of its first bad upload."""
    images = []
    for i, (name, data) in enumerate(uploads):
        try:
            images.append(decode_image(data, max_pixels=max_pixels))
        except _PREPARE_ERRORS as e:
            return _upload_error(e, name, many=len(uploads) > 1, index=i)
    return images


def _upload_error(e: Exception, name: str, many: bool, index: int) -> UploadError:
    where = f"file {index + 1} ({name!r}): " if many else ""
    if isinstance(e, ImageError):
        return UploadError(e.status, where + str(e))
    log.warning("cannot process upload %r: %s", name, e, exc_info=e)
    return UploadError(400, f"{where}cannot process the image ({type(e).__name__}); please try another file "
                            "or format")


# --- the JSON -----------------------------------------------------------------------------------------------

def to_api(result: dict) -> dict:
    """Predictor result -> JSON-able dict: the image becomes ``input_png``; unknown keys pass through."""
    out = {k: jsonable(v) for k, v in result.items() if k != "image"}
    if "image" in result:
        out["input_png"] = png_base64(result["image"])
    return out


def png_base64(img: np.ndarray) -> str:
    """A 2-D uint8 image as a base64 greyscale PNG (written directly: ten times faster than through Pillow)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    h, w = img.shape
    rows = np.zeros((h, w + 1), np.uint8)  # each row starts with filter type 0 (none)
    rows[:, 1:] = img

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode("ascii")


def jsonable(v):
    """Plain JSON types; NaN and infinities become null (strict JSON has no such numbers)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        return jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


# --- the model ----------------------------------------------------------------------------------------------

def single_threaded_compute() -> None:
    """One thread for PyTorch and for NumPy's BLAS in this process, as the server runs them.

    A 28x28 image gains nothing from intra-op parallelism, and idle pool threads spin: under load (3,000
    requests at 16 clients) NumPy's BLAS helper thread alone burned 5.6 s of CPU for the OOD scores' small
    matrix products, with no gain in throughput or latency, on cores the event loop and the clients need.
    """
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
