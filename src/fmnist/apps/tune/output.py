"""What a study leaves behind: a marker in each finished trial's folder, the ``best`` link, and a table of
trials on the terminal, as ``trials.csv`` and as ``index.html`` with the optimisation history, the parameter
importances and a learning-rate plot (matplotlib, PNGs embedded: nothing fetched)."""
from __future__ import annotations

import csv
import os
import warnings
from pathlib import Path

from fmnist.core.runfolder import MODEL_JSON, TUNE_TRIAL, _atomic, write_json
from fmnist.core.values import is_finite_number

MARKER = TUNE_TRIAL  # written once the storage has a trial's outcome: `fmnist compare` trusts only these
FIGURES = ("history", "importances", "learning_rate")


def trial_folder(number: int) -> str:
    """A trial's run folder inside the study folder."""
    return f"trial-{number:04d}"


def _finite(v):
    return v if is_finite_number(v) else None


def record(t) -> dict:
    """One trial as plain data (JSON and CSV): what it tried, how it did, how long it took, where it ran."""
    done, start = t.datetime_complete, t.datetime_start
    return {"number": t.number, "state": t.state.name, "value": _finite(t.value), "params": dict(t.params),
            "duration": (done - start).total_seconds() if done and start else None,
            "run": trial_folder(t.number), "worker": t.user_attrs.get("worker")}


def write_marker(study_dir: Path, t) -> None:
    folder = Path(study_dir) / trial_folder(t.number)
    if folder.is_dir() and t.state.is_finished():
        write_json(folder / MARKER, record(t))


def update_best(study, study_dir: Path) -> str | None:
    """Point ``STUDY/best`` at the best finished trial's folder (replaced atomically); its name, or None."""
    study_dir = Path(study_dir)
    try:
        best = study.best_trial
    except ValueError:
        return None  # no finished trial yet
    target = trial_folder(best.number)
    link, tmp = study_dir / "best", study_dir / f".best.{os.getpid()}.tmp"
    if not (study_dir / target / MODEL_JSON).is_file():
        if link.is_symlink():
            link.unlink(missing_ok=True)  # the best trial ran on another machine: no link rather than a wrong one
        return None
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)
    return target


def describe_trial(t, metric: str) -> str:
    """One line per finished trial, as workers print them."""
    r = record(t)
    value = "" if r["value"] is None else f" {metric} {r['value']:.4f},"
    took = "" if r["duration"] is None else f" ({r['duration']:.1f} s)"
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in r["params"].items())
    return f"trial {r['number']} {r['state'].lower()}:{value} {params}{took}"


# --- table and CSV -------------------------------------------------------------------------------------------


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table_rows(records: list[dict], metric: str, names: list[str]) -> list[list[str]]:
    header = ["trial", "state", metric, "seconds", *names, "worker"]
    rows = [[str(r["number"]), r["state"].lower(), "-" if r["value"] is None else f"{r['value']:.4f}",
             "-" if r["duration"] is None else f"{r['duration']:.1f}", *(_fmt(r["params"].get(n)) for n in names),
             r["worker"] or "-"] for r in records]
    return [header, *rows]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(path: Path, records: list[dict], metric: str, names: list[str]) -> None:
    def w(tmp):
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["number", "state", metric, "duration_s", *names, "run", "worker"])
            for r in records:
                out.writerow([r["number"], r["state"], "" if r["value"] is None else r["value"],
                              "" if r["duration"] is None else f"{r['duration']:.3f}",
                              *(r["params"].get(n, "") for n in names), r["run"], r["worker"] or ""])

    _atomic(path, w)


# --- figures -------------------------------------------------------------------------------------------------


def history_figure(records: list[dict], metric: str, minimize: bool):
    from fmnist.apps.report.figures import VAL_COLOR, _figure

    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    done = [r for r in records if r["state"] == "COMPLETE" and r["value"] is not None]
    pruned = [r for r in records if r["state"] == "PRUNED" and r["value"] is not None]
    ax.scatter([r["number"] for r in done], [r["value"] for r in done], color=VAL_COLOR, label="complete", zorder=3)
    if pruned:
        ax.scatter([r["number"] for r in pruned], [r["value"] for r in pruned], color="#999", marker="x",
                   label="pruned (last epoch reported)", zorder=3)
    best, xs, ys = None, [], []
    for r in sorted(done, key=lambda r: r["number"]):
        if best is None or (r["value"] < best if minimize else r["value"] > best):
            best = r["value"]
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="#333", label="best so far")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _value_axis(ax, [r["value"] for r in done + pruned], metric)
    ax.set_xlabel("trial")
    ax.set_title("Optimisation history")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _value_axis(ax, values: list[float], metric: str) -> None:
    """A log scale for losses that span more than 10x: one diverged trial would flatten all the others."""
    values = [v for v in values if v is not None]
    if metric == "val_loss" and values and min(values) > 0 and max(values) / min(values) > 10:
        ax.set_yscale("log")
        ax.set_ylabel(f"{metric} (log scale)")
    else:
        ax.set_ylabel(metric)


def importances(study) -> dict[str, float] | None:
    """Optuna's parameter importances; None when too few finished trials vary a parameter to say anything."""
    import optuna
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varied = any(len({repr(t.params.get(n)) for t in done}) > 1 for t in done[:1] for n in t.params)
    if len(done) < 3 or not varied:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):
        return None


