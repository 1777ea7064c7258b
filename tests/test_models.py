"""The model registry: shapes, the features/head contract, and the parameter counts the README quotes."""
from __future__ import annotations

import pytest
import torch

from fmnist.fit.models import count_parameters, create_model, describe, model_names

ALL_MODELS = ["seed-a", "seed-b-mlp", "seed-b-cnn", "s2d-24", "s2d-32", "s2d-48", "tiny", "resnet-lite", "resnet9-s",
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
