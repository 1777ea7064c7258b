"""``fmnist report RUN`` and ``fmnist compare RUN...``."""
from __future__ import annotations

import sys
from pathlib import Path

from fmnist.apps.cli.flags import add_data_flags
from fmnist.core.run import Run


def cmd_report(args) -> int:
    from fmnist.fit.sources import data_from_args

    Run.load(args.run, detector=False)  # fail on a wrong folder before loading 70,000 images
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fmnist report: error: matplotlib is needed: pip install 'fmnist[report]'", file=sys.stderr)
        return 2
    data = data_from_args(args, args.run)
    from fmnist.apps.report import build_report

    index = build_report(args.run, data=data, out=args.out, limit=args.limit or None, threads=args.threads or None)
    print(f"wrote {index} and {len(list(index.parent.glob('*.png')))} PNGs in {index.parent}")
    return 0


def cmd_compare(args) -> int:
    from fmnist.apps.report.compare import compare_html, expand_runs, format_compare, run_row

    rows = [run_row(r) for r in expand_runs(args.runs)]
    print(format_compare(rows))
    if args.html:
        Path(args.html).write_text(compare_html(rows), encoding="utf-8")
        print(f"\nwrote {args.html}")
    return 0


def register(sub, formatter_class) -> None:
    p = sub.add_parser("report", help="figures and a model card for a run, as one self-contained HTML page",
                       formatter_class=formatter_class,
                       description="Predict the test set with RUN's model and write RUN/report/index.html "
                                   "(figures embedded) and the figures as PNGs.")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/report)")
    add_data_flags(p)
    p.add_argument("--limit", type=int, default=0, metavar="N", help="use only the first N test images; 0 = all")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="a table of runs: model, size, recipe, accuracy, training time",
                       formatter_class=formatter_class)
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders, study folders of `fmnist tune`, or a folder holding either (runs); "
                        "a link to a run listed already (latest, best) is skipped")
    p.add_argument("--html", default="", metavar="FILE",
                   help="also write the table as an HTML page here (default: the terminal only)")
    p.set_defaults(func=cmd_compare)
