"""Safe decoding of untrusted image uploads and files.

:func:`decode_image` is the one door through which user-supplied image bytes enter the package (the
server, the ``predict`` command). It

* reads only the header first (``Image.open`` is lazy) and refuses images whose pixel count exceeds
  ``max_pixels`` *before* any pixel is decoded, so a decompression bomb (a 50000x50000 PNG that
  compresses to a few KB) is refused fast and without allocating;
* turns Pillow's own ``DecompressionBombWarning``/``DecompressionBombError`` into :class:`ImageTooLarge`;
* accepts only PNG, JPEG (including phone "MPO" JPEGs), BMP, GIF, WebP and TIFF, and only lets Pillow's
  parsers for those formats look at the data;
* forces a full decode inside a ``try`` so that truncated or corrupt data fails here with a clear
  message, not later in some other module;
* returns the first frame of animated images, with the EXIF orientation applied, fully loaded and
  detached from any file.

Every failure is an :class:`ImageError` (a ``ValueError``) whose ``status`` is the HTTP status a server
should answer with and whose message is safe to show to a user (no traceback, no internal paths).
"""
from __future__ import annotations

import io
import os
import warnings

from PIL import Image, ImageOps

__all__ = ["ImageError", "ImageTooCostly", "ImageTooLarge", "MAX_DECODE_WORK", "MAX_FRAMES", "MAX_PIXELS",
           "SUPPORTED_FORMATS", "decode_image"]

#: Largest accepted width*height by default: 40 megapixels (an 8000x5000 photo; phones take 12-48 MP).
MAX_PIXELS = 40_000_000
#: Largest accepted decoding work by default, in pixel-passes: width*height times the passes the decoder makes
#: over them (a progressive JPEG's scans; 1 for every other image). A 40-megapixel progressive photo has 10
#: scans; one scan of a megapixel costs the decoder about 1 ms of CPU, so this bounds a decode near 0.5 s.
MAX_DECODE_WORK = 10 * MAX_PIXELS
#: Most frames (animated GIF, PNG or WebP, pages of a TIFF) an upload may declare; only the first is decoded.
MAX_FRAMES = 1_000

#: Pillow format names we let parse untrusted data. "MPO" is how Pillow names the multi-picture JPEGs that
#: many phones write; it decodes as an ordinary JPEG.
SUPPORTED_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF", "WEBP", "TIFF")


def _register_plugins() -> tuple[str, ...]:
    """Import (= register) exactly the Pillow plugins we accept; return the formats actually available."""
    import importlib

    modules = {"PNG": "PngImagePlugin", "JPEG": "JpegImagePlugin", "MPO": "MpoImagePlugin",
               "BMP": "BmpImagePlugin", "GIF": "GifImagePlugin", "WEBP": "WebPImagePlugin",
               "TIFF": "TiffImagePlugin"}
    available = []
    for fmt in SUPPORTED_FORMATS:
        try:
            importlib.import_module(f"PIL.{modules[fmt]}")
        except ImportError:  # e.g. Pillow built without WebP support
            continue
        if fmt in Image.OPEN:
            available.append(fmt)
    return tuple(available)


_AVAILABLE_FORMATS = _register_plugins()
_SUPPORTED_TEXT = "PNG, JPEG, BMP, GIF, WebP or TIFF"

# Signatures of common formats we do not accept, only to give a clearer message. We never hand such data to
# Pillow's other (less exercised) parsers.
_KNOWN_UNSUPPORTED = (
    (b"%PDF", "PDF"),
    (b"8BPS", "Photoshop (PSD)"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"icns", "ICNS"),
    (b"\x00\x00\x08\x01", "IDX (use the data-set loader, not decode_image)"),
    (b"\x00\x00\x08\x03", "IDX (use the data-set loader, not decode_image)"),
)


class ImageError(ValueError):
    """The data is not an image we can decode (empty, corrupt, truncated, unsupported format...)."""

    status = 400


class ImageTooLarge(ImageError):
    """The image has more pixels than allowed (possible decompression bomb)."""

    status = 413


class ImageTooCostly(ImageTooLarge):
    """Decoding the image would cost more than allowed (too many progressive scans, frames, or pixels times
    passes), found from its structure before any pixel is decoded."""


