"""Out-of-distribution detection: is this input a Fashion-MNIST-like garment at all?

Softmax confidence is no guard (a cat photo or uniform noise can get 99 %). The detector scores where an input
lies relative to the *training* images (higher = stranger). Five scores are available; the default three
were picked by measurement (``fmnist ood-eval``, README) as the best combination, the others kept for
comparison (``fmnist calibrate RUN --ood-parts ...``):

- ``knn`` (default): cosine distance to the nearest of 10,000 training feature vectors (5,000 for 512-wide
  features; penultimate layer, L2-normalised). Catches inputs that land between or outside the class clusters.
- ``orientation`` (default): how much more garment-like the image looks turned by 90, 180 or 270 degrees,
  under the ``pixel`` model below (NLL upright minus the best NLL turned). Garments have a strong upright
  orientation, so genuine images score very low; rotated garments score high, and anything without an
  orientation (noise, textures, flat images, most photo crops) scores about 0, far above genuine images.
- ``stats`` (default): class-conditional Gaussians of 13 image statistics (brightness, contrast, fraction of
  lit pixels, border brightness, extent of the object, edge density, centre of mass, left-right and
  top-bottom asymmetry). Catches pixel statistics no garment has. Blur and sharpness are left out on purpose:
  they flagged genuine garments sent as resized shop photos.
- ``pixel``: class-conditional probabilistic PCA of the pixels (30 components per class + isotropic rest).
- ``mahalanobis``: class-conditional Mahalanobis distance of the features (shared covariance).

Each score is standardised on the validation split (0 at its median, 1 at its 95th percentile) and the
detector's score is the maximum: an input is rejected if *any* view finds it unusual. Statistics are fitted on
the training split only; the threshold is the validation quantile that accepts ``target_accept`` (default
95 %) of genuine images. No out-of-distribution data is used to fit or tune anything.

Storage: tensors in ``RUN/ood.safetensors``; threshold, standardisation and settings in ``model.json["ood"]``.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist.checkpoint import CheckpointError, load_tensors, save_tensors

OOD_FORMAT = "fmnist-ood/1"
OOD_FILE = "ood.safetensors"
DEFAULT_TARGET = 0.95
PARTS = ("knn", "orientation", "stats", "pixel", "mahalanobis")
DEFAULT_PARTS = ("knn", "orientation", "stats")
KNN_K = 1
BANK_SIZE = 10_000
BANK_FLOATS = 2_560_000  # at most 10 MB of float32 bank: a bigger one slowed per-image prediction (memory-bound)
PIXEL_COMPONENTS = 30
SHRINK = 1e-3  # covariance shrinkage towards the mean variance, relative: keeps inverses stable


@torch.inference_mode()
def features_and_logits(model: torch.nn.Module, x: torch.Tensor, tta: bool = False, batch_size: int = 512,
                        device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features and logits of a normalised (N, 1, 28, 28) batch, in one forward pass.

    With ``tta`` the features are the mean of the image's and its mirror's; the head being linear,
    ``head(mean features)`` is the mean of the two logits, exactly what ``batched_logits`` computes.
    """
    device = device or next(model.parameters()).device
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
        if tta:  # the image and its mirror in one call: half the per-call overhead that dominates small batches
            f = model.features(torch.cat([xb, xb.flip(3)])).float()
            f = 0.5 * (f[:len(xb)] + f[len(xb):])
        else:
            f = model.features(xb).float()
        feats.append(f)
        logits.append(model.head(f).float())
    if not feats:
        return torch.empty(0, model.head.in_features), torch.empty(0, model.head.out_features)
    return torch.cat(feats).cpu(), torch.cat(logits).cpu()


def pixels01(images28) -> torch.Tensor:
    """uint8 (N, 28, 28) images -> float (N, 28, 28) in [0, 1], the pixel space of the input-side scores."""
    return torch.as_tensor(images28).reshape(-1, 28, 28).float() / 255.0


