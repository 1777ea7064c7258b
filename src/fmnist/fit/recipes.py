"""Training recipes: the configuration of a run, the named presets, and the pieces of a recipe that are pure
functions of it (learning-rate schedule, optimiser)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fmnist.core.errors import InputError
from fmnist.core.values import is_finite_number

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
    # which validation figure picks the kept epoch: val_loss | val_acc; last keeps the final weights and
    # validates them alone (a schedule that anneals to 0 ends at its best: other passes would change nothing)
    select: str = field(default="val_loss", metadata={"help": (
        'which validation figure picks the epoch kept: val_loss or val_acc; last: keep the final epoch and '
        'validate only it'
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
    # the probe, training, validation and the calibration/OOD fit; starting Python and PyTorch and loading the
    # data come on top (2-5 s on a 2-core CPU): fast's 52 s make a command of about a minute.
    # Their model "auto" takes the recipe from the epoch table for the epochs the budget buys on this machine
    # (machines here differ 2-3x in speed: one static recipe is over-fitted on one and under-trained on another).
    "fast": dict(model="auto", time_budget=52, select="last"),
    "default": dict(model="auto", time_budget=175, select="last"),
    "best": dict(model="auto", time_budget=880, select="last"),
    "tiny": dict(model="auto-tiny", time_budget=880, select="last"),
}
DEFAULT_PRESET = "default"

# The epoch table: recipes measured for a number of epochs, with the validation accuracy (%, flip TTA) each
# reached; several rows per model (docs/results.md, "The epoch table"). A time-budgeted preset (model "auto") times
# each model here (:mod:`fmnist.fit.throughput`), predicts what it reaches in the epochs the budget buys, and trains
# the model predicted best, with its row for those epochs; ``fmnist train --epochs N`` without a budget trains the
# row predicted best at N epochs. All: SGD-Nesterov, one-cycle to 0, label smoothing 0.1, weight decay 5e-4; the
# final epoch kept. Sources: the s2dw and air rows on a 2-core AMD EPYC Zen 3 (benchmarks/ablation.py, 3 seeds
# where the docs say so); the resnet9 rows on an NVIDIA H200 (benchmarks/epoch_table.py, bf16). Short schedules
# want small models and little augmentation; from 10 epochs crops pay, from 20 random erasing.
EPOCH_TABLE: tuple[tuple[float, dict, float], ...] = (
    (4, dict(model="s2dw-24", batch_size=128, lr=0.2, augment="flip"), 92.67),
    (3, dict(model="s2dw-32", batch_size=128, lr=0.2, augment="flip"), 92.54),
    (8, dict(model="s2dw-32", batch_size=128, lr=0.2, augment="flip"), 93.67),
    (3, dict(model="air-16", batch_size=128, lr=0.2, augment="flip"), 92.98),
    (1.5, dict(model="air-32", batch_size=128, lr=0.2, augment="flip"), 92.63),
    (3, dict(model="air-32", batch_size=128, lr=0.2, augment="flip"), 93.65),
    (10, dict(model="air-32", batch_size=128, lr=0.2, augment="flip"), 94.54),
    (5, dict(model="resnet9-s", batch_size=256, lr=0.2, augment="flip"), 93.56),
    (10, dict(model="resnet9-s", batch_size=256, lr=0.2, augment="flip,crop"), 94.32),
    (10, dict(model="resnet9-m", batch_size=256, lr=0.2, augment="flip,crop"), 94.56),
    (20, dict(model="resnet9-m", batch_size=256, lr=0.2, augment="flip,crop,erase"), 95.20),
    (80, dict(model="resnet9-m", batch_size=256, lr=0.2, augment="flip,crop,erase"), 95.66),
    (40, dict(model="resnet9-l", batch_size=256, lr=0.2, augment="flip,crop,erase"), 95.54),
    (100, dict(model="resnet9-l", batch_size=256, lr=0.2, augment="flip,crop,erase"), 95.69),
)
# The same for models under 100,000 parameters (the tiny preset).
TINY_TABLE: tuple[tuple[float, dict, float], ...] = (
    (4, dict(model="s2dw-24", batch_size=128, lr=0.2, augment="flip"), 92.67),
    (3, dict(model="air-16", batch_size=128, lr=0.2, augment="flip"), 92.98),
    (20, dict(model="s2d-24", batch_size=128, lr=0.2, augment="flip,crop"), 93.1),
)
AUTO_MODELS = {"auto": EPOCH_TABLE, "auto-tiny": TINY_TABLE}
TABLE_KEYS = {k for table in AUTO_MODELS.values() for _, row, _ in table for k in row}
# What an epoch of each table model costs relative to s2dw-32 (training images/s on a 2-core AVX2 CPU, fp32):
# models that could not train even half their first row's epochs at this cost are not timed (a probe of a large
# model costs seconds of a short budget).
RELATIVE_COST = {"s2dw-24": 0.6, "s2d-24": 0.6, "air-16": 0.9, "s2dw-32": 1.0, "air-32": 2.3, "resnet9-s": 3.3,
                 "resnet9-m": 11.0, "resnet9-l": 40.0}


def row_values(recipe: dict, cfg: TrainConfig) -> dict:
    """A table row's values for ``cfg``, less those its user gave (``cfg.pinned``)."""
    pinned = set(filter(None, cfg.pinned.split(",")))
    return {k: v for k, v in recipe.items() if k not in pinned}


