"""``fmnist compare RUN...``: a table of runs (model, size, recipe, accuracy, training time)."""
from __future__ import annotations

import math
from pathlib import Path

from fmnist.core.run import Run
from fmnist.core.runfolder import METRICS, MODEL_JSON, SUMMARY, TUNE_TRIAL, read_json


def expand_runs(paths) -> list[Path]:
    """Run folders, with a study folder of `fmnist tune` standing for its finished trials (never a trial a worker
    left half-written: only those whose tune_trial.json, written once the study recorded them, says COMPLETE)."""
    runs = []
    for p in map(Path, paths):
        markers = sorted(p.glob(f"trial-*/{TUNE_TRIAL}")) if p.is_dir() and not (p / MODEL_JSON).exists() else []
        if not markers:
            runs.append(p)
            continue
        runs += [m.parent for m in markers if read_json(m).get("state") == "COMPLETE"]
    return runs


def run_row(run_dir) -> dict:
    """One line of `fmnist compare`: what the run is and how well it did (test accuracy if evaluated)."""
    run = Run.load(run_dir, detector=False)
    summary, metrics = run.read_optional(SUMMARY), run.read_optional(METRICS)
    recipe = run.recipe
    parts = [recipe.get("preset") or "custom", recipe.get("optimizer"), f"lr {recipe.get('lr')}",
             recipe.get("schedule"), f"aug {recipe.get('augment')}"]
    return {
        "run": run.path.name if run.path.name not in ("", ".") else str(run.path), "model": run.model_name,
        "parameters": run.parameters, "recipe": ", ".join(str(p) for p in parts if p),
        "best_epoch": run.best_epoch, "epochs": summary.get("epochs"),
        "val_acc": run.metrics.get("val_acc"), "test_acc": metrics.get("accuracy"),
        "train_seconds": summary.get("train_seconds"),
        "temperature": run.temperature if run.calibration else None,
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
    from fmnist.apps.report.html import page, table

    body = table([h for _, h, _ in COMPARE_COLUMNS],
                 [[_cell(r, k, f) for k, _, f in COMPARE_COLUMNS] for r in rows])
    note = ("<p class=note>test acc is '-' for runs not yet evaluated (<code>fmnist evaluate RUN</code>); "
            "val acc is at the kept epoch.</p>")
    return page("fmnist: compare runs", f"<h1>Runs compared</h1>{body}{note}")
