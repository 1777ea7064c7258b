"""The model registry: shapes, the features/head contract, and the parameter counts the README quotes."""
from __future__ import annotations

import pytest
import torch

from fmnist.fit.models import count_parameters, create_model, describe, model_names

ALL_MODELS = ["seed-a", "seed-b-mlp", "seed-b-cnn", "s2d-24", "s2d-32", "s2d-48", "s2dw-24", "s2dw-32", "air-16", "air-32",
              "tiny", "resnet-lite", "resnet9-s",
              "resnet9-m"]


def test_registry_holds_every_documented_model():
    assert set(ALL_MODELS) <= set(model_names())
    for name in model_names():
        assert describe(name).strip(), f"{name} has no description"


@pytest.mark.parametrize("name", ALL_MODELS)
def test_output_features_and_head_contract(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert model.arch_name == name
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        via_head = model.head(feats)
    assert logits.shape == (3, 10)
    assert feats.shape == (3, model.feature_dim)
    assert isinstance(model.head, torch.nn.Linear)
    assert model.head.in_features == model.feature_dim and model.head.out_features == 10
    # forward must be exactly head(features): OOD detection relies on features being the penultimate layer
    torch.testing.assert_close(logits, via_head, rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_single_image_in_eval_mode_and_other_class_count(name):
    model = create_model(name, num_classes=5).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 28, 28))
    assert out.shape == (1, 5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,count", [
    ("seed-a", 1_630_474),   # Keras's summary for seed A (BN moving mean/var counted)
    ("seed-b-mlp", 235_146),
    ("seed-b-cnn", 241_546),
])
def test_seed_parameter_counts_are_exact(name, count):
    assert count_parameters(create_model(name)) == count


@pytest.mark.parametrize("name", ["tiny", "s2d-24"])
def test_small_models_are_under_100k_parameters(name):
    n = count_parameters(create_model(name))
    assert 10_000 < n < 100_000


def test_space_to_depth_stem_keeps_every_pixel():
    from fmnist.fit.models import SpaceToDepth

    x = torch.arange(2 * 28 * 28, dtype=torch.float32).reshape(2, 1, 28, 28)
    y = SpaceToDepth()(x)
    assert y.shape == (2, 4, 14, 14)
    # each output position holds the four pixels of one 2x2 patch, and nothing is lost
    torch.testing.assert_close(y[0, :, 0, 0], torch.tensor([0.0, 1.0, 28.0, 29.0]))
    torch.testing.assert_close(torch.nn.functional.pixel_shuffle(y, 2), x)


def test_count_includes_batchnorm_running_stats_but_not_batch_counter():
    bn = torch.nn.BatchNorm2d(8)
    # weight + bias (trainable) + running mean + running var; num_batches_tracked is an integer counter
    assert count_parameters(bn) == 4 * 8


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError) as e:
        create_model("resnet50")
    msg = str(e.value)
    assert "resnet50" in msg
    for name in ALL_MODELS:
        assert name in msg


def _smooth_images(n: int = 400) -> torch.Tensor:
    """Images whose neighbouring pixels are strongly correlated, like real ones (blurred noise)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    return torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2) * 3 + 0.5


@pytest.mark.parametrize("name", ["s2dw-32", "air-32"])
def test_whitening_stem_whitens_the_patches_it_was_fitted_on(name):
    from fmnist.fit.models import PatchWhitening, fit_whitening

    model = create_model(name)
    x = _smooth_images()
    assert fit_whitening(model, x) == 1
    stem = next(m for m in model.modules() if isinstance(m, PatchWhitening))
    k = stem.conv.kernel_size[0]
    patches = torch.nn.functional.unfold(x, k).transpose(1, 2).reshape(-1, k * k)
    raw_cov = torch.cov(patches.T.double())
    assert raw_cov.diagonal().std() / raw_cov.diagonal().mean() < 0.5  # sanity: the raw patches are correlated
    assert raw_cov[0, 1] / raw_cov[0, 0] > 0.5
    with torch.no_grad():
        out = torch.nn.functional.conv2d(x, stem.conv.weight[: k * k], stem.conv.bias[: k * k])  # the + half
    responses = out.permute(0, 2, 3, 1).reshape(-1, k * k).double()
    cov = torch.cov(responses.T)
    # Decorrelated and centred, each direction of variance lambda / (lambda + eps): 1 but for the faintest ones.
    off = cov - torch.diag(cov.diagonal())
    assert off.abs().max() < 1e-3
    eigenvalues = torch.linalg.eigvalsh(raw_cov)
    expected = (eigenvalues / (eigenvalues + stem.eps)).sort().values
    assert torch.allclose(cov.diagonal().sort().values, expected, atol=1e-3)
    assert (cov.diagonal() > 0.95).sum() >= k * k // 2
    assert responses.mean(0).abs().max() < 0.05
    # the second half are the negatives of the first; the stem is frozen
    assert torch.equal(stem.conv.weight[k * k:], -stem.conv.weight[: k * k])
    assert not any(p.requires_grad for p in stem.parameters())


def test_training_fits_the_whitening_stem_and_keeps_it_frozen(synthetic_data):
    from fmnist.fit.models import PatchWhitening
    from fmnist.fit.recipes import resolve_config
    from fmnist.fit.train import build, prepare_data

    cfg = resolve_config(model="s2dw-24", epochs=1, val_size=20, augment="none")
    d = prepare_data(cfg, synthetic_data, "cpu")
    st = build(cfg, "cpu", d.x_train)
    stem = next(m for m in st.model.modules() if isinstance(m, PatchWhitening))
    fresh = create_model("s2dw-24")
    assert not torch.equal(stem.conv.weight, next(m for m in fresh.modules()
                                                  if isinstance(m, PatchWhitening)).conv.weight)
    optimised = {id(p) for g in st.opt.param_groups for p in g["params"]}
    assert id(stem.conv.weight) not in optimised and id(stem.conv.bias) not in optimised
