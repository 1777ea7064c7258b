"""Procedural non-garments: the negative examples of the OOD detector's ``outlier`` score (outlier exposure).

A detector fitted on garments alone never sees what it must refuse. These images give it that, without using
any real picture. Five families (:data:`FAMILIES`); the first three are simple models of what natural images are
made of, so they stand for the photos, faces and scenes that users send by mistake, not for any particular set;
the last two stand for drawings and objects on a plain ground:

- **1/f noise**: natural images have power spectra falling as 1/f^a with a between about 1 and 3 (textures,
  foliage, stone, skin), here with a drawn at random;
- **plain surfaces**: a linear gradient with faint 1/f texture (walls, sky, paper, a face filling the frame);
- **dead leaves**: occluding discs and rectangles of random grey levels, the classic model of scenes made of
  objects in front of one another;

- **strokes**: 1-4 pen strokes, smooth random curves of random width, light on dark or dark on light (writing,
  marks, line drawings);
- **blobs**: one or a few filled, smoothly outlined shapes of random outline in one grey level on a plain
  ground (objects seen as a silhouette);

1/f noise and plain surfaces often cut out by a random ellipse, rectangle or star-shaped polygon on a random
background. Each family can be left out of a fit (``procedural(..., families=...)``): that is how
``benchmarks/ood_leave_out.py`` measures what the detector does on a kind of input it never saw.
Each picture is drawn at a random size and sent through :func:`~fmnist.core.preprocess.to_dataset_format`, the
function every upload goes through (inverted, cropped to the object, stretched), so the detector learns from
what the model would actually see; pictures that come out blank (refused anyway) are dropped.

None of the images of ``fmnist ood-eval`` (:mod:`fmnist.fit.trust.eval_sets`) is used or imitated here.
"""
from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from fmnist.core import preprocess
from fmnist.core.preprocess import is_blank, to_dataset_format
from fmnist.fit.data import CACHE_DIR

SIZES = (32, 48, 64, 96)  # drawn sizes: to_dataset_format then shrinks them to at most 28 px
COUNT = 2_000  # what the fit draws: 3,000 or 6,000 refused the same sets within 0.5 points, and each costs time
# Drawings kept on disk between runs (about 1.6 MB each): drawing 2,000 takes 4-5 s of a one-minute run on a
# 2-core laptop CPU. A file is named by everything its images depend on (this module's and the preprocessing's
# code, NumPy's and Pillow's versions, the arguments), so a change to any of them draws afresh.
CACHE = CACHE_DIR / "procedural"


def fractal(rng: np.random.Generator, size: int) -> np.ndarray:
    """1/f^a noise in [0, 1], a in [1, 3]: a random phase and amplitude spectrum shaped like a natural image's."""
    a = rng.uniform(1.0, 3.0)
    f = np.hypot(np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None])
    f[0, 0] = 1.0
    spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f ** (a / 2)
    spectrum[0, 0] = 0.0
    img = np.fft.irfft2(spectrum, s=(size, size))
    return (img - img.min()) / (np.ptp(img) + 1e-9)


def plain(rng: np.random.Generator, size: int) -> np.ndarray:
    """A nearly flat surface: a linear gradient in some direction plus faint 1/f texture."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = rng.uniform(0, 2 * np.pi)
    img = rng.uniform(0.3, 1) + rng.uniform(0, 0.5) * (np.cos(angle) * xx + np.sin(angle) * yy)
    return img + rng.uniform(0.02, 0.2) * fractal(rng, size)


def dead_leaves(rng: np.random.Generator, size: int) -> np.ndarray:
    """5-40 discs and rectangles of random grey levels, each drawn over the ones before."""
    img = np.full((size, size), rng.uniform(0, 1))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(int(rng.integers(5, 40))):
        cy, cx = rng.uniform(-0.1, 1.1, 2)
        r = 0.5 * rng.uniform(0.02, 0.5)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        else:
            mask = (abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.3, 3))
        img[mask] = rng.uniform(0, 1)
    return img


def shape_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random ellipse, rectangle or star-shaped polygon (boolean (size, size))."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.3, 0.7, 2)
    kind = int(rng.integers(3))
    if kind == 0:
        ry, rx = rng.uniform(0.1, 0.5, 2)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u, v = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        return (u / rx) ** 2 + (v / ry) ** 2 < 1
    if kind == 1:
        h, w = rng.uniform(0.1, 0.9, 2)
        return (abs(yy - cy) < h / 2) & (abs(xx - cx) < w / 2)
    k = int(rng.integers(3, 9))
    radii = rng.uniform(0.1, 0.45, k)
    edge = np.interp(np.arctan2(yy - cy, xx - cx), np.linspace(-np.pi, np.pi, k + 1), np.append(radii, radii[0]))
    return np.hypot(yy - cy, xx - cx) < edge


def strokes(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-4 smooth pen strokes (a random walk of slowly turning direction), each 3-14 % of the size wide."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    ink = np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, 5))):
        p = rng.uniform(0.2, 0.8, 2)
        heading, turn = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.5)
        width = rng.uniform(0.015, 0.07)
        for _ in range(int(rng.integers(10, 40))):
            heading += turn + rng.normal(0, 0.3)
            p = np.clip(p + 0.03 * np.array([np.sin(heading), np.cos(heading)]), 0.05, 0.95)
            ink |= (yy - p[0]) ** 2 + (xx - p[1]) ** 2 < width * width
    pen, paper = rng.uniform(0.7, 1), rng.uniform(0, 0.3)
    return np.where(ink, pen, paper) if rng.random() < 0.5 else np.where(ink, paper, pen)


def blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """1-3 filled shapes with smooth random outlines (low-frequency noise thresholded), one grey each."""
    img = np.full((size, size), rng.uniform(0, 1))
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.3, 0.7, 2)
        radius = rng.uniform(0.15, 0.45)
        wobble = _smooth_field(rng, size)  # outlines of random detail, smooth at the pixel scale
        level = np.hypot(yy - cy, xx - cx) / radius + rng.uniform(0.3, 1.2) * (wobble - 0.5)
        img[level < 1] = rng.uniform(0, 1)
    return img


def _smooth_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse noise (4-10 cells a side) upsampled bicubically."""
    cells = int(rng.integers(4, 11))
    coarse = Image.fromarray(rng.uniform(0, 1, (cells, cells)).astype(np.float32), mode="F")
    field = np.asarray(coarse.resize((size, size), Image.BICUBIC))
    return (field - field.min()) / (np.ptp(field) + 1e-9)


