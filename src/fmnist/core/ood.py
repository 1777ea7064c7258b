"""Out-of-distribution detection: is this input a Fashion-MNIST-like garment at all?

Softmax confidence is no guard (a cat photo or uniform noise can get 99 %). The detector scores where an input
lies relative to the *training* images (higher = stranger). Seven scores are available; the default four were
picked by measurement (``fmnist ood-eval``, docs/trust.md), the others kept for comparison
(``fmnist calibrate RUN --ood-parts ...``):

- ``outlier`` (default): outlier exposure after training. A logistic classifier of the penultimate features,
  the logits and the 13 image statistics below, fitted to tell training garments from procedural
  non-garments (1/f noise, plain surfaces, dead leaves: :mod:`fmnist.fit.trust.outliers`, no real picture). The
  other scores only know what garments look like; this one has also seen what they do not, and it is the
  strongest single score on photos and faces.
- ``energy`` (default): -log sum exp of the logits. Low when the network finds one class strongly; inputs
  unlike its training images rarely raise any logit as high. Free: the logits are computed anyway.
- ``orientation`` (default): how much more garment-like the image looks turned by 90, 180 or 270 degrees,
  under the ``pixel`` model below (NLL upright minus the best NLL turned). Garments have a strong upright
  orientation, so genuine images score very low; rotated garments score high, and anything without an
  orientation (noise, textures, flat images, most photo crops) scores about 0, far above genuine images.
- ``stats`` (default): class-conditional Gaussians of 13 image statistics (brightness, contrast, fraction of
  lit pixels, border brightness, extent of the object, edge density, centre of mass, left-right and
  top-bottom asymmetry). Catches pixel statistics no garment has. Blur and sharpness are left out on purpose:
  they flagged genuine garments sent as resized shop photos.
- ``knn``: cosine distance to the nearest of 2,000 training feature vectors (penultimate layer, L2-normalised).
- ``pixel``: class-conditional probabilistic PCA of the pixels (30 components per class + isotropic rest).
- ``mahalanobis``: class-conditional Mahalanobis distance of the features (shared covariance).

How the parts make one score (``combine``): each part's score becomes its *evidence*, -log of its p-value
among the validation images (the share of them that score at least as high), and the evidences are summed
(Fisher's method). Each part is thus judged by how rare its score is for a genuine garment, whatever the
shape of its distribution: a part whose genuine tail is long (stats on patterned shirts) needs a higher
score before it counts, and a part that finds an input rarer than any validation image says so with
weight. Measured against the earlier rule, the sum of parts standardised by their median and 95th
percentile: at 97.5 % acceptance the evidence sum refuses 94.5 % instead of 88.7 % of 180-degree turns with
the same parts (docs/trust.md). Runs fitted with the sum (``"combine": "sum"``) or the maximum (no ``"combine"``)
keep their rule, with the threshold set for it. Statistics are fitted on the training split only, the
p-values and the threshold on validation: the threshold is the validation quantile that accepts
``target_accept`` (default 98 %, so that 97.5 % of new genuine images pass) of genuine images. No real
out-of-distribution image is used to fit or tune anything.

Storage: tensors in ``RUN/ood.safetensors`` (statistics, and the sorted validation scores of each part);
threshold, standardisation and settings in ``model.json["ood"]``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fmnist.core.errors import InputError
from fmnist.core.model_json import OOD_FORMAT, OOD_RULES  # noqa: F401 (OOD_RULES: re-exported)
from fmnist.core.runfolder import (
    DETECTOR,
    CheckpointError,
    is_present,
    load_arrays,
    read_run_file,
    save_arrays,
    sha256,
)

OOD_FILE = DETECTOR
DEFAULT_TARGET = 0.98
PARTS = ("outlier", "energy", "orientation", "stats", "knn", "pixel", "mahalanobis")
DEFAULT_PARTS = ("outlier", "energy", "orientation", "stats")
NEEDS_NO_FIT = {"energy"}  # computed from the logits alone: no statistics to store
KNN_K = 1
BANK_SIZE = 2_000
COMBINE = "fisher"  # how parts make one score; runs fitted earlier keep theirs: "sum", or "max" (none recorded)
PIXEL_COMPONENTS = 30
SHRINK = 1e-3  # covariance shrinkage towards the mean variance, relative: keeps inverses stable


def pixels01(images28) -> np.ndarray:
    """uint8 (N, 28, 28) images -> float32 (N, 28, 28) in [0, 1], the pixel space of the input-side scores."""
    return _as_array(images28).reshape(-1, 28, 28).astype(np.float32) / np.float32(255.0)


# --- fitting and scoring each part ---------------------------------------------------------------------------

# Scoring runs in NumPy: a served request scores one image, where PyTorch's per-operation overhead (~10 us,
# some 60 small operations) cost more than the arithmetic; NumPy's is a few microseconds.

def _as_array(x) -> np.ndarray:
    """A NumPy array of ``x`` (an array, or a tensor: this module scores without importing PyTorch)."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _np(x) -> np.ndarray:
    return _as_array(x).astype(np.float32, copy=False)