# --- fitting and scoring each part ---------------------------------------------------------------------------

def _gaussians(x: torch.Tensor, labels: torch.Tensor, num_classes: int, shared: bool) -> tuple:
    """Class means and precision matrices (one shared, or one per class) with their log-determinants."""
    x = x.double()
    means = torch.stack([x[labels == c].mean(0) for c in range(num_classes)])
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    groups = [x - means[labels]] if shared else [x[labels == c] - means[c] for c in range(num_classes)]
    covs = [z.T @ z / len(z) for z in groups]
    covs = torch.stack([c + SHRINK * c.diagonal().mean() * eye for c in covs])
    return means.float(), torch.linalg.inv(covs).float(), torch.logdet(covs).float()


def _gaussian_nll(x: torch.Tensor, means, precisions, logdets) -> torch.Tensor:
    """min over classes of (x - m)' P (x - m) + log det C (shared P: broadcast)."""
    z = x[:, None, :] - means[None]                                   # (N, C, D)
    d = torch.einsum("ncd,cde,nce->nc", z, precisions.expand(len(means), -1, -1), z)
    return (d + logdets).min(dim=1).values


def image_stats(u: torch.Tensor) -> torch.Tensor:
    """13 statistics of (N, 28, 28) images in [0, 1] that describe *how* a garment picture looks."""
    u = u.float()
    eps = 1e-3
    mean, std = u.mean((1, 2)), u.std((1, 2))
    lit, half, bright = ((u > t).to(u.dtype).mean((1, 2)) for t in (0.125, 0.5, 0.9))
    ring = torch.ones(28, 28, dtype=torch.bool)
    ring[2:-2, 2:-2] = False
    border = u[:, ring].mean(1)
    fg = u > 0.125

    def extent(on: torch.Tensor) -> torch.Tensor:  # rows/cols spanned by lit pixels, as a fraction of 28
        first = on.to(torch.uint8).argmax(1)
        last = 27 - on.flip(1).to(torch.uint8).argmax(1)
        return torch.where(on.any(1), (last - first + 1).to(u.dtype), torch.zeros_like(mean)) / 28

    edges = (u[:, :, 1:] - u[:, :, :-1]).abs().mean((1, 2)) + (u[:, 1:] - u[:, :-1]).abs().mean((1, 2))
    idx = torch.arange(28, dtype=u.dtype)
    mass = u.sum((1, 2)) + eps
    cy, cx = (u.sum(2) @ idx) / mass / 27, (u.sum(1) @ idx) / mass / 27
    lr = (u - u.flip(2)).abs().mean((1, 2)) / (mean + eps)
    tb = (u - u.flip(1)).abs().mean((1, 2)) / (mean + eps)
    return torch.stack([mean, std, lit, half, bright, border, extent(fg.any(2)), extent(fg.any(1)), edges,
                        cy, cx, lr, tb], 1).float()


def _fit_pixel(u: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int) -> dict:
    x = u.flatten(1).double()
    d = x.shape[1]
    means, comps, variances, rest = [], [], [], []
    for c in range(num_classes):
        xc = x[labels == c]
        m = xc.mean(0)
        z = xc - m
        # Eigen-decomposition of the D x D covariance: 5x faster than an SVD of the N x D data for N ~ 1,000.
        var, vec = torch.linalg.eigh(z.T @ z / len(xc))
        var, vec = var.flip(0).clamp(min=0), vec.flip(1)
        kk = min(k, len(xc) - 1, d - 1)
        v = vec[:, :k].T
        means.append(m)
        comps.append(v if kk == k else torch.cat([v[:kk], torch.zeros(k - kk, d, dtype=x.dtype)]))
        variances.append(torch.cat([var[:kk], torch.ones(k - kk, dtype=x.dtype)]))
        rest.append(var[kk:].sum() / (d - kk) + 1e-6)
    return {"pixel.means": torch.stack(means).float(), "pixel.components": torch.stack(comps).float(),
            "pixel.variances": torch.stack(variances).float(), "pixel.residual": torch.stack(rest).float()}


