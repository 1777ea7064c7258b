"""Fit the trust layer of a run: temperature (calibration), out-of-distribution detector, candidate sets.

Called at the end of every ``fmnist train`` and by ``fmnist calibrate RUN``. It loads the *kept* model of the
run, computes features and logits once (:func:`fmnist.core.forward.forward`, as the Predictor does) for a sample of
the training split and for the validation split, then

- fits the temperature on the validation logits (:mod:`fmnist.fit.trust.calibration`),
- draws procedural non-garments (:mod:`fmnist.fit.trust.outliers`) for the OOD detector's outlier score, fits the
  OOD statistics on the training sample and them, and sets the threshold on validation (:mod:`fmnist.core.ood`),
- fits the candidate sets on the calibrated validation probabilities (:mod:`fmnist.core.conformal`),

and stores them with the model: ``model.json["calibration"]``, ``["ood"]``, ``["conformal"]`` and
``RUN/ood.safetensors``.
The test split is never used here.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from fmnist.core import conformal
from fmnist.core.conformal import DEFAULT_COVERAGE
from fmnist.core.forward import forward, probabilities
from fmnist.core.ood import DEFAULT_PARTS, DEFAULT_TARGET, pixels01
from fmnist.core.progress import Bar
from fmnist.core.run import Run
from fmnist.core.runfolder import record_complete, withdraw_complete
from fmnist.fit.data import preprocess, split_indices
from fmnist.fit.trust.outliers import COUNT as OUTLIER_COUNT
from fmnist.fit.trust.outliers import cached, procedural

if TYPE_CHECKING:  # PyTorch is imported where a fit runs: the command line reads this module's settings without it
    import torch

FIT_SIZE = 10_000  # training images that fit the OOD statistics (stratified sample): as good as 20,000, faster
# What the fit costs, for a time budget to keep in hand (fmnist.fit.train): 2.4 validation passes' worth of model
# time (features of FIT_SIZE training images, the validation images and 2,000 procedural non-garments: 2.2, and a
# margin the measurements asked for), COST_FIXED_SECONDS of fitting statistics on a 2-core CPU, and
# DRAW_SECONDS more where the procedural non-garments are not on disk yet (fmnist.fit.trust.outliers.CACHE).
# Measured on a 2-core AVX2 Zen 3 (docs/results.md): the slowest machine sets the figure, since a reserve too
# small makes the run end late, and one too large costs a few seconds of training. The fit runs the model as it
# is served, in fp32: after a training run validated in bf16 each pass costs about twice as much.
COST_FIXED_SECONDS = 5.0
DRAW_SECONDS = 5.0
COST_PER_VALIDATION = 2.4
FP32_OVER_BF16 = 2.0


def cost_seconds(validation_seconds: float, precision: str = "fp32", drawn: bool = False) -> float:
    """Predicted seconds of :func:`fit_trust`, given what one validation pass costs in ``precision`` and whether
    the non-garments are ``drawn`` already (:func:`fmnist.fit.trust.outliers.cached`). In fp32 the training run
    hands the fit its last validation outputs (``val_outputs``): one pass fewer."""
    fixed = COST_FIXED_SECONDS + (0.0 if drawn else DRAW_SECONDS)
    if precision in ("bf16", "fp16"):
        return fixed + COST_PER_VALIDATION * validation_seconds * FP32_OVER_BF16
    return fixed + (COST_PER_VALIDATION - 1) * validation_seconds


def reserve(train_images: int, precision: str = "fp32"):
    """:func:`cost_seconds` for a run of ``train_images`` training images (the fit's defaults): a function of the
    validation pass's seconds, for the time budget."""
    drawn = cached(min(OUTLIER_COUNT, train_images, FIT_SIZE))
    return lambda validation_seconds: cost_seconds(validation_seconds, precision, drawn)


def stratified_sample(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Positions of about ``size`` items, the same fraction of each class (all if size >= len)."""
    import torch

    if size <= 0 or size >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    frac = size / len(labels)
    picks = []
    for c in torch.unique(labels):
        pos = torch.nonzero(labels == c).flatten()
        picks.append(pos[torch.randperm(len(pos), generator=gen)[:max(1, round(frac * len(pos)))]])
    return torch.cat(picks).sort().values


def run_outputs(run: Run, backend, images: torch.Tensor):
    """(features, logits, pixels in [0, 1]) of uint8 (N, 28, 28) images, as the Predictor computes them."""
    import torch

    feats, logits = forward(backend, preprocess(images, run.spec), tta=run.tta)
    return torch.from_numpy(feats), torch.from_numpy(logits), pixels01(images)


def fit_trust(run_dir, data, target_accept: float = DEFAULT_TARGET, parts=DEFAULT_PARTS,
              fit_size: int = FIT_SIZE, device=None, seed: int = 0, coverage: float = DEFAULT_COVERAGE,
              val_outputs: tuple | None = None, progress: bool | None = None) -> dict:
    """Fit temperature, OOD detector and candidate sets (``coverage``) for the model in ``run_dir`` on its own
    split; return a summary. ``val_outputs``: the (features, logits) tensors of this model on the validation
    split, computed as served (the training run's last validation in fp32), instead of computing them again.
    ``progress``: a bar of the fit's steps (None: on a terminal only, the log has the fit's own line; False:
    never)."""
    import torch

    from fmnist.fit.trust.calibration import calibrate
    from fmnist.fit.trust.ood_fit import fit_detector

    run = Run.load(run_dir, detector=False, complete=False)  # this fit is what completes a run
    train_idx, val_idx = split_indices(data.train_labels, run.config)
    if len(val_idx) < 20:
        return {"skipped": "no validation split to calibrate on (--val-size 0)"}
    backend = run.backend("torch", device or "cpu")  # refuses a model with non-finite outputs
    num_classes = len(run.class_names)
    train_idx = train_idx[stratified_sample(data.train_labels[train_idx], fit_size, seed)]
    tr_labels, va_labels = data.train_labels[train_idx], data.train_labels[val_idx]
    if torch.bincount(tr_labels, minlength=num_classes).min() < 3:
        return {"skipped": "fewer than 3 training images of some class (--subset too small)"}
    with Bar(5, "calibration and OOD fit", unit="step", enabled=progress, plain=False) as bar:
        bar.update(0, step="training features")
        tr_feats, tr_logits, tr_pix = run_outputs(run, backend, data.train_images[train_idx])
        bar.update(1, step="validation features")
        if val_outputs is not None and len(val_outputs[1]) == len(val_idx):
            (va_feats, va_logits), va_pix = val_outputs, pixels01(data.train_images[val_idx])
        else:
            va_feats, va_logits, va_pix = run_outputs(run, backend, data.train_images[val_idx])
        bar.update(1, step="non-garments")
        outliers = None
        if "outlier" in parts:
            # as many as the training images of the fit (at most COUNT): a quick run on a subset fits quickly
            drawn = procedural(min(OUTLIER_COUNT, len(train_idx)), seed)
            outliers = run_outputs(run, backend, torch.from_numpy(drawn))
        bar.update(1, step="detector")
        calibration = calibrate(va_logits, va_labels)
        detector = fit_detector(tr_feats, tr_labels, tr_pix, va_feats, va_pix, num_classes,
                                target_accept=target_accept, parts=parts, seed=seed, val_logits=va_logits,
                                train_logits=tr_logits, outliers=outliers)
        bar.update(1, step="candidate sets")
        sets = None  # candidate sets, on the calibrated probabilities as served; too few images give no guarantee
        if len(va_labels) >= conformal.min_calibration_size(conformal.fit_level(coverage)):
            sets = conformal.fit(probabilities(va_logits.numpy(), calibration["temperature"]), va_labels.numpy(),
                                 coverage)
        bar.update(1)
    # The run is incomplete from the first write (the detector) until the manifest, written last.
    withdraw_complete(run.path)
    ood = detector.save(run.path)
    run.update(calibration=calibration, ood=ood, conformal=sets)
    record_complete(run.path, trust=True)
    return {
        "coverage": [sets["coverage"], sets["val_coverage"]] if sets else None,
        "mean_set_size": sets["val_mean_size"] if sets else None,
        "temperature": calibration["temperature"],
        "val_nll": [calibration["nll_before"], calibration["nll_after"]],
        "val_ece": [calibration["ece_before"], calibration["ece_after"]],
        "ood_parts": list(detector.parts),
        "ood_threshold": detector.threshold,
        "ood_val_accept": detector.config["val_accept"],
    }


def describe(summary: dict) -> str:
    """One line for the training log."""
    if "skipped" in summary:
        return f"calibration and OOD detector skipped: {summary['skipped']}"
    return (f"calibrated: temperature {summary['temperature']:.3f}, validation NLL {summary['val_nll'][0]:.4f} -> "
            f"{summary['val_nll'][1]:.4f}, ECE {100 * summary['val_ece'][0]:.2f} % -> "
            f"{100 * summary['val_ece'][1]:.2f} %; OOD detector ({', '.join(summary['ood_parts'])}) accepts "
            f"{100 * summary['ood_val_accept']:.1f} % of validation images"
            + (f"; candidate sets for {100 * summary['coverage'][0]:.0f} % coverage: {summary['mean_set_size']:.2f} "
               "labels on average" if summary["coverage"] else "; no candidate sets (validation split too small)"))
