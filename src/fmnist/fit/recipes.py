"""Training recipes: the configuration of a run, the named presets, and the pieces of a recipe that are pure
functions of it (learning-rate schedule, optimiser)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fmnist.core.errors import InputError

if TYPE_CHECKING:
    import torch



@dataclass
class TrainConfig:
    model: str = field(default="resnet9-s", metadata={"help": (
        "architecture (see `fmnist models`); auto: the epoch table's recipe (model, batch size, "
        'learning rate, augmentation) for the epochs the time budget buys on this machine, or for '
        '--epochs; auto-tiny: the same among models under 100,000 parameters'
    )})
    epochs: int = field(default=30, metadata={"help": (
        "epochs to train; given without --time-budget, it replaces the preset's time budget, and a "
        "model auto trains the epoch table's recipe for that many epochs (given with a "
        '--time-budget above 0, it is ignored)'
    )})
    batch_size: int = field(default=256, metadata={"help": 'images per step'})
    lr: float = field(default=0.2, metadata={"help": 'peak learning rate'})
    # sgd (Nesterov) | adam | adamw
    optimizer: str = field(default="sgd", metadata={"help": 'sgd (Nesterov momentum), adam or adamw'})
    momentum: float = field(default=0.9, metadata={"help": 'SGD momentum'})
    # applied to weights only, not to biases or BatchNorm
    weight_decay: float = field(default=5e-4, metadata={"help": (
        'weight decay on weights (not biases or BatchNorm)'
    )})
    # onecycle (linear warm-up, linear decay to 0) | cosine | constant
    schedule: str = field(default="onecycle", metadata={"help": (
        'learning-rate schedule: onecycle, cosine or constant'
    )})
    # fraction of training spent warming up (onecycle, cosine)
    warmup: float = field(default=0.15, metadata={"help": (
        'fraction of training spent warming the learning rate up'
    )})
    label_smoothing: float = field(default=0.1, metadata={"help": 'label smoothing of the training loss'})
    # EMA decay of the weights per step; 0 disables
    ema: float = field(default=0.0, metadata={"help": (
        'decay of an exponential moving average of the weights (0 = off)'
    )})
    augment: str = field(default="flip,crop", metadata={"help": (
        'comma-separated: flip,crop,erase,noise,jitter or none'
    )})
    # mirrored test-time augmentation at validation and evaluation
    tta: bool = field(default=True, metadata={"help": 'mirrored test-time augmentation'})
    val_size: int = field(default=10_000, metadata={"help": (
        'validation images held out of the 60,000 (stratified, seeded)'
    )})
    # which validation figure picks the kept epoch: val_loss | val_acc
    select: str = field(default="val_loss", metadata={"help": (
        'which validation figure picks the epoch kept: val_loss or val_acc'
    )})
    # stop after this many epochs without improvement; 0 never stops early
    patience: int = field(default=0, metadata={"help": (
        'stop after this many epochs without improvement (0 = never)'
    )})
    # seconds; > 0 sizes the schedule to fit training, validation and calibration
    time_budget: float = field(default=0.0, metadata={"help": (
        'seconds: size the schedule to fit and stop within it (0 = use --epochs)'
    )})
    seed: int = field(default=0, metadata={"help": 'random seed (split, init, shuffling, augmentation)'})
    # 0 = physical cores
    threads: int = field(default=0, metadata={"help": 'CPU threads (0 = physical cores)'})
    # auto | fp32 | bf16 | fp16
    precision: str = field(default="auto", metadata={"help": (
        'auto, fp32, bf16 or fp16 (auto: bf16 on GPUs and on CPUs with native bf16)'
    )})
    # NHWC: 1.5-2x faster convolutions on CPU (oneDNN)
    channels_last: bool = field(default=True, metadata={"help": 'channels_last memory format'})
    device: str = field(default="auto", metadata={"help": 'auto, cpu or cuda'})
    # use only this many training images (quick experiments); 0 = all
    subset: int = field(default=0, metadata={"help": (
        'train on only this many images (quick experiments; 0 = all)'
    )})
    data_dir: str | None = field(default=None, metadata={"help": (
        "folder holding the four IDX files (default: search: FMNIST_DATA, Debian's folder, the "
        'cache)'
    )})
    data: str | None = field(default=None, metadata={"help": (
        "your own data set: a folder of four IDX files, a training CSV (label,pixel1,...) with --test-data, a "
        "folder of both CSVs, or an image folder train/CLASS/* and test/CLASS/* (docs/your-data.md; default: "
        "Fashion-MNIST)"
    )})
    test_data: str | None = field(default=None, metadata={"help": "the test CSV that goes with --data TRAIN.csv"})
    class_names: str | None = field(default=None, metadata={"help": (
        "class names, one a line (UTF-8; default: the image folder's names, classes.json, or the labels)"
    )})
    # flips and mirrored TTA: None = only for a data set known mirror-symmetric
    mirror: bool | None = field(default=None, metadata={"help": (
        "allow mirrored augmentation (flip) and mirrored test-time views (default: only for a data set known to "
        "look the same mirrored: Fashion-MNIST, or a classes.json saying so); --no-mirror: never"
    )})
    preset: str | None = None
    pinned: str = ""                # model auto: the recipe options given explicitly, kept over the table row's


# The help of each option, written once: `fmnist train` and `fmnist tune` both show it.
FIELD_HELP = {f.name: f.metadata.get("help", f.name) for f in dataclasses.fields(TrainConfig)}


PRESETS: dict[str, dict] = {
    # The seeds' own recipes, reproduced.
    "seed-a": dict(model="seed-a", optimizer="adam", lr=1e-3, batch_size=32, epochs=30, schedule="constant",
                   weight_decay=0.0, label_smoothing=0.0, augment="flip", tta=False, select="val_loss",
                   precision="fp32"),
    "seed-b-mlp": dict(model="seed-b-mlp", optimizer="adam", lr=1e-3, batch_size=32, epochs=20, schedule="constant",
                       weight_decay=0.0, label_smoothing=0.0, augment="none", tta=False, select="val_acc"),
    # Seed B's callback keeps the best model "by minimum loss or maximum accuracy"; both its presets keep the best
    # validation accuracy, the figure seed B reports.
    "seed-b-cnn": dict(model="seed-b-cnn", optimizer="adam", lr=1e-3, batch_size=64, epochs=30, schedule="constant",
                       weight_decay=0.0, label_smoothing=0.0, augment="none", tta=False, select="val_acc"),
    # Time-budgeted recipes: the learning-rate schedule runs on the clock, so it always completes. A budget covers
    # the probe, training, validation and the calibration/OOD fit; loading the data (~1 s) comes on top.
    # Their model "auto" takes the recipe from the epoch table for the epochs the budget buys on this machine
    # (machines here differ 2-3x in speed: one static recipe is over-fitted on one and under-trained on another).
    "fast": dict(model="auto", time_budget=55, select="val_acc"),
    "default": dict(model="auto", time_budget=175, select="val_acc"),
    "best": dict(model="auto", time_budget=880, select="val_acc"),
    "tiny": dict(model="auto-tiny", time_budget=880, select="val_acc"),
}
DEFAULT_PRESET = "default"

# The epoch table: for a number of epochs, the recipe that measured best on the validation split
# (benchmarks/epoch_table.py; README, "The epoch table"). A time-budgeted preset (model "auto") probes how fast each
# row's model trains on this machine and takes the longest row its budget affords; ``fmnist train --epochs N``
# without a budget trains row N's recipe. All: SGD-Nesterov, one-cycle, label smoothing 0.1, weight decay 5e-4.
# Short schedules want small models and little augmentation (resnet9-m trails resnet9-s by 2.2 points at 5
# epochs; crops cost 0.6 at 3-5 epochs); from 10 epochs crops pay, from 20 random erasing, and the widest model
# only from 40 (it trails resnet9-m by 1.4 points at 10). At 3 epochs s2d-32 and resnet9-s tie (91.92 vs 92.04 %
# val., one seed) and the table takes s2d-32, 2.5x cheaper per epoch on a CPU.
EPOCH_TABLE: tuple[tuple[int, dict], ...] = (
    (3, dict(model="s2d-32", batch_size=128, lr=0.2, augment="flip")),
    (5, dict(model="resnet9-s", batch_size=256, lr=0.2, augment="flip")),
    (10, dict(model="resnet9-m", batch_size=256, lr=0.2, augment="flip,crop")),
    (20, dict(model="resnet9-m", batch_size=256, lr=0.2, augment="flip,crop,erase")),
    (40, dict(model="resnet9-l", batch_size=256, lr=0.2, augment="flip,crop,erase")),
    (80, dict(model="resnet9-m", batch_size=256, lr=0.2, augment="flip,crop,erase")),
)
# The same for models under 100,000 parameters (the tiny preset): s2d-24, flips alone up to about 11 epochs, crops
# from 18 (93.1 % val.), measured on a 2-core CPU.
TINY_TABLE: tuple[tuple[int, dict], ...] = (
    (3, dict(model="s2d-24", batch_size=128, lr=0.2, augment="flip")),
    (20, dict(model="s2d-24", batch_size=128, lr=0.2, augment="flip,crop")),
)
AUTO_MODELS = {"auto": EPOCH_TABLE, "auto-tiny": TINY_TABLE}
TABLE_KEYS = {k for table in AUTO_MODELS.values() for _, row in table for k in row}


def row_values(recipe: dict, cfg: TrainConfig) -> dict:
    """A table row's values for ``cfg``, less those its user gave (``cfg.pinned``)."""
    pinned = set(filter(None, cfg.pinned.split(",")))
    return {k: v for k, v in recipe.items() if k not in pinned}


