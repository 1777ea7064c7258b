"""Prediction on user images: the Python API behind ``fmnist predict`` and the server.

``fmnist.load(run_dir).predict(image)`` returns one plain dict per image::

    {"label", "class_id", "score", "accepted", "reason", "ood_score", "top_k": [{"label", "score"}, ...]}

``label``/``score`` are the best guess even when ``accepted`` is false; ``reason`` says why an answer is refused:
"blank", "out_of_distribution" (``ood_score`` above the run's OOD threshold: not a garment as the data set
shows them) or "low_confidence". Scores are calibrated probabilities when the run holds a temperature;
``ood_score`` is None for a run without an OOD detector (see :mod:`fmnist.trust.ood`; `fmnist calibrate RUN` adds one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fmnist.forward import forward
from fmnist.images import decode_image
from fmnist.preprocess import is_blank, preprocess_array, to_dataset_format
from fmnist.run import Run
from fmnist.trust.ood import pixels01


@dataclass
class Analysis:
    """What one pass over a batch gives: calibrated probabilities (float64), OOD scores (None without a
    detector) and, when asked for, each OOD part's standardised score; NumPy arrays (no PyTorch needed)."""
    probs: np.ndarray
    ood: np.ndarray | None
    parts: dict | None = None


class Predictor:
    """Answers for user images, from a loaded :class:`~fmnist.run.Run` and an inference backend."""

    def __init__(self, run: Run, backend=None, confidence_threshold: float | None = None, top_k: int = 3,
                 ood_threshold: float | None = None):
        self.run = run
        self.backend = backend if backend is not None else run.backend()
        self.class_names = run.class_names
        self.top_k = max(1, min(top_k, len(self.class_names)))
        self.detector = run.detector
        self.confidence_threshold = (run.confidence_threshold if confidence_threshold is None
                                     else float(confidence_threshold))
        self.ood_threshold = (None if self.detector is None else
                              float(ood_threshold) if ood_threshold is not None else self.detector.threshold)

    @classmethod
    def from_run(cls, run_dir, backend: str = "torch", device: str = "cpu", fold_bn: bool = False,
                 threads: int = 1, **kwargs) -> Predictor:
        """``backend``: torch, onnx or auto (see :meth:`fmnist.run.Run.backend`)."""
        run = Run.load(run_dir)
        return cls(run, run.backend(backend, device, fold_bn=fold_bn, threads=threads), **kwargs)

    def info(self) -> dict:
        """What the server's /api/model shows: architecture, size, metrics, thresholds, classes."""
        m = self.run.read_optional("metrics.json")
        test = {k: m.get(k) for k in ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1", "n",
                                      "tta")} if m else None
        return {
            "model": self.run.model_name,
            "parameters": self.run.parameters,
            "class_names": self.class_names,
            "validation": self.run.metrics or None,
            "test": test,
            "thresholds": {"confidence": self.confidence_threshold, "ood": self.ood_threshold},
            "temperature": self.run.temperature,
            "calibration": self.run.calibration,
            "ood": None if self.detector is None else {
                k: self.detector.config.get(k) for k in ("method", "parts", "threshold", "target_accept",
                                                         "val_accept")},
            "tta": self.run.tta,
            "backend": self.backend.name,
            "recipe": self.run.recipe or None,
        }

    # --- inputs --------------------------------------------------------------------------------------------

    @staticmethod
    def to_image28(item) -> np.ndarray:
        """Any accepted input -> uint8 (28, 28) in the data set's format (the image the model sees)."""
        if isinstance(item, (bytes, bytearray, str, os.PathLike)):
            item = decode_image(bytes(item) if isinstance(item, bytearray) else item)
        if hasattr(item, "detach"):  # a PyTorch tensor (checked without importing PyTorch)
            item = item.detach().cpu().numpy()
        # to_dataset_format returns an image already in the data set's format unchanged, bit for bit; any other
        # array (a dark garment on white, say) is prepared exactly as the same pixels sent as a PNG would be.
        return to_dataset_format(item)

    # --- prediction ----------------------------------------------------------------------------------------

    def analyse(self, images28: np.ndarray, parts: bool = False) -> Analysis:
        """Calibrated class probabilities and OOD scores of a uint8 (N, 28, 28) batch, from one forward pass
        (:func:`fmnist.forward.forward`, mirrored TTA as trained) that gives both logits and features."""
        images28 = np.ascontiguousarray(images28)
        if not len(images28):
            return Analysis(np.empty((0, len(self.class_names))), None)
        feats, logits = forward(self.backend, preprocess_array(images28, self.run.spec), tta=self.run.tta)
        probs = softmax(logits.astype(np.float64) / self.run.temperature)
        if self.detector is None:
            return Analysis(probs, None)
        std = self.detector.standardised(feats, pixels01(images28), logits)
        return Analysis(probs, self.detector.combine(std), std if parts else None)

    def predict(self, item, return_image: bool = False) -> dict:
        return self.predict_batch([item], return_image=return_image)[0]

    def predict_batch(self, items, return_image: bool = False) -> list[dict]:
        images = [self.to_image28(it) for it in items]
        if not images:
            return []
        batch = np.stack(images)
        analysis = self.analyse(batch)
        probs, ood = analysis.probs, analysis.ood
        ood = [None] * len(batch) if ood is None else ood.tolist()
        # Top classes of the whole batch at once, as plain Python numbers (per-row calls cost more).
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :self.top_k]
        scores = np.take_along_axis(probs, ids, axis=1)
        return [self._result(img, s, i, o, return_image)
                for img, s, i, o in zip(batch, scores.tolist(), ids.tolist(), ood)]

    def reason(self, img: np.ndarray, score: float, ood_score: float | None) -> str | None:
        """Why an answer is refused (None: accepted). Order: nothing to see, not a garment, not sure which."""
        if is_blank(img):
            return "blank"
        # Written as "not (within the limit)" so that a NaN score is a refusal, never a pass.
        if ood_score is not None and not ood_score <= self.ood_threshold:
            return "out_of_distribution"
        if not score >= self.confidence_threshold:
            return "low_confidence"
        return None

    def _result(self, img: np.ndarray, scores: list[float], ids: list[int], ood_score: float | None,
                return_image: bool) -> dict:
        best, score = ids[0], scores[0]
        reason = self.reason(img, score, ood_score)
        out = {
            "label": self.class_names[best],
            "class_id": best,
            "score": score,
            "accepted": reason is None,
            "reason": reason,
            "ood_score": ood_score,
            "top_k": [{"label": self.class_names[i], "score": s} for s, i in zip(scores, ids)],
        }
        if return_image:
            out["image"] = img
        return out


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
