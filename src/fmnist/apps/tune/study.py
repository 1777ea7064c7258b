"""Where a study lives and how workers share it: the Optuna storage, a study-wide lock, and the worker loop.

Storage: by default Optuna's journal file in the study folder (several processes on one machine); with
``--storage postgresql://...`` Optuna's database storage, whose heartbeat fails the trial of a worker that died
and queues it again. Every worker claims its next trial under one lock (``flock`` on a file in the study folder,
or a PostgreSQL advisory lock), so the study never runs more trials than asked for, and the grid's combinations,
queued once in the study, are each taken by exactly one worker.

A trial on the journal file holds a ``flock`` on its own lock file while it trains; the kernel drops it when the
process dies, however it dies. A running trial whose lock is free therefore belongs to a dead worker: the next
worker to claim a trial marks it failed and queues its parameters again.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from fmnist.apps.tune.output import trial_folder
from fmnist.apps.tune.space import Space, suggest
from fmnist.apps.tune.storage import LOCK_DIR, MAX_RETRY, FileLock, make_lock, open_storage
from fmnist.core.errors import InputError
from fmnist.core.values import is_finite_number

SPACE_ATTR = "fmnist_space"
POLL_SECONDS = 1.0   # how often a worker with nothing to claim looks again while others' trials run


@dataclass
class Settings:
    study: str
    study_dir: Path
    space: Space
    metric: str = "val_loss"
    n_trials: int = 20
    storage: str | None = None
    sampler: str = "tpe"
    sampler_seed: int = 0
    pruner: str = "median"
    prune_after: int = 5
    timeout: float = 0.0
    workers: int = 1
    threads: int = 1
    device: str | None = None
    data_dir: str | None = None
    data: str | None = None  # one's own data set (--data), with its test CSV and class names file
    test_data: str | None = None
    class_names: str | None = None
    verify: bool = True
    heartbeat: int = 10
    tensorboard: str | None = None  # a folder: each trial's event files in FOLDER/trial-NNNN (--tensorboard)

    @property
    def direction(self) -> str:
        return "minimize" if self.metric == "val_loss" else "maximize"


# --- the study -----------------------------------------------------------------------------------------------


def _sampler(s: Settings, seed: int):
    import optuna

    if s.sampler == "tpe":
        # constant_liar: trials still running count as bad guesses, so parallel workers spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    # grid: every combination is queued in the study (enqueue_grid); the sampler is never asked for a value
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(s: Settings):
    import optuna

    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.prune_after, n_warmup_steps=0)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.NopPruner()


def _differences(stored: str, wanted: str) -> str:
    import json

    a, b = json.loads(stored), json.loads(wanted)
    keys = []
    for part in ("preset", "metric", "params", "fixed"):
        if isinstance(a.get(part), dict) and isinstance(b.get(part), dict):
            keys += [f"--{k.replace('_', '-')}" for k in sorted(set(a[part]) | set(b[part]))
                     if a[part].get(k) != b[part].get(k)]
        elif a.get(part) != b.get(part):
            keys.append(f"--{part}")
    return ", ".join(dict.fromkeys(keys)) or "unknown"


def load_or_create(s: Settings, storage, worker: int = 0):
    """The study, created with its search space on first use; a ValueError if it was made with another space.

    Call it under the study lock: workers starting together then create the study, and queue the grid, once."""
    import optuna

    identity = s.space.identity(s.metric)
    try:
        study = optuna.load_study(study_name=s.study, storage=storage, pruner=_pruner(s))
    except KeyError:
        study = optuna.create_study(storage=storage, study_name=s.study, direction=s.direction,
                                    pruner=_pruner(s))
        study.set_user_attr(SPACE_ATTR, identity)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None and not study.trials:
        study.set_user_attr(SPACE_ATTR, identity)  # a creator that died before recording the space
    elif stored != identity:
        raise InputError(f"study {s.study!r} was created with another search space (differs in "
                         f"{_differences(stored or '{}', identity)}); repeat its options or choose another --study")
    # Distinct seeds for workers, and for later commands continuing the study (a repeated seed would repeat
    # the same random proposals).
    study.sampler = _sampler(s, s.sampler_seed + 7919 * worker + len(study.trials))
    if s.sampler == "grid":
        enqueue_grid(study, s)
    return study


def enqueue_grid(study, s: Settings) -> None:
    """Queue each combination that no trial has run, is running or waits for (failed ones run again)."""
    from optuna.trial import TrialState

    have = [t.system_attrs.get("fixed_params", t.params) for t in study.get_trials(deepcopy=False)
            if t.state != TrialState.FAIL]
    for combo in s.space.grid()[: s.n_trials]:
        if combo not in have:
            study.enqueue_trial(combo)
            have.append(combo)


def prepare(s: Settings) -> None:
    """Open the storage, create or check the study and queue the grid, before any worker starts."""
    storage = open_storage(s)
    lock = make_lock(s)
    try:
        with lock:
            load_or_create(s, storage)
    finally:
        lock.close()


def reap(study, s: Settings, log) -> None:
    """Fail the running trials of workers that died, and queue their parameters again (under the study lock)."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    if s.storage is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # past the heartbeat's grace period
        return
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        probe = FileLock(s.study_dir / LOCK_DIR / f"{trial_folder(t.number)}.lock")
        if not probe.acquire(blocking=False):
            continue  # its worker is alive and training
        try:
            study.tell(t.number, state=TrialState.FAIL)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
            retry(study, study.get_trials(deepcopy=False)[t.number])
            log(f"trial {t.number}: its worker is gone; marked failed and its parameters queued again")
        finally:
            probe.release()


