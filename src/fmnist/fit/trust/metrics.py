"""How well an OOD score separates genuine images from others: AUROC and the false-positive rate at a TPR."""
from __future__ import annotations

import torch


def auroc(id_scores, ood_scores) -> float:
    """Probability that an OOD input scores higher than a genuine one (ties count half); arrays or tensors."""
    a, b = torch.as_tensor(id_scores).double().flatten(), torch.as_tensor(ood_scores).double().flatten()
    s, order = torch.cat([a, b]).sort()
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, len(s) + 1, dtype=s.dtype)
    _, inverse, counts = torch.unique(torch.cat([a, b]), return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=s.dtype).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]  # tied scores share their average rank
    return float((ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD inputs still accepted when the threshold accepts ``tpr`` of genuine inputs."""
    thr = torch.quantile(torch.as_tensor(id_scores).double(), tpr)
    return float((torch.as_tensor(ood_scores).double() <= thr).double().mean())
