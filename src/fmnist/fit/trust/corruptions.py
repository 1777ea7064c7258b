"""Garments imperfectly shown: mild, seeded corruptions of 28x28 images in the data set's format.

Users' photos of garments are not Fashion-MNIST's: turned a little, off-centre, blurred, noisy, flat or unevenly
lit. They are still garments, and the trust layer must answer them (or say "uncertain"), not refuse them as
non-garments. These families measure that (``benchmarks/corruptions.py``) and some of them give the OOD
detector's fit examples of "a garment, imperfectly shown" (:data:`FIT_KINDS`, :mod:`fmnist.fit.trust.fit`).

Every family draws its strength at random in a mild range (a turn of 5-15 degrees, a blur of 0.5-1 px, ...), one
draw per image, repeatable by seed. :data:`HELD_OUT` families are never used by a fit: they measure whether what
the fit learned from the others carries over.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rotate(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Turned by 5-15 degrees either way, about the centre, black (the data set's background) filling in."""
    angle = rng.uniform(5, 15) * rng.choice((-1, 1))
    return np.asarray(Image.fromarray(img).rotate(angle, resample=Image.BILINEAR, fillcolor=0))


def blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian blur of 0.5-1 px (out of focus, or shrunk from a soft photo)."""
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.0))))


def noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor-like noise: Gaussian, standard deviation 8-20 grey levels, on every pixel."""
    return _to_uint8(img + rng.normal(0, rng.uniform(8, 20), img.shape))


def low_contrast(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Contrast cut to 40-70 %, the background raised to 0-40 grey levels (a dim photo, a grey backdrop)."""
    return _to_uint8(img * rng.uniform(0.4, 0.7) + rng.uniform(0, 40))


def shift(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Moved by 1-3 px in each direction (a loose crop), black filling in."""
    dy, dx = (int(rng.integers(1, 4)) * int(rng.choice((-1, 1))) for _ in range(2))
    out = np.zeros_like(img)
    src = img[max(0, -dy):img.shape[0] - max(0, dy), max(0, -dx):img.shape[1] - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def uneven_light(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lit from one side: brightness falling linearly to 50-80 % across the image, in a random direction."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h - 1, 1)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)
    ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
    return _to_uint8(img * (1 - (1 - rng.uniform(0.5, 0.8)) * ramp))


def zoom(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scaled by 0.85-1.15 about the centre (a garment framed a little tighter or looser)."""
    s = rng.uniform(0.85, 1.15)
    c = (img.shape[1] - 1) / 2, (img.shape[0] - 1) / 2
    # PIL's affine maps output to input coordinates: x_in = x_out / s + c (1 - 1 / s)
    data = (1 / s, 0, c[0] * (1 - 1 / s), 0, 1 / s, c[1] * (1 - 1 / s))
    return np.asarray(Image.fromarray(img).transform(img.shape[::-1], Image.AFFINE, data,
                                                     resample=Image.BILINEAR, fillcolor=0))


KINDS = {
    "rotate": rotate, "blur": blur, "noise": noise, "low-contrast": low_contrast,
    "shift": shift, "uneven-light": uneven_light, "zoom": zoom,
}
FIT_KINDS = ("rotate", "blur", "noise", "low-contrast")  # those a fit may draw; the others measure it
HELD_OUT = tuple(k for k in KINDS if k not in FIT_KINDS)


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """uint8 (N, 28, 28) ``images`` each corrupted once by ``kind`` (a key of :data:`KINDS`); repeatable."""
    if kind not in KINDS:
        raise ValueError(f"unknown corruption {kind!r}; choose from {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, sorted(KINDS).index(kind)])
    fn = KINDS[kind]
    return np.stack([fn(np.asarray(img, np.uint8), rng) for img in images]) if len(images) else np.asarray(images)


def mixed(images: np.ndarray, seed: int = 0, kinds=FIT_KINDS) -> np.ndarray:
    """Each image corrupted by one of ``kinds``, chosen at random (repeatable by seed)."""
    rng = np.random.default_rng([seed, 0xC0])
    which = rng.integers(len(kinds), size=len(images))
    out = np.array(images, dtype=np.uint8, copy=True)
    for k, kind in enumerate(kinds):
        pos = np.flatnonzero(which == k)
        if len(pos):
            out[pos] = corrupt(out[pos], kind, seed)
    return out