def predicted_accuracy(table, model: str, epochs: float) -> float:
    """Validation accuracy (%) the table predicts for ``model`` after ``epochs``: linear in log(epochs) between
    its rows, flat past its longest row (nothing measured says it keeps improving), and 2 points lower for each
    halving below its shortest row."""
    points = sorted((e, acc) for e, r, acc in table if r["model"] == model)
    if epochs >= points[-1][0]:
        return points[-1][1]
    if epochs <= points[0][0]:
        return points[0][1] - 2.0 * math.log2(points[0][0] / max(epochs, 1e-3))
    for (e0, a0), (e1, a1) in zip(points, points[1:]):
        if e0 <= epochs <= e1:
            return a0 + (a1 - a0) * math.log(epochs / e0) / math.log(e1 / e0)
    raise AssertionError("unreachable")


def _row_for(table, model: str, epochs: float) -> int:
    """Index of ``model``'s longest row not longer than ``epochs`` (its shortest when all are longer)."""
    rows = sorted((e, i) for i, (e, r, _) in enumerate(table) if r["model"] == model)
    return max([i for e, i in rows if e <= epochs], key=lambda i: table[i][0], default=rows[0][1])


def table_recipe(epochs: int, table: tuple[tuple[int, dict, float], ...] = EPOCH_TABLE) -> tuple[int, dict]:
    """(row epochs, recipe) for ``epochs`` without a budget: the row of the model predicted best after that many
    epochs. The recipe is a dict of TrainConfig values, ``select`` included."""
    models = list(dict.fromkeys(r["model"] for _, r, _ in table))
    model = max(models, key=lambda m: predicted_accuracy(table, m, epochs))
    e, recipe, _ = table[_row_for(table, model, epochs)]
    return e, {**recipe, "select": "last"}


def choose_row(spendable: float, epoch_seconds, table: tuple[tuple[int, dict, float], ...] = EPOCH_TABLE,
               cost=lambda model: RELATIVE_COST.get(model, 1.0)) -> tuple[int, float, float]:
    """(row index, epochs affordable, predicted accuracy) for a budget of ``spendable`` seconds of training: the
    model predicted most accurate after the epochs it can train here, and its row for them.

    ``epoch_seconds(recipe)`` times a row's recipe here: (seconds per epoch, seconds once: the final
    validation pass). Models are timed cheapest first (by
    ``cost``); a model is not timed when the first one's time scaled by the cost ratio says it could not train
    half its shortest row, or when even its best row would not beat the choice so far."""
    models = sorted(dict.fromkeys(r["model"] for _, r, _ in table), key=cost)
    best = (-math.inf, 0, 0.0)  # (predicted accuracy, row, epochs)
    base = None  # (model, seconds per epoch) of the first model timed
    for model in models:
        rows = [(e, i, acc) for i, (e, r, acc) in enumerate(table) if r["model"] == model]
        if max(acc for _, _, acc in rows) <= best[0]:
            continue
        if base is not None and spendable / (base[1] * cost(model) / cost(base[0])) < min(rows)[0] / 2:
            continue
        seconds, once = epoch_seconds(table[min(rows)[1]][1])
        base = base or (model, seconds)
        epochs = max(spendable - once, 0.0) / seconds
        accuracy = predicted_accuracy(table, model, epochs)
        if accuracy > best[0]:
            best = (accuracy, _row_for(table, model, epochs), epochs)
    return best[1], best[2], best[0]


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
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def check_value(key: str, value) -> str | None:
    """Why ``value`` cannot be the TrainConfig field ``key`` as read from a file (None when it can): a value of the
    wrong JSON type, a bool where a number is due, a NaN or an infinity."""
    kinds = _JSON_TYPES[_FIELD_TYPES[key]]
    ok = isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))
    if not ok or (isinstance(value, float) and not is_finite_number(value)):
        return f"{key} must be {_FIELD_TYPES[key].replace(' | ', ' or ')}, got {value!r}"
    return None


def read_config(path) -> TrainConfig:
    """A run's config.json as a TrainConfig (``--resume``): an unknown key, a value of the wrong type or out of
    range is one CheckpointError naming the file and the key."""
    from fmnist.core.runfolder import CheckpointError, read_json

    values = read_json(path)
    if not isinstance(values, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    for key, value in values.items():
        if key not in _FIELD_TYPES:
            raise CheckpointError(f"{path}: unknown key {key!r}: not a training option of this fmnist")
        if (why := check_value(key, value)) is not None:
            raise CheckpointError(f"{path}: {why}")
    cfg = TrainConfig(**values)
    try:
        validate(cfg)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg


# Beyond these a value is a typo, not a setting (threads: more than any machine fmnist runs on has cores).
MAX_THREADS = 1024
MAX_BUDGET_SECONDS = 7 * 24 * 3600


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
        (cfg.select in ("val_loss", "val_acc", "last"), "--select must be val_loss, val_acc or last"),
        (cfg.select != "last" or cfg.schedule != "constant" and not cfg.patience,
         "--select last keeps the final weights: it needs a schedule that anneals (onecycle, cosine) and no "
         "--patience"),
        (cfg.precision in ("auto", "fp32", "bf16", "fp16"), "--precision must be auto, fp32, bf16 or fp16"),
        (0 <= cfg.ema < 1, "--ema must be in [0, 1)"),
        (cfg.val_size >= 0 and cfg.time_budget >= 0 and cfg.patience >= 0, "negative sizes are not allowed"),
        (cfg.subset >= 0, "--subset must be >= 0 (0 = every training image)"),
        (0 <= cfg.threads <= MAX_THREADS, f"--threads must be in [0, {MAX_THREADS}] (0 = physical cores)"),
        (0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
        (0 <= cfg.warmup < 1, "--warmup must be in [0, 1)"),
        (0 <= cfg.momentum < 1, "--momentum must be in [0, 1)"),
        (0 <= cfg.weight_decay < 1, "--weight-decay must be in [0, 1)"),
        (cfg.time_budget <= MAX_BUDGET_SECONDS, f"--time-budget must be at most {MAX_BUDGET_SECONDS:,} s (a week)"),
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
