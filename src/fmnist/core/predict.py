"""Prediction on user images: the Python API behind ``fmnist predict`` and the server.

``fmnist.load(run_dir).predict(image)`` returns one plain dict per image::

    {"label", "class_id", "score", "accepted", "reason", "verdict", "candidates", "ood_score",
     "top_k": [{"label", "score"}, ...]}

``verdict`` is ``answer`` (one label, calibrated confidence at or above the threshold: ``accepted`` is true),
``uncertain`` (below it: ``candidates``, the labels of a conformal candidate set, e.g. Shirt or T-shirt/top) or
``refused`` (blank, or not a garment). ``label``/``score`` are the best guess whatever the verdict; ``reason``
says why there is no single answer: "blank", "out_of_distribution" (``ood_score`` above the run's OOD threshold:
not a garment as the data set shows them), "invalid_scores" or "low_confidence". ``candidates`` is None for
refusals and for runs fitted before candidate sets existed. Scores are calibrated probabilities when the run
holds a temperature;
``ood_score`` is None for a run without an OOD detector (see :mod:`fmnist.core.ood`; `fmnist calibrate RUN` adds one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fmnist.core import conformal
from fmnist.core.forward import forward, probabilities
from fmnist.core.images import decode_image
from fmnist.core.ood import pixels01
from fmnist.core.preprocess import is_blank, preprocess_array, to_dataset_format
from fmnist.core.run import Run
from fmnist.core.runfolder import METRICS
from fmnist.core.verdict import finite_threshold, is_ood, verdict


@dataclass
class Analysis:
    """What one pass over a batch gives: calibrated probabilities (float64), OOD scores (None without a
    detector) and, when asked for, each OOD part on the scale the detector adds up (its evidence, or its
    standardised score for older runs); NumPy arrays (no PyTorch needed)."""
    probs: np.ndarray
    ood: np.ndarray | None
    parts: dict | None = None


class Predictor:
    """Answers for user images, from a loaded :class:`~fmnist.core.run.Run` and an inference backend."""

    def __init__(self, run: Run, backend=None, confidence_threshold: float | None = None, top_k: int = 3,
                 ood_threshold: float | None = None):
        self.run = run
        self.backend = backend if backend is not None else run.backend()
        self.class_names = run.class_names
        self.dataset = run.dataset
        self.top_k = max(1, min(top_k, len(self.class_names)))
        self.detector = run.detector
        self.confidence_threshold = (run.confidence_threshold if confidence_threshold is None
                                     else finite_threshold(confidence_threshold, "confidence_threshold"))
        ood_threshold = None if ood_threshold is None else finite_threshold(ood_threshold, "ood_threshold")
        self.ood_threshold = (None if self.detector is None else
                              ood_threshold if ood_threshold is not None else self.detector.threshold)

    @classmethod
    def from_run(cls, run_dir, backend: str = "torch", device: str = "cpu", fold_bn: bool = False,
                 threads: int = 1, **kwargs) -> Predictor:
        """``backend``: torch, onnx or auto (see :meth:`fmnist.core.run.Run.backend`)."""
        run = Run.load(run_dir)
        return cls(run, run.backend(backend, device, fold_bn=fold_bn, threads=threads), **kwargs)

    def info(self) -> dict:
        """What the server's /api/model shows: architecture, size, metrics, thresholds, classes."""
        m = self.run.read_optional(METRICS)
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
        (:func:`fmnist.core.forward.forward`, mirrored TTA as trained) that gives both logits and features."""
        images28 = np.ascontiguousarray(images28)
        if not len(images28):
            return Analysis(np.empty((0, len(self.class_names))), None)
        feats, logits = forward(self.backend, preprocess_array(images28, self.run.spec), tta=self.run.tta)
        probs = probabilities(logits, self.run.temperature)
        if self.detector is None:
            return Analysis(probs, None)
        std = self.detector.evidences(feats, pixels01(images28), logits)
        return Analysis(probs, self.detector.combine(std), std if parts else None)

    def predict(self, item, return_image: bool = False) -> dict:
        return self.predict_batch([item], return_image=return_image)[0]

    def predict_batch(self, items, return_image: bool = False) -> list[dict]:
        return self.predict_prepared([self.to_image28(it) for it in items], return_image)

    def predict_prepared(self, images28: list[np.ndarray], return_image: bool = False) -> list[dict]:
        """Results for images already in the data set's format (:meth:`to_image28`), as ``predict_batch``."""
        if not len(images28):
            return []
        batch = np.stack(images28)
        analysis = self.analyse(batch)
        probs = analysis.probs
        ood = [None] * len(batch) if analysis.ood is None else analysis.ood.tolist()
        masks = (conformal.candidate_sets(probs, self.run.conformal) if self.run.conformal is not None
                 else [None] * len(batch))
        # Top classes of the whole batch at once, as plain Python numbers (per-row calls cost more).
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :self.top_k]
        scores = np.take_along_axis(probs, ids, axis=1)
        return [self._result(img, p, s, i, o, m, return_image)
                for img, p, s, i, o, m in zip(batch, probs, scores.tolist(), ids.tolist(), ood, masks)]

    def judge(self, img: np.ndarray, probs_row: np.ndarray, ood_score: float | None, mask=None):
        """(verdict, reason, candidate class ids) of one image: refused (blank, not a garment, unusable
        scores), answer (confident) or uncertain (a candidate set); see :func:`fmnist.core.verdict.verdict`."""
        return verdict(is_blank(img), is_ood(ood_score, self.ood_threshold), probs_row,
                                 self.confidence_threshold, mask)

    def _result(self, img: np.ndarray, probs_row, scores: list[float], ids: list[int], ood_score: float | None,
                mask, return_image: bool) -> dict:
        kind, reason, candidates = self.judge(img, probs_row, ood_score, mask)
        out = {
            "label": self.class_names[ids[0]],
            "class_id": ids[0],
            "score": scores[0],
            "accepted": kind == "answer",
            "reason": reason,
            "verdict": kind,
            # None for a run fitted before candidate sets existed, and for refusals
            "candidates": None if candidates is None else [
                {"label": self.class_names[c], "score": float(probs_row[c])} for c in candidates],
            "ood_score": ood_score,
            "top_k": [{"label": self.class_names[i], "score": s} for s, i in zip(scores, ids)],
        }
        if return_image:
            out["image"] = img
        return out
