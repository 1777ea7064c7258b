"""``fmnist tune``: search training recipes with Optuna; each trial is an ordinary run folder.

    fmnist tune --preset seed-a --lr 1e-1,1e-2,1e-3,1e-4 --sampler grid      # seed A's learning-rate sweep
    fmnist tune --preset fast --lr 1e-3:3e-1:log --batch-size 64,128,256 --n-trials 30 --workers 2

Training options take the names of ``fmnist train``'s; each value is a range LOW:HIGH (``:log`` for a log
scale, ``:STEP`` for steps), a list of choices A,B or A|B (only '|' for --augment, whose values hold commas), or one
value, fixed for every trial. Trials go to ``runs/tune/STUDY/trial-NNNN``; ``STUDY/best`` links the best one,
``STUDY/trials.csv`` and ``STUDY/index.html`` sum the study up. Running the same command again continues the study.
"""
from __future__ import annotations

import re
from pathlib import Path

from fmnist.core.errors import InputError

DEFAULT_TRIALS = 20
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SPACE_HELP = " (default: the preset's)"


def register(sub, formatter_class) -> None:
    from fmnist.apps.cli.flags import add_data_flags, device_name
    from fmnist.apps.tune.space import option_types
    from fmnist.fit.recipes import FIELD_HELP, PRESETS

    p = sub.add_parser("tune", formatter_class=formatter_class,
                       help="search training recipes with Optuna (each trial a run folder)",
                       description=__doc__.replace("``", "`"))
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="base recipe; searched and fixed options override it (default: default, or the --space file's)")
    p.add_argument("--space", default=None, metavar="FILE",
                   help="a TOML file of options (same names, same values as the flags); flags override it "
                        "(default: none)")
    for name in option_types():
        text = FIELD_HELP[name].split(" (default")[0]
        if name in ("tta", "channels_last"):
            text += ": true, false, or true|false to search both"
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="SPACE", help=text + SPACE_HELP)
    g = p.add_argument_group("the study")
    g.add_argument("--study", default=None, help="study name, its folder's name (default: the preset's name)")
    g.add_argument("--out", default="runs/tune", metavar="DIR", help="folder holding the study folders")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="sqlite:///FILE (one file on this machine, what optuna-dashboard opens) or "
                        "postgresql://USER:PASSWORD@HOST:PORT/DB to share the study between machines "
                        "(default: a journal file in the study folder, for processes on this machine)")
    g.add_argument("--metric", default=None, choices=("val_acc", "val_loss"),
                   help="what trials are judged by, on the validation split (default: the recipe's --select)")
    g.add_argument("--sampler", default="tpe", choices=("tpe", "grid", "random"),
                   help="tpe (Bayesian), random, or grid: every combination of the lists, in order, once")
    g.add_argument("--sampler-seed", type=int, default=0, metavar="N", help="seed of the sampler's proposals")
    g.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"),
                   help="stop trials whose epochs fall behind the others'")
    g.add_argument("--prune-after", type=int, default=5, metavar="N",
                   help="finished trials the median pruner waits for before it stops any")
    g.add_argument("--n-trials", type=int, default=None, metavar="N",
                   help=f"finished trials the study should have, all workers and runs together "
                        f"(default: every grid combination, else {DEFAULT_TRIALS})")
    g.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                   help="start no trial after this long (0 = no limit; per trial: --time-budget)")
    g.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on this machine")
    g.add_argument("--threads", type=int, default=0,
                   help="CPU threads per worker (default: physical cores / --workers, at least 1)")
    g.add_argument("--device", default=None, type=device_name,
                   help="auto, cpu, cuda (or cuda:N): where trials train (default: the preset's)")
    g.add_argument("--heartbeat", type=int, default=10, metavar="SECONDS",
                   help="SQLite and PostgreSQL: a worker silent for 3 heartbeats is dead, its trial run again")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="each trial's scalars and figures as TensorBoard event files, its parameters and outcome "
                        "in the HParams view (DIR: default STUDY/tensorboard; open with tensorboard --logdir DIR; "
                        "needs the tensorboard extra) (default: off)")
    add_data_flags(g, threads=False)
    p.set_defaults(func=cmd_tune)


