"""Prediction on user images: the Python API behind ``fmnist predict`` and the server.

``fmnist.load(run_dir).predict(image)`` returns one plain dict per image::

    {"label", "class_id", "score", "accepted", "reason", "top_k": [{"label", "score"}, ...]}

``label``/``score`` are the best guess even when ``accepted`` is false; ``reason`` says why an answer is refused
("blank", "low_confidence", ...). Scores are calibrated probabilities when the run holds a temperature.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fmnist.checkpoint import load_model, read_json
from fmnist.evaluate import batched_logits
from fmnist.images import decode_image
from fmnist.preprocess import is_blank, preprocess, to_dataset_format

DEFAULT_CONFIDENCE = 0.60  # seed B's threshold


class Predictor:
    def __init__(self, model: torch.nn.Module, meta: dict, run_dir: Path | None = None,
                 confidence_threshold: float | None = None, top_k: int = 3):
        self.model = model.eval()
        self.meta = meta
        self.run_dir = run_dir
        self.class_names = list(meta["class_names"])
        self.spec = meta["preprocessing"]
        self.tta = bool(meta.get("tta", False))
        self.temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
        thresholds = meta.get("thresholds", {})
        self.confidence_threshold = (confidence_threshold if confidence_threshold is not None
                                     else float(thresholds.get("confidence", DEFAULT_CONFIDENCE)))
        self.top_k = max(1, min(top_k, len(self.class_names)))
        self.device = next(model.parameters()).device

    @classmethod
    def from_run(cls, run_dir, device: str = "cpu", **kwargs) -> "Predictor":
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
            "thresholds": {"confidence": self.confidence_threshold},
            "temperature": self.temperature,
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

    def probabilities(self, images28: np.ndarray) -> torch.Tensor:
        """Calibrated class probabilities for a uint8 (N, 28, 28) batch."""
        x = preprocess(np.ascontiguousarray(images28), self.spec)
        logits = batched_logits(self.model, x, batch_size=256, tta=self.tta, device=self.device)
        return torch.softmax(logits / self.temperature, dim=1)

    def predict(self, item, return_image: bool = False) -> dict:
        return self.predict_batch([item], return_image=return_image)[0]

    def predict_batch(self, items, return_image: bool = False) -> list[dict]:
        images = [self.to_image28(it) for it in items]
        if not images:
            return []
        batch = np.stack(images)
        probs = self.probabilities(batch)
        return [self._result(img, p, return_image) for img, p in zip(batch, probs)]

    def _result(self, img: np.ndarray, p: torch.Tensor, return_image: bool) -> dict:
        scores, ids = p.topk(self.top_k)
        best = int(ids[0])
        score = float(scores[0])
        reason = None
        if is_blank(img):
            reason = "blank"
        elif score < self.confidence_threshold:
            reason = "low_confidence"
        out = {
            "label": self.class_names[best],
            "class_id": best,
            "score": score,
            "accepted": reason is None,
            "reason": reason,
            "top_k": [{"label": self.class_names[int(i)], "score": float(s)} for s, i in zip(scores, ids)],
        }
        if return_image:
            out["image"] = img
        return out
