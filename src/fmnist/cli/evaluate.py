"""``fmnist evaluate`` and ``fmnist predict``: a trained run on the test set, and on image files."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fmnist.backends import add_backend_flag


def register(sub, formatter_class) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run on the official test set", formatter_class=formatter_class)
    p.add_argument("run", help="run folder")
    p.add_argument("--tta", default=None, action=argparse.BooleanOptionalAction,
                   help="mirrored test-time augmentation (default: as the run was trained)")
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files (default: search, see README)")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files that are not the official ones")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = physical cores)")
    p.add_argument("--dry-run", action="store_true", help="evaluate 256 images, write nothing")
    add_backend_flag(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files (PNG/JPEG/BMP/GIF/WebP/TIFF or IDX)",
                       formatter_class=formatter_class)
    p.add_argument("run", help="run folder")
    p.add_argument("files", nargs="+", help="image files; an IDX file counts as one image per entry")
    p.add_argument("--top-k", type=int, default=3, help="classes listed per image")
    p.add_argument("--threshold", type=float, default=None,
                   help="refuse answers under this confidence (default: the run's, 0.60 unless set)")
    p.add_argument("--dry-run", action="store_true", help="check the model and inputs, print no predictions")
    add_backend_flag(p)
    p.set_defaults(func=cmd_predict)


def cmd_evaluate(args) -> int:
    from fmnist.data import load_fashion_mnist
    from fmnist.evaluate import evaluate_run, format_report

    data = load_fashion_mnist(args.data_dir, verify=not args.no_verify)
    m = evaluate_run(args.run, data=data, tta=args.tta, limit=256 if args.dry_run else None,
                     write=not args.dry_run, threads=args.threads or None, backend=args.backend)
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

    predictor = Predictor.from_run(args.run, backend=args.backend, confidence_threshold=args.threshold,
                                   top_k=args.top_k)
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
