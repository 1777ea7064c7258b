"""How fast a recipe trains on this machine, and the epoch-table row a time budget affords.

Machines differ 2-3x in speed (AVX2 only, AVX-512 with native bf16, AMX, a GPU), so a budget of 175 s buys 7
epochs on one and 16 on another, and the recipe best for 7 epochs is not the best for 16. A preset whose model is
"auto" therefore times a few training steps of each table row's recipe (its model, batch size, precision and
augmentation, on random data of the real shape) before training, and takes the longest row that fits its budget
(:func:`fmnist.fit.recipes.choose_row`). The probe's seconds count against the budget.
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F

from fmnist import CLASS_NAMES
from fmnist.core.preprocess import make_spec
from fmnist.fit import runtime
from fmnist.fit.augment import augment_batch, parse_augment
from fmnist.fit.models import create_model
from fmnist.fit.recipes import AUTO_MODELS, TrainConfig, choose_row, make_optimizer, row_values
from fmnist.fit.trust.fit import cost_seconds

WARMUP_STEPS, TIMED_STEPS = 1, 2  # the first step pays for kernel selection and allocation; then two are timed


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(cfg: TrainConfig, device: torch.device) -> float:
    """Seconds of one training step of ``cfg``'s recipe here (augmentation, forward, backward, update)."""
    model = create_model(cfg.model, num_classes=len(CLASS_NAMES)).to(device)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train()
    opt = make_optimizer(cfg, model)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(cfg.batch_size, 1, 28, 28, generator=gen, device=device)
    y = torch.randint(0, len(CLASS_NAMES), (cfg.batch_size,), generator=gen, device=device)
    ops, spec = parse_augment(cfg.augment), make_spec()
    precision = runtime.resolve_precision(cfg.precision, device, cfg.batch_size)
    t0 = 0.0
    for i in range(WARMUP_STEPS + TIMED_STEPS):
        if i == WARMUP_STEPS:
            _sync(device)
            t0 = time.perf_counter()
        xb = augment_batch(x, ops, gen, spec) if ops else x
        with runtime.autocast(device, precision):
            loss = F.cross_entropy(model(xb.contiguous(memory_format=fmt)).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return (time.perf_counter() - t0) / TIMED_STEPS


def epoch_seconds(cfg: TrainConfig, device: torch.device, n_train: int, n_val: int) -> tuple[float, float]:
    """(seconds of one training epoch of ``cfg`` here, seconds of its one validation pass): a forward pass costs
    about a third of a training step per image, as :class:`fmnist.fit.budget.TimeBudget` assumes before it has
    measured."""
    per_step = step_seconds(cfg, device)
    val_images = n_val * (2 if cfg.tta else 1)
    return per_step * max(1, n_train // cfg.batch_size), per_step * val_images / cfg.batch_size / 3


def size_recipe(cfg: TrainConfig, device: torch.device, n_train: int, n_val: int, reserve: float,
                agree=lambda i: i) -> tuple[TrainConfig, str]:
    """``cfg`` with the table row its time budget affords here, and a line that says why.

    ``reserve``: seconds kept for after training (the trust fit). The models are timed cheapest first and the
    one predicted most accurate in the epochs it can train is taken (:func:`fmnist.fit.recipes.choose_row`).
    ``agree(i)``: the row every process of a data-parallel run takes (rank 0's choice)."""
    table = AUTO_MODELS[cfg.model]
    t0 = time.monotonic()
    measured: dict[str, float] = {}

    def seconds(recipe: dict) -> tuple[float, float]:
        trial = dataclasses.replace(cfg, **row_values(recipe, cfg))
        per_epoch, validation = epoch_seconds(trial, device, n_train, n_val)
        measured[trial.model] = per_epoch
        # once: the final validation pass, and the trust fit's passes of this model (``reserve`` is its fixed part)
        precision = runtime.resolve_precision(trial.precision, device, trial.batch_size)
        return per_epoch, validation + cost_seconds(validation, precision) - cost_seconds(0.0)

    i, epochs, accuracy = choose_row(cfg.time_budget - reserve, seconds, table)
    i = int(agree(i))
    row_epochs, recipe, _ = table[i]
    probe = ", ".join(f"{model} {s:.2f} s/epoch" for model, s in measured.items())
    chosen = dataclasses.replace(cfg, **row_values(recipe, cfg))
    given = f", {cfg.pinned.replace(',', ', ')} as given" if cfg.pinned else ""
    note = (f"recipe: {chosen.model} (the epoch table's '{row_epochs} epochs' row: batch {chosen.batch_size}, "
            f"lr {chosen.lr:g}, augment {chosen.augment}{given}), about {epochs:.1f} epochs here, predicted "
            f"{accuracy:.1f} % validation accuracy; probe {time.monotonic() - t0:.1f} s ({probe})")
    return chosen, note
