"""Batch augmentations: shapes, valid value range, seeded determinism, and what each op does to pixels."""
from __future__ import annotations

import pytest
import torch

from fmnist.core.preprocess import make_spec
from fmnist.fit.augment import (
    AUGMENTATIONS,
    augment_batch,
    gaussian_noise,
    hflip,
    intensity_jitter,
    parse_augment,
    random_crop,
    random_erase,
)
from fmnist.fit.data import preprocess

SPEC = make_spec()
BG = (0.0 - SPEC["mean"]) / SPEC["std"]  # the normalised value of a black (raw 0) pixel
OPS = {
    "flip": lambda x, g: hflip(x, g),
    "crop": lambda x, g: random_crop(x, g, SPEC),
    "erase": lambda x, g: random_erase(x, g, SPEC),
    "noise": lambda x, g: gaussian_noise(x, g, SPEC),
    "jitter": lambda x, g: intensity_jitter(x, g, SPEC),
    "all": lambda x, g: augment_batch(x, AUGMENTATIONS, g, SPEC),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """64 asymmetric random images spanning the whole uint8 range, normalised as in training."""
    g = gen(123)
    raw = torch.randint(0, 256, (64, 28, 28), generator=g, dtype=torch.uint8)
    raw[:, 0, 0], raw[:, -1, -1] = 0, 255  # both extremes present in every image
    return preprocess(raw, SPEC)


def raw_of(x: torch.Tensor) -> torch.Tensor:
    return x * SPEC["std"] + SPEC["mean"]


@pytest.mark.parametrize("op", list(OPS))
def test_shape_dtype_and_range_preserved(op, batch):
    out = OPS[op](batch.clone(), gen(0))
    assert out.shape == batch.shape and out.dtype == batch.dtype
    raw = raw_of(out)
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5, f"{op} leaves the [0, 1] image range"
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("op", list(OPS))
def test_seeded_determinism(op, batch):
    a = OPS[op](batch.clone(), gen(7))
    b = OPS[op](batch.clone(), gen(7))
    c = OPS[op](batch.clone(), gen(8))
    assert torch.equal(a, b), f"{op}: same seed gave different output"
    assert not torch.equal(a, c), f"{op}: different seeds gave the same output"
    assert not torch.equal(a, batch), f"{op} changed nothing"


def test_input_is_not_modified_in_place(batch):
    before = batch.clone()
    for op in OPS.values():
        op(batch, gen(1))
    assert torch.equal(batch, before)


def test_flip_is_an_exact_mirror_of_some_samples(batch):
    out = hflip(batch, gen(3))
    flipped = [torch.equal(out[i], batch[i].flip(-1)) for i in range(len(batch))]
    kept = [torch.equal(out[i], batch[i]) for i in range(len(batch))]
    assert all(f or k for f, k in zip(flipped, kept)), "a sample is neither itself nor its mirror"
    assert 10 < sum(flipped) < 54, f"p=0.5 should flip about half of 64, flipped {sum(flipped)}"


def test_crop_is_a_shift_with_background_fill(batch):
    pad = 2
    out = random_crop(batch, gen(4), SPEC, pad=pad)
    padded = torch.nn.functional.pad(batch, (pad, pad, pad, pad), value=BG)
    shifts = []
    for i in range(len(batch)):
        match = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if torch.equal(out[i], padded[i, :, dy:dy + 28, dx:dx + 28])]
        assert match, f"sample {i} is not a shift of its input by at most {pad} px"
        shifts.append(match[0])
    assert len(set(shifts)) > 5, "crop should draw varied shifts"
    assert any(s != (pad, pad) for s in shifts)


def _changed_box(before: torch.Tensor, after: torch.Tensor):
    changed = (before != after)[0]
    if not changed.any():
        return None
    rows = changed.any(1).nonzero().flatten()
    cols = changed.any(0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def test_erase_fills_one_rectangle_with_background(batch):
    out = random_erase(batch, gen(5), SPEC, p=0.5)
    erased = 0
    for i in range(len(batch)):
        box = _changed_box(batch[i], out[i])
        if box is None:
            continue
        erased += 1
        t, b, l, r = box
        assert torch.all(out[i, 0, t:b, l:r] == BG), "the erased area is not a filled background rectangle"
        outside = torch.ones(28, 28, dtype=torch.bool)
        outside[t:b, l:r] = False
        assert torch.equal(out[i, 0][outside], batch[i, 0][outside])
    assert 10 < erased < 54, f"p=0.5 should erase about half of 64 images, erased {erased}"


def test_erase_area_within_bounds(batch):
    out = random_erase(batch, gen(6), SPEC, p=1.0, area=(0.05, 0.1))
    for i in range(len(batch)):
        box = _changed_box(batch[i], out[i])
        assert box is not None, "p=1 must erase every image"
        t, b, l, r = box
        # rounding of height and width moves the area a little off the drawn fraction of 784 pixels
        assert 0.03 * 784 <= (b - t) * (r - l) <= 0.13 * 784


def test_noise_has_the_requested_sigma_in_raw_units():
    mid = torch.full((32, 1, 28, 28), (0.5 - SPEC["mean"]) / SPEC["std"])  # raw 0.5: noise is never clamped
    out = gaussian_noise(mid, gen(9), SPEC, sigma=0.05, p=1.0)
    diff = raw_of(out) - 0.5
    assert abs(float(diff.std()) - 0.05) < 0.005
    assert abs(float(diff.mean())) < 0.005


def test_noise_touches_only_a_fraction_p_of_images(batch):
    out = gaussian_noise(batch, gen(10), SPEC, p=0.5)
    touched = sum(not torch.allclose(out[i], batch[i], atol=1e-5) for i in range(len(batch)))
    assert 10 < touched < 54


def test_jitter_preserves_pixel_order_within_each_image(batch):
    # contrast, brightness and gamma are monotone: brighter stays brighter (up to clamping ties)
    out = intensity_jitter(batch, gen(11), SPEC)
    for i in range(len(batch)):
        order = batch[i].flatten().argsort()
        assert torch.all(out[i].flatten()[order].diff() >= -1e-5)
    assert not torch.allclose(out, batch, atol=1e-3)


def test_augment_batch_without_ops_is_identity(batch):
    assert torch.equal(augment_batch(batch, (), gen(0), SPEC), batch)


@pytest.mark.parametrize("text,expected", [
    ("flip,crop", ("flip", "crop")),
    (" Flip , CROP ,", ("flip", "crop")),
    ("flip,crop,erase,noise,jitter", AUGMENTATIONS),
    ("none", ()),
    ("None", ()),
    ("", ()),
    (None, ()),
])
def test_parse_augment(text, expected):
    assert parse_augment(text) == expected


def test_parse_augment_rejects_unknown_names():
    with pytest.raises(ValueError) as e:
        parse_augment("flip,blur")
    msg = str(e.value)
    assert "blur" in msg
    for name in AUGMENTATIONS:
        assert name in msg
