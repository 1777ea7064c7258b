"""Batch augmentations as tensor ops on normalised (N, 1, H, W) batches.

Each op draws from an explicit ``torch.Generator`` so a seed makes a run repeatable, and works on a whole
batch at once (no per-image Python loop): on a 2-core CPU this is what keeps augmentation nearly free.
Ops know the normalisation ``spec`` so they can fill with the true background (raw 0) and apply intensity
changes in raw [0, 1] space.
"""
from __future__ import annotations

import torch

from fmnist.core.errors import InputError

AUGMENTATIONS = ("flip", "crop", "erase", "noise", "jitter")


def parse_augment(text: str | None) -> tuple[str, ...]:
    """'flip,crop' -> ('flip', 'crop'); 'none' or '' -> ()."""
    if not text or text.strip().lower() == "none":
        return ()
    names = tuple(t.strip().lower() for t in text.split(",") if t.strip())
    bad = [n for n in names if n not in AUGMENTATIONS]
    if bad:
        raise InputError(f"unknown augmentation(s) {bad}; choose from {', '.join(AUGMENTATIONS)} or 'none'")
    return names


def _background(spec: dict) -> float:
    return (0.0 - spec["mean"]) / spec["std"]


def hflip(x: torch.Tensor, g: torch.Generator, p: float = 0.5) -> torch.Tensor:
    mask = torch.rand(x.shape[0], generator=g, device=g.device) < p
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


def random_crop(x: torch.Tensor, g: torch.Generator, spec: dict, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels in each direction, filling with background."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=_background(spec))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g, device=g.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # n,1,h,1
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # n,1,1,w
    idx_n = torch.arange(n, device=x.device)[:, None, None, None]
    idx_c = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


def random_erase(x: torch.Tensor, g: torch.Generator, spec: dict, p: float = 0.25,
                 area=(0.02, 0.2), ratio=(0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al.): blank a random rectangle in a fraction ``p`` of the images."""
    n, _, h, w = x.shape
    dev = g.device
    apply = torch.rand(n, generator=g, device=dev) < p
    a = torch.empty(n, device=dev).uniform_(*area, generator=g) * h * w
    log_r = torch.empty(n, device=dev).uniform_(torch.log(torch.tensor(ratio[0])).item(),
                                                torch.log(torch.tensor(ratio[1])).item(), generator=g)
    r = torch.exp(log_r)
    eh = torch.sqrt(a * r).round().clamp(1, h).long()
    ew = torch.sqrt(a / r).round().clamp(1, w).long()
    y0 = (torch.rand(n, generator=g, device=dev) * (h - eh + 1)).long()
    x0 = (torch.rand(n, generator=g, device=dev) * (w - ew + 1)).long()
    ar = torch.arange(h, device=dev)
    ac = torch.arange(w, device=dev)
    in_r = (ar[None, :] >= y0[:, None]) & (ar[None, :] < (y0 + eh)[:, None])
    in_c = (ac[None, :] >= x0[:, None]) & (ac[None, :] < (x0 + ew)[:, None])
    mask = (in_r[:, :, None] & in_c[:, None, :] & apply[:, None, None])[:, None].to(x.device)
    return torch.where(mask, torch.full_like(x, _background(spec)), x)


def _raw(x, spec):
    return x * spec["std"] + spec["mean"]


def _norm(raw, spec):
    return (raw - spec["mean"]) / spec["std"]


def gaussian_noise(x: torch.Tensor, g: torch.Generator, spec: dict, sigma: float = 0.05, p: float = 0.5):
    """Add N(0, sigma) noise in raw [0, 1] units to a fraction ``p`` of the images; clamp to the valid range."""
    n = x.shape[0]
    apply = (torch.rand(n, generator=g, device=g.device) < p).to(x.device, x.dtype)[:, None, None, None]
    noise = torch.randn(x.shape, generator=g, device=g.device).to(x.device, x.dtype) * sigma
    return _norm((_raw(x, spec) + apply * noise).clamp_(0, 1), spec)


def intensity_jitter(x: torch.Tensor, g: torch.Generator, spec: dict, contrast: float = 0.2,
                     brightness: float = 0.1, gamma: float = 0.2):
    """Random contrast, brightness and gamma per image, in raw [0, 1] space (the histogram changes, shapes don't)."""
    n = x.shape[0]
    dev = g.device

    def u(lo, hi):
        return torch.empty(n, device=dev).uniform_(lo, hi, generator=g).to(x.device, x.dtype)[:, None, None, None]

    c, b, gm = u(1 - contrast, 1 + contrast), u(-brightness, brightness), u(1 - gamma, 1 + gamma)
    raw = _raw(x, spec).clamp(0, 1).pow(gm)
    return _norm((raw * c + b).clamp_(0, 1), spec)


def augment_batch(x: torch.Tensor, ops: tuple[str, ...], g: torch.Generator, spec: dict) -> torch.Tensor:
    """Apply the named ops in a fixed order (geometry first, then erasing, then intensity)."""
    if "crop" in ops:
        x = random_crop(x, g, spec)
    if "flip" in ops:
        x = hflip(x, g)
    if "jitter" in ops:
        x = intensity_jitter(x, g, spec)
    if "noise" in ops:
        x = gaussian_noise(x, g, spec)
    if "erase" in ops:
        x = random_erase(x, g, spec)
    return x
