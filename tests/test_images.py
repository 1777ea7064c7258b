"""fmnist.core.images.decode_image: safe decoding of untrusted uploads (all images made in memory)."""
from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fmnist.core.images import MAX_PIXELS, ImageError, ImageTooLarge, decode_image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _garment(size=(60, 40)) -> Image.Image:
    im = Image.new("RGB", size, (250, 250, 250))
    ImageDraw.Draw(im).rectangle((size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4),
                                 fill=(30, 40, 90))
    return im


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def _png_bomb(width: int, height: int, rows: int | None = None) -> bytes:
    """A valid 1-bit PNG of width x height zeros (or just its first ``rows`` rows): tiny once compressed."""
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    block = row * 256
    left = height if rows is None else rows
    idat = []
    while left > 0:
        n = min(left, 256)
        idat.append(comp.compress(block if n == 256 else row * n))
        left -= n
    idat.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(idat))
            + _png_chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------
# errors


def test_error_classes():
    assert issubclass(ImageError, ValueError)
    assert issubclass(ImageTooLarge, ImageError)
    assert ImageError.status == 400 and ImageTooLarge.status == 413
    assert MAX_PIXELS == 40_000_000


def _bad_inputs(tmp_path):
    png = _encode(_garment(), "PNG")
    noisy = Image.effect_noise((200, 150), 60).convert("RGB")
    jpeg = _encode(noisy, "JPEG", quality=90)
    text_png = tmp_path / "hello.png"
    text_png.write_text("hello")
    rng = np.random.default_rng(0)
    return {
        "empty": (b"", "empty"),
        "truncated png": (png[: len(png) // 2], "truncated"),
        "truncated png header": (png[:30], "corrupt"),
        "truncated jpeg": (jpeg[: len(jpeg) // 2], "truncated"),
        "random bytes": (rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "cannot identify"),
        "text named .png": (text_png, "cannot identify"),
        "text bytes": (b"hello", "cannot identify"),
        "ico": (_encode(Image.new("RGB", (16, 16)), "ICO"), "unsupported image format"),
        "ppm": (_encode(Image.new("RGB", (16, 16)), "PPM"), "unsupported image format"),
        "pdf": (b"%PDF-1.4\n%...", "unsupported image format"),
        "missing file": (tmp_path / "nope.png", "cannot read image file"),
    }


@pytest.mark.parametrize("kind", [
    "empty", "truncated png", "truncated png header", "truncated jpeg", "random bytes", "text named .png",
    "text bytes", "ico", "ppm", "pdf", "missing file",
])
def test_bad_data_gives_clear_image_error(kind, tmp_path):
    data, words = _bad_inputs(tmp_path)[kind]
    with pytest.raises(ImageError) as info:
        decode_image(data)
    err = info.value
    assert type(err) is ImageError and err.status == 400
    msg = str(err)
    assert words in msg.lower(), msg
    assert "Traceback" not in msg and "File \"" not in msg
    if kind in ("ico", "ppm", "random bytes", "text bytes"):
        assert "PNG, JPEG" in msg  # tells the user what is accepted


def test_wrong_argument_type():
    with pytest.raises(ImageError):
        decode_image(12345)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# size limits


def test_decompression_bomb_refused_fast():
    data = _png_bomb(30_000, 30_000)  # 900 megapixels, a few hundred KB compressed
    assert len(data) < 300_000
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data)
    assert time.perf_counter() - t0 < 1.0
    assert info.value.status == 413 and "too large" in str(info.value)


def test_huge_header_refused_before_decoding():
    data = _png_bomb(50_000, 50_000, rows=4)  # header promises 2.5 gigapixels; only the header is read
    assert len(data) < 1000
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge):
        decode_image(data)
    assert time.perf_counter() - t0 < 0.5


def test_pillow_bomb_warning_becomes_too_large_not_a_warning():
    data = _png_bomb(10_000, 9_000, rows=4)  # 90 MP: above Pillow's warning threshold, below its error
    assert 10_000 * 9_000 > Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning would fail the test
        with pytest.raises(ImageTooLarge):
            decode_image(data)


def test_limit_is_per_call():
    data = _encode(_garment((100, 100)), "PNG")
    with pytest.raises(ImageTooLarge) as info:
        decode_image(data, max_pixels=9_999)
    assert "100x100" in str(info.value)
    assert decode_image(data, max_pixels=10_000).size == (100, 100)
    small = _png_bomb(3_000, 2_000)  # 6 MP of zeros: fine by default
    assert decode_image(small).size == (3_000, 2_000)
    with pytest.raises(ImageTooLarge):
        decode_image(small, max_pixels=5_000_000)


# --------------------------------------------------------------------------------------------------
# what decodes


def test_one_by_one_pixel():
    im = decode_image(_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert im.size == (1, 1) and im.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF"])
def test_supported_formats(fmt):
    im = decode_image(_encode(_garment(), fmt))
    assert im.size == (60, 40)
    assert im.format == fmt
    a = np.asarray(im.convert("L"), dtype=float)
    assert a[20, 30] < 128 < a[2, 2]  # the dark rectangle is where it was drawn


def test_decodes_bytes_bytearray_memoryview_and_paths(tmp_path):
    data = _encode(_garment(), "PNG")
    path = tmp_path / "g.png"
    path.write_bytes(data)
    for src in (data, bytearray(data), memoryview(data), path, str(path)):
        assert decode_image(src).size == (60, 40)


def test_result_is_loaded_and_detached_from_the_file(tmp_path):
    path = tmp_path / "g.png"
    path.write_bytes(_encode(_garment(), "PNG"))
    im = decode_image(path)
    path.unlink()
    assert np.asarray(im.convert("L")).shape == (40, 60)


def test_cmyk_jpeg():
    im = decode_image(_encode(Image.new("CMYK", (50, 40), (0, 0, 0, 200)), "JPEG"))
    assert im.mode == "CMYK" and im.size == (50, 40)


def test_16_bit_png():
    a = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 25).astype(np.uint16)
    im = decode_image(_encode(Image.fromarray(a), "PNG"))
    assert im.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(im), a)


def test_palette_png_with_transparency():
    p = _garment().quantize(4, dither=Image.Dither.NONE)
    p.info["transparency"] = p.getpixel((0, 0))
    im = decode_image(_encode(p, "PNG", transparency=p.getpixel((0, 0))))
    assert im.mode == "P" and "transparency" in im.info
    rgba = np.asarray(im.convert("RGBA"))
    assert rgba[0, 0, 3] == 0 and rgba[20, 30, 3] == 255


def test_rgba_png():
    src = Image.new("RGBA", (30, 20), (0, 0, 0, 0))
    ImageDraw.Draw(src).ellipse((5, 5, 25, 15), fill=(200, 10, 10, 255))
    im = decode_image(_encode(src, "PNG"))
    assert im.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(im), np.asarray(src))