def _gaussian_nll(x, means, precisions, logdets) -> np.ndarray:
    """min over classes of (x - m)' P (x - m) + log det C; ``precisions`` (C, D, D), or (1, D, D) if shared."""
    z = (_np(x)[None] - _np(means)[:, None])                     # (C, N, D)
    d = (np.matmul(z, _np(precisions)) * z).sum(2)               # (C, N)
    return (d + _np(logdets)[:, None]).min(0)


def _linear_stats() -> np.ndarray:
    """(784, 4) weights: mean, border mean, row and column of each pixel (for the centre of mass)."""
    ring = np.ones((28, 28), bool)
    ring[2:-2, 2:-2] = False
    rows, cols = np.mgrid[0:28, 0:28].astype(np.float32) / 27
    return np.stack([np.full(784, 1 / 784), ring.ravel() / ring.sum(), rows.ravel(), cols.ravel()], 1).astype(
        np.float32)


_LINEAR = _linear_stats()
_LEVELS = np.array([0.125, 0.5, 0.9], np.float32)[:, None]
N_STATS = 13  # columns of image_stats
STATS_CHUNK = 1024


def image_stats(u) -> np.ndarray:
    """13 statistics of (N, 28, 28) images in [0, 1] that describe *how* a garment picture looks.

    Few array operations on purpose (each costs microseconds, whatever the size): a served request
    computes them for one image. Many images go in chunks of :data:`STATS_CHUNK`: the temporaries of 10,000 at
    once are 100 MB of fresh memory, whose first touch cost 0.7 s more than the arithmetic on a 2-core VM.
    """
    u = _np(u).reshape(-1, 28, 28)
    if len(u) > STATS_CHUNK:
        return np.concatenate([image_stats(u[i:i + STATS_CHUNK]) for i in range(0, len(u), STATS_CHUNK)])
    n, eps = len(u), np.float32(1e-3)
    flat = u.reshape(n, -1)
    lin = flat @ _LINEAR                                                     # (N, 4)
    mean, border = lin[:, 0], lin[:, 1]
    mass = mean * 784 + eps
    cy, cx = lin[:, 2] / mass, lin[:, 3] / mass
    std = np.sqrt(np.maximum((flat * flat).sum(1) - 784 * mean * mean, 0) / 783)
    levels = (flat[:, None, :] > _LEVELS).mean(2, dtype=np.float32)          # (N, 3): lit, half, bright
    fg = u > _LEVELS[0, 0]
    spans = np.concatenate([fg.any(2), fg.any(1)], 0)                        # (2N, 28): rows, then columns
    first, last = spans.argmax(1), 27 - spans[:, ::-1].argmax(1)
    extent = (np.where(spans.any(1), last - first + 1, 0) / 28).astype(np.float32).reshape(2, n)
    edges = (np.abs(np.diff(u, axis=2)).sum((1, 2)) + np.abs(np.diff(u, axis=1)).sum((1, 2))) / 756
    asym = np.abs(np.stack([u - u[:, :, ::-1], u - u[:, ::-1]])).mean((2, 3)) / (mean + eps)  # (2, N)
    return np.stack([mean, std, levels[:, 0], levels[:, 1], levels[:, 2], border, extent[0], extent[1], edges,
                     cy, cx, asym[0], asym[1]], 1).astype(np.float32)


