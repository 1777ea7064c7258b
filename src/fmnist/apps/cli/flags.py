"""Flags that several commands share; their help comes from :class:`~fmnist.fit.recipes.TrainConfig` where
the option is one of a recipe's."""
from __future__ import annotations

import argparse
import re

from fmnist.core.backends import BACKENDS
from fmnist.fit.recipes import FIELD_HELP

# The recipe options whose values are a fixed list (fit.recipes.validate checks the same lists).
CHOICES = {
    "optimizer": ("sgd", "adam", "adamw"),
    "schedule": ("onecycle", "cosine", "constant"),
    "select": ("val_loss", "val_acc", "last"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
}
DEVICES = ("auto", "cpu", "cuda", "mps", "xpu")


def device_name(text: str) -> str:
    """--device: auto, cpu, or an accelerator with an optional index (cuda, cuda:1)."""
    if not re.fullmatch(r"(auto|cpu)|(cuda|mps|xpu)(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(DEVICES)}, "
                                         "or an accelerator with its index, cuda:1)")
    return text


def add_own_data_flags(p) -> None:
    """--data, --test-data and --class-names: a data set of one's own (docs/your-data.md)."""
    p.add_argument("--data", default=None, metavar="PATH",
                   help=FIELD_HELP["data"].replace("default: Fashion-MNIST", "default: for a run trained on its "
                                                   "own data, that data; else Fashion-MNIST"))
    p.add_argument("--test-data", default=None, metavar="CSV", help=FIELD_HELP["test_data"])
    p.add_argument("--class-names", default=None, metavar="FILE", help=FIELD_HELP["class_names"])


def add_data_flags(p, threads: bool = True) -> None:
    """The flags of every command that reads the data set: where it is, whether to check it, CPU threads."""
    p.add_argument("--data-dir", default=None, help=FIELD_HELP["data_dir"])
    p.add_argument("--no-verify", action="store_true", help="accept IDX files that are not the official ones")
    add_own_data_flags(p)
    if threads:
        p.add_argument("--threads", type=int, default=0, help=FIELD_HELP["threads"])


def add_backend_flag(p) -> None:
    """The ``--backend`` flag of predict, evaluate and serve."""
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="inference engine: torch (PyTorch), onnx (ONNX Runtime on RUN/model.onnx, written by "
                        "`fmnist export`), onnx-int8 (RUN/model.int8.onnx, `fmnist export --int8`), auto (onnx "
                        "where exported and installed, else torch) (default: auto)")