FAMILIES = ("fractal", "plain", "dead-leaves", "strokes", "blobs")


def picture(rng: np.random.Generator, family: str) -> np.ndarray:
    """One picture in [0, 1] of a random size from one of :data:`FAMILIES`."""
    size = int(rng.choice(SIZES))
    if family == "dead-leaves":
        img = dead_leaves(rng, size)
        if rng.random() < 0.5:
            img = 0.7 * img + 0.3 * fractal(rng, size)
    elif family == "strokes":
        img = strokes(rng, size)
    elif family == "blobs":
        img = blobs(rng, size)
    else:
        img = plain(rng, size) if family == "plain" else fractal(rng, size)
        if rng.random() < 0.7:  # an object on a background, rather than a texture filling the frame
            img = np.where(shape_mask(rng, size), img, rng.uniform(0, 1) * rng.uniform(0, 1))
    # a plain surface keeps its faint contrast; the others span the whole range before a random gain and offset
    img = img / img.max() if family == "plain" else (img - img.min()) / (np.ptp(img) + 1e-9)
    return np.clip(img * rng.uniform(0.3, 1) + rng.uniform(0, 0.3), 0, 1)


def procedural(n: int = COUNT, seed: int = 0, families=FAMILIES) -> np.ndarray:
    """``n`` non-garments as uint8 (n, 28, 28) images in the data set's format, none blank; repeatable by seed.
    The named ``families`` take turns (so each gives about n / len(families) images).

    A fresh copy of a drawing kept for the next call with the same arguments, in this process and on disk
    (:data:`CACHE`; drawing 2,000 takes 4-5 s on a 2-core laptop CPU; a tuning study fits one detector per
    trial)."""
    return drawn(n, seed, families)[0].copy()


def drawn(n: int, seed: int = 0, families=FAMILIES) -> tuple[np.ndarray, tuple[str, ...]]:
    """:func:`procedural`'s images (kept: do not change them) and the family of each."""
    families = tuple(families)
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ValueError(f"unknown procedural famil(ies) {unknown or '(none given)'}; choose from {FAMILIES}")
    return _drawn(int(n), int(seed), families)


def cached(n: int = COUNT, seed: int = 0, families=FAMILIES) -> bool:
    """Whether :func:`procedural` (n, seed, families) will read its images instead of drawing them (a time
    budget keeps less in hand then)."""
    return _read_cache(_cache_file(int(n), int(seed), tuple(families)), int(n)) is not None


@functools.cache
def _code_key() -> str:
    h = hashlib.sha256()
    for module in (__file__, preprocess.__file__):
        h.update(Path(module).read_bytes())
    h.update(f"numpy {np.__version__} pillow {PIL.__version__}".encode())
    return h.hexdigest()


def _cache_file(n: int, seed: int, families: tuple[str, ...]) -> Path:
    key = hashlib.sha256(f"{_code_key()} {n} {seed} {','.join(families)}".encode()).hexdigest()[:24]
    return CACHE / f"procedural-{key}.npz"


def _read_cache(path: Path, n: int) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """The kept drawing, or None when there is none or it is not what this code writes (then it is drawn again)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            images, kinds = f["images"], tuple(str(k) for k in f["kinds"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    if images.dtype != np.uint8 or images.shape != (n, 28, 28) or len(kinds) != n \
            or not set(kinds) <= set(FAMILIES):
        return None
    return images, kinds


def _write_cache(path: Path, images: np.ndarray, kinds: tuple[str, ...]) -> None:
    """Atomically, or not at all (a read-only or full disk only means drawing again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".procedural-", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, kinds=np.array(kinds, dtype="U16"))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


@functools.lru_cache(maxsize=8)
def _drawn(n: int, seed: int, families: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    path = _cache_file(n, seed, families)
    kept = _read_cache(path, n)
    if kept is not None:
        return kept
    images, kinds = _draw(n, seed, families)
    _write_cache(path, images, kinds)
    return images, kinds


def _draw(n: int, seed: int, families: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    rng = np.random.default_rng([seed, 0x0D])
    out, kinds = [], []
    while len(out) < n:
        family = families[len(out) % len(families)]
        img = to_dataset_format(np.rint(picture(rng, family) * 255).astype(np.uint8))
        if not is_blank(img):
            out.append(img)
            kinds.append(family)
    return (np.stack(out) if out else np.zeros((0, 28, 28), np.uint8)), tuple(kinds)