def _sniff_unsupported(head: bytes) -> str | None:
    for magic, name in _KNOWN_UNSUPPORTED:
        if head.startswith(magic):
            return name
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIC/HEIF"
        if brand in (b"avif", b"avis"):
            return "AVIF"
        return "ISO media (video/HEIF)"
    if len(head) >= 2 and head[:1] == b"P" and head[1:2] in b"1234567":
        return "PNM (PBM/PGM/PPM)"
    stripped = head.lstrip()
    if stripped[:5].lower() == b"<?xml" or stripped[:4].lower() == b"<svg":
        return "SVG/XML"
    return None


#: Pillow reads PNG chunks and the JPEG markers before the image data one by one in Python: a few MB of
#: empty ones (600,000 PNG chunks, 2,000,000 JPEG markers) cost it over a second. Real files have dozens (an
#: animated PNG two per frame, a large PNG one per 8-64 KB of data).
MAX_PNG_CHUNKS = 10_000
MAX_JPEG_MARKERS = 1_000
#: GIF data sub-blocks walked before giving up (an 8 MB GIF of full 255-byte blocks has 33,000).
MAX_GIF_BLOCKS = 200_000
_SOS = b"\xff\xda"


def _too_many_parts(data: bytes) -> str | None:
    """Why a PNG or JPEG has too many chunks or markers for its size to be a real image, else None.

    Walks the chunk headers only (lengths, no data), and stops at the limit, so it costs microseconds."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        pos, count = 8, 0
        while pos + 8 <= len(data) and data[pos + 4:pos + 8] != b"IEND":
            count += 1
            if count > MAX_PNG_CHUNKS:
                return f"the PNG has more than {MAX_PNG_CHUNKS:,} chunks"
            pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    elif data.startswith(b"\xff\xd8"):
        if _first_scan(data) < 0:
            return f"the JPEG has more than {MAX_JPEG_MARKERS:,} markers before its image data"
    return None


def _first_scan(data: bytes) -> int:
    """Offset of a JPEG's first start-of-scan marker (len(data) when there is none), -1 past the marker limit."""
    pos, count = 2, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:  # up to the image data
        count += 1
        if count > MAX_JPEG_MARKERS:
            return -1
        marker = data[pos + 1]
        standalone = marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01  # fill byte, RSTn, SOI, TEM
        pos += 1 if marker == 0xFF else 2 if standalone else 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return pos


def _passes(data: bytes, fmt: str) -> int:
    """How many times the decoder goes over the pixels: a JPEG's scans (a progressive one has several, and a
    crafted one thousands), 1 for the other formats.

    Inside a JPEG's entropy-coded data a 0xFF byte is always followed by 0x00, a restart marker or a real
    marker, so every ``FF DA`` from the first scan on starts a scan (one in trailing data or a second MPO
    picture counts too, which errs on the safe side); the count runs in C, a millisecond for 8 MB."""
    if fmt in ("JPEG", "MPO"):
        start = _first_scan(data)
        return max(1, data.count(_SOS, max(start, 0)))
    return 1


def _frames(data: bytes, fmt: str, limit: int) -> int:
    """The frames (or TIFF pages) the file declares, counted from its structure up to ``limit + 1``."""
    count = 0
    if fmt == "PNG":
        pos = 8
        while pos + 8 <= len(data) and count <= limit and data[pos + 4:pos + 8] != b"IEND":
            count += data[pos + 4:pos + 8] == b"fcTL"
            pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    elif fmt == "GIF":
        count = _gif_frames(data, limit)
    elif fmt == "WEBP":
        pos = 12
        while pos + 8 <= len(data) and count <= limit:
            count += data[pos:pos + 4] == b"ANMF"
            size = int.from_bytes(data[pos + 4:pos + 8], "little")
            pos += 8 + size + (size & 1)
    elif fmt == "TIFF":
        little = data[:2] == b"II"
        order = "little" if little else "big"
        big = int.from_bytes(data[2:4], order) == 43  # BigTIFF: 8-byte offsets and counts
        offset = int.from_bytes(data[8:16] if big else data[4:8], order)
        seen = set()
        while 0 < offset < len(data) and offset not in seen and count <= limit:
            seen.add(offset)
            count += 1
            width = 8 if big else 2
            entries = int.from_bytes(data[offset:offset + width], order)
            nxt = offset + width + entries * (20 if big else 12)
            offset = int.from_bytes(data[nxt:nxt + (8 if big else 4)], order)
    return max(count, 1)


