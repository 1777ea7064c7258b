"""``fmnist evaluate`` and ``fmnist predict``: a trained run on the test set, and on image files."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fmnist.apps.cli.flags import add_backend_flag, add_data_flags
from fmnist.core.progress import Bar


def register(sub, formatter_class) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run on the official test set", formatter_class=formatter_class)
    p.add_argument("run", help="run folder")
    p.add_argument("--tta", default=None, action=argparse.BooleanOptionalAction,
                   help="mirrored test-time augmentation (default: as the run was trained)")
    add_data_flags(p)
    p.add_argument("--dry-run", action="store_true", help="evaluate 256 images, write nothing")
    add_backend_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files (PNG/JPEG/BMP/GIF/WebP/TIFF or IDX)",
                       formatter_class=formatter_class)
    p.add_argument("run", help="run folder")
    p.add_argument("files", nargs="+", help="image files; an IDX file counts as one image per entry")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    p.add_argument("--threshold", type=probability, default=None,
                   help="refuse answers under this confidence (default: the run's, 0.60 unless set)")
    p.add_argument("--dry-run", action="store_true", help="check the model and inputs, print no predictions")
    add_backend_flag(p)
    p.set_defaults(func=cmd_predict)


def probability(text: str) -> float:
    """A flag's value in [0, 1]: NaN would turn its gate off (every comparison with NaN is false)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def cmd_evaluate(args) -> int:
    from fmnist.fit.evaluate import evaluate_run, format_report
    from fmnist.fit.sources import data_from_args

    data = data_from_args(args, args.run)
    m = evaluate_run(args.run, data=data, tta=args.tta, limit=256 if args.dry_run else None,
                     write=not args.dry_run, threads=args.threads or None, backend=args.backend)
    print(format_report(m, title=f"{args.run} on the {'official' if getattr(data, 'name', '') == 'fashion-mnist' else 'data set' + chr(39) + 's'} test set" if not args.dry_run else "dry run"))
    if m["tta"]:
        print(f"\nwith mirrored TTA {100 * m['accuracy']:.2f} %, without {100 * m['accuracy_no_tta']:.2f} %")
    if not args.dry_run:
        print(f"\nwrote {Path(args.run) / 'metrics.json'}")
    return 0


def _per_file_errors() -> tuple:
    """What one input file may raise that is that file's fault or its circumstance, reported per file while the
    others go on: undecodable or unreadable (ImageError, DataError, OSError), unusable (ValueError), too large
    to decode (MemoryError). Anything else is a bug and surfaces with its traceback."""
    from fmnist.core.images import ImageError
    from fmnist.fit.data import DataError

    return ImageError, DataError, ValueError, OSError, MemoryError


def _file_error(name: str, e: BaseException) -> dict:
    if isinstance(e, MemoryError):
        return {"file": name, "error": f"{name}: not enough memory to read this file"}
    return {"file": name, "error": str(e) or type(e).__name__}


def _expand_inputs(files):
    """Yield (name, item) for each image; an IDX file yields one item per image it holds, an unreadable one
    the exception."""
    from fmnist.fit.data import read_idx

    for f in files:
        path = Path(f)
        if not path.is_file():
            why = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "no such file"
            yield f, FileNotFoundError(f"{f}: {why}")
        elif path.name.endswith(("-ubyte", "-ubyte.gz", ".idx", ".idx.gz")):
            try:
                arr = read_idx(path)
            except _per_file_errors() as e:
                yield f, e
                continue
            if arr.ndim != 3 or arr.shape[1:] != (28, 28):
                yield f, ValueError(f"{f}: IDX images must be N x 28 x 28, got {arr.shape}")
                continue
            for i, img in enumerate(arr):
                yield f"{f}[{i}]", img
        else:
            yield f, path


PREDICT_BATCH = 256  # images per model call: an IDX file of 10,000 images is 40 calls, not 10,000


def cmd_predict(args) -> int:
    """One line of strict JSON per image (NaN and infinities are null); a file that fails is its own line."""
    from fmnist.core.predict import Predictor
    from fmnist.core.runfolder import jsonable

    predictor = Predictor.from_run(args.run, backend=args.backend, confidence_threshold=args.threshold,
                                   top_k=args.top_k)
    failures = total = 0
    pending: list[tuple[str, object]] = []  # prepared images waiting for one model call (an IDX file holds many)

    def flush() -> None:
        results = predictor.predict_prepared([image for _, image in pending]) if pending else []
        for (name, _), result in zip(pending, results):
            if not args.dry_run:
                print(json.dumps(jsonable({"file": name, **result}), allow_nan=False), flush=True)
        pending.clear()

    # many images, their lines going to a file: a bar on the terminal (none between the lines on a terminal)
    many = len(args.files) > 1 or str(args.files[0]).endswith(("-ubyte", "-ubyte.gz", ".idx", ".idx.gz"))
    bar = Bar(None, "predict", unit="img", plain=False, enabled=None if many and not sys.stdout.isatty() else False)
    for name, item in _expand_inputs(args.files):
        total += 1
        bar.update(1)
        try:
            if isinstance(item, BaseException):
                raise item
            pending.append((name, predictor.to_image28(item)))  # decoding and preparing: the file's own errors
        except _per_file_errors() as e:
            flush()  # lines stay in the order of the inputs
            failures += 1
            print(json.dumps(_file_error(name, e)), flush=True)
            continue
        if len(pending) >= PREDICT_BATCH:
            flush()
    flush()
    bar.close()
    if args.dry_run:
        print(f"dry run ok: {total - failures} of {total} image(s) readable, {failures} failed")
    return 1 if failures else 0