def _pixel_derived(t: dict) -> dict:
    """Per-model constants of the pixel score (NumPy), computed once when a detector is built (not stored)."""
    means, comps = _np(t["pixel.means"]), _np(t["pixel.components"])           # (C, D), (C, k, D)
    num_classes, k, d = comps.shape
    var, rest = _np(t["pixel.variances"]).astype(np.float64), _np(t["pixel.residual"]).astype(np.float64)
    return {
        # components and means side by side: one matrix product gives both projections
        "pixel.project": np.ascontiguousarray(np.concatenate([comps.reshape(num_classes * k, d), means]).T),
        "pixel.means_proj": np.einsum("cd,ckd->ck", means, comps),            # (C, k)
        "pixel.means_sq": (means * means).sum(1),                              # (C,)
        "pixel.inv_var": (1.0 / var).astype(np.float32),
        "pixel.inv_rest": (1.0 / rest).astype(np.float32),
        "pixel.const": (np.log(var).sum(1) + (d - k) * np.log(rest)).astype(np.float32),  # (C,)
    }


def _score_pixel(t: dict, u) -> np.ndarray:
    """Probabilistic-PCA negative log-likelihood (x2, constants dropped), min over classes.

    Written with matrix products against the stacked class components, so no (N, classes, 784) difference
    tensor is ever built: ||x - m||^2 = ||x||^2 - 2 x.m + ||m||^2 and (x - m).V = x.V - m.V.
    """
    if "pixel.const" not in t:
        t = {**t, **_pixel_derived(t)}
    x = _np(u).reshape(len(u), -1)
    num_classes, k = t["pixel.means_proj"].shape
    proj = x @ t["pixel.project"]                                                        # (N, C*k + C)
    p = proj[:, :num_classes * k].reshape(-1, num_classes, k) - t["pixel.means_proj"]    # (N, C, k)
    zz = (x * x).sum(1, keepdims=True) - 2 * proj[:, num_classes * k:] + t["pixel.means_sq"]  # (N, C)
    pp = p * p
    outside = np.maximum(zz - pp.sum(2), 0)
    nll = (pp * t["pixel.inv_var"]).sum(2) + outside * t["pixel.inv_rest"] + t["pixel.const"]
    return nll.min(1)


def _score_orientation(t: dict, u) -> np.ndarray:
    """How much better the image fits turned by a quarter, half or three-quarter turn than upright."""
    u = _np(u).reshape(-1, 28, 28)
    # The four orientations in one matrix product, against a matrix read once (1 MB: memory, not arithmetic,
    # is what a served image waits for).
    turns = np.concatenate([u] + [np.rot90(u, q, (1, 2)) for q in (1, 2, 3)])
    nll = _score_pixel(t, turns).reshape(4, len(u))
    return nll[0] - nll[1:].min(0)


def _score_energy(logits) -> np.ndarray:
    """Negative free energy, -log sum exp(logits): low when some class's logit is high."""
    z = _np(logits)
    m = z.max(1)
    return -(m + np.log(np.exp(z - m[:, None]).sum(1)))


def outlier_inputs(feats, logits, u, stats=None) -> np.ndarray:
    """What the ``outlier`` classifier reads: features, logits and image statistics side by side
    (N, D + C + N_STATS)."""
    return np.concatenate([_np(feats), _np(logits), image_stats(u) if stats is None else stats], 1)


def _score_outlier(t: dict, feats, logits, u, stats=None) -> np.ndarray:
    """The classifier's log-odds that the input is a non-garment (its input scaling is folded into the weights)."""
    return outlier_inputs(feats, logits, u, stats) @ t["outlier.weight"] + t["outlier.bias"][0]


def _score_knn(t: dict, feats, k: int) -> np.ndarray:
    f = _np(feats)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sims = f @ t["knn.bank_t"]  # (D, M) contiguous: the fastest layout
    nearest = sims.max(1) if k == 1 else -np.partition(-sims, min(k, sims.shape[1]) - 1, axis=1)[:, k - 1]
    return 1.0 - nearest


# --- the detector --------------------------------------------------------------------------------------------

