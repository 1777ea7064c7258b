"""``fmnist report RUN``: what a trained run did, as figures and tables (``fmnist compare``: :mod:`.compare`).

The report predicts the test set itself with the run's model (the package's one preprocessing and forward
path, :func:`fmnist.evaluate.run_logits`), so its figures always match the weights on disk. It writes ``RUN/report/index.html``,
one self-contained page (PNG figures embedded as data URIs, no scripts, nothing fetched), plus the PNGs.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from fmnist.run import Run
from fmnist.trust.calibration import ECE_BINS, expected_calibration_error

FIGURES = ("learning_curves", "confusion", "per_class", "confused_pairs", "misclassified", "reliability",
           "samples")


# --- reading a run folder ----------------------------------------------------------------------------------


def read_history(run: Run) -> list[dict]:
    path = run.path / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


# --- predictions and numbers -------------------------------------------------------------------------------


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins (lo, hi], and the bins themselves."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        avg = float(conf[mask].mean()) if n else 0.0
        table.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n, "accuracy": acc, "confidence": avg})
    ece = expected_calibration_error(torch.as_tensor(probs), torch.as_tensor(labels), bins)
    return ece, table


def predict_test(run: Run, data, limit: int | None = None, threads: int | None = None) -> dict:
    """Test-set logits and (temperature-scaled) probabilities from the run's model."""
    from fmnist import runtime
    from fmnist.evaluate import classification_metrics, run_logits
    from fmnist.forward import TorchBackend

    backend = TorchBackend(run.model(runtime.setup(threads, "auto")))
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    logits = run_logits(backend, run, images)
    probs = torch.softmax(logits / run.temperature, dim=1)
    metrics = classification_metrics(logits, labels, run.class_names)
    saved = run.read_optional("metrics.json")  # the no-TTA accuracy of `fmnist evaluate`, if it matches
    if saved.get("n") == metrics["n"] and saved.get("tta") == run.tta and "accuracy_no_tta" in saved:
        metrics["accuracy_no_tta"] = saved["accuracy_no_tta"]
    return {"metrics": metrics, "images": np.asarray(images), "y": np.asarray(labels), "logits": logits.numpy(),
            "probs": probs.numpy()}


def rejection_stats(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """What the confidence threshold does on the test set: share refused, accuracy on what is accepted."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    keep = conf >= threshold
    return {"threshold": threshold, "refused": float(1 - keep.mean()) if len(keep) else 0.0,
            "accepted_accuracy": float(correct[keep].mean()) if keep.any() else math.nan}


# --- the report ----------------------------------------------------------------------------------------------


def build_report(run_dir, data=None, out=None, limit: int | None = None, threads: int | None = None) -> Path:
    """Write RUN/report/index.html and its PNGs; return the HTML path. ``data`` defaults to the official set."""
    from fmnist.data import load_fashion_mnist

    run = Run.load(run_dir, detector=False)
    data = data if data is not None else load_fashion_mnist()
    out = Path(out) if out is not None else run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_test(run, data, limit, threads)
    drawn, ece = _figures(run, pred, read_history(run), out)
    from fmnist.report.html import render_report

    context = {
        "run": run.path, "meta": run.meta, "metrics": pred["metrics"], "history": read_history(run), "ece": ece,
        "data": data, "temperature": run.temperature,
        "rejection": rejection_stats(pred["probs"], pred["y"], run.confidence_threshold),
        "config": run.config, "summary": run.read_optional("train_summary.json"),
        "env": run.read_optional("env.json"), "pngs": {n: out / f"{n}.png" for n in FIGURES if n in drawn},
    }
    index = out / "index.html"
    index.write_text(render_report(context), encoding="utf-8")
    return index


def _figures(run: Run, pred: dict, history: list[dict], out: Path) -> tuple[dict, float]:
    """Draw and save the report's figures; return them and the test ECE."""
    from fmnist.report import figures as figs

    names, y, probs, images, metrics = run.class_names, pred["y"], pred["probs"], pred["images"], pred["metrics"]
    ece, bins = calibration_bins(probs, y)
    sample_idx = np.sort(np.random.default_rng(0).choice(len(y), size=min(24, len(y)), replace=False))
    drawn = {
        "confusion": figs.confusion(metrics["confusion_matrix"], names),
        "per_class": figs.per_class(metrics["per_class"]),
        "confused_pairs": figs.confused_pairs(images, y, probs.argmax(1), probs,
                                             [p for p in metrics["most_confused"] if p["total"]][:3], names),
        "misclassified": figs.misclassified(images, y, probs, names),
        "reliability": figs.reliability(bins, ece, run.temperature),
        "samples": figs.samples(images, y, probs, names, sample_idx),
    }
    if history:
        drawn["learning_curves"] = figs.learning_curves(history, run.best_epoch, run.select)
    else:
        (out / "learning_curves.png").unlink(missing_ok=True)  # an older report's curves would mislead
    for name, fig in drawn.items():
        figs.save(fig, out / f"{name}.png")
    return drawn, ece
