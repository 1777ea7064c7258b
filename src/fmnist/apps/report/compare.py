"""``fmnist compare RUN...``: a table of runs (model, size, recipe, accuracy, training time)."""
from __future__ import annotations

import math
from pathlib import Path

from fmnist.core.run import Run
from fmnist.core.runfolder import METRICS, MODEL_JSON, SUMMARY, TUNE_TRIAL, read_json


def expand_runs(paths) -> list[Path]:
    """Run folders, from run folders, study folders of `fmnist tune` and parent folders of either.

    A study folder stands for its finished trials (never a trial a worker left half-written: only those whose
    tune_trial.json, written once the study recorded them, says COMPLETE). A parent folder (``runs``) stands for
    the runs and studies in it. Each run is listed once: a link to a run listed already (``latest``, a study's
    ``best``, a shell glob that names both) is skipped. A folder that is none of these is passed on as it is, for
    the error that names it."""
    found: list[Path] = []
    for p in map(Path, paths):
        found += _runs_in(p, depth=2) or [p]
    runs, seen = [], {}
    for p in found:
        key = p.resolve()
        if key in seen:
            i = seen[key]
            if runs[i].is_symlink() and not p.is_symlink():
                runs[i] = p  # name the run by its own folder rather than by a link to it
            continue
        seen[key] = len(runs)
        runs.append(p)
    return runs


def _runs_in(p: Path, depth: int) -> list[Path]:
    if (p / MODEL_JSON).exists():
        return [p]
    if not p.is_dir():
        return []
    markers = sorted(p.glob(f"trial-*/{TUNE_TRIAL}"))
    if markers:
        return [m.parent for m in markers if read_json(m).get("state") == "COMPLETE"]
    if depth == 0:
        return []
    runs: list[Path] = []
    for child in sorted(p.iterdir()):
        if child.is_dir():
            runs += _runs_in(child, depth - 1)
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