class Detector:
    """Fitted statistics, standardisation and threshold; ``score(features, pixels) > threshold`` means OOD."""

    def __init__(self, tensors: dict, config: dict):
        self.tensors = dict(tensors)  # what is saved
        # What scoring reads: NumPy float32 copies, with the derived constants computed once here, not per call.
        self.arrays = {k: _np(v) for k, v in self.tensors.items()}
        if "knn.bank" in self.arrays:  # kept transposed only: (D, M) is the layout the product reads fastest
            self.arrays["knn.bank_t"] = np.ascontiguousarray(self.arrays.pop("knn.bank").T)
        if "pixel.means" in self.arrays:
            self.arrays.update(_pixel_derived(self.arrays))
        self.config = config
        self.parts = list(config["parts"])
        self.rule = config["combine"]  # runs fitted before the evidence sum keep the rule of their threshold
        self.threshold = float(config.get("threshold", float("inf")))

    def part_scores(self, feats, pixels, logits=None) -> dict[str, np.ndarray]:
        """Raw score of each part."""
        return self._raw(feats, pixels, logits)

    def _raw(self, feats, pixels, logits=None, chunk: int = 1024) -> dict[str, np.ndarray]:
        """Raw score of each part (NumPy), in chunks (the orientation score turns each image four ways)."""
        u = _np(pixels).reshape(-1, 28, 28)
        if logits is None and {"energy", "outlier"} & set(self.parts):
            raise InputError("this OOD detector's energy and outlier scores need the model's logits")
        if len(u) > chunk:
            pieces = [self._raw(feats[i:i + chunk], u[i:i + chunk], None if logits is None else logits[i:i + chunk],
                                chunk) for i in range(0, len(u), chunk)]
            return {name: np.concatenate([p[name] for p in pieces]) for name in self.parts}
        t, out = self.arrays, {}
        stats = image_stats(u) if {"stats", "outlier"} & set(self.parts) else None  # both read them: once
        for name in self.parts:
            if name == "energy":
                out[name] = _score_energy(logits)
            elif name == "outlier":
                out[name] = _score_outlier(t, feats, logits, u, stats)
            elif name == "knn":
                out[name] = _score_knn(t, feats, int(self.config.get("knn_k", KNN_K)))
            elif name == "orientation":
                out[name] = _score_orientation(t, u)
            elif name == "pixel":
                out[name] = _score_pixel(t, u)
            elif name == "stats":
                out[name] = _gaussian_nll(stats, t["stats.means"], t["stats.precisions"],
                                          t["stats.logdets"])
            elif name == "mahalanobis":
                out[name] = _gaussian_nll(feats, t["mahalanobis.means"], t["mahalanobis.precision"],
                                          np.zeros(len(t["mahalanobis.means"]), np.float32))
        return {name: np.asarray(v, np.float32) for name, v in out.items()}

    def evidences(self, feats, pixels, logits=None, in_sample: bool = False) -> dict[str, np.ndarray]:
        """Each part's score on the common scale the combination adds up: its evidence, -log p-value among the
        validation images (rule ``fisher``; ``in_sample`` for the validation images themselves, see
        :func:`_evidence`), or for older runs (score - validation median) / (95th percentile - median)."""
        raw = self._raw(feats, pixels, logits)
        if self.rule == "fisher":
            return {n: _evidence(s, self.arrays[f"tail.{n}"], self.config["standardise"][n][1], in_sample)
                    for n, s in raw.items()}
        return _standardise(raw, self.config["standardise"])

    def combine(self, standardised: dict) -> np.ndarray:
        """The detector's score from its parts on the common scale: their sum (or, for runs fitted before the
        sum, the highest)."""
        stacked = np.stack([_np(v) for v in standardised.values()])
        return stacked.max(0) if self.rule == "max" else stacked.sum(0)

    def score(self, feats, pixels, logits=None) -> np.ndarray:
        """The OOD score of each input: the sum over parts of their evidence (see the module's docstring).

        ``feats``: penultimate features, ``pixels``: (N, 28, 28) in [0, 1], ``logits``: the model's (for the
        energy and outlier scores).
        """
        return self.combine(self.evidences(feats, pixels, logits))

    def check_model(self, feature_dim: int, num_classes: int) -> None:
        """Raise CheckpointError unless the statistics read features and logits of these sizes."""
        expected = [("outlier.weight", 0, feature_dim + num_classes + N_STATS), ("knn.bank_t", 0, feature_dim),
                    ("mahalanobis.means", 0, num_classes), ("mahalanobis.means", 1, feature_dim),
                    ("stats.means", 0, num_classes), ("pixel.means", 0, num_classes)]
        wrong = [f"{key} has {self.arrays[key].shape[axis]}, the model {size}" for key, axis, size in expected
                 if key in self.arrays and self.arrays[key].shape[axis] != size]
        if wrong:
            raise CheckpointError(f"the OOD detector was fitted on another model ({', '.join(wrong)}; this one has "
                                  f"{feature_dim} features and {num_classes} classes): refit it with "
                                  "`fmnist calibrate RUN`")

    def save(self, run_dir) -> dict:
        """Write RUN/ood.safetensors; return the JSON part for ``model.json["ood"]``."""
        path = Path(run_dir) / OOD_FILE
        save_arrays(path, {k: _as_array(v) for k, v in self.tensors.items()}, metadata={"format": OOD_FORMAT})
        # The two halves of the detector are two files: model.json records which statistics it was fitted with,
        # so a file from another fit (or altered) is refused at load instead of scoring with the wrong numbers.
        self.config["sha256"] = sha256(path.read_bytes())
        return dict(self.config)

    @classmethod
    def load(cls, run_dir, config: dict | None) -> Detector | None:
        """The run's detector from ``config``, model.json's checked OOD section
        (:func:`fmnist.core.model_json.ood_section`), and its arrays in RUN/ood.safetensors; None if the run
        has none (a run fitted before OOD detection existed)."""
        path = Path(run_dir) / OOD_FILE
        if not config:
            return None
        if not is_present(path):  # model.json says there is a detector: serving without it would accept anything
            raise CheckpointError(f"{path} not found, but model.json describes an OOD detector: restore the file "
                                  "or refit it with `fmnist calibrate RUN`")
        data = read_run_file(path)  # a regular file inside the run folder, of a bounded size
        if "sha256" in config and sha256(data) != config["sha256"]:
            raise CheckpointError(f"{path} is not the file {Path(run_dir) / 'model.json'} was fitted with (its SHA-256 "
                                  "differs): restore it, or refit with `fmnist calibrate RUN`")
        det = cls(load_arrays(path, data), config)
        need = {"orientation": "pixel"}
        missing = [n for n in det.parts if n not in NEEDS_NO_FIT
                   and not any(k.startswith(need.get(n, n) + ".") for k in det.tensors)]
        if det.rule == "fisher":
            missing += [f"{n} (validation scores)" for n in det.parts if f"tail.{n}" not in det.tensors]
        if "outlier" in det.parts:
            missing += [k for k in ("outlier.weight", "outlier.bias") if k not in det.tensors]
        if missing:
            raise CheckpointError(f"{path} lacks the statistics of {', '.join(missing)}: "
                                  "refit with `fmnist calibrate RUN`")
        bad = [k for k, v in det.arrays.items() if not np.isfinite(v).all()]
        bad += [k for k, v in det.arrays.items()
                if k.startswith("tail.") and (v.ndim != 1 or not len(v) or (np.diff(v) < 0).any())]
        if bad:
            raise CheckpointError(f"{path}: damaged or non-finite OOD statistics ({', '.join(sorted(bad))}): the "
                                  "detector would score wrongly; refit it with `fmnist calibrate RUN`")
        return det


