"""The one preprocessing function, shared by training, evaluation, prediction and the server.

Preprocessing is *data*: a small JSON-able dict (``spec``) saved in ``model.json`` with the weights, so a
model always sees its inputs prepared exactly as in training.
"""
from __future__ import annotations

import numpy as np

# Mean and std of the 60,000 official training images scaled to [0, 1].
DEFAULT_SPEC = {"size": 28, "mean": 0.2860, "std": 0.3530}


def make_spec(mean: float = DEFAULT_SPEC["mean"], std: float = DEFAULT_SPEC["std"]) -> dict:
    return {"size": 28, "mean": float(mean), "std": float(std)}


def preprocess_array(x, spec: dict | None = None) -> np.ndarray:
    """Turn images into what a model takes: float32 (N, 1, size, size), normalised by ``spec``. NumPy only.

    ``x`` is either a *batch* of images in the data set's format (uint8 array/tensor of shape (N, 28, 28),
    light garment on black: the data set's own tensors, or images already through :func:`to_dataset_format`)
    or a single image of any kind (PIL image or array, including a 28x28 one), which goes through
    :func:`to_dataset_format`: one idea of "data-set format", decided by content for single images (a dark
    garment on white is inverted, whatever its size and dtype; an image already in the format is unchanged).
    """
    spec = spec or DEFAULT_SPEC
    if hasattr(x, "detach"):  # a PyTorch tensor (checked without importing PyTorch)
        x = x.detach().cpu().numpy()
    if not _is_dataset_batch(x, spec["size"]):
        x = to_dataset_format(x)[None]
    # float32 throughout, in the order training always used: /255, -mean, /std
    t = np.asarray(x).astype(np.float32) / np.float32(255.0)
    t -= np.float32(spec["mean"])
    t /= np.float32(spec["std"])
    return t[:, None]


def _is_dataset_batch(x, size: int) -> bool:
    """A uint8 (N, size, size) array: by contract, images already in the data set's format."""
    return isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (size, size)


def to_dataset_format(image) -> np.ndarray:
    """Bring an arbitrary image to the data set's format: uint8 (28, 28), light garment on black.

    ``image`` is a PIL image of any mode (``RGB``, ``RGBA``, ``LA``, ``P`` with transparency, ``I;16``/``I``,
    ``CMYK``, ``1``, ``F``, ...) or a numpy array (``(H, W)``, ``(H, W, 1|2|3|4)``; uint8, uint16, other
    integers, bool or float in [0, 1] or [0, 255]). Typical inputs are shop photos and phone pictures: a dark
    or coloured garment on a light background, any size and aspect, off-centre. The steps, in order:

    1. first frame, EXIF orientation, transparency composited onto a background that contrasts with the
       opaque content (white behind a dark garment, black behind a light one; a fully transparent image is
       blank), then 8-bit-range luminance (ITU-R 601, as Pillow's ``L``);
    2. background level from the border pixels (their median; when the garment crosses the edge of a
       tightly cropped photo, the flatter of the two clusters there, see :func:`_background`); if the
       pixels that stand out of it are darker overall (the usual product photo: dark garment on light
       paper) the image is inverted so the garment is light on black;
    3. the background level is subtracted and the image cropped to the bounding box of the pixels that
       stand out of the background noise (isolated specks ignored; if there is no object the whole image
       is kept, minus the noise level, and not amplified, so it comes out black or nearly so);
    4. resized with Lanczos (area-averaging when shrinking) so the LONGEST side is 28 px and centred on a
       28x28 black canvas, the way Fashion-MNIST was made (measured on the test set: 98% of its images
       touch two opposite edges, and an odd-sized object sits half a pixel right/down of centre);
    5. contrast stretched so the brightest object pixels reach 255 (every Fashion-MNIST image has its
       maximum at 254 or 255).

    An image already in the data set's format (uint8 28x28, dark border, bright object filling the frame,
    see :func:`_looks_like_dataset`) is returned unchanged, bit for bit; this also holds after a lossless
    round trip through an ``L``/``RGB``/``RGBA`` PNG.
    """
    ready = _plain_uint8_28(image)
    if ready is not None and _looks_like_dataset(ready):  # the common case, without the float copies below
        return ready
    gray, alpha = _planes(image)
    if alpha is not None:
        gray = _composite(gray, alpha)
        if gray is None:  # nothing opaque: blank
            return np.zeros((_SIZE, _SIZE), np.uint8)

    same = _dataset_28(gray)
    if same is not None:
        return same
    d, thr = _object_levels(_shrink(gray, _WORK_SIZE))

    # 3. subtract the background, crop to the object
    box = _object_box(d > thr)
    if box is None:  # no object (or only specks): keep the whole frame, only what stands out of the noise
        return _frame(np.clip(d - thr, 0.0, None), stretch=False)
    top, bottom, left, right = box
    return _frame(d[top:bottom, left:right], stretch=True)