def settings_from_args(args):
    """Check every option and build the study's Settings; a ValueError (nothing written) on bad input."""
    from fmnist.apps.tune.space import build_space, option_types
    from fmnist.apps.tune.study import Settings
    from fmnist.fit import runtime
    from fmnist.fit.recipes import PRESETS, TrainConfig

    flags = {n: getattr(args, n) for n in option_types() if getattr(args, n) is not None}
    space, machine = build_space(args.preset, flags, args.space)
    if not space.params:
        raise InputError("nothing to search: give at least one option a range (--lr 1e-4:1e-1:log) "
                         "or a list (--batch-size 64,128)")
    for flag, value, low in (("--workers", args.workers, 1), ("--prune-after", args.prune_after, 0),
                             ("--timeout", args.timeout, 0), ("--heartbeat", args.heartbeat, 1),
                             ("--threads", args.threads, 0), ("--n-trials", 1 if args.n_trials is None else args.n_trials, 1)):
        if value < low:
            raise InputError(f"{flag} must be at least {low}")
    study = args.study or space.preset
    if not STUDY_NAME.match(study):
        raise InputError(f"--study {study!r}: use letters, digits, '.', '_' and '-' (it names a folder)")
    metric = args.metric or space.fixed.get("select") or PRESETS[space.preset].get("select", TrainConfig.select)
    metric = "val_acc" if metric == "last" else metric  # trials validate every epoch: the pruner reads them
    n_trials = args.n_trials or DEFAULT_TRIALS
    if args.sampler == "grid":
        size = len(space.grid())
        if args.n_trials and args.n_trials > size:
            print(f"--n-trials {args.n_trials}: the grid has {size} combinations; running {size}")
        n_trials = min(args.n_trials or size, size)
    threads = args.threads or machine.get("threads") or max(1, runtime.physical_cores() // args.workers)
    return Settings(study=study, study_dir=Path(args.out) / study, space=space, metric=metric, n_trials=n_trials,
                    storage=args.storage, sampler=args.sampler, sampler_seed=args.sampler_seed, pruner=args.pruner,
                    prune_after=args.prune_after, timeout=args.timeout, workers=args.workers, threads=int(threads),
                    device=args.device or machine.get("device"), data_dir=args.data_dir or machine.get("data_dir"),
                    **{k: _absolute(getattr(args, k, None) or machine.get(k)) for k in ("data", "test_data", "class_names")},
                    verify=not args.no_verify, heartbeat=args.heartbeat, tensorboard=_tensorboard_dir(args, study))


def _tensorboard_dir(args, study: str) -> str | None:
    """--tensorboard's folder, absolute (workers may start elsewhere); the extra checked before any trial."""
    if args.tensorboard is None:
        return None
    from fmnist.apps.tracking import summary_writer

    summary_writer()
    return _absolute(args.tensorboard or Path(args.out) / study / "tensorboard")


def _absolute(path):
    return None if path is None else str(Path(path).expanduser().resolve())


def cmd_tune(args) -> int:
    from fmnist.apps.tune.output import write_outputs
    from fmnist.apps.tune.study import prepare, run_workers
    from fmnist.fit.data import find_data_dir

    s = settings_from_args(args)
    if s.data is None:
        find_data_dir(s.data_dir)  # a missing data set fails (or downloads) once here, not in every worker
    else:
        from fmnist.fit.sources import load_data

        load_data(s.data, s.test_data, s.class_names)  # a bad data set fails once here (and fills the cache)
    prepare(s)  # storage reachable, study created or its space checked, grid queued: before any trial
    print(f"study {s.study} in {s.study_dir}: {s.n_trials} trials, {s.sampler} sampler, {s.pruner} pruner, "
          f"{s.workers} worker(s) x {s.threads} thread(s), {s.metric} on the validation split")
    failed = run_workers(s)
    best = write_outputs(s)
    if best:
        won = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        value = "-" if best["value"] is None else f"{best['value']:.4f}"
        where = f" ({s.study_dir / 'best'})" if (s.study_dir / "best").exists() else " (run on another machine)"
        print(f"best: trial {best['number']}, {s.metric} {value} with {won}{where}")
    for code in failed:
        print(f"fmnist tune: a worker exited with code {code}; run the same command again to continue")
    return 1 if failed else 0


__all__ = ["cmd_tune", "register", "settings_from_args"]
