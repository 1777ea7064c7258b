"""The ``fmnist`` command line: one subcommand per stage, kebab-case flags whose help states the default."""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fmnist.train import DEFAULT_PRESET, PRESETS, TrainConfig


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to each flag's help, unless the help already states its default."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# Help text for each TrainConfig field; the default shown is the default preset's value.
TRAIN_HELP = {
    "model": "architecture (see `fmnist models`)",
    "epochs": "epochs to train (ignored when --time-budget is set)",
    "batch_size": "images per step",
    "lr": "peak learning rate",
    "optimizer": "sgd (Nesterov momentum), adam or adamw",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay on weights (not biases or BatchNorm)",
    "schedule": "learning-rate schedule: onecycle, cosine or constant",
    "warmup": "fraction of training spent warming the learning rate up",
    "label_smoothing": "label smoothing of the training loss",
    "ema": "decay of an exponential moving average of the weights (0 = off)",
    "augment": "comma-separated: flip,crop,erase,noise,jitter or none",
    "val_size": "validation images held out of the 60,000 (stratified, seeded)",
    "select": "which validation figure picks the epoch kept: val_loss or val_acc",
    "patience": "stop after this many epochs without improvement (0 = never)",
    "time_budget": "seconds: size the schedule to fit and stop within it (0 = use --epochs)",
    "seed": "random seed (split, init, shuffling, augmentation)",
    "threads": "CPU threads (0 = physical cores)",
    "precision": "auto, fp32, bf16 or fp16 (auto: bf16 on GPUs and on CPUs with native bf16)",
    "device": "auto, cpu or cuda",
    "subset": "train on only this many images (quick experiments; 0 = all)",
    "data_dir": "folder holding the four IDX files (default: search: FMNIST_DATA, Debian's folder, the cache)",
}


def _add_train(sub) -> None:
    default = dataclasses.asdict(TrainConfig(**PRESETS[DEFAULT_PRESET]))
    p = sub.add_parser("train", help="train a model and write a run folder",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a model. With no flags, trains the default preset "
                                   f"({DEFAULT_PRESET!r}). Presets: " + ", ".join(PRESETS) + ".")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help=f"a named recipe; explicit flags override it (default: {DEFAULT_PRESET})")
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("preset",):
            continue
        kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "str": str,
                                                          "bool": bool}.get(str(f.type), str)
        help_text = TRAIN_HELP.get(f.name, f.name)
        if f.name in ("tta", "channels_last"):
            p.add_argument(_flag(f.name), dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                           help=f"{'mirrored test-time augmentation' if f.name == 'tta' else 'channels_last memory format'}"
                                f" (default: {default[f.name]})")
            continue
        if "(default" not in help_text:
            help_text += f" (default: {default[f.name]})"
        p.add_argument(_flag(f.name), dest=f.name, type=kind, default=None, metavar=f.name.upper(), help=help_text)
    p.add_argument("--out", default=None, help="run folder (default: runs/DATE-PRESET-sSEED)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue an interrupted run from RUN/last.pt")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files whose checksums are not the official ones")
    p.add_argument("--dry-run", action="store_true", help="run two steps on a small slice, write nothing, exit")


def cmd_train(args) -> int:
    from fmnist.data import load_fashion_mnist
    from fmnist.train import resolve_config, train

    if args.resume:
        from fmnist.checkpoint import read_json

        saved = read_json(Path(args.resume) / "config.json")
        data = load_fashion_mnist(args.data_dir or saved.get("data_dir"), verify=not args.no_verify)
        train(None, data=data, resume=args.resume)
        return 0
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"preset"}
    overrides = {k: getattr(args, k) for k in fields}
    preset = args.preset or DEFAULT_PRESET
    cfg = resolve_config(preset, **overrides)
    data = load_fashion_mnist(cfg.data_dir, verify=not args.no_verify)
    if args.dry_run:
        cfg = dataclasses.replace(cfg, epochs=1, time_budget=0, subset=min(cfg.subset or 512, 512),
                                  val_size=min(cfg.val_size, 512) if cfg.val_size else 0)
        tmp = Path(tempfile.mkdtemp(prefix="fmnist-dry-run-"))
        try:
            summary = train(cfg, out=tmp / "run", data=data, max_steps=2)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"dry run ok: {cfg.model}, 2 steps, val acc {100 * summary['best']['val_acc']:.1f} %; nothing written")
        return 0
    train(cfg, out=args.out, data=data)
    return 0


