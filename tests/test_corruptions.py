"""Mild corruptions of garments (fmnist.fit.trust.corruptions): mild, repeatable, and what they say they are."""
import numpy as np
import pytest

from fmnist.fit.trust import corruptions as C


@pytest.fixture(scope="module")
def garments():
    # a bright "garment" block on black, in the data set's format
    imgs = np.zeros((20, 28, 28), np.uint8)
    imgs[:, 4:24, 8:20] = 200
    imgs[:, 10:14, 11:17] = 255
    return imgs


def test_every_family_is_repeatable_mild_and_keeps_the_format(garments):
    for kind in C.KINDS:
        a, b = C.corrupt(garments, kind, 1), C.corrupt(garments, kind, 1)
        assert a.shape == garments.shape and a.dtype == np.uint8, kind
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, garments), kind  # it did something
        assert not np.array_equal(a, C.corrupt(garments, kind, 2)), kind  # drawn per seed
        # mild: the picture survives (each corrupted image correlates with its original)
        r = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a.astype(float), garments.astype(float))]
        assert min(r) > 0.45, (kind, min(r))  # a 3-px shift of a sharp block: 0.50


def test_each_family_changes_what_it_names(garments):
    g = garments.astype(float)
    flat = C.corrupt(garments, "low-contrast", 0).astype(int)
    assert (np.ptp(flat, axis=(1, 2)) <= 0.7 * 255 + 1).all() and (flat.min((1, 2)) >= 0).all()
    noisy = C.corrupt(garments, "noise", 0).astype(float)
    assert 6 < (noisy - g)[:, :3, :].std() < 25  # the background too
    blurred = C.corrupt(garments, "blur", 0).astype(float)
    assert np.abs(np.diff(blurred, axis=2)).sum() < np.abs(np.diff(g, axis=2)).sum()
    moved = C.corrupt(garments, "shift", 0)
    assert moved.sum((1, 2)).min() > 0.7 * garments[0].sum()
    assert not (moved.argmax(2) == garments.argmax(2)).all()
    turned = C.corrupt(garments, "rotate", 0)
    assert np.abs(turned.astype(int).sum((1, 2)) - garments.astype(int).sum((1, 2))).max() < 0.1 * garments[0].sum()


def test_the_fit_families_and_the_held_out_ones_do_not_overlap_and_mixed_uses_only_those_asked():
    assert set(C.FIT_KINDS).isdisjoint(C.HELD_OUT) and set(C.FIT_KINDS) | set(C.HELD_OUT) == set(C.KINDS)
    imgs = np.zeros((30, 28, 28), np.uint8)
    imgs[:, 6:22, 6:22] = 180
    only_contrast = C.mixed(imgs, 0, ("low-contrast",))
    np.testing.assert_array_equal(only_contrast, C.corrupt(imgs, "low-contrast", 0))
    with pytest.raises(ValueError, match="unknown corruption"):
        C.corrupt(imgs, "sepia")
