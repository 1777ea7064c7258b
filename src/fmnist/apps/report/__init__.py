"""``fmnist report RUN``: what a trained run did, as figures and tables (``fmnist compare``: :mod:`.compare`).

The report predicts the test set itself with the run's model (the package's one preprocessing and forward
path, :func:`fmnist.fit.evaluate.run_logits`), so its figures always match the weights on disk. It writes ``RUN/report/index.html``,
one self-contained page (PNG figures embedded as data URIs, no scripts, nothing fetched), plus the PNGs.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from fmnist.core import conformal
from fmnist.core.run import Run
from fmnist.core.runfolder import ENV, HISTORY, METRICS, REPORT_DIR, SUMMARY
from fmnist.core.verdict import verdict

FIGURES = ("learning_curves", "confusion", "per_class", "confused_pairs", "misclassified", "reliability",
           "uncertain", "samples")


# --- reading a run folder ----------------------------------------------------------------------------------


def read_history(run: Run) -> list[dict]:
    path = run.path / HISTORY
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


# --- predictions and numbers -------------------------------------------------------------------------------


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int | None = None) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins (lo, hi], and the bins themselves."""
    import torch  # here, not at the top: `fmnist compare` reads this package without PyTorch

    from fmnist.fit.trust.calibration import ECE_BINS, expected_calibration_error

    bins = bins or ECE_BINS
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
    from fmnist.core.forward import probabilities
    from fmnist.fit import runtime
    from fmnist.fit.evaluate import classification_metrics, run_logits

    backend = run.backend("torch", runtime.setup(threads, "auto"))  # probed: a NaN model is one clear error
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    logits = run_logits(backend, run, images)
    probs = probabilities(logits.numpy(), run.temperature)  # float64, exactly as served
    metrics = classification_metrics(logits, labels, run.class_names)
    saved = run.read_optional(METRICS)  # the no-TTA accuracy of `fmnist evaluate`, if it matches
    if saved.get("n") == metrics["n"] and saved.get("tta") == run.tta and "accuracy_no_tta" in saved:
        metrics["accuracy_no_tta"] = saved["accuracy_no_tta"]
    return {"metrics": metrics, "images": np.asarray(images), "y": np.asarray(labels), "logits": logits.numpy(),
            "probs": probs}


def rejection_stats(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """What the confidence threshold does on the test set: share refused, accuracy on what is accepted."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    keep = conf >= threshold
    return {"threshold": threshold, "refused": float(1 - keep.mean()) if len(keep) else 0.0,
            "accepted_accuracy": float(correct[keep].mean()) if keep.any() else math.nan}


def candidate_set_stats(run: Run, pred: dict) -> dict | None:
    """The run's candidate sets on the test set (None for a run fitted before they existed).

    ``metrics``: :func:`fmnist.core.conformal.set_metrics` of the conformal sets; ``noise``: two standard
    deviations of the coverage a fresh calibration and test sample would give (binomial test sample plus the
    quantile's own spread), so a coverage within ``noise`` of the target meets it. ``uncertain``: the test
    images under the confidence threshold, and ``candidates`` what the Predictor serves them (the set, widened
    to the two most likely labels). Only the confidence gate is applied: the blank and OOD gates refuse
    almost no test images, and the report does not load the detector.
    """
    if run.conformal is None:
        return None
    params, y, probs = run.conformal, pred["y"], pred["probs"]
    masks = conformal.candidate_sets(probs, params)
    metrics = conformal.set_metrics(masks, y)
    t, n_cal = params["coverage"], params["n"]
    noise = 2 * math.sqrt(t * (1 - t) * (1 / metrics["n"] + 1 / (n_cal + 1)))
    threshold = run.confidence_threshold
    uncertain = np.flatnonzero(probs.max(1) < threshold)
    candidates = [verdict(False, False, probs[i], threshold, masks[i])[2] for i in uncertain]
    covered = [y[i] in ids for i, ids in zip(uncertain, candidates)]
    return {"params": params, "metrics": metrics, "noise": noise, "threshold": threshold, "probs": probs,
            "uncertain": uncertain, "candidates": candidates,
            "uncertain_coverage": float(np.mean(covered)) if covered else math.nan,
            "uncertain_mean_size": float(np.mean([len(c) for c in candidates])) if candidates else math.nan}


# --- the report ----------------------------------------------------------------------------------------------


def build_report(run_dir, data=None, out=None, limit: int | None = None, threads: int | None = None) -> Path:
    """Write RUN/report/index.html and its PNGs; return the HTML path. ``data`` defaults to the official set."""
    from fmnist.fit.sources import check_run_classes, data_from_args

    run = Run.load(run_dir, detector=False)
    data = data if data is not None else data_from_args(None, run_dir)
    check_run_classes(run.class_names, data)
    out = Path(out) if out is not None else run.path / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_test(run, data, limit, threads)
    sets = candidate_set_stats(run, pred)
    drawn, ece = _figures(run, pred, read_history(run), out, sets)
    from fmnist.apps.report.html import render_report

    context = {
        "run": run.path, "meta": run.meta, "metrics": pred["metrics"], "history": read_history(run), "ece": ece,
        "data": data, "temperature": run.temperature,
        "rejection": rejection_stats(pred["probs"], pred["y"], run.confidence_threshold), "sets": sets,
        "config": run.config, "summary": run.read_optional(SUMMARY),
        "env": run.read_optional(ENV), "pngs": {n: out / f"{n}.png" for n in FIGURES if n in drawn},
    }
    index = out / "index.html"
    index.write_text(render_report(context), encoding="utf-8")
    return index


def _figures(run: Run, pred: dict, history: list[dict], out: Path, sets: dict | None) -> tuple[dict, float]:
    """Draw and save the report's figures; return them and the test ECE."""
    from fmnist.apps.report import figures as figs

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
    if sets and len(sets["uncertain"]):
        drawn["uncertain"] = figs.uncertain(images, y, sets["probs"], sets["uncertain"], sets["candidates"], names,
                                            sets["threshold"])
    else:
        (out / "uncertain.png").unlink(missing_ok=True)
    for name, fig in drawn.items():
        figs.save(fig, out / f"{name}.png")
    return drawn, ece
