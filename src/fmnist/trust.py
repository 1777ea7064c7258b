"""Fit the trust layer of a run: temperature (calibration) and out-of-distribution detector.

Called at the end of every ``fmnist train`` and by ``fmnist calibrate RUN``. It reloads the *kept* model from
the run folder, computes features and logits once for a sample of the training split and for the validation
split, then

- fits the temperature on the validation logits (:mod:`fmnist.calibrate`),
- fits the OOD statistics on the training sample and sets the threshold on validation (:mod:`fmnist.ood`),

and stores them with the model: ``model.json["calibration"]``, ``model.json["ood"]`` and ``RUN/ood.safetensors``.
The test split is never used here.
"""
from __future__ import annotations

from pathlib import Path

import torch

from fmnist.calibrate import calibrate
from fmnist.checkpoint import load_model, read_json, write_json
from fmnist.ood import DEFAULT_PARTS, DEFAULT_TARGET, Detector, features_and_logits, pixels01
from fmnist.preprocess import preprocess

FIT_SIZE = 10_000  # training images that fit the OOD statistics (stratified sample): as good as 20,000, faster


def stratified_sample(labels: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Positions of about ``size`` items, the same fraction of each class (all if size >= len)."""
    if size <= 0 or size >= len(labels):
        return torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed)
    frac = size / len(labels)
    picks = []
    for c in torch.unique(labels):
        pos = torch.nonzero(labels == c).flatten()
        picks.append(pos[torch.randperm(len(pos), generator=gen)[:max(1, round(frac * len(pos)))]])
    return torch.cat(picks).sort().values


def split_outputs(model, meta: dict, images: torch.Tensor, device=None):
    """(features, logits, pixels in [0, 1]) of uint8 (N, 28, 28) images, as the Predictor computes them."""
    x = preprocess(images, meta["preprocessing"])
    feats, logits = features_and_logits(model, x, tta=bool(meta.get("tta", False)), device=device)
    return feats, logits, pixels01(images)


def fit_trust(run_dir, data, train_idx, val_idx, target_accept: float = DEFAULT_TARGET, parts=DEFAULT_PARTS,
              fit_size: int = FIT_SIZE, device=None, seed: int = 0) -> dict:
    """Fit temperature and OOD detector for the model in ``run_dir``; update model.json; return a summary."""
    run_dir = Path(run_dir)
    train_idx, val_idx = torch.as_tensor(train_idx), torch.as_tensor(val_idx)
    if len(val_idx) < 20:
        return {"skipped": "no validation split to calibrate on (--val-size 0)"}
    model, meta = load_model(run_dir, map_location=device or "cpu")
    model = model.to(memory_format=torch.channels_last)  # as in training: 1.5x faster convolutions on CPU
    num_classes = len(meta["class_names"])
    train_idx = train_idx[stratified_sample(data.train_labels[train_idx], fit_size, seed)]
    tr_feats, _, tr_pix = split_outputs(model, meta, data.train_images[train_idx], device)
    va_feats, va_logits, va_pix = split_outputs(model, meta, data.train_images[val_idx], device)
    tr_labels, va_labels = data.train_labels[train_idx], data.train_labels[val_idx]
    if torch.bincount(tr_labels, minlength=num_classes).min() < 3:
        return {"skipped": "fewer than 3 training images of some class (--subset too small)"}

    calibration = calibrate(va_logits, va_labels)
    detector = Detector.fit(tr_feats, tr_labels, tr_pix, va_feats, va_pix, num_classes,
                            target_accept=target_accept, parts=parts, seed=seed, val_logits=va_logits)
    ood_meta = detector.save(run_dir)
    # Re-read model.json right before writing: only our two keys change.
    meta = read_json(run_dir / "model.json")
    meta["calibration"] = calibration
    meta["ood"] = ood_meta
    write_json(run_dir / "model.json", meta)
    return {
        "temperature": calibration["temperature"],
        "val_nll": [calibration["nll_before"], calibration["nll_after"]],
        "val_ece": [calibration["ece_before"], calibration["ece_after"]],
        "ood_parts": list(detector.parts),
        "ood_threshold": detector.threshold,
        "ood_val_accept": ood_meta["val_accept"],
    }


def describe(summary: dict) -> str:
    """One line for the training log."""
    if "skipped" in summary:
        return f"calibration and OOD detector skipped: {summary['skipped']}"
    return (f"calibrated: temperature {summary['temperature']:.3f}, validation NLL {summary['val_nll'][0]:.4f} -> "
            f"{summary['val_nll'][1]:.4f}, ECE {100 * summary['val_ece'][0]:.2f} % -> "
            f"{100 * summary['val_ece'][1]:.2f} %; OOD detector ({', '.join(summary['ood_parts'])}) accepts "
            f"{100 * summary['ood_val_accept']:.1f} % of validation images")
