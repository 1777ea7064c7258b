"""The blocking part of prediction requests, run on worker threads: decode, prepare, predict, shape the JSON.

Kept free of any web framework so the benchmark can time exactly what a request costs the server. Two steps,
each isolating failures to the image or request they belong to:

* :func:`prepare_upload`, one upload at a time: decode it and bring it to the 28x28 image the model sees,
  releasing the decoded image before the next one is touched, so a request's memory is one decoded image
  at most, however many it sends;
* :func:`classify_batch`: one model call for the prepared images of several requests.

Only the upload's own faults (:class:`~fmnist.core.images.ImageError`: undecodable, too large, unsupported) are
a 4xx; running out of memory on an image is its own 413; anything else is a bug, logged with its traceback
and answered 500, for that request alone.
"""
from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools
import logging
import struct
import sys
import zlib

import numpy as np

from fmnist.core.images import ImageError, decode_image
from fmnist.core.runfolder import jsonable  # noqa: F401 (re-exported: the app uses it)

log = logging.getLogger("fmnist.apps.serve")

#: After preparing an image of at least this many pixels, freed memory is handed back to the system.
TRIM_PIXELS = 4_000_000
INTERNAL_ERROR = "internal server error while processing the image; please report it"


class UploadError(Exception):
    """A request that cannot be answered normally; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


def prepare_upload(predictor, data: bytes, max_pixels: int, **limits) -> np.ndarray:
    """Decode one upload and prepare it: the uint8 (28, 28) image the model sees. Raises what failed.
    ``limits``: ``max_work``, ``max_frames`` of :func:`~fmnist.core.images.decode_image`."""
    image = decode_image(data, max_pixels=max_pixels, **limits)
    pixels = image.width * image.height
    try:
        return predictor.to_image28(image)
    finally:
        image.close()
        del image
        if pixels >= TRIM_PIXELS:
            release_memory()


def upload_error(e: BaseException, name: str, many: bool, index: int) -> UploadError:
    """The answer to a request whose upload ``index`` (named ``name``) failed with ``e``."""
    where = f"file {index + 1} ({name!r}): " if many else ""
    if isinstance(e, ImageError):
        return UploadError(e.status, where + str(e))
    if isinstance(e, MemoryError):
        log.warning("out of memory on upload %r", name)
        return UploadError(413, where + "the image is too large to process; please upload a smaller image")
    log.error("error while preparing upload %r", name, exc_info=e)
    return UploadError(500, where + INTERNAL_ERROR)


def classify_batch(predictor, requests: list[list[np.ndarray]]) -> list:
    """One model call for several requests' prepared images: for each request, its list of API-ready dicts,
    or an :class:`UploadError` (500) if the model fails on it. When the call fails, each request is retried
    alone, so that only the one the model fails on is answered 500."""
    try:
        results = classify(predictor, [img for images in requests for img in images])
    except Exception as e:  # noqa: BLE001 - a bug: find whose request it is
        if len(requests) == 1:
            log.error("error in the model call", exc_info=e)
            return [UploadError(500, INTERNAL_ERROR)]
        return [classify_batch(predictor, [images])[0] for images in requests]
    outcomes, start = [], 0
    for images in requests:
        outcomes.append(results[start:start + len(images)])
        start += len(images)
    return outcomes


def classify(predictor, images28: list[np.ndarray]) -> list[dict]:
    """API results for prepared images (no second preparation)."""
    return [to_api(r) for r in predictor.predict_prepared(images28, return_image=True)]


# --- memory -------------------------------------------------------------------------------------------------

@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only


def release_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise: after a batch of large images the
    server held 5 GB it no longer used). A no-op where the C library is not glibc."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


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


# --- the model ----------------------------------------------------------------------------------------------

def single_threaded_compute() -> None:
    """One thread for PyTorch and for NumPy's BLAS in this process, as the server runs them (call it once the
    model is loaded: ONNX Runtime sets its own threads per session).

    A 28x28 image gains nothing from intra-op parallelism, and idle pool threads spin: under load (3,000
    requests at 16 clients) NumPy's BLAS helper thread alone burned 5.6 s of CPU for the OOD scores' small
    matrix products, with no gain in throughput or latency, on cores the event loop and the clients need.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
    torch = sys.modules.get("torch")  # None when absent, or blocked (sys.modules["torch"] = None)
    if torch is not None:  # the PyTorch backend (a server on ONNX Runtime never imports it)
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)  # denormal floats can slow CPU kernels many times over