def test_animated_gif_first_frame():
    f1 = Image.new("L", (40, 30), 255)
    ImageDraw.Draw(f1).rectangle((2, 2, 12, 12), fill=0)
    f2 = Image.new("L", (40, 30), 255)
    ImageDraw.Draw(f2).rectangle((25, 15, 35, 25), fill=0)
    data = _encode(f1, "GIF", save_all=True, append_images=[f2], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    im = decode_image(data)
    a = np.asarray(im.convert("L"))
    assert a[5, 5] == 0 and a[20, 30] == 255  # frame 1, not frame 2
    assert getattr(im, "n_frames", 1) == 1


def test_animated_webp_first_frame():
    f1 = Image.new("RGB", (40, 30), "white")
    ImageDraw.Draw(f1).rectangle((2, 2, 12, 12), fill="black")
    f2 = Image.new("RGB", (40, 30), "white")
    ImageDraw.Draw(f2).rectangle((25, 15, 35, 25), fill="black")
    data = _encode(f1, "WEBP", save_all=True, append_images=[f2], duration=100, lossless=True)
    a = np.asarray(decode_image(data).convert("L"))
    assert a[5, 5] < 50 and a[20, 30] > 200


def test_exif_rotated_jpeg():
    base = Image.new("RGB", (60, 40), "white")
    ImageDraw.Draw(base).rectangle((0, 0, 9, 9), fill="black")  # mark the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    im = decode_image(_encode(base, "JPEG", exif=exif.tobytes(), quality=95))
    assert im.size == (40, 60)
    a = np.asarray(im.convert("L"), dtype=float)
    assert a[:8, -8:].mean() < 40 and a[:8, :8].mean() > 215  # the mark is now top-right
    assert im.getexif().get(0x0112) in (None, 1)  # not applied twice downstream


def test_too_large_messages_quote_our_limit_not_pillows():
    """Pillow's own bomb checks fire first for very large images; the message still names the caller's limit."""
    limit = 1_000_000
    for w, h in ((20000, 20000), (12000, 9000), (1001, 1000)):  # Pillow's error, Pillow's warning, ours
        with pytest.raises(ImageTooLarge) as err:
            decode_image(_png_bomb(w, h, rows=1), max_pixels=limit)
        message = str(err.value)
        assert "1,000,000" in message and str(Image.MAX_IMAGE_PIXELS) not in message, message
        assert str(2 * Image.MAX_IMAGE_PIXELS) not in message



def _gif_of_many_frames(frames: int) -> bytes:
    """A valid GIF of ``frames`` 1x1 frames, written by hand (about 20 bytes a frame)."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
             + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor, 1x1
             + b"\x02\x02\x44\x01\x00")  # LZW code size 2, one sub-block (clear, pixel 0, end), terminator
    return head + frame * frames + b"\x3b"


def test_gif_with_many_frames_is_not_walked(monkeypatch):
    """Only the first frame is read (n_frames would parse all of them); the frames are counted from the file's
    blocks, a walk that stops at a bound."""
    from PIL import GifImagePlugin

    data = _gif_of_many_frames(50_000)
    seeks = []
    real = GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek",
                        lambda self, frame, update_image=True: seeks.append(frame) or real(self, frame, update_image))
    im = decode_image(data, max_frames=1_000_000)
    assert im.size == (1, 1) and len(seeks) <= 2
    with pytest.raises(ImageError, match="more than 1,000 frames"):  # by default, refused from its structure
        decode_image(data)
    many = _gif_of_many_frames(200_000)
    assert len(many) < 5_000_000
    with pytest.raises(ImageError, match="more than 200,000 data blocks"):
        decode_image(many, max_frames=1_000_000)


def test_png_and_jpeg_with_endless_empty_parts_are_refused():
    """A few MB of empty PNG chunks or JPEG markers, each parsed by Pillow in Python: refused before parsing."""
    png = _encode(Image.new("L", (8, 8), 100), "PNG")
    spam = _png_chunk(b"teXt", b"") * 600_000
    jpeg = _encode(Image.new("L", (8, 8), 100), "JPEG")
    for data in (png[:33] + spam + png[33:], png[:-12] + spam + png[-12:],
                 jpeg[:2] + b"\xff\xfe\x00\x02" * 2_000_000 + jpeg[2:]):
        with pytest.raises(ImageError, match="far more than any real image"):
            decode_image(data)
    # Real files are far below the limits: an animated PNG of 300 frames, a progressive JPEG with EXIF.
    frames = [Image.new("L", (16, 16), v) for v in range(0, 300)]
    apng = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=10)
    assert decode_image(apng).size == (16, 16)
    exif = Image.Exif()
    exif[0x010E] = "x" * 10_000
    assert decode_image(_encode(_garment(), "JPEG", progressive=True, exif=exif.tobytes())).size == (60, 40)
