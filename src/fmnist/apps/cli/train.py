"""``fmnist train`` and ``fmnist models``: train a model into a run folder; list the architectures."""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

from fmnist.core.runfolder import CONFIG
from fmnist.fit.recipes import DEFAULT_PRESET, FIELD_HELP, PRESETS, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Help text for each TrainConfig field; the default shown is the default preset's value.


def register(sub, formatter_class) -> None:
    default = dataclasses.asdict(TrainConfig(**PRESETS[DEFAULT_PRESET]))
    p = sub.add_parser("train", help="train a model and write a run folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model. With no flags, trains the default preset "
                                   f"({DEFAULT_PRESET!r}). Presets: " + ", ".join(PRESETS) + ".\n"
                                   "Explicit flags override the preset's values. The fast, default, best and tiny "
                                   "presets train on a clock (--time-budget);\nan explicit --epochs without "
                                   "--time-budget trains that many epochs instead.")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"a named recipe; explicit flags override it (default: {DEFAULT_PRESET})")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("preset", "pinned"):
            continue
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                          "bool": bool}.get(str(f.type), str)
        help_text = FIELD_HELP[f.name]
        if f.name in ("tta", "channels_last", "mirror"):
            p.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                           help=help_text if "(default" in help_text else f"{help_text} (default: {default[f.name]})")
            continue
        if f.name == "mirror":
            p.add_argument("--mirror", dest="mirror", default=None, action=argparse.BooleanOptionalAction,
                           help="allow mirrored augmentation (flip) and mirrored test-time views (default: only for "
                                "a data set known to look the same mirrored: Fashion-MNIST, or a classes.json saying "
                                "so); --no-mirror: never")
            continue
        if "(default" not in help_text:
            help_text += f" (default: {default[f.name]})"
        p.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    p.add_argument("--out", default=None, help="run folder; one that holds a run already is refused, unless "
                                               "--overwrite (default: runs/DATE-PRESET-sSEED)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", default=None, metavar="RUN", help="continue an interrupted run from RUN/last.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run that --out holds: its files (and RUN/report) are removed first; "
                            "without this, a folder holding a run is refused")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files whose checksums are not the official ones")
    p.add_argument("--dry-run", action="store_true", help="run two steps on a small slice, write nothing, exit")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("models", help="list architectures and parameter counts", formatter_class=formatter_class)
    p.set_defaults(func=cmd_models)


def cmd_train(args) -> int:
    """Train in this process, or as one rank of a data-parallel run when started by torchrun."""
    from fmnist.fit.distributed import session
    from fmnist.fit.sources import load_data
    from fmnist.fit.train import resolve_config, train

    if args.resume:
        from fmnist.fit.recipes import read_config

        saved = read_config(Path(args.resume) / CONFIG)
        data = load_data(saved.data, saved.test_data, saved.class_names, args.data_dir or saved.data_dir,
                         verify=not args.no_verify)
        with session(saved.device) as ctx:
            train(None, data=data, resume=args.resume, ctx=ctx)
        return 0
    overrides = _overrides(args)
    for k in ("data", "test_data", "class_names"):  # absolute: evaluate and report find the run's data set again
        if overrides.get(k) is not None:
            overrides[k] = str(Path(overrides[k]).expanduser().resolve())
    cfg = resolve_config(args.preset or DEFAULT_PRESET, **overrides)
    if args.dry_run:  # one epoch, no clock (a model "auto" takes the epoch table's first row)
        cfg = resolve_config(args.preset or DEFAULT_PRESET, **{**overrides, "epochs": 1, "time_budget": 0})
    data = load_data(cfg.data, cfg.test_data, cfg.class_names, cfg.data_dir, verify=not args.no_verify)
    if args.dry_run:
        cfg = dataclasses.replace(cfg, subset=min(cfg.subset or 512, 512),
                                  val_size=min(cfg.val_size, 512) if cfg.val_size else 0)
        tmp = Path(tempfile.mkdtemp(prefix="fmnist-dry-run-"))
        try:
            with session(cfg.device) as ctx:
                summary = train(cfg, out=tmp / "run", data=data, max_steps=2, ctx=ctx)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if ctx.is_main:
            val = summary["best"]["val_acc"]
            print(f"dry run ok: {cfg.model}, 2 steps, "
                  + (f"val acc {100 * val:.1f} %" if val is not None else "no validation split") + "; nothing written")
        return 0
    with session(cfg.device) as ctx:
        train(cfg, out=args.out, data=data, ctx=ctx, overwrite=args.overwrite)
    return 0


def _overrides(args) -> dict:
    """The recipe options given on the command line (None: not given). An explicit --epochs wins over the
    preset's time budget (the presets train on a clock), unless --time-budget is given too."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset", "pinned"}
    overrides = {k: getattr(args, k) for k in fields}
    if overrides["epochs"] is not None and overrides["time_budget"] is None:
        overrides["time_budget"] = 0
    elif overrides["epochs"] is not None and overrides["time_budget"]:
        print(f"fmnist train: note: --epochs {overrides['epochs']} is ignored: --time-budget "
              f"{overrides['time_budget']:g} sizes the schedule", file=sys.stderr)
    return overrides


def cmd_models(args) -> int:
    from fmnist.fit.models import count_parameters, create_model, describe, model_names

    print(f"{'name':<12}{'parameters':>12}  description")
    for name in model_names():
        print(f"{name:<12}{count_parameters(create_model(name)):>12,}  {describe(name)}")
    return 0
