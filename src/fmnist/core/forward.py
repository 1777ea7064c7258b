"""The one forward pass: every figure fmnist reports and every answer it serves comes through here.

A *backend* runs the network once on a normalised float32 batch (N, 1, 28, 28) and returns the penultimate
features (N, D) and the logits (N, C) as NumPy float32 arrays. :func:`forward` adds what every caller shares:
batching and mirrored test-time augmentation (TTA). Training validation, ``fmnist evaluate``, the trust fit,
the Predictor (and so ``fmnist predict``, ``ood-eval`` and the server) all call it, so the accuracy reported
and the answer served come from the same code. Backends: :class:`TorchBackend` here and
:class:`fmnist.core.backends.OnnxBackend` (ONNX Runtime); another implements ``run`` and nothing else changes.

TTA: the image and its mirror go through the network in *one* call (half the per-call overhead that dominates
small batches); features and logits are the means of the two views. With a linear head the mean of the
logits is the head of the mean features, up to rounding.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

BATCH_SIZE = 500  # images per backend call (twice that with TTA): large enough to amortise the call


class Backend(Protocol):
    name: str

    def run(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), logits (N, C)), float32, of a normalised (N, 1, 28, 28) float32 batch."""


class TorchBackend:
    """A PyTorch model on a device, in eval mode, optionally under autocast (``precision`` bf16/fp16).

    ``channels_last`` stores weights and inputs NHWC (1.5-2x faster convolutions with oneDNN on CPU);
    ``fold_bn`` folds BatchNorm into the convolutions before it (the same function, fewer layers).
    """

    name = "torch"

    def __init__(self, model, device=None, precision: str = "fp32", channels_last: bool = True,
                 fold_bn: bool = False):
        import torch

        from fmnist.fit import runtime
        from fmnist.fit.models import fuse_conv_bn

        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = precision
        self.folded = fuse_conv_bn(self.model) if fold_bn else 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._autocast = lambda: runtime.autocast(self.device, precision)

    def run(self, x) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            xb = torch.as_tensor(x).to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            with self._autocast():
                feats = self.model.features(xb)
                logits = self.model.head(feats)
            return feats.float().cpu().numpy(), logits.float().cpu().numpy()


def forward(backend: Backend, x, tta: bool = False, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(features, logits) of a normalised (N, 1, 28, 28) batch (NumPy array or tensor), in batches.

    ``tta`` averages each image with its mirror (both views in one backend call).
    """
    x = x if isinstance(x, np.ndarray) else x.numpy()
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        if tta:
            f, lg = backend.run(np.concatenate([xb, xb[..., ::-1]]))
            n = len(xb)
            f, lg = 0.5 * (f[:n] + f[n:]), 0.5 * (lg[:n] + lg[n:])
        else:
            f, lg = backend.run(np.ascontiguousarray(xb))
        feats.append(f)
        logits.append(lg)
    if not feats:
        f, lg = backend.run(np.zeros((1, 1, 28, 28), np.float32))
        return np.zeros((0, f.shape[1]), np.float32), np.zeros((0, lg.shape[1]), np.float32)
    return np.concatenate(feats), np.concatenate(logits)


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (float64) of logits divided by a temperature: softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
