"""``fmnist export``: a run's model to ONNX (optionally int8), checked against PyTorch (:mod:`fmnist.fit.export`)."""
from __future__ import annotations

from pathlib import Path

from fmnist.apps.cli.flags import add_data_flags
from fmnist.core.errors import InputError
from fmnist.core.runfolder import EXPORT_REPORT
from fmnist.fit import export


def register(sub, formatter_class) -> None:
    p = sub.add_parser("export", formatter_class=formatter_class,
                       help="export a run's model to ONNX (optionally int8) and check it against PyTorch",
                       description="Write RUN/model.onnx (features and logits, dynamic batch, BatchNorm folded; "
                                   "with --int8 also RUN/model.int8.onnx), then compare ONNX Runtime with "
                                   "PyTorch on the official test set and write RUN/export.json. Needs the "
                                   f"export extra: {export.EXPORT_EXTRA}.")
    add_arguments(p)
    p.set_defaults(func=cmd_export)


def add_arguments(p) -> None:
    p.add_argument("run", help="run folder")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx, statically quantised on training images")
    p.add_argument("--opset", type=int, default=export.DEFAULT_OPSET, help="ONNX opset")
    p.add_argument("--calibration-images", type=int, default=export.CALIBRATION_IMAGES,
                   help="training images that calibrate the int8 ranges")
    p.add_argument("--limit", type=int, default=0,
                   help="validate on the first N test images only (0 = all 10,000)")
    add_data_flags(p)


def cmd_export(args) -> int:
    from fmnist.fit import runtime
    from fmnist.fit.sources import data_from_args

    if args.calibration_images < 1 or args.limit < 0 or args.opset < 1:
        raise InputError("--calibration-images and --opset must be positive, --limit at least 0")
    runtime.setup(args.threads or None, "cpu")
    run = Path(args.run)
    export.load_exportable(run).model()  # fails early, with a clear message, on an unfinished run or bad weights
    export.require("onnx", "onnxscript", "onnxruntime")
    export.check_opset(args.opset)
    data = data_from_args(args, run)
    for path in export.export_onnx(run, int8=args.int8, opset=args.opset, data=data, complete=False,
                                   calibration_images=args.calibration_images).values():
        print(f"wrote {path} ({path.stat().st_size / 1024:,.0f} KiB)")
    n = args.limit or len(data.test_labels)
    report = export.validate_onnx(run, data.test_images[:n], data.test_labels[:n], threads=args.threads)
    print(export.format_validation(report))
    print(f"wrote {run / EXPORT_REPORT}")
    if not report["ok"]:
        export.withdraw(run)
        print(f"the export differs from PyTorch by more than {export.FP32_TOLERANCE:g}: its files are removed (see "
              f"{run / EXPORT_REPORT}), so that no backend serves them")
        return 1
    export.finish(run)  # recorded and validated: the run is complete with its export
    return 0
