"""Prediction on user images: the Python API behind ``fmnist predict`` and the server.

``fmnist.load(run_dir).predict(image)`` returns one plain dict per image::

    {"label", "class_id", "score", "accepted", "reason", "ood_score", "top_k": [{"label", "score"}, ...]}

``label``/``score`` are the best guess even when ``accepted`` is false; ``reason`` says why an answer is refused:
"blank", "out_of_distribution" (``ood_score`` above the run's OOD threshold: not a garment as the data set
shows them) or "low_confidence". Scores are calibrated probabilities when the run holds a temperature;
``ood_score`` is None for a run without an OOD detector (see :mod:`fmnist.ood`; `fmnist calibrate RUN` adds one).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fmnist.checkpoint import load_model, read_json
from fmnist.images import decode_image
from fmnist.ood import Detector, features_and_logits, pixels01
from fmnist.preprocess import is_blank, preprocess, to_dataset_format

# Seed B's threshold. Scores are calibrated, so an answer under 0.60 is wrong about 40 % of the time or more:
# the user is told the model is not sure. (The OOD detector, not this gate, tells garments from other images.)
DEFAULT_CONFIDENCE = 0.60


def run_confidence_threshold(meta: dict) -> float:
    """The run's own confidence threshold (model.json "thresholds"), else seed B's 0.60."""
    return float(meta.get("thresholds", {}).get("confidence", DEFAULT_CONFIDENCE))


class Predictor:
    def __init__(self, model: torch.nn.Module, meta: dict, run_dir: Path | None = None,
                 confidence_threshold: float | None = None, top_k: int = 3, ood_threshold: float | None = None):
        self.model = model.eval()
        self.meta = meta
        self.run_dir = run_dir
        self.class_names = list(meta["class_names"])
        self.spec = meta["preprocessing"]
        self.tta = bool(meta.get("tta", False))
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        self.top_k = max(1, min(top_k, len(self.class_names)))
        self.device = next(model.parameters()).device
        # Loaded once here (small tensors), never per call.
        self.detector = Detector.load(run_dir, meta) if run_dir is not None else None
        self.confidence_threshold = (confidence_threshold if confidence_threshold is not None
                                     else run_confidence_threshold(meta))
        self.ood_threshold = (None if self.detector is None else
                              float(ood_threshold) if ood_threshold is not None else self.detector.threshold)

    @classmethod
    def from_run(cls, run_dir, device: str = "cpu", **kwargs) -> Predictor:
        model, meta = load_model(run_dir, map_location=device)
        return cls(model, meta, Path(run_dir), **kwargs)

    def info(self) -> dict:
        """What the server's /api/model shows: architecture, size, metrics, thresholds, classes."""
        metrics_path = self.run_dir / "metrics.json" if self.run_dir else None
        test = None
        if metrics_path is not None and metrics_path.exists():
            m = read_json(metrics_path)
            test = {k: m.get(k) for k in ("accuracy", "loss", "macro_precision", "macro_recall", "macro_f1", "n",
                                          "tta")}
        return {
            "model": self.meta["model"],
            "parameters": self.meta.get("parameters"),
            "class_names": self.class_names,
            "validation": self.meta.get("metrics"),
            "test": test,
            "thresholds": {"confidence": self.confidence_threshold, "ood": self.ood_threshold},
            "temperature": self.temperature,
            "calibration": self.meta.get("calibration"),
            "ood": None if self.detector is None else {
                k: self.detector.config.get(k) for k in ("method", "parts", "threshold", "target_accept",
                                                         "val_accept")},
            "tta": self.tta,
            "recipe": self.meta.get("recipe"),
        }

    # --- inputs --------------------------------------------------------------------------------------------

    @staticmethod
    def to_image28(item) -> np.ndarray:
        """Any accepted input -> uint8 (28, 28) in the data set's format (the image the model sees)."""
        if isinstance(item, (bytes, bytearray, str, os.PathLike)):
            item = decode_image(bytes(item) if isinstance(item, bytearray) else item)
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        # to_dataset_format returns an image already in the data set's format unchanged, bit for bit; any other
        # array (a dark garment on white, say) is prepared exactly as the same pixels sent as a PNG would be.
        return to_dataset_format(item)

    # --- prediction ----------------------------------------------------------------------------------------

    def analyse(self, images28: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(calibrated class probabilities, OOD scores or None) for a uint8 (N, 28, 28) batch.

        One forward pass gives both the logits and the features the detector needs (mirrored TTA as trained).
        """
        images28 = np.ascontiguousarray(images28)
        if not len(images28):
            return torch.empty(0, len(self.class_names)), None
        # Both calls below work in chunks of their own, so a large batch never builds large intermediates.
        feats, logits = features_and_logits(self.model, preprocess(images28, self.spec), tta=self.tta,
                                            device=self.device)
        probs = torch.softmax(logits / self.temperature, dim=1)
        ood = self.detector.score(feats, pixels01(images28), logits) if self.detector is not None else None
        return probs, ood

    def probabilities(self, images28: np.ndarray) -> torch.Tensor:
        """Calibrated class probabilities for a uint8 (N, 28, 28) batch."""
        return self.analyse(images28)[0]

    def predict(self, item, return_image: bool = False) -> dict:
        return self.predict_batch([item], return_image=return_image)[0]

    def predict_batch(self, items, return_image: bool = False) -> list[dict]:
        images = [self.to_image28(it) for it in items]
        if not images:
            return []
        batch = np.stack(images)
        probs, ood = self.analyse(batch)
        ood = [None] * len(batch) if ood is None else ood.tolist()
        # Top classes of the whole batch at once, as plain Python numbers (per-row tensor calls cost more).
        probs = probs.double().numpy()
        ids = np.argsort(-probs, axis=1, kind="stable")[:, :self.top_k]
        scores = np.take_along_axis(probs, ids, axis=1)
        return [self._result(img, s, i, o, return_image)
                for img, s, i, o in zip(batch, scores.tolist(), ids.tolist(), ood)]

    def reason(self, img: np.ndarray, score: float, ood_score: float | None) -> str | None:
        """Why an answer is refused (None: accepted). Order: nothing to see, not a garment, not sure which."""
        if is_blank(img):
            return "blank"
        if ood_score is not None and ood_score > self.ood_threshold:
            return "out_of_distribution"
        if score < self.confidence_threshold:
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
