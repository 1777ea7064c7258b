"""``fmnist report RUN`` and ``fmnist compare RUN...``: what a trained run did, as figures and tables.

The report predicts the test set itself with the run's model (the package's one preprocessing path and
``batched_logits``), so its figures always match the weights on disk. It writes ``RUN/report/index.html``,
one self-contained page (PNG figures embedded as data URIs, no scripts, nothing fetched), plus the PNGs.
"""
from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch

from fmnist.calibrate import ECE_BINS, expected_calibration_error
from fmnist.checkpoint import CheckpointError, read_json

FIGURES = ("learning_curves", "confusion", "per_class", "confused_pairs", "misclassified", "reliability",
           "samples")


# --- reading a run folder ----------------------------------------------------------------------------------


def require_run(run_dir) -> Path:
    """The run folder as a Path, or a CheckpointError that says what is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        raise CheckpointError(f"{run} is not a folder; give a run folder written by `fmnist train`")
    if not (run / "model.json").is_file():
        raise CheckpointError(f"{run} is not a run folder: it has no model.json (train one with `fmnist train`)")
    return run


def _optional_json(path: Path) -> dict:
    """A run's optional JSON file (metrics, summary, env) or {} when absent; a corrupt one still errors."""
    return read_json(path) if path.is_file() else {}


def read_history(run: Path) -> list[dict]:
    path = run / "history.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


# --- predictions and numbers -------------------------------------------------------------------------------


