"""The one forward pass: every figure fmnist reports and every answer it serves comes through here.

A *backend* runs the network once on a normalised float32 batch (N, 1, 28, 28) and returns the penultimate
features (N, D) and the logits (N, C) as NumPy float32 arrays. :func:`forward` adds what every caller shares:
batching and mirrored test-time augmentation (TTA). Training validation, ``fmnist evaluate``, the trust fit,
the Predictor (and so ``fmnist predict``, ``ood-eval`` and the server) all call it, so the accuracy reported
and the answer served come from the same code. Backends: :class:`fmnist.core.backends.TorchBackend` and
:class:`fmnist.core.backends.OnnxBackend` (ONNX Runtime); another implements ``run`` and nothing else changes.

TTA: the image and its mirror go through the network in *one* call (half the per-call overhead that dominates
small batches); features and logits are the means of the two views. With a linear head the mean of the
logits is the head of the mean features, up to rounding.
"""
from __future__ import annotations

import numpy as np

from fmnist.core.backends import Backend

BATCH_SIZE = 500  # images per backend call (twice that with TTA): large enough to amortise the call


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