def _gif_frames(data: bytes, limit: int) -> int:
    """Image descriptors of a GIF, walking its blocks (at most ``MAX_GIF_BLOCKS`` data sub-blocks)."""
    if len(data) < 13:
        return 1
    pos = 13
    if data[10] & 0x80:
        pos += 3 << ((data[10] & 7) + 1)
    count = blocks = 0
    while pos < len(data) and count <= limit:
        kind = data[pos]
        if kind == 0x3B:  # trailer
            break
        if kind == 0x2C:  # image descriptor, then an optional colour table and the LZW code size
            count += 1
            if pos + 10 > len(data):
                break
            flags = data[pos + 9]
            pos += 10 + ((3 << ((flags & 7) + 1)) if flags & 0x80 else 0) + 1
        elif kind == 0x21:  # extension: label, then sub-blocks
            pos += 2
        else:
            break
        while pos < len(data) and data[pos]:  # sub-blocks until the zero-length terminator
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise ImageTooCostly(f"image too costly to decode: the GIF has more than {MAX_GIF_BLOCKS:,} data "
                                     "blocks; please upload a still image")
            pos += 1 + data[pos]
        pos += 1
    return count


class Deferred(Exception):
    """Raised by :func:`decode_image` before decoding, for an image whose work passes ``defer_above``: the
    caller decodes it elsewhere (a server, in a process of lower priority)."""

    def __init__(self, work: int):
        super().__init__(f"{work:,} pixel-passes")
        self.work = work


def _check_work(data: bytes, im: Image.Image, max_work: int, max_frames: int, defer_above: int | None) -> None:
    fmt = im.format or ""
    passes = _passes(data, fmt)
    work = im.width * im.height * passes
    if work > max_work:
        what = f"{passes:,} progressive scans of {im.width}x{im.height} pixels" if passes > 1 else \
            f"{im.width}x{im.height} pixels"
        raise ImageTooCostly(f"image too costly to decode: {what} = {work:,} pixel-passes (the limit is "
                             f"{max_work:,}); please upload a smaller or plainer image")
    frames = _frames(data, fmt, max_frames)
    if frames > max_frames:
        raise ImageTooCostly(f"image too costly to decode: more than {max_frames:,} frames (the limit); "
                             "please upload a still image")
    if defer_above is not None and work > defer_above:
        raise Deferred(work)


def _bomb(max_pixels: int) -> ImageTooLarge:
    """Pillow's own bomb check fired (its message quotes Pillow's limit, not ours)."""
    return ImageTooLarge(f"image is too large: more than {max_pixels:,} pixels (the limit); please upload a "
                         "smaller image")


def _too_large(width: int, height: int, max_pixels: int) -> ImageTooLarge:
    return ImageTooLarge(
        f"image is too large: {width}x{height} = {width * height:,} pixels "
        f"(the limit is {max_pixels:,}); please upload a smaller image"
    )