def _evidence(scores, tail: np.ndarray, scale: float, in_sample: bool = False) -> np.ndarray:
    """-log of the p-value of each score among the sorted validation scores ``tail``: (number at least as high
    + 1) / (n + 1). Past the highest validation score it keeps growing, by one per ``scale`` (the part's 95th
    percentile minus median), so that stranger inputs still score higher. A score that is not a finite number
    gets infinite evidence: refused, whatever the other parts say.

    ``in_sample``: the scores are the validation images' own (setting the threshold): each is judged among the
    n - 1 others, (number at least as high) / n, or the threshold would promise more acceptance than new
    images get (each validation image would count itself).
    """
    s = _np(scores)
    n = len(tail)
    at_least = n - np.searchsorted(tail, s, side="left")
    e = np.log(n / np.maximum(at_least, 1)) if in_sample else np.log((n + 1) / (at_least + 1.0))
    with np.errstate(over="ignore", invalid="ignore"):
        beyond = np.maximum(s - tail[-1], 0) / np.float32(scale)
        return np.where(np.isfinite(s), e + beyond, np.inf).astype(np.float32)


def _standardise(raw: dict, std: dict) -> dict:
    """(score - validation median) / (95th percentile - median), part by part (arrays or tensors, float32)."""
    return {n: (s - np.float32(std[n][0])) / np.float32(std[n][1]) for n, s in raw.items()}