def calibration_bins(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins (lo, hi], and the bins themselves."""
    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    which = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        acc = float(correct[mask].mean()) if n else 0.0
        avg = float(conf[mask].mean()) if n else 0.0
        table.append({"lo": b / bins, "hi": (b + 1) / bins, "count": n, "accuracy": acc, "confidence": avg})
    ece = expected_calibration_error(torch.as_tensor(probs), torch.as_tensor(labels), bins)
    return ece, table


def predict_test(run: Path, data, limit: int | None = None, threads: int | None = None) -> dict:
    """Test-set logits and (temperature-scaled) probabilities from the run's model."""
    import torch

    from fmnist import runtime
    from fmnist.checkpoint import load_model
    from fmnist.evaluate import batched_logits
    from fmnist.preprocess import preprocess

    device = runtime.setup(threads, "auto")
    model, meta = load_model(run, map_location=device)
    images, labels = data.test_images, data.test_labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    tta = bool(meta.get("tta", False))
    logits = batched_logits(model, preprocess(images, meta["preprocessing"]), tta=tta, device=device)
    temperature = float(meta.get("calibration", {}).get("temperature", 1.0))
    probs = torch.softmax(logits / temperature, dim=1)
    return {"meta": meta, "logits": logits, "labels": labels, "tta": tta, "temperature": temperature,
            "images": np.asarray(images), "y": np.asarray(labels), "probs": probs.numpy()}


def test_metrics(run: Path, pred: dict) -> dict:
    """classification_metrics of the predictions; the no-TTA accuracy comes from RUN/metrics.json if it matches."""
    from fmnist.evaluate import classification_metrics

    m = classification_metrics(pred["logits"], pred["labels"], pred["meta"]["class_names"])
    saved = _optional_json(run / "metrics.json")
    if saved.get("n") == m["n"] and saved.get("tta") == pred["tta"] and "accuracy_no_tta" in saved:
        m["accuracy_no_tta"] = saved["accuracy_no_tta"]
    return m


def rejection_stats(probs: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """What the confidence threshold does on the test set: share refused, accuracy on what is accepted."""
    conf, correct = probs.max(1), probs.argmax(1) == labels
    keep = conf >= threshold
    return {"threshold": threshold, "refused": float(1 - keep.mean()) if len(keep) else 0.0,
            "accepted_accuracy": float(correct[keep].mean()) if keep.any() else math.nan}


# --- the report ----------------------------------------------------------------------------------------------


def build_report(run_dir, data=None, out=None, limit: int | None = None, threads: int | None = None) -> Path:
    """Write RUN/report/index.html and its PNGs; return the HTML path. ``data`` defaults to the official set."""
    from fmnist import report_figures as figs
    from fmnist.data import load_fashion_mnist
    from fmnist.predict import run_confidence_threshold

    run = require_run(run_dir)
    data = data if data is not None else load_fashion_mnist()
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    pred = predict_test(run, data, limit, threads)
    meta, names, y, probs, images = pred["meta"], pred["meta"]["class_names"], pred["y"], pred["probs"], pred["images"]
    metrics = test_metrics(run, pred)
    history = read_history(run)
    ece, bins = calibration_bins(probs, y)
    threshold = run_confidence_threshold(meta)
    sample_idx = np.sort(np.random.default_rng(0).choice(len(y), size=min(24, len(y)), replace=False))

    drawn = {
        "confusion": figs.confusion(metrics["confusion_matrix"], names),
        "per_class": figs.per_class(metrics["per_class"]),
        "confused_pairs": figs.confused_pairs(images, y, probs.argmax(1), probs,
                                             [p for p in metrics["most_confused"] if p["total"]][:3], names),
        "misclassified": figs.misclassified(images, y, probs, names),
        "reliability": figs.reliability(bins, ece, pred["temperature"]),
        "samples": figs.samples(images, y, probs, names, sample_idx),
    }
    if history:
        drawn["learning_curves"] = figs.learning_curves(history, meta.get("best_epoch"), meta.get("select", ""))
    else:
        (out / "learning_curves.png").unlink(missing_ok=True)  # an older report's curves would mislead
    for name, fig in drawn.items():
        figs.save(fig, out / f"{name}.png")

    from fmnist.report_html import render_report

    context = {
        "run": run, "meta": meta, "metrics": metrics, "history": history, "ece": ece, "data": data,
        "temperature": pred["temperature"], "rejection": rejection_stats(probs, y, threshold),
        "config": _optional_json(run / "config.json"), "summary": _optional_json(run / "train_summary.json"),
        "env": _optional_json(run / "env.json"), "pngs": {n: out / f"{n}.png" for n in FIGURES if n in drawn},
    }
    index = out / "index.html"
    index.write_text(render_report(context), encoding="utf-8")
    return index


# --- comparing runs ----------------------------------------------------------------------------------------


def run_row(run_dir) -> dict:
    """One line of `fmnist compare`: what the run is and how well it did (test accuracy if evaluated)."""
    run = require_run(run_dir)
    meta = read_json(run / "model.json")
    summary, metrics = _optional_json(run / "train_summary.json"), _optional_json(run / "metrics.json")
    recipe = meta.get("recipe", {})
    parts = [recipe.get("preset") or "custom", recipe.get("optimizer"), f"lr {recipe.get('lr')}",
             recipe.get("schedule"), f"aug {recipe.get('augment')}"]
    return {
        "run": run.name if run.name not in ("", ".") else str(run), "model": meta.get("model"),
        "parameters": meta.get("parameters"), "recipe": ", ".join(str(p) for p in parts if p),
        "best_epoch": meta.get("best_epoch"), "epochs": summary.get("epochs"),
        "val_acc": meta.get("metrics", {}).get("val_acc"), "test_acc": metrics.get("accuracy"),
        "train_seconds": summary.get("train_seconds"),
        "temperature": meta.get("calibration", {}).get("temperature"),
    }


COMPARE_COLUMNS = [  # (key, header, format)
    ("run", "run", "{}"), ("model", "model", "{}"), ("parameters", "params", "{:,}"),
    ("best_epoch", "best ep", "{}"), ("epochs", "epochs", "{}"), ("val_acc", "val acc", "{:.2%}"),
    ("test_acc", "test acc", "{:.2%}"), ("train_seconds", "train time", "{:.0f} s"), ("recipe", "recipe", "{}"),
]


def _cell(row: dict, key: str, fmt: str) -> str:
    v = row.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def format_compare(rows: list[dict]) -> str:
    """A plain-text table, columns sized to their content."""
    table = [[h for _, h, _ in COMPARE_COLUMNS]] + [[_cell(r, k, f) for k, _, f in COMPARE_COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COMPARE_COLUMNS))]
    text_cols = {0, 1, len(COMPARE_COLUMNS) - 1}  # left-aligned; numbers right-aligned
    lines = ["  ".join(c.ljust(w) if i in text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def compare_html(rows: list[dict]) -> str:
    from fmnist.report_html import page, table

    body = table([h for _, h, _ in COMPARE_COLUMNS],
                 [[_cell(r, k, f) for k, _, f in COMPARE_COLUMNS] for r in rows])
    note = ("<p class=note>test acc is '-' for runs not yet evaluated (<code>fmnist evaluate RUN</code>); "
            "val acc is at the kept epoch.</p>")
    return page("fmnist: compare runs", f"<h1>Runs compared</h1>{body}{note}")


# --- command line ------------------------------------------------------------------------------------------


def cmd_report(args) -> int:
    from fmnist.data import load_fashion_mnist

    require_run(args.run)  # fail on a wrong folder before loading 70,000 images
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("fmnist report: error: matplotlib is needed: pip install 'fmnist[report]'", file=sys.stderr)
        return 2
    data = load_fashion_mnist(args.data_dir, verify=not args.no_verify)
    index = build_report(args.run, data=data, out=args.out, limit=args.limit or None, threads=args.threads or None)
    print(f"wrote {index} and {len(list(index.parent.glob('*.png')))} PNGs in {index.parent}")
    return 0


def expand_runs(paths) -> list[Path]:
    """Run folders, with a study folder of `fmnist tune` standing for its finished trials (never a trial a worker
    left half-written: only those whose tune_trial.json, written once the study recorded them, says COMPLETE)."""
    runs = []
    for p in map(Path, paths):
        markers = sorted(p.glob("trial-*/tune_trial.json")) if p.is_dir() and not (p / "model.json").exists() else []
        if not markers:
            runs.append(p)
            continue
        runs += [m.parent for m in markers if read_json(m).get("state") == "COMPLETE"]
    return runs


def cmd_compare(args) -> int:
    rows = [run_row(r) for r in expand_runs(args.runs)]
    print(format_compare(rows))
    if args.html:
        Path(args.html).write_text(compare_html(rows), encoding="utf-8")
        print(f"\nwrote {args.html}")
    return 0


def _own_defaults(formatter_class):
    """The CLI's formatter, minus its '(default: ...)' suffix where the help already states the default."""
    class Formatter(formatter_class):
        def _get_help_string(self, action):
            text = action.help or ""
            return text if "(default" in text else super()._get_help_string(action)

    return Formatter


def register(sub, formatter_class) -> None:
    formatter_class = _own_defaults(formatter_class)
    p = sub.add_parser("report", help="figures and a model card for a run, as one self-contained HTML page",
                       formatter_class=formatter_class,
                       description="Predict the test set with RUN's model and write RUN/report/index.html "
                                   "(figures embedded) and the figures as PNGs.")
    p.add_argument("run", help="run folder")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/report)")
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files (default: search)")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files that are not the official ones")
    p.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = physical cores")
    p.add_argument("--limit", type=int, default=0, metavar="N", help="use only the first N test images; 0 = all")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="a table of runs: model, size, recipe, accuracy, training time",
                       formatter_class=formatter_class)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders, or study folders of `fmnist tune`")
    p.add_argument("--html", default="compare.html", metavar="FILE",
                   help="also write the table as an HTML page here; '' = terminal only")
    p.set_defaults(func=cmd_compare)


__all__ = ["build_report", "calibration_bins", "compare_html", "expand_runs", "format_compare", "register", "run_row"]
