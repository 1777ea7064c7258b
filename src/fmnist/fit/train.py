"""The training loop: whole data set in memory, batches cut from shuffled indices, one line per epoch.

A plain loop rather than a framework, so every step is visible. :func:`train` runs it in parts:
:func:`prepare_data` (the split and the one preprocessing), :func:`build` (model, optimiser, EMA, generator),
then per epoch :func:`train_epoch` (the steps, under a :class:`~fmnist.fit.budget.TimeBudget`) and
:func:`validate_and_keep` (the one forward pass on the validation split; the kept epoch's model written),
a resume state written atomically after each epoch (:func:`save_resume`; :func:`read_resume` and
:func:`restore` on ``--resume``), and after the loop the trust fit, for which the budget kept a reserve.
:class:`Context` says which process this is: only the main process (rank 0) validates and writes; under
``torchrun`` several processes train one model through the hooks of :mod:`fmnist.fit.distributed`, which do
nothing in one process.
"""
from __future__ import annotations

import csv
import dataclasses
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

from fmnist import CLASS_NAMES
from fmnist.core.errors import InputError
from fmnist.core.preprocess import make_spec
from fmnist.core.run import check_new_run_folder, created_now, remove_run
from fmnist.core.runfolder import CONFIG, ENV, HISTORY, LAST, SUMMARY, TRAIN_LOG, WEIGHTS, record_complete
from fmnist.core.values import is_count, is_finite_number
from fmnist.fit import distributed, runtime
from fmnist.fit.augment import augment_batch, parse_augment
from fmnist.fit.budget import TimeBudget
from fmnist.fit.checkpoint import CheckpointError, _atomic, load_state, save_model, save_state, write_json
from fmnist.fit.data import preprocess
from fmnist.fit.distributed import ONE_PROCESS, Context
from fmnist.fit.models import count_parameters, create_model, fit_whitening
from fmnist.fit.recipes import (
    DEFAULT_PRESET,
    PRESETS,
    TrainConfig,
    lr_at,
    make_optimizer,
    read_config,
    resolve_config,
    validate,
)

__all__ = ["DEFAULT_PRESET", "PRESETS", "Context", "TrainConfig", "resolve_config", "train"]


FAILED = -1.0  # what rank 0 broadcasts instead of its stop decision when its part of an epoch raised


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite: the recipe is unstable (a learning rate too high, say)."""


@dataclass
class Data:
    """The run's tensors, preprocessed once: training images on the device, validation on the host."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    spec: dict


@dataclass
class State:
    """Everything the loop changes, and what --resume restores."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: EMA | None
    gen: torch.Generator
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "value": None})
    epoch: int = 0
    step: int = 0
    wrapped: torch.nn.Module | None = None  # the DistributedDataParallel wrapper, across processes
    val_outputs: tuple | None = None  # (features, logits) of the kept model on the validation split, as served
    # On an accelerator, augmentation draws its random numbers there: a generator on the host would make every
    # step copy them over and wait for the device (a host sync per step). On the CPU it is ``gen`` itself.
    aug_gen: torch.Generator | None = None

    def eval_model(self) -> torch.nn.Module:
        return self.ema.model if self.ema is not None else self.model


@dataclass
class Job:
    """What stays fixed while the loop runs: the recipe, the data, where and how it computes and writes."""
    cfg: TrainConfig
    d: Data
    budget: TimeBudget
    precision: str
    out: Path
    data_info: dict
    ctx: Context = ONE_PROCESS


class EMA:
    """Exponential moving average of weights and BatchNorm statistics, evaluated instead of the raw weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = create_model(model.arch_name, num_classes=model.head.out_features).to(
            next(model.parameters()).device)
        self.model.load_state_dict(model.state_dict())
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        # Early on the average would be dominated by the random init: ramp the decay up with the step count.
        d = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                e.lerp_(m, 1 - d)
            else:
                e.copy_(m)