def _pixel_derived(t: dict) -> dict:
    """Per-model constants of the pixel score, computed once when a detector is built (not stored)."""
    means, comps = t["pixel.means"], t["pixel.components"]                     # (C, D), (C, k, D)
    num_classes, k, d = comps.shape
    var, rest = t["pixel.variances"], t["pixel.residual"]
    return {
        "pixel.components_t": comps.reshape(num_classes * k, d).T.contiguous(),  # (D, C*k)
        "pixel.means_t": means.T.contiguous(),                                  # (D, C)
        "pixel.means_proj": torch.einsum("cd,ckd->ck", means, comps),          # (C, k)
        "pixel.means_sq": (means * means).sum(1),                               # (C,)
        "pixel.inv_var": 1.0 / var,
        "pixel.const": var.log().sum(1) + (d - k) * rest.log(),                 # (C,)
    }


def _score_pixel(t: dict, u: torch.Tensor) -> torch.Tensor:
    """Probabilistic-PCA negative log-likelihood (x2, constants dropped), min over classes.

    Written with matrix products against the stacked class components, so no (N, classes, 784) difference
    tensor is ever built: ||x - m||^2 = ||x||^2 - 2 x.m + ||m||^2 and (x - m).V = x.V - m.V.
    """
    if "pixel.const" not in t:
        t = {**t, **_pixel_derived(t)}
    x = u.flatten(1).float()
    num_classes, k = t["pixel.means_proj"].shape
    p = (x @ t["pixel.components_t"]).reshape(-1, num_classes, k) - t["pixel.means_proj"]   # (N, C, k)
    zz = (x * x).sum(1, keepdim=True) - 2 * x @ t["pixel.means_t"] + t["pixel.means_sq"]   # (N, C)
    pp = p * p
    outside = (zz - pp.sum(2)).clamp(min=0)
    nll = (pp * t["pixel.inv_var"]).sum(2) + outside / t["pixel.residual"] + t["pixel.const"]
    return nll.min(dim=1).values


def _score_orientation(t: dict, u: torch.Tensor) -> torch.Tensor:
    turns = torch.cat([u] + [torch.rot90(u, k, (1, 2)) for k in (1, 2, 3)])  # one call: 4x fewer small ops
    nll = _score_pixel(t, turns).reshape(4, len(u))
    return nll[0] - nll[1:].amin(0)


def _score_knn(t: dict, feats: torch.Tensor, k: int) -> torch.Tensor:
    sims = F.normalize(feats.float(), dim=1) @ t["knn.bank_t"]  # (D, M) contiguous: the fastest layout
    nearest = sims.amax(dim=1) if k == 1 else sims.topk(min(k, sims.shape[1]), dim=1).values[:, -1]
    return 1.0 - nearest


