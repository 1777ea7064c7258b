"""The ``fmnist`` command line: one subcommand per stage, kebab-case flags whose help states the default.

Commands live in this package by job (train, evaluate/predict, trust, report/compare, tune, export, serve);
:data:`COMMANDS` registers them explicitly.
"""
from __future__ import annotations

import argparse
import os
import sys

from fmnist.apps.cli import evaluate, export, report, serve, train, trust, tune
from fmnist.core.errors import FmnistError

# Every subcommand, in the order `fmnist --help` lists them; each module adds its parsers with
# set_defaults(func=...) and keeps its heavy imports inside those functions.
COMMANDS = (train.register, evaluate.register, trust.register, report.register, tune.register, export.register,
            serve.register)


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends '(default: X)' to each flag's help, unless the help already states its default."""

    def _get_help_string(self, action):
        if "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


EPILOG = """exit status: 0 done; 2 bad input (a run folder, data file, flag or value: one line says what to do);
1 an internal error, a bug (shown with its traceback); 130 interrupted.
--debug shows the traceback of bad-input errors too."""


def version() -> str:
    """The installed package's version (a checkout that was never installed: the source's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("fmnist")
    except PackageNotFoundError:
        import fmnist

        return getattr(fmnist, "__version__", "unknown")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist", formatter_class=Formatter, epilog=EPILOG,
                                     description="Train, evaluate, explain and serve Fashion-MNIST classifiers.")
    parser.add_argument("--version", action="version", version=f"fmnist {version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (default: off)")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in COMMANDS:
        register(sub, Formatter)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FmnistError as e:
        if args.debug:
            raise
        print(f"fmnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if (e.name or "").split(".")[0] != "torch":
            raise
        print(f"fmnist {args.command}: error: this command needs PyTorch, which is not installed here "
              "(pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu, the CPU build; a "
              "deployment without it can run `predict` and `serve` on an exported run with --backend onnx)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:  # the machine's doing (disk full, permission denied), not a bug: one line, no traceback
        if args.debug:
            raise
        print(f"fmnist {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted" + ("; continue with --resume RUN" if args.command == "train" else ""),
              file=sys.stderr)
        return 130

