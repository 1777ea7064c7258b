"""The one forward pass (fmnist.core.forward): batching, mirrored TTA in one place, backends, BatchNorm folding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fmnist.core.backends import TorchBackend
from fmnist.core.forward import forward
from fmnist.fit.models import create_model, fuse_conv_bn


def _model(name: str = "tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model(name)
    for m in model.modules():  # BatchNorm statistics that are not the identity, so folding them is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def test_tta_is_the_mirror_average_and_batching_changes_nothing():
    model = _model()
    x = torch.randn(10, 1, 28, 28)
    with torch.no_grad():
        expected = 0.5 * (model(x) + model(x.flip(3)))
        plain = model(x)
        feats = model.features(x)
    backend = TorchBackend(model)
    f, got = forward(backend, x, tta=True, batch_size=4)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)
    f_plain, lg_plain = forward(backend, x.numpy(), batch_size=3)
    torch.testing.assert_close(torch.from_numpy(lg_plain), plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(f_plain), feats, rtol=1e-5, atol=1e-5)
    assert not np.allclose(got, lg_plain, atol=1e-4)
    assert f.shape == (10, model.feature_dim) and f.dtype == np.float32 and got.dtype == np.float32


def test_empty_batch_keeps_the_shapes():
    f, lg = forward(TorchBackend(_model()), np.zeros((0, 1, 28, 28), np.float32), tta=True)
    assert f.shape == (0, 128) and lg.shape == (0, 10)


class Doubling:
    """A backend that is not PyTorch: anything with run(x) -> (features, logits) plugs in."""
    name = "fake"

    def run(self, x):
        flat = x.reshape(len(x), -1)
        return flat[:, :3].astype(np.float32), (2 * flat[:, :4]).astype(np.float32)


def test_any_backend_gets_the_same_tta():
    x = np.random.default_rng(0).normal(size=(5, 1, 28, 28)).astype(np.float32)
    f, lg = forward(Doubling(), x, tta=True)
    mirrored = x[..., ::-1].reshape(5, -1)
    np.testing.assert_allclose(lg, (x.reshape(5, -1)[:, :4] + mirrored[:, :4]), rtol=1e-6)
    np.testing.assert_allclose(f, 0.5 * (x.reshape(5, -1)[:, :3] + mirrored[:, :3]), rtol=1e-6)


@pytest.mark.parametrize("name", ["s2d-24", "tiny", "resnet-lite", "resnet9-s", "seed-a", "seed-b-mlp"])
def test_folded_model_computes_the_same(name):
    model = _model(name)
    folded_model = create_model(name)
    folded_model.load_state_dict(model.state_dict())
    folded_model.eval()
    folded = fuse_conv_bn(folded_model)
    bn_left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in folded_model.modules())
    if name in ("s2d-24", "tiny", "resnet-lite", "resnet9-s"):
        assert folded > 0 and bn_left == 0
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        torch.testing.assert_close(folded_model(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(folded_model.features(x), model.features(x), atol=1e-4, rtol=1e-4)
    # and through a backend that folds for itself
    f, lg = forward(TorchBackend(_model(name), fold_bn=True), x)
    torch.testing.assert_close(torch.from_numpy(lg), model(x).detach(), atol=1e-4, rtol=1e-4)


def test_folding_needs_eval_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fuse_conv_bn(create_model("tiny").train())