def _fit_parts(parts, feats, labels, u, num_classes: int, bank_size: int, seed: int) -> dict:
    t: dict[str, torch.Tensor] = {}
    if "knn" in parts:
        bank_size = min(bank_size, BANK_FLOATS // feats.shape[1])  # 10,000 for 256 features, 5,000 for 512
        idx = torch.randperm(len(feats), generator=torch.Generator().manual_seed(seed))[:bank_size]
        t["knn.bank"] = F.normalize(feats[idx].float(), dim=1).half()  # half precision: half the file
    if "pixel" in parts or "orientation" in parts:
        t.update(_fit_pixel(u, labels, num_classes, PIXEL_COMPONENTS))
    if "stats" in parts:
        t["stats.means"], t["stats.precisions"], t["stats.logdets"] = _gaussians(
            image_stats(u), labels, num_classes, shared=False)
    if "mahalanobis" in parts:
        t["mahalanobis.means"], t["mahalanobis.precision"], _ = _gaussians(feats, labels, num_classes, shared=True)
    return t


# --- the detector --------------------------------------------------------------------------------------------

class Detector:
    """Fitted statistics, standardisation and threshold; ``score(features, pixels) > threshold`` means OOD."""

    def __init__(self, tensors: dict[str, torch.Tensor], config: dict):
        self.tensors = dict(tensors)
        # Derived tensors, computed once here rather than per call, and never saved.
        derived: dict[str, torch.Tensor] = {}
        if "knn.bank" in self.tensors:
            derived["knn.bank_t"] = self.tensors["knn.bank"].float().T.contiguous()
        if "pixel.means" in self.tensors:
            derived.update(_pixel_derived(self.tensors))
        self.tensors.update(derived)
        self.derived = set(derived)
        self.config = config
        self.parts = list(config["parts"])
        self.threshold = float(config.get("threshold", float("inf")))

    @classmethod
    def fit(cls, train_feats: torch.Tensor, train_labels: torch.Tensor, train_pixels: torch.Tensor,
            val_feats: torch.Tensor, val_pixels: torch.Tensor, num_classes: int,
            target_accept: float = DEFAULT_TARGET, parts=DEFAULT_PARTS, bank_size: int = BANK_SIZE,
            seed: int = 0) -> Detector:
        """Fit on training features and pixels (in [0, 1]); standardise and set the threshold on validation."""
        parts = list(parts)
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise ValueError(f"unknown OOD score(s) {', '.join(unknown) or '(none given)'}; "
                             f"choose from {', '.join(PARTS)}")
        if not 0 < target_accept < 1:
            raise ValueError("the target acceptance rate must be between 0 and 1 (e.g. 0.95)")
        tensors = _fit_parts(parts, train_feats, train_labels.long(), train_pixels.reshape(-1, 28, 28).float(),
                             num_classes, bank_size, seed)
        det = cls(tensors, {"format": OOD_FORMAT, "parts": parts, "knn_k": KNN_K})
        raw = det.part_scores(val_feats, val_pixels)
        det.config["standardise"] = {name: _robust_scale(s) for name, s in raw.items()}
        det.set_threshold(det.combine(_standardise(raw, det.config["standardise"])), target_accept)
        det.config.update({
            "method": "max of validation-standardised scores: " + ", ".join(parts),
            "fit_on": f"training split ({len(train_feats)} images)",
            "threshold_on": f"validation split ({len(val_feats)} images)",
        })
        return det

    @torch.inference_mode()
    def part_scores(self, feats: torch.Tensor, pixels: torch.Tensor, chunk: int = 1024) -> dict[str, torch.Tensor]:
        """Raw score of each part, in chunks (the pixel model's intermediate is N x classes x 784 floats)."""
        u = pixels.reshape(-1, 28, 28).float()
        if len(u) > chunk:
            pieces = [self.part_scores(feats[i:i + chunk], u[i:i + chunk], chunk) for i in range(0, len(u), chunk)]
            return {name: torch.cat([p[name] for p in pieces]) for name in self.parts}
        out = {}
        for name in self.parts:
            if name == "knn":
                out[name] = _score_knn(self.tensors, feats, int(self.config.get("knn_k", KNN_K)))
            elif name == "orientation":
                out[name] = _score_orientation(self.tensors, u)
            elif name == "pixel":
                out[name] = _score_pixel(self.tensors, u)
            elif name == "stats":
                t = self.tensors
                out[name] = _gaussian_nll(image_stats(u), t["stats.means"], t["stats.precisions"],
                                          t["stats.logdets"])
            elif name == "mahalanobis":
                t = self.tensors
                out[name] = _gaussian_nll(feats.float(), t["mahalanobis.means"], t["mahalanobis.precision"],
                                          torch.zeros(len(t["mahalanobis.means"])))
        return out

    def standardised(self, feats: torch.Tensor, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return _standardise(self.part_scores(feats, pixels), self.config["standardise"])

    @staticmethod
    def combine(standardised: dict[str, torch.Tensor]) -> torch.Tensor:
        """The detector's score from its standardised parts: the highest (any view finding it unusual)."""
        return torch.stack(list(standardised.values())).amax(dim=0)

    def score(self, feats: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """The OOD score of each input: max over parts of (score - median) / (95th percentile - median)."""
        return self.combine(self.standardised(feats, pixels))

    def set_threshold(self, val_scores: torch.Tensor, target_accept: float) -> None:
        """Accept ``target_accept`` of genuine images: a quantile of the validation scores.

        The quantile is raised by 1.28 standard errors of a proportion (a one-sided 90 % bound) so that new
        genuine images are accepted at least at the target rate, not just on average: with 10,000 validation
        images the threshold accepts about 95.3 % of them for a 95 % target (measured: 94.9 % on the test set
        with the plain quantile).
        """
        n = max(len(val_scores), 1)
        level = min(target_accept + 1.28 * (target_accept * (1 - target_accept) / n) ** 0.5, 1.0)
        self.threshold = float(torch.quantile(val_scores.double(), level))
        self.config.update({"threshold": self.threshold, "target_accept": float(target_accept),
                            "val_accept": float((val_scores <= self.threshold).double().mean())})

    def save(self, run_dir) -> dict:
        """Write RUN/ood.safetensors; return the JSON part for ``model.json["ood"]``."""
        tensors = {k: v for k, v in self.tensors.items() if k not in self.derived}
        save_tensors(Path(run_dir) / OOD_FILE, tensors, metadata={"format": OOD_FORMAT})
        return dict(self.config)

    @classmethod
    def load(cls, run_dir, meta: dict) -> Detector | None:
        """The run's detector, or None if it has none (a run fitted before OOD detection existed)."""
        config = meta.get("ood")
        path = Path(run_dir) / OOD_FILE
        if not config or not path.exists():
            return None
        if config.get("format") != OOD_FORMAT:
            raise CheckpointError(f"{path}: unsupported OOD format {config.get('format')!r}")
        det = cls(load_tensors(path), config)
        need = {"orientation": "pixel"}
        missing = [n for n in det.parts if not any(k.startswith(need.get(n, n) + ".") for k in det.tensors)]
        if missing or set(config.get("standardise", {})) != set(det.parts):
            raise CheckpointError(f"{path} lacks the statistics of {', '.join(missing) or 'standardisation'}: "
                                  "refit with `fmnist calibrate RUN`")
        return det


def _standardise(raw: dict[str, torch.Tensor], std: dict) -> dict[str, torch.Tensor]:
    return {n: (s - std[n][0]) / std[n][1] for n, s in raw.items()}


def _robust_scale(s: torch.Tensor) -> list[float]:
    """[median, 95th percentile - median] of validation scores: puts every part on one scale."""
    s = s.double()
    med = float(s.median())
    return [med, max(float(torch.quantile(s, 0.95)) - med, 1e-12)]


# --- evaluation metrics --------------------------------------------------------------------------------------

def auroc(id_scores: torch.Tensor, ood_scores: torch.Tensor) -> float:
    """Probability that an OOD input scores higher than a genuine one (ties count half)."""
    a, b = id_scores.double().flatten(), ood_scores.double().flatten()
    s, order = torch.cat([a, b]).sort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=s.dtype)
    _, inverse, counts = torch.unique(torch.cat([a, b]), return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=s.dtype).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]  # tied scores share their average rank
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(id_scores: torch.Tensor, ood_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """Fraction of OOD inputs still accepted when the threshold accepts ``tpr`` of genuine inputs."""
    thr = torch.quantile(id_scores.double(), tpr)
    return float((ood_scores.double() <= thr).double().mean())