def table_recipe(epochs: int, table: tuple[tuple[int, dict], ...] = EPOCH_TABLE) -> tuple[int, dict]:
    """(row, recipe) of the table for ``epochs``: the longest row not longer than ``epochs`` (the first row
    below it). The recipe is a dict of TrainConfig values, ``select`` included."""
    row, recipe = table[0]
    for e, r in table:
        if e <= epochs:
            row, recipe = e, r
    return row, {**recipe, "select": "val_acc"}


def choose_row(spendable: float, epoch_seconds, table: tuple[tuple[int, dict], ...] = EPOCH_TABLE,
               size=lambda recipe: 0) -> int:
    """Index of the row a budget affords: the longest row whose own recipe trains its epochs within
    ``spendable`` seconds; the first row when none does. ``epoch_seconds(recipe)`` says what one epoch of a row's
    recipe costs here. It is asked row by row, shortest first, except for rows that cannot fit: a row longer than
    one that did not fit, with a model no smaller (``size(recipe)``, its parameters), is skipped unasked (a probe of
    a large model on a CPU costs seconds of the budget)."""
    chosen, too_big = 0, None
    for i, (epochs, recipe) in enumerate(table):
        if too_big is not None and size(recipe) >= too_big:
            continue
        if epochs * epoch_seconds(recipe) <= spendable:
            chosen = i
        else:
            too_big = size(recipe) if too_big is None else min(too_big, size(recipe))
    return chosen