def importance_figure(values: dict[str, float]):
    from fmnist.apps.report.figures import TRAIN_COLOR, _figure

    names = list(values)[::-1]
    fig = _figure(6.5, 0.5 + 0.4 * len(names))
    ax = fig.add_subplot()
    ax.barh(names, [values[n] for n in names], color=TRAIN_COLOR)
    ax.set_xlabel("importance (share of the variation in the objective)")
    ax.set_title("Parameter importances")
    return fig


def lr_figure(records: list[dict], metric: str, log: bool):
    from fmnist.apps.report.figures import VAL_COLOR, _figure

    fig = _figure(6.5, 3.6)
    ax = fig.add_subplot()
    shown = []
    for state, style in (("COMPLETE", dict(color=VAL_COLOR)), ("PRUNED", dict(color="#999", marker="x"))):
        rs = [r for r in records if r["state"] == state and r["value"] is not None and "lr" in r["params"]]
        if rs:
            ax.scatter([r["params"]["lr"] for r in rs], [r["value"] for r in rs], label=state.lower(), **style)
            shown += [r["value"] for r in rs]
    if log:
        ax.set_xscale("log")
    _value_axis(ax, shown, metric)
    ax.set_xlabel("learning rate (--lr)")
    ax.set_title(f"{metric} against the learning rate")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _lr_is_log(param: dict) -> bool:
    if param["kind"] != "categorical":
        return bool(param.get("log"))
    values = [v for v in param["choices"] if v > 0]
    return len(values) > 1 and max(values) / min(values) > 10


def draw_figures(study, records: list[dict], s, out: Path) -> tuple[dict[str, Path], dict | None]:
    """Write the PNGs into the study folder; return them, and the importances (None: too few trials)."""
    from fmnist.apps.report.figures import save

    figs = {"history": history_figure(records, s.metric, s.direction == "minimize")}
    imp = importances(study)
    if imp:
        figs["importances"] = importance_figure(imp)
    if "lr" in s.space.params:
        figs["learning_rate"] = lr_figure(records, s.metric, _lr_is_log(s.space.params["lr"]))
    paths = {}
    for name, fig in figs.items():
        paths[name] = out / f"{name}.png"
        save(fig, paths[name])
    for name in set(FIGURES) - set(figs):
        (out / f"{name}.png").unlink(missing_ok=True)  # an older page's figure would mislead
    return paths, imp


# --- the page ------------------------------------------------------------------------------------------------


def render_html(s, rows: list[list[str]], pngs: dict[str, Path], imp: dict | None, best: dict | None) -> str:
    from fmnist.apps.report.html import esc, image, key_values, page, table

    counts = {}
    for r in rows[1:]:
        counts[r[1]] = counts.get(r[1], 0) + 1
    head = (f"<h1>Study {esc(s.study)}</h1><p>{esc(s.metric)} on the validation split, "
            f"{'lower' if s.direction == 'minimize' else 'higher'} is better; trials: "
            + esc(", ".join(f"{n} {k}" for k, n in sorted(counts.items()))) + ".</p>")
    if best:
        head += (f"<p>Best: trial {best['number']}, {esc(s.metric)} {_fmt(best['value'])}, "
                 + esc(", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items()))
                 + f" (<code>{esc(s.study_dir / 'best')}</code>).</p>")
    parts = [head, "<h2>Trials</h2>", table(rows[0], rows[1:])]
    parts += ["<h2>Optimisation history</h2>", image(pngs["history"], "optimisation history")]
    parts.append("<h2>Parameter importances</h2>")
    parts.append(image(pngs["importances"], "parameter importances") if imp else
                 "<p class=note>Too few finished trials that differ in their parameters to rank them "
                 "(at least 3 are needed).</p>")
    parts.append("<h2>Learning rate</h2>")
    parts.append(image(pngs["learning_rate"], "objective against the learning rate") if "learning_rate" in pngs
                 else "<p class=note>The learning rate is not searched in this study.</p>")
    space = {"preset": s.space.preset, **{f"--{k.replace('_', '-')}": v for k, v in s.space.params.items()},
             **{f"--{k.replace('_', '-')}": v for k, v in s.space.fixed.items()}}
    parts += ["<h2>Search space</h2>", key_values(space)]
    return page(f"fmnist: study {s.study}", "\n".join(parts))


def write_outputs(s, log=print) -> dict | None:
    """Print the table and the winner; write markers, the best link, trials.csv and index.html. Returns the best."""
    import optuna

    from fmnist.apps.tune.storage import open_storage

    study = optuna.load_study(study_name=s.study, storage=open_storage(s))
    trials = study.get_trials(deepcopy=False)
    records = [record(t) for t in trials]
    names = list(s.space.params)
    out = Path(s.study_dir)
    out.mkdir(parents=True, exist_ok=True)
    for t in trials:
        write_marker(out, t)
    update_best(study, out)
    try:
        best = record(study.best_trial)
    except ValueError:
        best = None
    rows = table_rows(records, s.metric, names)
    log(format_table(rows))
    write_csv(out / "trials.csv", records, s.metric, names)
    written = [out / "trials.csv"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log("no index.html: its figures need matplotlib (pip install 'fmnist[tune]')")
    else:
        pngs, imp = draw_figures(study, records, s, out)
        html = render_html(s, rows, pngs, imp, best)
        _atomic(out / "index.html", lambda tmp: Path(tmp).write_text(html, encoding="utf-8"))
        written.append(out / "index.html")
    log("wrote " + " and ".join(str(p) for p in written))
    return best