def next_action(study, n_trials: int) -> str:
    """'run' a trial, 'wait' for others' running trials (one may die and need a rerun), or 'done'."""
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    live = sum(st != TrialState.FAIL for st in states)
    if TrialState.WAITING in states or live < n_trials:
        return "run"
    return "wait" if TrialState.RUNNING in states else "done"


# --- one trial -----------------------------------------------------------------------------------------------


def objective_value(row: dict | None, metric: str) -> float:
    """The trial's figure; a diverged run (NaN) is the worst value, not a failed trial (Optuna fails NaN)."""
    value = None if row is None else row.get(metric)
    if value is None or not is_finite_number(value):
        return math.inf if metric == "val_loss" else 0.0
    return float(value)


def train_trial(trial, s: Settings, data) -> float:
    """Train one trial's run folder; report each epoch to the pruner, which may stop it."""
    import optuna

    from fmnist.fit.train import resolve_config, train

    values = suggest(trial, s.space.params)
    machine = {"threads": s.threads, "data_dir": s.data_dir, "data": s.data, "test_data": s.test_data,
               "class_names": s.class_names, **({"device": s.device} if s.device else {})}
    cfg = resolve_config(s.space.preset, **{"select": s.metric, **s.space.fixed, **values, **machine})
    out = s.study_dir / trial_folder(trial.number)
    if out.exists():
        raise InputError(f"{out} already exists, but the study's storage does not know trial {trial.number}: "
                         "was the storage replaced? Choose another --study or --out")
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    pruned_at: list[int] = []
    tracker = None
    if s.tensorboard is not None:
        from fmnist.apps.tracking import TensorBoard

        tracker = TensorBoard(Path(s.tensorboard) / trial_folder(trial.number), out)

    def on_epoch_end(epoch: int, row: dict) -> bool:
        if tracker is not None:
            tracker(epoch, row)
        trial.report(objective_value(row, s.metric), epoch)
        if trial.should_prune():
            pruned_at.append(epoch)
            return True  # train() stops after this epoch and still leaves a complete run folder
        return False

    from fmnist.fit.train import TrainingDiverged

    try:
        summary = train(cfg, out=out, data=data, on_epoch_end=on_epoch_end, quiet=True)
    except TrainingDiverged as e:
        trial.set_user_attr("diverged", str(e))
        if tracker is not None:
            tracker.close()
        return objective_value(None, s.metric)  # the worst value: the sampler learns to stay away from it
    value = objective_value(summary["best"], s.metric)
    if tracker is not None:  # pruned or not, the trial left a complete run folder
        tracker.finish(data, hparams=values, outcome={s.metric: value, "pruned": float(bool(pruned_at))})
    if pruned_at:
        raise optuna.TrialPruned(f"pruned after epoch {pruned_at[0]}")
    return value


def run_one(study, s: Settings, lock, data, log) -> None:
    """Claim a trial (the caller holds the study lock, released as soon as the trial is ours) and run it."""
    from fmnist.apps.tune.output import describe_trial, update_best, write_marker

    claimed: dict = {}

    def objective(trial):
        if s.storage is None:
            claimed["lock"] = FileLock(s.study_dir / LOCK_DIR / f"{trial_folder(trial.number)}.lock")
            claimed["lock"].acquire()
        claimed["number"] = trial.number
        lock.release()
        return train_trial(trial, s, data)

    try:
        study.optimize(objective, n_trials=1, catch=())
    finally:
        # Held until Optuna has recorded the outcome: a trial is never seen running without a live owner.
        if "lock" in claimed:
            claimed["lock"].release()
    if "number" in claimed:
        t = study.get_trials(deepcopy=False)[claimed["number"]]
        write_marker(s.study_dir, t)  # after the storage has the outcome, never before
        update_best(study, s.study_dir)
        log(describe_trial(t, s.metric))


def work(s: Settings, worker: int = 0, log=print) -> int:
    """Run trials until the study has its number of finished trials, or --timeout; returns the trials run."""
    from fmnist.fit.sources import load_data

    storage = open_storage(s)
    lock = make_lock(s)
    try:
        with lock:
            study = load_or_create(s, storage, worker)
        data = load_data(s.data, s.test_data, s.class_names, s.data_dir, verify=s.verify)  # once per worker
        deadline = time.monotonic() + s.timeout if s.timeout else math.inf
        ran = 0
        while time.monotonic() < deadline:
            lock.acquire()
            try:
                reap(study, s, log)
                action = next_action(study, s.n_trials)
                if action == "run":
                    run_one(study, s, lock, data, log)
                    ran += 1
            finally:
                lock.release()
            if action == "done":
                break
            if action == "wait":
                time.sleep(POLL_SECONDS)
        return ran
    finally:
        lock.close()


def _worker_main(s: Settings, worker: int) -> None:
    from fmnist.core.runfolder import CheckpointError
    from fmnist.fit.data import DataError

    try:
        work(s, worker, log=lambda msg: print(f"[worker {worker}] {msg}", flush=True))
    except (ValueError, DataError, CheckpointError) as e:
        print(f"fmnist tune: worker {worker}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(s: Settings) -> list[int]:
    """Run the study in this process, or in ``s.workers`` processes; returns the failed workers' exit codes."""
    if s.workers == 1:
        work(s)
        return []
    import multiprocessing

    # spawn, not fork: a forked copy of a process that already runs torch's thread pools can deadlock
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(s, i), name=f"fmnist-tune-{i}") for i in range(s.workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return [p.exitcode for p in procs if p.exitcode != 0]