def resolve_config(preset: str | None = None, **overrides) -> TrainConfig:
    """Preset values first, then explicit overrides (``None`` means 'not given')."""
    values: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
        values["preset"] = preset
    given = {k: v for k, v in overrides.items() if v is not None}
    values = _table_values(values, given)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise InputError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def _table_values(base: dict, given: dict) -> dict:
    """A preset's values under the explicit ones, with an "auto" model's table row in between when it trains a
    number of epochs (on a clock, the row is chosen when training starts: :func:`fmnist.fit.throughput.size_recipe`)."""
    values = {**base, **given}
    model = values.get("model")
    if model not in AUTO_MODELS:
        return values
    if values.get("time_budget"):
        return {**values, "pinned": ",".join(sorted(set(given) & TABLE_KEYS))}
    _, recipe = table_recipe(values.get("epochs", TrainConfig.epochs), AUTO_MODELS[model])
    return {**base, **recipe, **given}


# What each TrainConfig field may hold in a config.json (the annotations are strings: postponed evaluation).
_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "str | None": (str, type(None)),
               "bool | None": (bool, type(None))}


def read_config(path) -> TrainConfig:
    """A run's config.json as a TrainConfig (``--resume``): an unknown key, a value of the wrong type or out of
    range is one CheckpointError naming the file and the key."""
    from fmnist.core.runfolder import CheckpointError, read_json

    values = read_json(path)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        if key not in fields:
            raise CheckpointError(f"{path}: unknown key {key!r}: not a training option of this fmnist")
        kinds = _JSON_TYPES[fields[key]]
        ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise CheckpointError(f"{path}: {key} must be {fields[key].replace(' | ', ' or ')}, got {value!r}")
    cfg = TrainConfig(**values)
    try:
        validate(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


def validate(cfg: TrainConfig) -> None:
    from fmnist.fit.augment import parse_augment

    parse_augment(cfg.augment)
    checks = [
        (cfg.model not in AUTO_MODELS or cfg.time_budget > 0,
         f"--model {cfg.model} picks a recipe for a time budget: give --time-budget, or --epochs without a preset"),
        (cfg.epochs >= 1, "--epochs must be >= 1"),
        (cfg.batch_size >= 2, "--batch-size must be >= 2"),
        (cfg.lr > 0, "--lr must be > 0"),
        (cfg.optimizer in ("sgd", "adam", "adamw"), "--optimizer must be sgd, adam or adamw"),
        (cfg.schedule in ("onecycle", "cosine", "constant"), "--schedule must be onecycle, cosine or constant"),
        (cfg.select in ("val_loss", "val_acc"), "--select must be val_loss or val_acc"),
        (cfg.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
        (0 <= cfg.ema < 1, "--ema must be in [0, 1)"),
        (cfg.val_size >= 0 and cfg.time_budget >= 0 and cfg.patience >= 0, "negative sizes are not allowed"),
    ]
    for ok, msg in checks:
        if not ok:
            raise InputError(msg)


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at a point of training, ``progress`` in [0, 1] (steps done, or budget used)."""
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.warmup > 0 and p < cfg.warmup:
        return cfg.lr * p / cfg.warmup
    q = (p - cfg.warmup) / max(1e-12, 1 - cfg.warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * q))
    return cfg.lr * (1 - q)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    import torch

    trained = [p for p in model.parameters() if p.requires_grad]  # frozen stems and BatchNorm scales stay out
    decay = [p for p in trained if p.ndim > 1]
    no_decay = [p for p in trained if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.Adam(groups, lr=cfg.lr)
