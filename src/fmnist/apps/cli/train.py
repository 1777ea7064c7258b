"""``fmnist train`` and ``fmnist models``: train a model into a run folder; list the architectures."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import tomllib
from pathlib import Path

from fmnist.apps.cli.flags import CHOICES, device_name
from fmnist.core.errors import InputError
from fmnist.core.runfolder import CONFIG
from fmnist.fit.recipes import AUTO_MODELS, DEFAULT_PRESET, FIELD_HELP, PRESETS, TABLE_KEYS, TrainConfig

MAX_CONFIG_BYTES = 1_000_000  # a config.json or TOML recipe is a few hundred bytes


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def presets_table() -> str:
    """The epilog of `train --help`: what each preset sets, from PRESETS itself (never out of date)."""
    lines = ["presets (each sets these options; every other option keeps the default shown above):"]
    width = max(map(len, PRESETS))
    for name, values in PRESETS.items():
        sets = " ".join(f"{_flag(k)} {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items())
        lines.append(f"  {name:<{width}}  {sets}")
    lines.append("  (--model auto / auto-tiny: the epoch table's row for the epochs the budget buys sets "
                 "--model, --batch-size, --lr and --augment)")
    return "\n".join(lines)


def register(sub, formatter_class) -> None:
    default = dataclasses.asdict(TrainConfig(**PRESETS[DEFAULT_PRESET]))
    from_table = PRESETS[DEFAULT_PRESET].get("model") in AUTO_MODELS
    p = sub.add_parser("train", help="train a model and write a run folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=presets_table(),
                       description="Train a model. With no flags, trains the default preset "
                                   f"({DEFAULT_PRESET!r}). Presets: " + ", ".join(PRESETS) + ".\n"
                                   "Explicit flags override the preset's values (and --config's). The fast, default, "
                                   "best and tiny presets train on a clock (--time-budget);\nan explicit --epochs "
                                   "without --time-budget trains that many epochs instead.")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"a named recipe; explicit flags override it (default: {DEFAULT_PRESET}, or --config's)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a recipe file: a run's config.json (replays that run) or a TOML file of options "
                        "(same names as the flags, with _ for -); flags given as well override it (default: none)")
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
            shown = "the epoch table's row" if from_table and f.name in TABLE_KEYS - {"model"} else default[f.name]
            help_text += f" (default: {shown})"
        if f.name in CHOICES:
            p.add_argument(_flag(f.name), dest=f.name, default=None, choices=CHOICES[f.name], help=help_text)
            continue
        if f.name == "device":
            kind = device_name
        p.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    p.add_argument("--out", default=None, help="run folder; one that holds a run already is refused, unless "
                                               "--overwrite (default: runs/DATE-PRESET-sSEED)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", default=None, metavar="RUN", help="continue an interrupted run from RUN/last.pt")
    again.add_argument("--overwrite", action="store_true",
                       help="replace the run that --out holds: its files (and RUN/report) are removed first; "
                            "without this, a folder holding a run is refused")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files whose checksums are not the official ones")
    p.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="write TensorBoard event files: scalars per epoch, the confusion matrix and reliability "
                        "diagram at the end (DIR: default RUN/tensorboard; open with tensorboard --logdir DIR; "
                        "needs the tensorboard extra) (default: off)")
    p.add_argument("--dry-run", action="store_true", help="run two steps on a small slice, write nothing, exit")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("models", help="list architectures and parameter counts", formatter_class=formatter_class)
    p.set_defaults(func=cmd_models)


def cmd_train(args) -> int:
    """Train in this process, or as one rank of a data-parallel run when started by torchrun."""
    from fmnist.fit.distributed import session
    from fmnist.fit.sources import load_data
    from fmnist.fit.train import resolve_config, train

    if args.resume and args.config:
        raise InputError("--resume continues a run with its own config.json: give --resume or --config, not both")
    if args.resume:
        from fmnist.fit.recipes import read_config

        saved = read_config(Path(args.resume) / CONFIG)
        data = load_data(saved.data, saved.test_data, saved.class_names, args.data_dir or saved.data_dir,
                         verify=not args.no_verify)
        tracker = _tracker(args, Path(args.resume))
        with session(saved.device) as ctx:
            train(None, data=data, resume=args.resume, ctx=ctx, on_epoch_end=tracker)
        _finish_tracker(tracker, data)
        return 0
    overrides = _overrides(args)
    preset = args.preset
    if args.config:
        from_file = read_config_file(args.config)
        preset = preset or from_file.pop("preset", None)
        given = {k: v for k, v in overrides.items() if v is not None}
        if "epochs" in from_file and "time_budget" not in from_file and "time_budget" not in given:
            from_file["time_budget"] = 0  # as on the command line: epochs without a budget replace it
        overrides = {**overrides, **from_file, **given}
    for k in ("data", "test_data", "class_names"):  # absolute: evaluate and report find the run's data set again
        if overrides.get(k) is not None:
            overrides[k] = str(Path(overrides[k]).expanduser().resolve())
    try:
        cfg = resolve_config(preset or DEFAULT_PRESET, **overrides)
    except InputError as e:
        raise InputError(f"{args.config}: {e}" if args.config else str(e)) from None
    if args.dry_run:  # one epoch, no clock (a model "auto" takes the epoch table's first row)
        cfg = resolve_config(preset or DEFAULT_PRESET, **{**overrides, "epochs": 1, "time_budget": 0})
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
    from fmnist.fit.train import default_out

    out = Path(args.out) if args.out else default_out(cfg)
    tracker = _tracker(args, out)
    with session(cfg.device) as ctx:
        train(cfg, out=out, data=data, ctx=ctx, overwrite=args.overwrite, on_epoch_end=tracker)
    _finish_tracker(tracker, data)
    return 0


def _tracker(args, out: Path):
    """The --tensorboard sink (rank 0 only: the others neither log nor write the run folder)."""
    import os

    if args.tensorboard is None or os.environ.get("RANK", "0") != "0":
        return None
    from fmnist.apps.tracking import TensorBoard

    logdir = Path(args.tensorboard) if args.tensorboard else out / "tensorboard"
    tracker = TensorBoard(logdir, out)
    print(f"tensorboard: {logdir} (open with: tensorboard --logdir {logdir})", file=sys.stderr)
    return tracker


def _finish_tracker(tracker, data) -> None:
    if tracker is not None:
        tracker.finish(data)


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


def read_config_file(path) -> dict:
    """The options of a recipe file (a run's config.json, or TOML): every key a training option, every value of
    that option's type; anything else is one InputError naming the file and the key."""
    from fmnist.fit.recipes import check_value

    path = Path(path)
    try:
        if not path.is_file():
            raise InputError(f"--config {path}: no such file")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise InputError(f"--config {path}: larger than {MAX_CONFIG_BYTES:,} bytes; a recipe is a short file")
        text = data.decode("utf-8")
        values = json.loads(text) if path.suffix == ".json" or text.lstrip().startswith("{") else tomllib.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # JSON and TOML errors are ValueErrors
        raise InputError(f"--config {path}: not a JSON or TOML recipe ({str(e).splitlines()[0] if str(e) else e})") \
            from None
    if not isinstance(values, dict):
        raise InputError(f"--config {path}: expected a table of options, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name == "pinned":  # bookkeeping of a run's config.json, not an option
            continue
        if name not in known:
            raise InputError(f"--config {path}: unknown option {key!r} (the options are those of "
                             "`fmnist train --help`, with _ for -)")
        if name == "preset":
            if value is not None and value not in PRESETS:
                raise InputError(f"--config {path}: unknown preset {value!r}; choose one of: {', '.join(PRESETS)}")
            out[name] = value
            continue
        if (why := check_value(name, value)) is not None:
            raise InputError(f"--config {path}: {why}")
        if name in CHOICES and value not in CHOICES[name]:
            raise InputError(f"--config {path}: {key} must be one of {', '.join(CHOICES[name])}, got {value!r}")
        out[name] = value
    return out


def cmd_models(args) -> int:
    from fmnist.fit.models import count_parameters, create_model, describe, model_names

    print(f"{'name':<12}{'parameters':>12}  description")
    for name in model_names():
        print(f"{name:<12}{count_parameters(create_model(name)):>12,}  {describe(name)}")
    return 0