def _dataset_28(gray: np.ndarray) -> np.ndarray | None:
    """A 28x28 luminance plane whose values are whole numbers and that looks like a data-set image, as uint8
    (it is returned as it is: an image in the format, sent as RGB or with an alpha plane); else None."""
    if gray.shape != (_SIZE, _SIZE):
        return None
    q = np.rint(gray)
    if np.abs(q - gray).max() < 1e-3 and q.min() >= 0 and q.max() <= 255:
        q = q.astype(np.uint8)
        if _looks_like_dataset(q):
            return q
    return None


def _object_levels(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """Step 2: (how far each pixel stands out of the background, towards the garment's side; the noise
    threshold). The image is inverted when the pixels that stand out are darker overall."""
    bg, noise = _background(_border_pixels(gray))
    thr = max(_FG_MIN_LEVEL, _FG_NOISE_K * noise)
    diff = gray - bg
    fg = np.abs(diff) > thr
    invert = bool(diff[fg].sum() < 0) if fg.any() else bg > 127.5
    return np.clip(-diff if invert else diff, 0.0, None), thr


def is_blank(img28: np.ndarray, min_std: float = 8.0, min_pixels: int = 12, level: int = 32) -> bool:
    """True if a data-set-format image (after :func:`to_dataset_format`) shows nothing to classify.

    Blank means near-uniform (standard deviation below ``min_std``: all black, all white, a flat grey, faint
    noise) or almost empty (fewer than ``min_pixels`` pixels at or above ``level``: a speck, a dot, a thin
    scratch). Calibrated on the official images so that none of the 70,000 is flagged: the smallest standard
    deviation is 18.1 in the test set (16.5 in the training set) and the smallest count of pixels >= 32 is
    42 (22), so the defaults leave a margin of about 2x.
    """
    a = np.asarray(img28, dtype=np.float64)
    if a.size == 0:
        return True
    if float(a.std()) < min_std:
        return True
    return int((a >= level).sum()) < min_pixels


# ----------------------------------------------------------------------------------------------------
# helpers of to_dataset_format

_SIZE = 28
_WORK_SIZE = 1024  # images are first reduced (area average) to at most this many pixels on a side
_FG_MIN_LEVEL = 10.0  # a pixel is "object" if it differs from the background by more than this (0-255)...
_FG_NOISE_K = 4.0  # ...and by more than this many robust standard deviations of the border
_SPECK_FRACTION = 0.05  # an object whose longest side is below this fraction of the image's is a speck
_STRETCH_PERCENTILE = 99.8  # percentile of the 28x28 result mapped to 255
_LUMA = np.array([0.299, 0.587, 0.114])


def _looks_like_dataset(a: np.ndarray) -> bool:
    """uint8 28x28 with a dark background, a bright maximum and an object spanning (nearly) the whole frame.

    "Dark background": the border's median is dark, or (bags and pullovers that fill the frame) at least
    two of the four 3x3 corners are. Holds for all 70,000 official images (maxima >= 254, longest side of
    the non-zero pixels' bounding box >= 26); a photo shrunk to 28x28 (light background) does not qualify.
    """
    if a.dtype != np.uint8 or a.shape != (_SIZE, _SIZE) or a.max() < 200:
        return False
    if _median(_border_pixels(a)) > 127:
        corners = [a[:3, :3], a[:3, -3:], a[-3:, :3], a[-3:, -3:]]
        if sum(float(c.mean()) < 64 for c in corners) < 2:
            return False
    rows = np.flatnonzero(a.any(axis=1))
    cols = np.flatnonzero(a.any(axis=0))
    return max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 24


def _plain_uint8_28(image) -> np.ndarray | None:
    """The pixels of a uint8 28x28 grey array, or of an ``L`` 28x28 PIL image on its first frame without an
    EXIF turn; None for anything else (which goes the long way, with the same result for these)."""
    if isinstance(image, np.ndarray):
        return image if image.dtype == np.uint8 and image.shape == (_SIZE, _SIZE) else None
    from PIL import Image

    if not (isinstance(image, Image.Image) and image.mode == "L" and image.size == (_SIZE, _SIZE)
            and image.tell() == 0):
        return None
    try:
        turned = image.getexif().get(0x0112, 1) != 1
    except Exception:  # noqa: BLE001 - a malformed EXIF block: the long way copes with it
        return None
    return None if turned else np.asarray(image)


def _planes(image) -> tuple[np.ndarray, np.ndarray | None]:
    """Image -> (luminance float64 (H, W) in [0, 255], alpha float64 in [0, 1] or None).

    A PIL image comes back already reduced to at most ``_WORK_SIZE`` pixels a side, converted and reduced
    tile by tile, so that no intermediate is larger than a tile however large or thin the image (an upload
    within the pixel limit costs its decoded pixels plus a few MB, never a float copy of itself).
    """
    from PIL import Image

    if isinstance(image, Image.Image):
        if image.tell() != 0:  # the first frame (not n_frames: GIF and TIFF count theirs by walking them all)
            image.seek(0)
        image = _upright(image)
        mode = image.mode
        if mode in ("I", "F") or mode.startswith("I;16"):
            return _wide_planes(image, _WORK_SIZE)
        try:
            small = _tiled_reduce(image, _WORK_SIZE)
        except (ValueError, OSError) as e:  # a mode Pillow cannot convert (LAB, HSV...): the image's fault
            from .images import ImageError

            raise ImageError(f"unsupported image mode {mode}: cannot convert it to grey levels") from e
        return _array_planes(np.asarray(small))
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch tensor
        image = image.detach().cpu().numpy()
    return _array_planes(np.asarray(image))


def _upright(image):
    """The image turned as its EXIF orientation says; the image itself (no copy) when there is no turn."""
    from PIL import ImageOps

    try:
        if image.getexif().get(0x0112, 1) not in range(2, 9):
            return image
        return ImageOps.exif_transpose(image) or image
    except Exception:  # noqa: BLE001 - a malformed EXIF block must not reject the image
        return image


def _luma(image):
    """Per-pixel conversion of a PIL image of any mode to ``L``, or ``LA`` when it has transparency."""
    mode = image.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in image.info:
        if mode == "La":
            image = image.convert("LA")
        elif mode not in ("RGBA", "LA"):
            image = image.convert("RGBA")  # applies a palette's / tRNS transparency
        return image.convert("LA")  # Pillow's ITU-R 601 luma, alpha kept
    if mode != "L":
        if mode not in ("1", "P", "RGB"):
            try:  # CMYK, YCbCr, LAB, HSV, RGBX...: through RGB
                image = image.convert("RGB")
            except (ValueError, OSError):
                pass
        image = image.convert("L")
    return image


_TILE_PIXELS = 1 << 18  # large images are converted and reduced in tiles of about this many pixels


def _factors(width: int, height: int, limit: int) -> tuple[int, int]:
    """Integer reduction factors (x, y) so that the longest side becomes at most ``limit``.

    Both are the same (the aspect ratio is kept) except along a side shorter than the factor, which is
    reduced to one pixel: a 1x100000 strip becomes 1x977, not 1x100000.
    """
    factor = max(1, -(-max(width, height) // limit))
    return min(factor, width), min(factor, height)


def _tiles(width: int, height: int, fx: int, fy: int):
    """Boxes (left, top, right, bottom) covering the image, each a whole number of fx x fy blocks (but the
    last row and column), of about ``_TILE_PIXELS`` pixels or one row of blocks."""
    tw = width if width * fy <= _TILE_PIXELS else max(fx, _TILE_PIXELS // fy // fx * fx)
    th = max(fy, _TILE_PIXELS // tw // fy * fy)
    for top in range(0, height, th):
        for left in range(0, width, tw):
            yield left, top, min(width, left + tw), min(height, top + th)


def _tiled_reduce(image, limit: int):
    """``_shrink_pil(_luma(image), limit)`` computed tile by tile, with the same pixels as a result.

    Conversion is per pixel and box reduction is per block, so tiles aligned on whole blocks give exactly
    the whole image's result, while only one tile's conversions exist at a time.
    """
    from PIL import Image

    fx, fy = _factors(*image.size, limit)
    if fx == fy == 1:
        return _luma(image)
    w, h = image.size
    out = None
    for box in _tiles(w, h, fx, fy):
        part = _shrink_pil(_luma(image.crop(box)), (fx, fy))
        if out is None:
            out = Image.new(part.mode, (-(-w // fx), -(-h // fy)))
        out.paste(part, (box[0] // fx, box[1] // fy))
    return out


def _shrink_pil(image, factors: tuple[int, int]):
    """Box reduction of a PIL image by integer factors (x, y) (fast, premultiplies alpha)."""
    if factors == (1, 1):
        return image
    if image.mode == "LA":
        return image.convert("La").reduce(factors).convert("LA")
    return image.reduce(factors)


def _wide_planes(image, limit: int) -> tuple[np.ndarray, None]:
    """Planes of an ``I``, ``F`` or ``I;16`` image, equal to ``_shrink(_array_planes(np.asarray(image))[0])``
    but computed tile by tile: the value range first (it decides the scaling), then the scaled block means,
    so that no float copy of the whole image is ever made."""
    w, h = image.size
    fx, fy = _factors(w, h, limit)
    if fx == fy == 1:
        return _array_planes(np.asarray(image))
    lo, hi = np.inf, -np.inf
    for box in _tiles(w, h, fx, fy):
        a = np.asarray(image.crop(box))
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
    hh, ww = h // fy * fy, w // fx * fx  # _shrink drops the incomplete last blocks
    out = np.empty((hh // fy, ww // fx), np.float64)
    for left, top, right, bottom in _tiles(ww, hh, fx, fy):
        f = _scale_to_255(np.asarray(image.crop((left, top, right, bottom))), (lo, hi))
        out[top // fy:bottom // fy, left // fx:right // fx] = _block_mean(f, fx, fy)
    return out, None


def _array_planes(a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    from .images import ImageError

    if a.dtype == object or np.iscomplexobj(a) or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise ImageError(f"unsupported image array dtype {a.dtype}")
    while a.ndim > 2 and a.shape[0] == 1:  # (1, H, W), (1, H, W, C)
        a = a[0]
    if a.ndim == 3 and a.shape[-1] not in (1, 2, 3, 4) and a.shape[0] in (1, 2, 3, 4):
        a = np.moveaxis(a, 0, -1)  # channels first (C, H, W)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (2, 3, 4)) or 0 in a.shape:
        raise ImageError(f"expected an image array of shape (H, W) or (H, W, 1|2|3|4), got {a.shape}")
    if a.ndim == 2:
        colour, alpha = a, None
    elif a.shape[-1] in (2, 4):
        colour, alpha = a[..., :-1], a[..., -1]
    else:
        colour, alpha = a, None
    colour = _scale_to_255(colour)
    if colour.ndim == 3:
        colour = colour[..., 0] if colour.shape[-1] == 1 else colour @ _LUMA
    if alpha is not None:
        alpha = _scale_alpha(alpha)
    return colour, alpha


def _scale_to_255(a: np.ndarray, whole: tuple | None = None) -> np.ndarray:
    """Pixel values of any dtype -> float64 in [0, 255].

    ``whole``: (min, max) of the whole image when ``a`` is one tile of it (the scaling depends on the
    whole image's range); None when ``a`` is the whole image.
    """
    if a.dtype == np.uint8:
        return a.astype(np.float64)
    if a.dtype == bool:
        return a.astype(np.float64) * 255.0
    f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(f.min()), float(f.max())) if whole is None else whole
    if np.issubdtype(a.dtype, np.floating):
        if lo >= 0.0 and hi <= 1.0:
            return f * 255.0
        if lo >= 0.0 and hi <= 255.0:
            return f
    elif lo >= 0:  # integers (uint16 / I;16, int32 / I, ...)
        if hi <= 255:
            return f
        if hi <= 65535:
            return f / 257.0
    # anything else (negative values, 32-bit ranges): map min..max to 0..255
    return (f - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(f)


def _scale_alpha(a: np.ndarray) -> np.ndarray:
    f = np.nan_to_num(a.astype(np.float64), nan=1.0)
    if a.dtype == np.uint8:
        f /= 255.0
    elif a.dtype == bool:
        pass
    elif np.issubdtype(a.dtype, np.integer):
        f /= 65535.0 if f.max() > 255 else 255.0
    elif f.max() > 1.0:
        f /= 255.0
    return np.clip(f, 0.0, 1.0)


def _composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray | None:
    """Flatten transparency onto white behind dark content, black behind light; None if nothing is opaque."""
    if alpha.min() >= 1.0:
        return gray
    weight = float(alpha.sum())
    if alpha.max() < 0.02 or weight < 1e-6:
        return None
    content = float((gray * alpha).sum()) / weight
    background = 255.0 if content < 127.5 else 0.0
    return gray * alpha + background * (1.0 - alpha)


def _shrink(a: np.ndarray, limit: int) -> np.ndarray:
    """Box-average a large array by integer factors (see :func:`_factors`) so its longest side is at most
    ``limit``; incomplete blocks at the right and bottom are dropped."""
    fx, fy = _factors(a.shape[1], a.shape[0], limit)
    if fx == fy == 1:
        return a
    h, w = (a.shape[0] // fy) * fy, (a.shape[1] // fx) * fx
    return _block_mean(a[:h, :w], fx, fy)


def _block_mean(a: np.ndarray, fx: int, fy: int) -> np.ndarray:
    """Mean of each fy x fx block of an array whose sides are multiples of the factors."""
    h, w = a.shape
    return a.reshape(h // fy, fy, w // fx, fx).mean(axis=(1, 3))


def _background(border: np.ndarray) -> tuple[float, float]:
    """Background level and its noise (robust standard deviation) from the border pixels.

    Usually the border is all background and its median is the answer. When the object crosses the border
    (a tight crop: a garment covering most of the edge of the photo), the border holds two clusters, and
    the median may be the garment; then the background is the *flatter* cluster (paper, wall, studio
    backdrop), the garment being the textured one, and on a tie the larger one.
    """
    med = float(np.median(border))
    lo, hi = (float(v) for v in np.percentile(border, [5, 95]))
    bg = med
    if hi - lo > 2 * _FG_MIN_LEVEL:
        mid = (lo + hi) / 2
        clusters = [c for c in (border[border <= mid], border[border > mid]) if c.size >= 0.1 * border.size]
        centres = [float(np.median(c)) for c in clusters]
        spreads = [float(np.median(np.abs(c - m))) + 1.0 for c, m in zip(clusters, centres)]
        # two well separated clusters (a lighting gradient is one spread-out cluster: keep the median)
        if len(clusters) == 2 and abs(centres[1] - centres[0]) > 3 * sum(spreads):
            if max(spreads) > 1.5 * min(spreads):
                pick = int(np.argmin(spreads))
            else:
                pick = int(np.argmax([c.size for c in clusters]))
            bg = centres[pick]
    near = border[np.abs(border - bg) <= 4 * _FG_MIN_LEVEL]
    noise = 1.4826 * float(np.median(np.abs(near - bg))) if near.size else 0.0
    return bg, noise


def _median(x: np.ndarray) -> float:
    """np.median of a 1-D array without NaNs: several times faster on the small arrays it gets here."""
    n = len(x)
    h = n // 2
    part = np.partition(x, [h - 1, h] if n % 2 == 0 else h)
    return float(part[h]) if n % 2 else (float(part[h - 1]) + float(part[h])) / 2


def _border_pixels(a: np.ndarray) -> np.ndarray:
    """The outer ring of the image, about 2% of its shorter side thick (at least one pixel)."""
    k = max(1, int(round(0.02 * min(a.shape))))
    return np.concatenate([a[:k].ravel(), a[-k:].ravel(), a[k:-k, :k].ravel(), a[k:-k, -k:].ravel()])


def _object_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right) of the object in ``mask``; None if none or only specks."""
    from PIL import Image, ImageFilter

    h, w = mask.shape
    if min(h, w) >= 3 * _SIZE:  # remove isolated 1-2 px specks (sensor/JPEG noise, dust)
        m = Image.fromarray(mask.astype(np.uint8) * 255)
        mask = np.asarray(m.filter(ImageFilter.MinFilter(3)).filter(ImageFilter.MaxFilter(3))) > 0
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    if max(bottom - top, right - left) < max(3.0, _SPECK_FRACTION * max(h, w)):
        return None
    return top, bottom, left, right


def _frame(obj: np.ndarray, stretch: bool) -> np.ndarray:
    """Resize so the longest side is 28, centre on a black 28x28 canvas, optionally stretch to 255.

    The scale is the same along both axes (28 / longest side); the shorter side becomes a whole number of
    pixels by sampling a window centred on the object, so the aspect ratio is kept exactly.
    """
    from PIL import Image

    h, w = obj.shape
    scale = _SIZE / max(h, w)
    nh, nw = max(1, min(_SIZE, round(h * scale))), max(1, min(_SIZE, round(w * scale)))
    margin = int(np.ceil(0.5 / scale)) + 2
    padded = np.pad(obj.astype(np.float32), margin)
    cy, cx = margin + h / 2, margin + w / 2
    hy, hx = nh / (2 * scale), nw / (2 * scale)
    small = Image.fromarray(padded).resize((nw, nh), Image.LANCZOS, box=(cx - hx, cy - hy, cx + hx, cy + hy))
    out = np.zeros((_SIZE, _SIZE), np.float64)
    top, left = (_SIZE - nh + 1) // 2, (_SIZE - nw + 1) // 2  # odd sizes: half a pixel down/right
    out[top:top + nh, left:left + nw] = np.clip(np.asarray(small, dtype=np.float64), 0.0, None)
    if stretch:
        peak = float(np.percentile(out, _STRETCH_PERCENTILE))
        if peak > 0:
            out *= 255.0 / peak
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
