"""HTML for ``fmnist report`` and ``fmnist compare``: one self-contained page, no scripts, nothing fetched.

Every value from a run folder goes through :func:`html.escape`; figures are embedded as base64 PNG data URIs.
"""
from __future__ import annotations

import base64
import html
import math
from pathlib import Path

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;max-width:1280px;
margin:0 auto;padding:0 24px 48px}
h1{margin:24px 0 4px}h2{margin-top:40px;border-bottom:2px solid #e5e5e5;padding-bottom:4px}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0 16px}
th,td{padding:4px 12px;border-bottom:1px solid #e5e5e5;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f6f6}
img{max-width:100%;height:auto;border:1px solid #eee}code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
.headline{display:flex;gap:16px;flex-wrap:wrap;margin:16px 0}.headline div{background:#f6f8fa;border-radius:8px;
padding:10px 16px}.headline b{display:block;font-size:22px}.note{color:#555}.warn{color:#a15c00}
"""


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<meta name=viewport content='width=device-width,initial-scale=1'><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def table(header: list[str] | None, rows: list[list], align_numbers: bool = True) -> str:
    """An HTML table; numbers (and numbers already formatted, like '92.1 %') right-aligned in columns."""
    def td(v):
        s = str(v)
        numeric = align_numbers and (_is_number(v) or (s[:1].isdigit()
                                                       and not any(c.isalpha() for c in s.replace(" s", ""))))
        return f"<td class=num>{esc(s)}</td>" if numeric else f"<td>{esc(s)}</td>"

    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(td(v) for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def key_values(d: dict) -> str:
    """A two-column table of a flat-ish dict (nested values shown as compact text)."""
    def show(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {show(x)}" for k, x in v.items())
        return "-" if v is None else v

    return table(None, [[k, show(v)] for k, v in d.items()], align_numbers=False)


def image(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f"<p><img src='data:image/png;base64,{data}' alt='{esc(alt)}'></p>"


def pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f} %"


# --- sections ----------------------------------------------------------------------------------------------


def _headline(c: dict) -> str:
    m, meta = c["metrics"], c["meta"]
    items = [("test accuracy", pct(m["accuracy"])), ("macro F1", pct(m["macro_f1"])),
             ("validation accuracy", pct(meta.get("metrics", {}).get("val_acc"))),
             ("ECE (15 bins)", pct(c["ece"])), ("parameters", f"{meta.get('parameters', 0):,}"),
             ("test images", f"{m['n']:,}")]
    return "<div class=headline>" + "".join(f"<div>{esc(k)}<b>{esc(v)}</b></div>" for k, v in items) + "</div>"


def _curves(c: dict) -> str:
    if "learning_curves" not in c["pngs"]:
        return "<p class=note>No history.csv in this run: no learning curves.</p>"
    h = c["history"]
    best = c["meta"].get("best_epoch")
    text = (f"<p>{len(h)} epochs; the model kept is epoch {esc(best)}, chosen by "
            f"<code>{esc(c['meta'].get('select', '?'))}</code> on the validation split. The shaded region (if "
            "any) is where validation loss has turned up while training continued: over-fitting.</p>")
    return text + image(c["pngs"]["learning_curves"], "learning curves")


def _confusion(c: dict) -> str:
    m = c["metrics"]
    rows = [[p["class"], pct(p["precision"]), pct(p["recall"]), pct(p["f1"]), p["support"]] for p in m["per_class"]]
    rows.append(["macro average", pct(m["macro_precision"]), pct(m["macro_recall"]), pct(m["macro_f1"]), m["n"]])
    return (image(c["pngs"]["confusion"], "confusion matrix")
            + table(["class", "precision", "recall", "F1", "support"], rows)
            + image(c["pngs"]["per_class"], "per-class precision, recall and F1"))


def _pairs(c: dict) -> str:
    rows = [[f"{p['a']} / {p['b']}", p["total"], p["a_as_b"], p["b_as_a"]] for p in c["metrics"]["most_confused"]]
    return (table(["pair", "errors both ways", "first as second", "second as first"], rows)
            + "<p class=note>Example images for the top three pairs, most confident mistakes first:</p>"
            + image(c["pngs"]["confused_pairs"], "most-confused pairs"))


def _calibration(c: dict) -> str:
    cal = c["meta"].get("calibration")
    if cal:
        status = ("<p>Calibrated by temperature scaling on the validation split; the scores below and in "
                  "predictions are divided by the temperature before the softmax.</p>" + key_values(cal))
    else:
        status = ("<p class=warn>Not calibrated: scores are the raw softmax (temperature 1). Run the calibration "
                  "step to fit a temperature on the validation split.</p>")
    return (status + f"<p>Expected calibration error measured here on the test set with temperature "
                     f"{c['temperature']:.3g}: <b>{pct(c['ece'])}</b> (15 equal-width bins).</p>"
            + image(c["pngs"]["reliability"], "reliability diagram"))


def _candidate_sets(c: dict) -> str:
    sets = c.get("sets")
    if not sets:
        return ("<p class=warn>No candidate sets in this run (it was fitted before they existed): under the "
                "confidence threshold the model gives its best guess only, with no set of labels it could be. "
                "<code>fmnist calibrate RUN</code> fits them.</p>")
    p, m, t = sets["params"], sets["metrics"], sets["params"]["coverage"]
    within = m["coverage"] >= t - sets["noise"]
    items = [("coverage reached", pct(m["coverage"])), ("target", pct(t)), ("mean set size", f"{m['mean_size']:.3f}"),
             ("singletons", pct(m["singleton_share"])),
             ("uncertain answers", pct(len(sets["uncertain"]) / m["n"]))]
    intro = (f"<p>When the model is not sure (best score under {sets['threshold']:.2f}) it answers with the "
             "labels the garment could be. The sets come from split conformal prediction on the validation "
             f"split ({esc(p['method'].upper())} score, k_reg {esc(p['k_reg'])}, lam {esc(p['lam'])}, fitted on "
             f"{p['n']:,} images: qhat {p['qhat']:.4f}) and hold the true label for at least {pct(t)} of images "
             f"like the validation ones. Measured here on {m['n']:,} test images:</p>")
    status = (f"<p class=note>Coverage {pct(m['coverage'])} against the {pct(t)} target: "
              + ("within" if within else "<b class=warn>below the target beyond</b>")
              + f" sampling noise (&plusmn;{pct(sets['noise'])}, two standard deviations of the test and "
              "calibration samples)."
              + (" The model is more accurate than the target, so each set is its top label alone and covers "
                 "more: no deterministic set can cover less." if p["qhat"] == 0 else "") + "</p>")
    rows = [[b["size"], b["count"], pct(b["share"]), pct(b["coverage"])] for b in m["by_size"]]
    by_size = table(["set size", "test images", "share", "coverage"], rows)
    n_unc = len(sets["uncertain"])
    if n_unc:
        gallery = (f"<p>{n_unc:,} test images ({pct(n_unc / m['n'])}) get an <b>uncertain</b> answer. Their "
                   "candidates (the set, widened to the two most likely labels) hold the true label for "
                   f"{pct(sets['uncertain_coverage'])} of them, with {sets['uncertain_mean_size']:.2f} labels on "
                   "average. The guarantee is over all images together: the hard ones are covered less often "
                   "than the easy ones.</p>" + image(c["pngs"]["uncertain"], "uncertain answers and their candidates"))
    else:
        gallery = (f"<p class=note>No test image is under the confidence threshold "
                   f"({sets['threshold']:.2f}): every answer here is a single label.</p>")
    return (intro + "<div class=headline>" + "".join(f"<div>{esc(k)}<b>{esc(v)}</b></div>" for k, v in items)
            + "</div>" + status + by_size + gallery
            + "<p class=note>Only the confidence gate is applied in this section: the blank and "
              "out-of-distribution gates, which refuse some genuine test images too, are not run here.</p>")


def _ood(c: dict) -> str:
    ood = c["meta"].get("ood")
    if not ood:
        return ("<p class=warn>No out-of-distribution detector: an image of something that is not one of the "
                "ten garments still gets one of their labels, sometimes with a high score.</p>")
    return "<p>Out-of-distribution detection, as stored in model.json:</p>" + key_values(ood)


def _limits(c: dict) -> str:
    m, meta, r = c["metrics"], c["meta"], c["rejection"]
    weakest = sorted(m["per_class"], key=lambda p: p["f1"])[:2]
    partners = {p["class"]: [q["b"] if q["a"] == p["class"] else q["a"] for q in m["most_confused"]
                             if p["class"] in (q["a"], q["b"])] for p in weakest}
    items = [
        "It knows ten classes only. Anything else gets one of their labels unless it is rejected.",
        "It rejects blank images (nothing stands out of the background): reason <code>blank</code>.",
        (f"It gives no single answer when the top score is below {r['threshold']:.2f} (verdict "
         "<code>uncertain</code>, reason <code>low_confidence</code>)"
         + (": it names the labels the garment could be instead (see Candidate sets)" if c.get("sets") else "")
         + f". On this test set that is {pct(r['refused'])} of the images; accuracy on the confident answers is "
         f"{pct(r['accepted_accuracy'])}."),
        "It was trained on centred 28x28 grayscale product photos, light garment on black. Other images are "
        "converted to that format first (inverted, cropped, resized), and it does worse on clutter, several "
        "garments in one picture, or clothes being worn.",
    ]
    if meta.get("ood"):
        items.append("Images flagged by the out-of-distribution detector are rejected (see above).")
    else:
        items.append("There is no out-of-distribution check: a photo of a cat gets a garment label.")
    for p in weakest:
        with_ = ", ".join(partners[p["class"]]) or "various classes"
        items.append(f"Weakest class: {esc(p['class'])} (F1 {pct(p['f1'])}), mostly confused with {esc(with_)}.")
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _validation(v: dict) -> dict:
    """model.json's metrics at the kept epoch, accuracies as percentages."""
    return {k.replace("_", " ").replace("acc", "accuracy"): pct(x) if k.endswith("acc") else
            (f"{x:.4f}" if _is_number(x) else x) for k, x in v.items()}


def _model_card(c: dict) -> str:
    from fmnist.fit.models import describe, model_names

    meta, m, s, env, data = c["meta"], c["metrics"], c["summary"], c["env"], c["data"]
    arch = meta.get("model")
    about = describe(arch) if arch in model_names() else "unknown architecture"
    trained = {"epochs run": s.get("epochs"), "kept epoch": meta.get("best_epoch"),
               "selected by": meta.get("select"),
               "training time": f"{s['train_seconds']:.0f} s" if s.get("train_seconds") else None,
               "created": meta.get("created")}
    machine = {k: env.get(k) for k in ("cpu", "device", "gpu", "threads", "precision", "torch", "python", "platform")
               if env.get(k) is not None}
    test = {"accuracy": pct(m["accuracy"]), "loss": f"{m['loss']:.4f}", "macro F1": pct(m["macro_f1"]),
            "images": m["n"], "mirrored TTA": c.get("meta", {}).get("tta", False)}
    if "accuracy_no_tta" in m:
        test["accuracy without TTA"] = pct(m["accuracy_no_tta"])
    sums = meta.get("data", {}).get("checksums") or {}
    checks = table(["file", "SHA-256 (decompressed)"], [[k, v] for k, v in sums.items()]) if sums else \
        "<p class=warn>No checksums recorded: the training data was not verified.</p>"
    used = (f"<p class=note>This report's test set: {esc(getattr(data, 'source', '?'))}"
            + ("" if getattr(data, "checksums", None) else " (not verified)") + ".</p>")
    return (f"<h3>Architecture</h3><p><code>{esc(arch)}</code>: {esc(about)}; "
            f"{meta.get('parameters', 0):,} parameters.</p>"
            f"<h3>Recipe</h3>{key_values(meta.get('recipe', {}))}"
            f"<details><summary>full config.json</summary>{key_values(c['config'])}</details>"
            f"<h3>Data</h3><p>Training data: {esc(meta.get('data', {}).get('source'))}</p>{checks}{used}"
            f"<h3>Test metrics</h3>{key_values(test)}"
            f"<h3>Validation (kept epoch)</h3>{key_values(_validation(meta.get('metrics', {})))}"
            f"<h3>Training</h3>{key_values(trained)}<h3>Machine</h3>{key_values(machine)}"
            f"<h3>Known limits</h3>{_limits(c)}")


def render_report(c: dict) -> str:
    run = c["run"]
    sections = [
        ("curves", "Learning curves", _curves(c)),
        ("confusion", "Confusion matrix and per-class scores", _confusion(c)),
        ("pairs", "Most-confused pairs", _pairs(c)),
        ("errors", "Worst misclassifications", image(c["pngs"]["misclassified"], "worst misclassifications")),
        ("calibration", "Calibration", _calibration(c)),
        ("sets", "Candidate sets", _candidate_sets(c)),
        ("ood", "Out-of-distribution inputs", _ood(c)),
        ("samples", "Sample predictions", image(c["pngs"]["samples"], "sample predictions")),
        ("card", "Model card", _model_card(c)),
    ]
    nav = "<nav>" + "".join(f"<a href='#{k}'>{esc(t)}</a>" for k, t, _ in sections) + "</nav>"
    body = "".join(f"<h2 id={k}>{esc(t)}</h2>\n{s}\n" for k, t, s in sections)
    title = f"fmnist report: {run.resolve().name}"
    return page(title, f"<h1>{esc(title)}</h1><p class=note>{esc(c['meta'].get('model'))} &middot; "
                       f"{esc(run)}</p>{_headline(c)}{nav}{body}")