class Progress:
    """The bar of one epoch, only when stderr is a terminal (logs stay clean when redirected: the epoch's own
    line says what a bar would): images/s, the epoch's time left and, on a clock, the run's."""

    def __init__(self, enabled: bool | None = None):
        from fmnist.core.progress import interactive

        self.enabled = interactive() if enabled is None else enabled
        self.bar = None

    def start(self, epoch: int, epochs: int | None, images: int) -> None:
        if self.enabled:
            from fmnist.core.progress import Bar

            self.bar = Bar(images, f"epoch {epoch}" + (f"/{epochs}" if epochs else ""), unit="img", enabled=True)

    def update(self, images: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(images, **postfix)

    def clear(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def default_out(cfg: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{cfg.preset or cfg.model}-s{cfg.seed}"


def _log(msg: str, log_path: Path, echo: bool = True) -> None:
    """Print a line and append it to the run's train.log (opened per line: nothing left open on interrupt)."""
    if echo:
        print(msg, flush=True)
    with open(log_path, "a") as f:
        f.write(msg + "\n")


def prepare_data(cfg: TrainConfig, data, device) -> Data:
    """The split (:func:`fmnist.fit.data.split_indices`) and the one preprocessing function, applied once to the
    whole set; augmentation then works on these floats."""
    from fmnist.fit.data import split_indices

    train_idx, val_idx = split_indices(data.train_labels, cfg)
    spec = make_spec()
    return Data(preprocess(data.train_images[train_idx], spec).to(device), data.train_labels[train_idx].to(device),
                preprocess(data.train_images[val_idx], spec), data.train_labels[val_idx], spec)


WHITENING_IMAGES = 5_000  # training images whose patches fit a whitening stem: the first ones of the split


def build(cfg: TrainConfig, device, x_train: torch.Tensor | None = None, num_classes: int = len(CLASS_NAMES)
          ) -> State:
    """Model, optimiser, EMA and the generator of shuffling and augmentation, seeded (in this order: the
    EMA copy draws its own initial weights from the global RNG, which dropout uses afterwards). A model with a
    whitening stem fits it on the first training images (``x_train``, normalised) before anything copies it."""
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, num_classes=num_classes).to(device)
    if x_train is not None:
        fit_whitening(model, x_train[:WHITENING_IMAGES])
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    opt = make_optimizer(cfg, model)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    device = torch.device(device)
    aug_gen = torch.Generator(device).manual_seed(cfg.seed + 2) if device.type != "cpu" else None
    return State(model, opt, ema, torch.Generator().manual_seed(cfg.seed + 1), aug_gen=aug_gen)


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Full batches, plus the remainder as a last batch when each process's share of it holds at least
    2 images (BatchNorm needs 2)."""
    return max(1, n // batch_size + (1 if n % batch_size // world_size >= 2 else 0))


def train_epoch(job: Job, st: State, progress_bar, max_steps: int = 0) -> tuple[dict, bool]:
    """One pass over the shuffled training set; returns (train loss/accuracy and last lr, whether to stop)."""
    cfg, d, budget, ctx = job.cfg, job.d, job.budget, job.ctx
    device = d.x_train.device
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    aug_ops = parse_augment(cfg.augment)
    n, per_epoch = len(d.x_train), steps_per_epoch(len(d.x_train), cfg.batch_size, ctx.world_size)
    total_steps = cfg.epochs * per_epoch
    st.model.train()
    perm = torch.randperm(n, generator=st.gen).to(device)  # the same on every rank: one shuffled order
    aug_gen = st.aug_gen if st.aug_gen is not None else st.gen
    if ctx.world_size > 1:
        aug_gen = distributed.reseed(cfg.seed, ctx, st.epoch)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen, stop, lr = 0, False, cfg.lr
    progress_bar.start(st.epoch + 1, None if budget.seconds else cfg.epochs, n // ctx.world_size)
    for b in range(per_epoch):
        t_step = time.monotonic()
        idx = distributed.share(perm[b * cfg.batch_size:(b + 1) * cfg.batch_size], ctx)
        xb, yb = d.x_train[idx], d.y_train[idx]
        if aug_ops:
            xb = augment_batch(xb, aug_ops, aug_gen, d.spec)
        xb = xb.contiguous(memory_format=memory_format)
        # The step about to run counts as done, so the first step of a warm-up does not run at lr 0.
        # On a clock, rank 0's reading: every rank must step with the same learning rate.
        lr = lr_at(cfg, distributed.agree(ctx, budget.progress()) if budget.seconds else (st.step + 1) / total_steps)
        logits, loss = _step(st, cfg, xb, yb, lr, device, job.precision)
        budget.note_step(time.monotonic() - t_step, len(yb))
        loss_sum += loss.detach() * len(yb)
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        if progress_bar.enabled:  # loss.item() waits for the device: only when someone watches
            left = {"run left": f"{max(budget.seconds - budget.elapsed(), 0):.0f}s"} if budget.seconds else {}
            progress_bar.update(len(yb), loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", **left)
        if (budget.seconds and distributed.agree(ctx, budget.spent())) or (max_steps and st.step >= max_steps):
            stop = True  # the budget is spent (the schedule has reached 0) or the dry run is done
            break
    progress_bar.clear()
    loss_total, correct_total, seen = distributed.sum_over_ranks(ctx, [float(loss_sum), float(correct), seen])
    return {"train_loss": loss_total / max(seen, 1), "train_acc": correct_total / max(seen, 1), "lr": lr}, stop


def _step(st: State, cfg: TrainConfig, xb, yb, lr: float, device, precision: str):
    for group in st.opt.param_groups:
        group["lr"] = lr
    with runtime.autocast(device, precision):
        logits = (st.wrapped if st.wrapped is not None else st.model)(xb)
        loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    st.opt.step()
    st.step += 1
    if st.ema is not None:
        st.ema.update(st.model, st.step)
    return logits, loss


def validate_and_keep(job: Job, st: State, train_row: dict, t_epoch: float) -> tuple[dict, bool]:
    """The epoch's row of history, with its validation figures (the one forward pass, :mod:`fmnist.core.forward`),
    and whether it is the best so far, in which case its model is written to the run folder (main process)."""
    from fmnist.core.backends import TorchBackend
    from fmnist.core.forward import BATCH_SIZE, forward

    cfg, d = job.cfg, job.d
    t_val = time.monotonic()
    backend = TorchBackend(st.eval_model(), precision=job.precision, channels_last=cfg.channels_last)
    # An accelerator takes the validation split in a few large calls; the CPU's best batch is forward's default.
    batch = BATCH_SIZE if backend.device.type == "cpu" else 5000
    val_feats, val_logits = (torch.from_numpy(a) for a in forward(backend, d.x_val, tta=cfg.tta, batch_size=batch))
    job.budget.note_validation(time.monotonic() - t_val)
    # No validation set (--val-size 0): no figures (None, not NaN, which JSON cannot hold); keep the last epoch.
    has_val = len(d.y_val) > 0
    row = {"epoch": st.epoch, "step": st.step, "train_loss": train_row["train_loss"],
           "train_acc": train_row["train_acc"],
           "val_loss": float(F.cross_entropy(val_logits, d.y_val)) if has_val else None,
           "val_acc": float((val_logits.argmax(1) == d.y_val).double().mean()) if has_val else None,
           "lr": train_row["lr"], "seconds": time.monotonic() - t_epoch, "elapsed": job.budget.elapsed()}
    if not all(is_finite_number(row[k]) for k in ("train_loss", "val_loss") if row[k] is not None):
        raise TrainingDiverged(f"training diverged at epoch {st.epoch}: loss {row['train_loss']:.4g} (train), "
                               f"{row['val_loss']} (validation); try a lower --lr. The run folder keeps the "
                               "last finite epoch's model and resume state")
    value = row["val_acc" if cfg.select == "last" else cfg.select]
    sign = 1.0 if cfg.select == "val_loss" else -1.0
    improved = (not has_val or cfg.select == "last" or st.best["value"] is None
                or sign * value < sign * st.best["value"])
    if improved:
        st.best = {"epoch": st.epoch, "value": value}
        # The trust fit runs the kept model as served (fp32 on the host): these are its validation outputs
        # when validation ran the same way, and the fit need not compute them again.
        same_as_served = job.precision == "fp32" and backend.device.type == "cpu"
        st.val_outputs = (val_feats, val_logits) if same_as_served else None
        if job.ctx.is_main:
            save_model(job.out, st.eval_model(), _model_meta(cfg, job.data_info, row, st.best, d.spec))
    return row, improved


def save_resume(out: Path, st: State, elapsed: float) -> None:
    save_state(out / LAST, {
        "model": st.model.state_dict(), "optimizer": st.opt.state_dict(),
        "ema": st.ema.model.state_dict() if st.ema is not None else {},
        "generator": st.gen.get_state(), "torch_rng": torch.get_rng_state(),
        **({"aug_generator": st.aug_gen.get_state()} if st.aug_gen is not None else {}),
        "epoch": st.epoch, "step": st.step, "elapsed": elapsed, "history": st.history, "best": st.best,
    })


RESUME_KEYS = ("model", "optimizer", "ema", "generator", "torch_rng", "epoch", "step", "elapsed", "history", "best")


def read_resume(out: Path) -> dict:
    """The state saved after the last finished epoch, checked for what :func:`restore` needs (read before the
    data, so a damaged last.pt fails at once)."""
    path = out / LAST
    state = load_state(path)
    missing = [k for k in RESUME_KEYS if k not in state] if isinstance(state, dict) else list(RESUME_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a resume state of this fmnist: it lacks {', '.join(missing)}")
    ok = (is_count(state["epoch"]) and is_count(state["step"]) and _seconds(state["elapsed"])
          and isinstance(state["history"], list) and len(state["history"]) == state["epoch"]
          and all(_history_row(row) for row in state["history"]) and _best(state["best"], state["epoch"]))
    if not ok:
        raise CheckpointError(f"{path} is not a resume state of this fmnist: its epoch, step, elapsed time, "
                              "history or best epoch are not what training writes")
    return state


def _seconds(value) -> bool:
    return is_finite_number(value) and value >= 0


def _number(value) -> bool:
    """A finite number, or None where training writes one (an epoch that was not validated)."""
    return value is None or is_finite_number(value)


def _history_row(row) -> bool:
    return isinstance(row, dict) and is_count(row.get("epoch")) and all(_number(v) for v in row.values())


def _best(best, epochs: int) -> bool:
    return (isinstance(best, dict) and is_count(best.get("epoch")) and best["epoch"] <= epochs
            and _number(best.get("value")))


def restore(state: dict, st: State, path: Path) -> float:
    """Put a :func:`read_resume` state into the freshly built ``st``; return the seconds spent before. A state
    that does not fit the run's model or recipe is one CheckpointError naming the file."""
    try:
        st.model.load_state_dict(state["model"])
        st.opt.load_state_dict(state["optimizer"])
        _check_optimizer_state(st.opt)
        if st.ema is not None:
            st.ema.model.load_state_dict(state["ema"])
        st.gen.set_state(state["generator"])
        if st.aug_gen is not None and "aug_generator" in state:  # absent when the run began on the CPU
            st.aug_gen.set_state(state["aug_generator"])
        torch.set_rng_state(state["torch_rng"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        reason = " ".join(str(e).split())  # load_state_dict lists every mismatch on lines of its own
        raise CheckpointError(f"{path} does not fit the run's model and recipe ({path.parent / 'config.json'}): "
                              f"{reason[:400]}{'...' if len(reason) > 400 else ''}") from None
    st.history, st.best = state["history"], state["best"]
    st.epoch, st.step = state["epoch"], state["step"]
    return float(state["elapsed"])


def _check_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Momentum and moment buffers shaped like their parameters (the optimiser would only fail at its step)."""
    for param, buffers in opt.state.items():
        for name, value in buffers.items():
            if torch.is_tensor(value) and value.ndim and value.shape != param.shape:
                raise InputError(f"optimizer {name} of shape {tuple(value.shape)} for a parameter of shape "
                                 f"{tuple(param.shape)}")


def train(cfg: TrainConfig | None, out: str | Path | None = None, data=None, resume: str | Path | None = None,
          on_epoch_end=None, quiet: bool = False, max_steps: int = 0, ctx: Context = ONE_PROCESS,
          overwrite: bool = False, trust: bool = True) -> dict:
    """Train and write a run folder; returns a summary dict.

    ``data`` is a FashionMNIST (tests pass their own); ``resume`` continues the run in that folder from its
    last finished epoch (``cfg`` is then read from its config.json); a folder ``out`` that holds a run already
    is refused unless ``overwrite``, which removes that run's files first; ``max_steps`` > 0 stops after that many
    steps (--dry-run); ``on_epoch_end(epoch, row)`` is called after each epoch's files are written and may
    return True to stop. ``ctx`` is this process's place in a data-parallel run (:func:`fmnist.fit.distributed.session`);
    ``on_epoch_end`` is then called on rank 0 only, and the summary returned is complete on rank 0 only.
    ``trust=False`` skips the calibration/OOD/candidate-set fit (benchmarks that only read accuracy): the run
    folder then answers without calibrated confidences or an OOD gate, like a run of an older fmnist.
    """
    from fmnist.fit.sources import dataset_info, fit_to_data, load_data

    t_start = time.monotonic()
    if resume is not None and overwrite:
        raise InputError("resume and overwrite exclude each other: continue the run, or replace it")
    out = Path(resume) if resume is not None else Path(out) if out is not None else default_out(cfg)
    saved = None
    if resume is not None:
        cfg = read_config(out / CONFIG)
        saved = read_resume(out)
    validate(cfg)
    distributed.check(cfg.batch_size, ctx)
    if resume is None:
        _check_out(out, overwrite, ctx)
    device = distributed.place(runtime.setup(cfg.threads or distributed.default_threads(ctx), cfg.device), ctx)
    data = data if data is not None else load_data(cfg.data, cfg.test_data, cfg.class_names, cfg.data_dir)
    dataset = dataset_info(data)
    cfg, notes = fit_to_data(cfg, data, len(data.train_labels))
    d = prepare_data(cfg, data, device)
    from fmnist.fit.recipes import AUTO_MODELS
    from fmnist.fit.trust.fit import reserve

    table_row = cfg.model in AUTO_MODELS
    cfg, recipe_note, elapsed_before = _size_recipe(cfg, d, device, ctx, reserve(len(d.y_train))(0.0))
    cfg, more = fit_to_data(cfg, data, len(data.train_labels), table_row)  # the table's row may flip images
    notes += [n for n in more if n not in notes]
    precision = runtime.resolve_precision(cfg.precision, device, cfg.batch_size)
    st = build(cfg, device, d.x_train, num_classes=len(dataset["class_names"]))
    if saved is not None:
        elapsed_before = restore(saved, st, out / LAST)
    st.wrapped = distributed.wrap(st.model, ctx, device)
    if overwrite and resume is None and ctx.is_main:
        remove_run(out)  # as late as possible: a run that fails to start leaves the old one in place
    say = _start_run(cfg, out, st, d, device, precision, ctx, quiet, resumed=resume is not None)
    if recipe_note:
        say(recipe_note)
    for note in notes:
        say(note)
    budget = TimeBudget(cfg.time_budget, len(d.y_val), cfg.tta, reserve(len(d.y_train), precision), elapsed_before)
    data_info = {"source": getattr(data, "source", None), "checksums": getattr(data, "checksums", {}),
                 "dataset": dataset}
    job = Job(cfg, d, budget, precision, out, data_info, ctx)
    _loop(job, st, say, on_epoch_end, quiet, max_steps)
    return _finish(job, st, data, device, say, t_start, trust, quiet)


def _size_recipe(cfg: TrainConfig, d: Data, device, ctx: Context, reserve: float) -> tuple[TrainConfig, str, float]:
    """An "auto" model's recipe for this machine and budget (:func:`fmnist.fit.throughput.size_recipe`): (config,
    the line that says which row and why, the seconds the probe took, which the budget counts)."""
    from fmnist.fit.recipes import AUTO_MODELS

    if cfg.model not in AUTO_MODELS:
        return cfg, "", 0.0
    from fmnist.fit.throughput import size_recipe

    t0 = time.monotonic()
    cfg, note = size_recipe(cfg, device, len(d.y_train) // ctx.world_size, len(d.y_val), reserve,
                            agree=lambda i: distributed.agree(ctx, i))
    distributed.check(cfg.batch_size, ctx)
    return cfg, note, time.monotonic() - t0


def _check_out(out: Path, overwrite: bool, ctx: Context) -> None:
    """Refuse to mix a new run into a folder that holds one (:func:`fmnist.core.run.check_new_run_folder`). Rank 0
    looks, before anything is written, and every rank follows its answer (another rank looking itself might
    already see the files rank 0 writes)."""
    error = None
    if ctx.is_main:
        try:
            check_new_run_folder(out, overwrite)
        except CheckpointError as e:
            error = e
    if distributed.agree(ctx, error is not None):
        raise error or CheckpointError(f"{out}: refused by the main process (rank 0)")


def _start_run(cfg, out: Path, st: State, d: Data, device, precision: str, ctx: Context, quiet: bool,
               resumed: bool):
    """Write config.json and env.json and the first log line; return the logging function."""
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG, dataclasses.asdict(cfg))
        env = runtime.environment(device)
        env.update(precision=precision, world_size=ctx.world_size)
        write_json(out / ENV, env)

    def say(msg: str) -> None:
        if ctx.is_main:
            _log(msg, out / TRAIN_LOG, echo=not quiet)

    if resumed:
        say(f"resuming {out} after epoch {st.epoch}")
    else:
        say(f"run {out}: model {cfg.model} ({count_parameters(st.model):,} parameters), {len(d.x_train):,} train / "
            f"{len(d.x_val):,} val images, {device} {precision}, {torch.get_num_threads()} threads"
            + (f" x {ctx.world_size} processes" if ctx.world_size > 1 else "")
            + (f", time budget {cfg.time_budget:.0f} s" if cfg.time_budget else f", {cfg.epochs} epochs"))
    return say


def _loop(job: Job, st: State, say, on_epoch_end, quiet: bool, max_steps: int) -> None:
    """Epochs until the budget, the epoch count, early stopping or the caller says stop (rank 0 decides)."""
    cfg = job.cfg
    progress_bar = Progress(None if not quiet and job.ctx.is_main else False)
    max_epochs = 10**9 if cfg.time_budget else cfg.epochs
    stop = False
    while st.epoch < max_epochs and not stop:
        t_epoch = time.monotonic()
        train_row, stop = train_epoch(job, st, progress_bar, max_steps)
        st.epoch += 1
        distributed.average_buffers(job.ctx, st.model, st.ema.model if st.ema is not None else None)
        if job.ctx.is_main:
            try:
                final = stop or st.epoch >= max_epochs or job.budget.spent()
                stop = _end_epoch(job, st, train_row, t_epoch, say, on_epoch_end, final) or stop
            except BaseException:
                distributed.agree(job.ctx, FAILED)  # the other processes stop too, instead of waiting for us
                raise
            # The last validation used up the budget: another epoch would be one step and a validation.
            stop = stop or job.budget.spent()
        decision = distributed.agree(job.ctx, stop)
        if decision == FAILED:
            raise RuntimeError("the main process (rank 0) failed at the end of this epoch; its error says why")
        stop = bool(decision)
    if job.ctx.is_main and st.epoch and st.best["epoch"] != st.epoch and cfg.select == "last":
        _keep_last(job, st, say)


def _keep_last(job: Job, st: State, say) -> None:
    """Validate and keep the final epoch after all, when the loop stopped after an epoch it did not know was the
    last (the caller stopped it, or the epoch's writes used up the budget)."""
    last = st.history.pop()
    row, _ = validate_and_keep(job, st, last, time.monotonic() - last["seconds"])
    st.history.append({**row, "elapsed": last["elapsed"]})
    say(_epoch_line(job.cfg, st.history[-1], True))
    _write_history(job.out / HISTORY, st.history)
    save_resume(job.out, st, job.budget.elapsed())


def _end_epoch(job: Job, st: State, train_row: dict, t_epoch: float, say, on_epoch_end, final: bool) -> bool:
    """Validate, log and write the epoch (main process); return whether early stopping or the caller stops.
    With ``select`` last only the ``final`` epoch is validated (and kept): a pass over the validation split
    after the others would change nothing that is kept, and on a clock it costs training time."""
    cfg, stop = job.cfg, False
    if cfg.select == "last" and not final:
        row, improved = {"epoch": st.epoch, "step": st.step, "train_loss": train_row["train_loss"],
                         "train_acc": train_row["train_acc"], "val_loss": None, "val_acc": None,
                         "lr": train_row["lr"], "seconds": time.monotonic() - t_epoch,
                         "elapsed": job.budget.elapsed()}, False
        if not is_finite_number(row["train_loss"]):
            raise TrainingDiverged(f"training diverged at epoch {st.epoch}: training loss {row['train_loss']:.4g}; "
                                   "try a lower --lr")
    else:
        row, improved = validate_and_keep(job, st, train_row, t_epoch)
    st.history.append(row)
    say(_epoch_line(cfg, row, improved))
    _write_history(job.out / HISTORY, st.history)
    save_resume(job.out, st, job.budget.elapsed())
    if cfg.patience and st.epoch - st.best["epoch"] >= cfg.patience:
        say(f"early stop: no improvement of {cfg.select} for {cfg.patience} epochs")
        stop = True
    if on_epoch_end is not None and on_epoch_end(st.epoch, row):
        stop = True  # the caller asked to stop (e.g. a benchmark that reached its target)
    return stop


def _epoch_line(cfg: TrainConfig, row: dict, improved: bool) -> str:
    val = (f"val loss {row['val_loss']:.4f} acc {100 * row['val_acc']:.2f}%" if row["val_acc"] is not None
           else "not validated (the last epoch is)" if cfg.select == "last" and cfg.val_size else "no validation set")
    return (f"epoch {row['epoch']:3d}{'' if cfg.time_budget else '/' + str(cfg.epochs)}  train loss "
            f"{row['train_loss']:.4f} acc {100 * row['train_acc']:.2f}%  {val}  lr {row['lr']:.2e}  "
            f"{row['seconds']:.1f}s{'  *' if improved else ''}")


def _finish(job: Job, st: State, data, device, say, t_start: float, trust: bool = True,
            quiet: bool = False) -> dict:
    """The summary, and the trust fit of the kept model (the reserve the budget kept)."""
    cfg, out, best = job.cfg, job.out, st.best
    train_seconds = job.budget.elapsed()
    summary = {"run": str(out), "best_epoch": best["epoch"], "epochs": st.epoch, "train_seconds": train_seconds,
               "wall_seconds": time.monotonic() - t_start, "world_size": job.ctx.world_size,
               "best": st.history[best["epoch"] - 1] if best["epoch"] else None}
    kept = (f"{'the last, val_acc' if cfg.select == 'last' else cfg.select} {best['value']:.4f}"
            if best["value"] is not None else "no validation set")
    say(f"kept epoch {best['epoch']} ({kept}); training took {train_seconds:.1f} s; model in {out / WEIGHTS}")
    if not job.ctx.is_main:
        return summary
    if not trust:
        write_json(out / SUMMARY, summary)
        record_complete(out, trust=False)  # complete without a trust layer, as asked
        return summary
    from fmnist.fit.trust.fit import describe, fit_trust

    t_trust = time.monotonic()
    summary["trust"] = fit_trust(out, data, device=device, val_outputs=st.val_outputs,
                                 progress=False if quiet else None)
    # what the budget kept for the fit against what it took, for the log (the reserve is a prediction)
    summary["trust_seconds"] = [time.monotonic() - t_trust, job.budget.reserve(job.budget.validation_cost())]
    summary["wall_seconds"] = time.monotonic() - t_start  # everything, the calibration/OOD fit included
    say(describe(summary["trust"]) + f" ({summary['trust_seconds'][0]:.1f} s; {summary['trust_seconds'][1]:.1f} s "
        "were kept for it)" if cfg.time_budget else describe(summary["trust"]))
    write_json(out / SUMMARY, summary)
    if "skipped" in summary["trust"]:
        record_complete(out, trust=False)  # no split to fit on: complete without a trust layer, as logged
    _link_latest(out)
    return summary


def _model_meta(cfg: TrainConfig, data_info: dict, row: dict, best: dict, spec: dict) -> dict:
    return {
        "class_names": data_info["dataset"]["class_names"],
        "preprocessing": spec,
        "tta": cfg.tta,
        "best_epoch": best["epoch"],
        "select": cfg.select,
        "metrics": {k: row[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc")},
        "recipe": {k: getattr(cfg, k) for k in ("preset", "optimizer", "lr", "batch_size", "schedule", "augment",
                                                  "label_smoothing", "weight_decay", "ema", "time_budget",
                                                  "epochs", "seed")},
        "data": {k: v for k, v in data_info.items() if k != "dataset"},
        "dataset": {k: v for k, v in data_info["dataset"].items() if k != "class_names"},
        "created": created_now(),
    }


def _write_history(path: Path, history: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)

    _atomic(path, write)


def _link_latest(out: Path) -> None:
    """runs/latest -> the newest run, so the README's commands can name it."""
    link = out.parent / "latest"
    try:
        if link.is_symlink() or not link.exists():
            tmp = out.parent / ".latest.tmp"
            if tmp.is_symlink():
                tmp.unlink()
            tmp.symlink_to(out.name)
            tmp.replace(link)
    except OSError:
        pass
