"""``fmnist ood-eval``'s measurement: genuine test images against out-of-distribution sets, scored exactly as
the Predictor scores an upload (``Predictor.to_image28``, then ``Predictor.analyse``: one forward pass and
the detector), with AUROC, FPR at 95 % TPR and the rejection rates at the run's threshold."""
from __future__ import annotations

import numpy as np
import torch

from fmnist.core.conformal import VERDICTS
from fmnist.core.progress import Bar
from fmnist.fit.trust import eval_sets
from fmnist.fit.trust.metrics import auroc, fpr_at_tpr


def score(predictor, items) -> dict:
    """What ood-eval needs of images sent to the Predictor: OOD scores (total and per part), reasons, classes."""
    imgs = np.stack([predictor.to_image28(it) for it in items])
    analysis = predictor.analyse(imgs, parts=True)
    judged = [predictor.judge(im, p, float(s)) for im, p, s in zip(imgs, analysis.probs, analysis.ood)]
    return {"ood": analysis.ood, "reasons": [r for _, r, _ in judged], "verdicts": [v for v, _, _ in judged],
            "pred": analysis.probs.argmax(1),
            "parts": {k: np.asarray(v) for k, v in analysis.parts.items()}}


def evaluate_sets(predictor, data, names, n: int, seed: int) -> tuple[dict, set]:
    """The ood-eval report of every named set (and the shop photos of test garments); missing extras."""
    test = data.test_images.numpy()
    genuine = score(predictor, list(test))
    genuine["correct"] = genuine["pred"] == data.test_labels.numpy()
    rows, missing = {}, set()
    bar = Bar(1 + len(names), f"ood-eval ({n:,} images per set)", unit="set")
    bar.update(0, set="shop-photos")
    shop = eval_sets.shop_photos(test, n, np.random.default_rng([seed, 99]))
    rows["shop-photos"] = row(genuine, score(predictor, shop), predictor, ood=False)
    for name in names:
        bar.update(1, set=name)
        try:
            images = eval_sets.build(name, n, test, seed=seed)
        except eval_sets.MissingExtra as e:
            missing.add(str(e))
            continue
        scored = score(predictor, list(images))
        rows[name] = row(genuine, scored, predictor, ood=True)
        if name == "animal":  # its first image is the whole cat photo: the "bear" check
            rows[name]["whole_photo"] = {"reason": scored["reasons"][0], "ood_score": float(scored["ood"][0])}
    bar.update(1)
    bar.close()
    return report(predictor, genuine, rows, data.test_labels.numpy()), missing


def verdict_shares(verdicts) -> dict:
    """Share of each verdict (answer, uncertain, refused) among a set's images."""
    v = np.asarray(verdicts)
    return {name: float(np.mean(v == name)) for name in VERDICTS}


def row(genuine: dict, s: dict, predictor, ood: bool) -> dict:
    g, o = torch.from_numpy(genuine["ood"]), torch.from_numpy(s["ood"])
    out = {
        "n": len(s["ood"]),
        "auroc": auroc(g, o),
        "fpr_at_95_tpr": fpr_at_tpr(g, o, 0.95),
        "rejected_ood": float(np.mean(~(s["ood"] <= predictor.ood_threshold))),  # NaN counts as rejected
        "rejected_any": float(np.mean([r is not None for r in s["reasons"]])),
        "reasons": {r or "accepted": int(sum(x == r for x in s["reasons"])) for r in set(s["reasons"])},
        "verdicts": verdict_shares(s["verdicts"]),
        "kind": "ood" if ood else "genuine",
    }
    out["auroc_by_part"] = {k: auroc(torch.from_numpy(genuine["parts"][k]), torch.from_numpy(v))
                            for k, v in s["parts"].items()}
    return out


