"""Calibrated confidence: temperature scaling fitted on the validation split, and the metrics that judge it.

A network trained with cross-entropy is usually over- (or, with label smoothing, under-) confident: its top
softmax score does not match how often it is right. Temperature scaling divides the logits by one scalar
``T`` chosen to minimise the validation negative log-likelihood; it never changes the predicted class, so
accuracy is untouched. The figures reported before/after:

- ECE (expected calibration error): the confidence range [0, 1] is cut into 15 equal bins; ECE is the
  average, weighted by the number of images in each bin, of |accuracy - mean confidence|.
- NLL: mean cross-entropy of the true class.
- Brier score: mean over images of the squared distance between the probability vector and the one-hot
  label (0 is perfect, 2 is the worst).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
T_MIN, T_MAX = 0.05, 20.0


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = ECE_BINS) -> float:
    conf, pred = probs.double().max(dim=1)
    correct = (pred == labels.long()).double()
    # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 joins the first bin.
    bins = (conf * n_bins).ceil().long().clamp(1, n_bins) - 1
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    return float((conf_sum - acc_sum).abs().sum() / max(len(labels), 1))


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    onehot = F.one_hot(labels.long(), probs.shape[1]).double()
    return float(((probs.double() - onehot) ** 2).sum(dim=1).mean())


def calibration_metrics(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> dict:
    """ECE (15 bins), NLL, Brier score and accuracy of ``softmax(logits / temperature)``."""
    probs = torch.softmax(logits.double() / temperature, dim=1)
    return {
        "ece": expected_calibration_error(probs, labels),
        "nll": nll(logits, labels, temperature),
        "brier": brier_score(probs, labels),
        "accuracy": float((probs.argmax(1) == labels.long()).double().mean()),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, iters: int = 80) -> float:
    """The temperature in [0.05, 20] that minimises the NLL of ``logits / T``.

    Golden-section search on log T: the NLL is a smooth one-dimensional function of T with a single minimum
    in practice, and the search is deterministic and needs no learning rate (unlike LBFGS on tiny sets).
    """
    if len(labels) == 0:
        return 1.0
    logits, labels = logits.double(), labels.long()

    def f(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = f(a), f(b)
    for _ in range(iters):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = f(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = f(b)
    t = math.exp((lo + hi) / 2)
    # Never return something worse than no scaling at all (a flat or degenerate objective).
    return t if f(math.log(t)) <= f(0.0) else 1.0


def calibrate(val_logits: torch.Tensor, val_labels: torch.Tensor) -> dict:
    """Fit T on validation logits; the dict stored in ``model.json["calibration"]``."""
    t = fit_temperature(val_logits, val_labels)
    before = calibration_metrics(val_logits, val_labels, 1.0)
    after = calibration_metrics(val_logits, val_labels, t)
    return {
        "method": "temperature",
        "temperature": t,
        "fit_on": "validation",
        "n": len(val_labels),
        "ece_bins": ECE_BINS,
        "nll_before": before["nll"], "nll_after": after["nll"],
        "ece_before": before["ece"], "ece_after": after["ece"],
        "brier_before": before["brier"], "brier_after": after["brier"],
    }


def format_calibration(rows: dict[str, tuple[dict, dict]]) -> str:
    """A before/after table: ``rows`` maps a split name to (metrics at T=1, metrics at the fitted T)."""
    lines = [f"{'split':<12}{'':>8}{'ECE':>9}{'NLL':>9}{'Brier':>9}{'accuracy':>10}"]
    for split, (before, after) in rows.items():
        for tag, m in (("before", before), ("after", after)):
            lines.append(f"{split if tag == 'before' else '':<12}{tag:>8}{100 * m['ece']:>8.2f}%{m['nll']:>9.4f}"
                         f"{m['brier']:>9.4f}{100 * m['accuracy']:>9.2f}%")
    return "\n".join(lines)
