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
from fmnist.fit.models import count_parameters, create_model
from fmnist.fit.recipes import AUTO_MODELS, TrainConfig, choose_row, make_optimizer, row_values

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


def epoch_seconds(cfg: TrainConfig, device: torch.device, n_train: int, n_val: int) -> float:
    """One epoch of ``cfg`` here: its training steps and one validation pass (a forward pass costs about a
    third of a training step per image, as :class:`fmnist.fit.budget.TimeBudget` assumes before it has measured)."""
    per_step = step_seconds(cfg, device)
    val_images = n_val * (2 if cfg.tta else 1)
    return per_step * (max(1, n_train // cfg.batch_size) + val_images / cfg.batch_size / 3)


def size_recipe(cfg: TrainConfig, device: torch.device, n_train: int, n_val: int, reserve: float,
                agree=lambda i: i) -> tuple[TrainConfig, str]:
    """``cfg`` with the table row its time budget affords here, and a line that says why.

    ``reserve``: seconds kept for after training (the trust fit). Rows are probed shortest first; a row whose
    model cannot train its epochs in what is left ends the search (:func:`fmnist.fit.recipes.choose_row`).
    ``agree(i)``: the row every process of a data-parallel run takes (rank 0's choice)."""
    table = AUTO_MODELS[cfg.model]
    t0 = time.monotonic()
    measured: dict[int, float] = {}

    per_model: dict[tuple, float] = {}  # rows that share a model and batch size share a probe

    def seconds(recipe: dict) -> float:
        row, trial = next(e for e, r in table if r is recipe), dataclasses.replace(cfg, **row_values(recipe, cfg))
        key = (trial.model, trial.batch_size)
        if key not in per_model:
            per_model[key] = epoch_seconds(trial, device, n_train, n_val)
        measured[row] = per_model[key]
        return measured[row]

    def size(recipe: dict) -> int:
        return count_parameters(create_model(recipe["model"]))

    i = int(agree(choose_row(cfg.time_budget - reserve, seconds, table, size)))
    epochs, recipe = table[i]
    probe = ", ".join(f"{table_row} epochs: {s:.2f} s/epoch" for table_row, s in measured.items())
    chosen = dataclasses.replace(cfg, **row_values(recipe, cfg))
    given = f", {cfg.pinned.replace(',', ', ')} as given" if cfg.pinned else ""
    note = (f"recipe: row '{epochs} epochs' of the epoch table ({chosen.model}, batch {chosen.batch_size}, "
            f"lr {chosen.lr:g}, augment {chosen.augment}{given}); probe {time.monotonic() - t0:.1f} s ({probe})")
    return chosen, note