def cmd_evaluate(args) -> int:
    from fmnist.data import load_fashion_mnist
    from fmnist.evaluate import evaluate_run, format_report

    data = load_fashion_mnist(args.data_dir, verify=not args.no_verify)
    m = evaluate_run(args.run, data=data, tta=args.tta, limit=256 if args.dry_run else None,
                     write=not args.dry_run, threads=args.threads or None)
    print(format_report(m, title=f"{args.run} on the official test set" if not args.dry_run else "dry run"))
    if m["tta"]:
        print(f"\nwith mirrored TTA {100 * m['accuracy']:.2f} %, without {100 * m['accuracy_no_tta']:.2f} %")
    if not args.dry_run:
        print(f"\nwrote {Path(args.run) / 'metrics.json'}")
    return 0


def _expand_inputs(files):
    """Yield (name, item) for each image; an IDX file yields one item per image it holds."""
    from fmnist.data import DataError, read_idx

    for f in files:
        path = Path(f)
        if path.name.endswith(("-ubyte", "-ubyte.gz", ".idx", ".idx.gz")):
            try:
                arr = read_idx(path)
            except DataError as e:
                yield f, e
                continue
            if arr.ndim != 3 or arr.shape[1:] != (28, 28):
                yield f, ValueError(f"{f}: IDX images must be N x 28 x 28, got {arr.shape}")
                continue
            for i, img in enumerate(arr):
                yield f"{f}[{i}]", img
        else:
            yield f, path


def cmd_predict(args) -> int:
    from fmnist.data import DataError
    from fmnist.images import ImageError
    from fmnist.predict import Predictor

    predictor = Predictor.from_run(args.run, confidence_threshold=args.threshold, top_k=args.top_k)
    failures = total = 0
    for name, item in _expand_inputs(args.files):
        total += 1
        try:
            if isinstance(item, Exception):
                raise item
            if isinstance(item, Path) and not item.is_file():
                raise ImageError(f"{item}: no such file")
            result = predictor.predict(item)
        except (ImageError, DataError, ValueError) as e:
            failures += 1
            print(json.dumps({"file": name, "error": str(e)}), flush=True)
            continue
        if not args.dry_run:
            print(json.dumps({"file": name, **result}), flush=True)
    if args.dry_run:
        print(f"dry run ok: {total - failures} of {total} image(s) readable, {failures} failed")
    return 1 if failures else 0


def cmd_models(args) -> int:
    from fmnist.models import count_parameters, create_model, describe, model_names

    print(f"{'name':<12}{'parameters':>12}  description")
    for name in model_names():
        print(f"{name:<12}{count_parameters(create_model(name)):>12,}  {describe(name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist", formatter_class=Formatter,
                                     description="Train, evaluate, explain and serve Fashion-MNIST classifiers.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)

    p = sub.add_parser("evaluate", help="evaluate a run on the official test set", formatter_class=Formatter)
    p.add_argument("run", help="run folder")
    p.add_argument("--tta", default=None, action=argparse.BooleanOptionalAction,
                   help="mirrored test-time augmentation (default: as the run was trained)")
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files (default: search, see README)")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files that are not the official ones")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = physical cores)")
    p.add_argument("--dry-run", action="store_true", help="evaluate 256 images, write nothing")

    p = sub.add_parser("predict", help="classify image files (PNG/JPEG/BMP/GIF/WebP/TIFF or IDX)",
                       formatter_class=Formatter)
    p.add_argument("run", help="run folder")
    p.add_argument("files", nargs="+", help="image files; an IDX file counts as one image per entry")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    p.add_argument("--threshold", type=float, default=None,
                   help="refuse answers under this confidence (default: the run's, 0.60 unless set)")
    p.add_argument("--dry-run", action="store_true", help="check the model and inputs, print no predictions")

    sub.add_parser("models", help="list architectures and parameter counts", formatter_class=Formatter)
    for name in ("train", "evaluate", "predict", "models"):
        sub.choices[name].set_defaults(func=globals()[f"cmd_{name}"])
    for module in COMMAND_MODULES:
        # Each module adds its own subcommands with set_defaults(func=...); heavy imports stay inside func.
        importlib.import_module(module).register(sub, Formatter)
    return parser


# Modules that add subcommands of their own (serve, calibrate, ood-eval, report, compare, bench, tune).
COMMAND_MODULES: list[str] = ["fmnist.report", "fmnist.serve.cli", "fmnist.trust_cli", "fmnist.tune"]


def main(argv=None) -> int:
    from fmnist.checkpoint import CheckpointError
    from fmnist.data import DataError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"fmnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted" + ("; continue with --resume RUN" if args.command == "train" else ""),
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
