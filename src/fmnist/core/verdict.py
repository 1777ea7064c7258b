"""The verdict of one image: refused, answer or uncertain, from its gates (blank, out of distribution) and its
calibrated probabilities, with the candidate set (:mod:`fmnist.core.conformal`) it is shown with; and the one
rule for a threshold a caller gives."""
from __future__ import annotations

import numpy as np

from fmnist.core import conformal
from fmnist.core.errors import InputError
from fmnist.core.values import is_finite_number


def finite_threshold(value, name: str) -> float:
    """A threshold as a finite real number (not a bool, not a string): NaN would turn its gate off (every
    comparison with NaN is false), and so would an infinite one. An InputError naming ``name`` otherwise."""
    if not is_finite_number(value):
        raise InputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_probability(value, name: str) -> float:
    """A confidence threshold: a finite number from 0 to 1 (see :func:`finite_threshold`), never clamped."""
    value = finite_threshold(value, name)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"{name} must be a number from 0 to 1 (a calibrated probability), got {value!r}")
    return value


def is_ood(ood_score: float | None, ood_threshold: float | None) -> bool:
    """The OOD gate: above the threshold, or a NaN score, is not a garment; no detector (None) passes all."""
    if ood_score is None or ood_threshold is None:
        return False
    return not float(ood_score) <= float(ood_threshold)  # written so that NaN fails the gate


def verdict(blank: bool, ood: bool, probs_row, threshold: float, candidates=None
            ) -> tuple[str, str | None, list[int] | None]:
    """One image's (verdict, reason, candidate class ids) from its gates and calibrated probabilities.

    - ``refused``: a blank image (reason "blank"), probabilities holding NaN ("invalid_scores": the model's
      output cannot be trusted, so neither can a set), or not a garment ("out_of_distribution"). A refusal
      never has candidates: naming garments for a picture that is not one would pretend to know.
    - ``answer`` (reason None): the top calibrated probability is >= ``threshold``. Candidates: the conformal
      set, which is almost always the answer alone.
    - ``uncertain`` (reason "low_confidence"): below the threshold. Candidates: the conformal set, widened to
      the two most likely labels when it holds only one. A single label under "not sure" would read as the
      answer the threshold has just declined to give, while the calibrated probability says that label is
      wrong more than 1 - threshold of the time; the runner-up, shown with its own score, is the honest
      alternative.

    ``candidates`` is the image's row of :func:`fmnist.core.conformal.candidate_sets` (a boolean mask over classes), or None for a
    run without conformal parameters: the verdict is then the same and the candidates are None. Served
    candidates are never smaller than the conformal set, so their coverage is at least the fitted one.
    """
    # Above 1 nothing is confident enough (every answer is hedged), 0 or below everything is.
    threshold = finite_threshold(threshold, "the confidence threshold")
    p = np.asarray(probs_row, dtype=np.float64).reshape(-1)
    if blank:
        return "refused", "blank", None
    if not np.isfinite(p).all():
        return "refused", "invalid_scores", None
    if ood:
        return "refused", "out_of_distribution", None
    confident = p.max() >= threshold
    ids = None
    if candidates is not None:
        mask = np.asarray(candidates, dtype=bool).reshape(-1)
        if mask.shape != p.shape:
            raise InputError(f"candidate mask has {mask.size} classes, the probabilities {p.size}")
        mask = mask.copy()
        top = np.argsort(-p, kind="stable")
        mask[top[0]] = True
        if not confident:
            mask[top[:2]] = True
        ids = conformal.members(mask, p)
    return ("answer", None, ids) if confident else ("uncertain", "low_confidence", ids)