def report(predictor, genuine: dict, rows: dict, labels: np.ndarray) -> dict:
    accepted = np.array([r is None for r in genuine["reasons"]])
    ood_ok = genuine["ood"] <= predictor.ood_threshold
    gates_ok = np.array([r not in ("blank", "out_of_distribution") for r in genuine["reasons"]])
    per_class = {predictor.class_names[c]: float(accepted[labels == c].mean()) for c in range(len(predictor.class_names))}
    return {
        "run": str(predictor.run.path),
        "model": predictor.run.model_name,
        "ood": {k: predictor.detector.config.get(k) for k in ("method", "threshold", "target_accept", "val_accept")},
        "test": {
            "n": len(labels),
            "accepted_ood_gate": float(ood_ok.mean()),
            "passed_gates": float(gates_ok.mean()),  # neither blank nor out of distribution
            "accepted_any": float(accepted.mean()),
            "accuracy": float(genuine["correct"].mean()),
            "accuracy_accepted": float(genuine["correct"][accepted].mean()) if accepted.any() else None,
            "accepted_by_class": per_class,
            "verdicts": verdict_shares(genuine["verdicts"]),
        },
        "sets": rows,
        "unseen": [n for n in eval_sets.UNSEEN if n in rows],
    }


def format_ood_table(report: dict, by_part: bool = False) -> str:
    t = report["test"]
    lines = [
        (f"{report['run']} ({report['model']}): OOD detector '{report['ood']['method']}', threshold "
         f"{report['ood']['threshold']:.3f} (accepts {100 * report['ood']['val_accept']:.1f} % of validation images)"),
        (f"test set: {t['n']} images, {100 * t['accepted_ood_gate']:.1f} % pass the OOD gate "
         f"({100 * t['passed_gates']:.1f} % the blank and OOD gates), "
         f"{100 * t['accepted_any']:.1f} % accepted overall; accuracy {100 * t['accuracy']:.2f} % "
         f"(on accepted images {100 * (t['accuracy_accepted'] or 0):.2f} %)"),
        "accepted per class: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in t["accepted_by_class"].items()),
        "",
        f"{'set':<18}{'n':>6}{'AUROC':>9}{'FPR@95%TPR':>12}{'rejected: OOD':>15}{'any reason':>12}"
        f"{'answer':>9}{'uncertain':>11}{'refused':>9}",
    ]
    for name, r in report["sets"].items():
        mark = " *" if name in report["unseen"] else ("  (genuine)" if r["kind"] == "genuine" else "")
        lines.append(f"{name:<18}{r['n']:>6}{r['auroc']:>9.4f}{100 * r['fpr_at_95_tpr']:>11.1f}%"
                     f"{100 * r['rejected_ood']:>14.1f}%{100 * r['rejected_any']:>11.1f}%"
                     + "".join(f"{100 * r['verdicts'][v]:>{w}.1f}%" for v, w in zip(VERDICTS, (8, 10, 8))) + mark)
    if "whole_photo" in report["sets"].get("animal", {}):
        cat = report["sets"]["animal"]["whole_photo"]
        lines.append(f"the whole cat photo: {'accepted' if cat['reason'] is None else 'refused, ' + cat['reason']} "
                     f"(ood_score {cat['ood_score']:.2f})")
    lines += ["",
              ("AUROC: genuine test images vs the set, by OOD score. FPR@95%TPR: share of the set accepted when 95 % "
               "of test images are. rejected: at the run's threshold, by the OOD gate alone / for any reason "
               "(blank, out_of_distribution, low_confidence). answer / uncertain (a candidate set) / refused: the "
               "verdicts. shop-photos: test garments re-drawn as product "
               "photos (should be accepted). * not used to choose the detector's scores (see docs/trust.md).")]
    if by_part:
        parts = list(next(iter(report["sets"].values())).get("auroc_by_part", {}))
        lines += ["", "AUROC of each OOD score alone:", f"{'set':<18}" + "".join(f"{p:>13}" for p in parts)]
        for name, r in report["sets"].items():
            lines.append(f"{name:<18}" + "".join(f"{r['auroc_by_part'][p]:>13.4f}" for p in parts))
    return "\n".join(lines)