def _as_bytes(data) -> bytes:
    """The upload's bytes (a path is read), refused when empty or made of too many parts to be an image."""
    if isinstance(data, (str, os.PathLike)):
        try:
            with open(data, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ImageError(f"cannot read image file {os.fspath(data)!r}: {e.strerror or e}") from None
    elif isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    elif not isinstance(data, bytes):
        raise ImageError(f"expected image bytes or a file path, got {type(data).__name__}")
    if not data:
        raise ImageError("empty upload: no image data")
    why = _too_many_parts(data)
    if why:
        raise ImageError(f"cannot read the image: {why}, far more than any real image")
    return data


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Pillow's image of ``data``, header read and size checked, pixels not decoded yet; ImageError otherwise."""
    try:
        im = Image.open(io.BytesIO(data), formats=_AVAILABLE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _bomb(max_pixels) from None
    except Image.UnidentifiedImageError:
        other = _sniff_unsupported(data[:64])
        if other:
            raise ImageError(f"unsupported image format: {other}; please upload a {_SUPPORTED_TEXT} "
                             f"image") from None
        raise ImageError(f"cannot identify the image: the data is not a {_SUPPORTED_TEXT} image, "
                         f"or its header is corrupt") from None
    except Exception as e:  # noqa: BLE001 - any parser failure is the upload's fault
        raise ImageError("cannot read the image: its header is truncated or corrupt "
                         f"({type(e).__name__})") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        im.close()
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        im.close()
        raise _too_large(width, height, max_pixels)
    return im


def decode_image(data: bytes | bytearray | memoryview | str | os.PathLike,
                 max_pixels: int = MAX_PIXELS, max_work: int = MAX_DECODE_WORK,
                 max_frames: int = MAX_FRAMES, defer_above: int | None = None) -> Image.Image:
    """Decode untrusted image bytes (or a file path) into a fully loaded Pillow image.

    Returns the first frame, EXIF orientation applied, in the file's own mode (``L``, ``RGB``, ``RGBA``,
    ``P``, ``I;16``, ``CMYK``, ...): :func:`fmnist.core.preprocess.to_dataset_format` takes any of them.

    Raises :class:`ImageTooLarge` if ``width * height > max_pixels`` (checked from the header, before
    decoding), :class:`ImageTooCostly` if decoding would cost more than ``max_work`` pixel-passes (pixels
    times a progressive JPEG's scans) or the file declares more than ``max_frames`` frames (both counted from
    its structure, before decoding), :class:`Deferred` (not an ImageError) if that work passes
    ``defer_above``, and :class:`ImageError` for anything that is not a decodable PNG/JPEG/BMP/GIF/WebP/TIFF
    image.
    """
    data = _as_bytes(data)
    if max_pixels is None or max_pixels <= 0:
        raise ValueError("max_pixels must be a positive integer")
    if max_work is None or max_work <= 0 or max_frames is None or max_frames <= 0:
        raise ValueError("max_work and max_frames must be positive integers")

    im = None
    try:
        with warnings.catch_warnings():
            # Pillow warns (above Image.MAX_IMAGE_PIXELS) and raises (above twice that) from inside
            # Image.open. Make its warning an error when our own limit is the stricter one, so it can never
            # leak as a warning; a caller who raised max_pixels above Pillow's threshold gets Pillow's error
            # (at twice the threshold) as the hard ceiling.
            if max_pixels <= (Image.MAX_IMAGE_PIXELS or max_pixels):
                warnings.simplefilter("error", Image.DecompressionBombWarning)
            else:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = _open(data, max_pixels)
            _check_work(data, im, max_work, max_frames, defer_above)
            try:
                # First frame of animated GIF/WebP/APNG/multi-page TIFF (open() leaves us on it; be explicit).
                # Not n_frames: for GIF and TIFF it walks every frame, and a few MB can hold 300,000 of them.
                if im.tell() != 0:
                    im.seek(0)
                im.load()  # force the full decode now: truncated/corrupt data must fail here
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _bomb(max_pixels) from None
            except MemoryError:
                raise ImageTooLarge("image is too large to decode in memory") from None
            except Exception as e:  # noqa: BLE001
                kind = "truncated" if "truncat" in str(e).lower() or isinstance(e, EOFError) else "corrupt"
                fmt = f"{im.format} " if im.format else ""
                raise ImageError(f"cannot decode the {fmt}image: the data is {kind} ({type(e).__name__})"
                                 ) from None

            try:
                ImageOps.exif_transpose(im, in_place=True)  # turns the pixels only when the EXIF says so
            except Exception:  # noqa: BLE001 - malformed EXIF must not reject an otherwise good image
                pass
            # A plain image sharing the decoded pixels (Image.copy without the copy, which would double the
            # memory of a large upload for a moment), detached from the parser; close() below leaves them.
            out = im._new(im.im)
            out.format = im.format  # keep the detected format for callers that log it
            return out
    finally:
        if im is not None:
            im.close()
