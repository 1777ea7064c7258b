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

What :meth:`Predictor.predict` takes (docs/python-api.md): one image gives one result, several a list of results
in order (:func:`split_input` says which is which); in a list, an image that cannot be read gives
``{"error": message}`` in its place while the others are answered.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fmnist.core import conformal
from fmnist.core.errors import CheckpointError, InputError
from fmnist.core.forward import forward, probabilities
from fmnist.core.images import decode_image
from fmnist.core.ood import pixels01
from fmnist.core.preprocess import is_blank, preprocess_array, to_dataset_format
from fmnist.core.run import Run
from fmnist.core.runfolder import METRICS
from fmnist.core.values import is_finite_number
from fmnist.core.verdict import check_probability, finite_threshold, is_ood, verdict


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
        self.top_k = check_top_k(top_k, len(self.class_names))
        self.detector = run.detector
        self.confidence_threshold = (run.confidence_threshold if confidence_threshold is None
                                     else check_probability(confidence_threshold, "confidence_threshold"))
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
        for key, value in (test or {}).items():  # what /api/model shows from a file of the run folder
            if value is not None and not (isinstance(value, bool) if key == "tta" else is_finite_number(value)):
                raise CheckpointError(f"{self.run.path / METRICS}: {key} must be "
                                      f"{'true or false' if key == 'tta' else 'a finite number'}, got {value!r}")
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
        """One image (see :func:`split_input`) -> uint8 (28, 28) in the data set's format (the image the model
        sees). Raises :class:`~fmnist.core.images.ImageError` (undecodable) or InputError (not one image)."""
        if isinstance(item, (bytes, bytearray, memoryview, str, os.PathLike)):
            item = decode_image(bytes(item) if isinstance(item, (bytearray, memoryview)) else item)
        elif _is_array(item):
            item = _as_numpy(item)
            if item.ndim == 3 and item.shape[-1] in CHANNELS:
                pass
            elif item.ndim != 2:
                raise InputError(f"expected one image, of shape (H, W) or (H, W, C) with C in 1-4, got an array "
                                 f"of shape {item.shape}; pass several as a list or an (N, H, W) array")
        elif not isinstance(item, Image.Image):
            raise InputError(f"cannot read a {type(item).__name__} as an image: give a path, bytes, a PIL "
                             "image, or an array or tensor of shape (H, W) or (H, W, C)")
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

    def predict(self, x, return_image: bool = False) -> dict | list[dict]:
        """The answer for one image, or the list of answers for several, in order.

        One image (one result dict): a path (``str`` or ``os.PathLike``), the bytes of an image file, a PIL
        image in any mode, an array or tensor of shape (H, W) or (H, W, C) with C in 1-4 (uint8, other integers,
        bool, or floats in [0, 1] or [0, 255]).

        Several (a list of result dicts, in order): a list or tuple of single images, an (N, H, W) array or
        tensor, an (N, H, W, C) one with C in 1-4, or an (N, 1, H, W) one. In a list each image is its own
        success or error: one that cannot be read gives ``{"error": message}`` in its place.

        Refused (InputError, with how to pass it instead): a shape that could be read two ways, e.g. (3, 28, 28)
        (one channels-first colour image, or three grayscale ones?) or (N, 3, H, W) (channels first); any other
        number of axes. One image that cannot be read raises its error (ImageError, InputError).
        """
        one, items = split_input(x)
        if one:
            return self.predict_prepared([self.to_image28(items[0])], return_image)[0]
        return self.predict_batch(items, return_image=return_image)

    def predict_batch(self, items, return_image: bool = False) -> list[dict]:
        """Results for a list of single images, in order; one that cannot be read is ``{"error": message}``."""
        prepared, errors = [], {}
        for i, item in enumerate(items):
            try:
                prepared.append(self.to_image28(item))
            except (ValueError, OSError, MemoryError) as e:  # ImageError and InputError are ValueErrors
                errors[i] = {"error": _message(e)}
        results = iter(self.predict_prepared(prepared, return_image))
        return [errors[i] if i in errors else next(results) for i in range(len(items))]

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


# --- the input contract ------------------------------------------------------------------------------------

CHANNELS = (1, 2, 3, 4)  # gray, gray + alpha, RGB, RGBA: the last axis of an (H, W, C) image


def check_top_k(top_k, classes: int) -> int:
    """``top_k`` as an int from 1 to ``classes``; an InputError otherwise (never clamped)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= classes:
        raise InputError(f"top_k must be a whole number from 1 to {classes} (the run's classes), got {top_k!r}")
    return int(top_k)


def _is_array(x) -> bool:
    return isinstance(x, np.ndarray) or hasattr(x, "detach")  # a PyTorch tensor, without importing PyTorch


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _message(e: BaseException) -> str:
    if isinstance(e, MemoryError):
        return "not enough memory to read this image"
    return str(e) or type(e).__name__


def split_input(x) -> tuple[bool, list]:
    """(whether ``x`` is one image, its images): the input contract of :meth:`Predictor.predict`.

    A 3-axis array is one (H, W, C) image when its last axis is 1-4 long, else N grayscale (H, W) images; one
    whose first axis is 2-4 long (and last is not) could be a channels-first image and is refused, as is a
    4-axis array that is neither (N, 1, H, W) nor (N, H, W, C)."""
    if isinstance(x, (list, tuple)):
        return False, list(x)
    if not _is_array(x):
        return True, [x]
    a = _as_numpy(x)
    shape = tuple(a.shape)
    if a.dtype.kind in "OUS" and a.ndim == 1:  # an array of paths (or of bytes)
        return False, a.tolist()
    if a.ndim == 2:
        return True, [a]
    if a.ndim == 3:
        first, last = shape[0] in CHANNELS[1:], shape[-1] in CHANNELS
        if last and shape[0] not in CHANNELS:
            return True, [a]
        if first or last:
            raise InputError(
                f"an array of shape {shape} is ambiguous: one channels-first image or {shape[0]} grayscale ones? "
                f"For {shape[0]} grayscale images pass x[:, None] (N, 1, H, W) or list(x); for one colour image "
                f"pass it channels last, x.transpose(1, 2, 0) (H, W, C)")
        return False, list(a)
    if a.ndim == 4:
        if shape[1] == 1 and shape[-1] not in CHANNELS[1:]:
            return False, list(a[:, 0])
        if shape[-1] in CHANNELS and shape[1] not in CHANNELS:
            return False, list(a)
        raise InputError(
            f"an array of shape {shape} is not (N, 1, H, W) nor (N, H, W, C) with C in 1-4: for channels-first "
            f"colour images pass them channels last, x.transpose(0, 2, 3, 1) (or x.permute(0, 2, 3, 1))")
    raise InputError(f"cannot read an array of shape {shape} as images: give one image as (H, W) or (H, W, C), "
                     "several as (N, H, W), (N, H, W, C) or (N, 1, H, W), or a list")
