"""``fmnist calibrate RUN`` and ``fmnist ood-eval RUN``: fit and measure the trust layer of a run.

``calibrate`` (re)fits the temperature and the OOD detector of an existing run, as ``fmnist train`` does at
its end, and prints ECE / NLL / Brier before and after on the validation and test splits.
``ood-eval`` scores every OOD set the way the Predictor sees it (``Predictor.to_image28``, then one forward
pass) and prints AUROC, FPR at 95 % TPR and the rejection rates at the run's threshold.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

EXTRAS_HINT = "pip install scikit-image scikit-learn"


def register(sub, formatter_class) -> None:
    from fmnist.ood import DEFAULT_PARTS, DEFAULT_TARGET, PARTS
    from fmnist.trust import FIT_SIZE

    p = sub.add_parser("calibrate", formatter_class=formatter_class,
                       help="fit temperature scaling and the OOD detector of a run (done by train too)",
                       description="Fit the temperature on the validation split and the out-of-distribution "
                                   "detector on the training split (threshold on validation), store both with "
                                   "the model, and print ECE / NLL / Brier before and after.")
    p.add_argument("run", help="run folder")
    p.add_argument("--target-accept", type=float, default=DEFAULT_TARGET,
                   help="fraction of genuine validation images the OOD threshold accepts")
    p.add_argument("--ood-parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated OOD scores combined, from: {', '.join(PARTS)}")
    p.add_argument("--fit-size", type=int, default=FIT_SIZE, help="training images that fit the OOD statistics")
    _data_flags(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("ood-eval", formatter_class=formatter_class,
                       help="measure out-of-distribution rejection on noise, photos, digits, letters, ...",
                       description="Score out-of-distribution sets built offline (noise, constant and rotated "
                                   "images, photo crops, digits, letters, faces, an animal photo) against the "
                                   "test set, as the Predictor sees them. Photos and faces need scikit-image, "
                                   f"digits scikit-learn ({EXTRAS_HINT}).")
    p.add_argument("run", help="run folder (with an OOD detector: see `fmnist calibrate`)")
    p.add_argument("--n", type=int, default=1000, help="images per OOD set")
    p.add_argument("--sets", default="all", help="comma-separated set names, or all")
    p.add_argument("--seed", type=int, default=0, help="random seed of the generated sets")
    p.add_argument("--by-part", action="store_true", help="also print the AUROC of each OOD score alone")
    p.add_argument("--no-write", action="store_true", help="do not write RUN/ood_eval.json")
    _data_flags(p)
    p.set_defaults(func=cmd_ood_eval)


def _data_flags(p) -> None:
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files (default: search)")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files that are not the official ones")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = physical cores)")


# --- calibrate -------------------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    from fmnist import runtime
    from fmnist.calibrate import calibration_metrics, format_calibration
    from fmnist.checkpoint import load_model, read_json, write_json
    from fmnist.data import load_fashion_mnist, stratified_split
    from fmnist.trust import describe, fit_trust, split_outputs

    run = Path(args.run)
    parts = [s.strip() for s in args.ood_parts.split(",") if s.strip()]
    device = runtime.setup(args.threads or None, "cpu")
    load_model(run)  # fails early, with a clear message, on a bad run folder
    cfg = read_json(run / "config.json") if (run / "config.json").exists() else {}
    if not cfg:
        print(f"{run}: no config.json; assuming the default split (10,000 validation images, seed 0)")
    data = load_fashion_mnist(args.data_dir, verify=not args.no_verify)
    train_idx, val_idx = stratified_split(data.train_labels, int(cfg.get("val_size", 10_000)), int(cfg.get("seed", 0)))
    if cfg.get("subset"):
        train_idx = train_idx[: int(cfg["subset"])]
    summary = fit_trust(run, data, train_idx, val_idx, target_accept=args.target_accept, parts=parts,
                        fit_size=args.fit_size, device=device)
    print(describe(summary))
    if "skipped" in summary:
        return 1
    model, meta = load_model(run)
    temperature = meta["calibration"]["temperature"]
    _, val_logits, _ = split_outputs(model, meta, data.train_images[val_idx])
    _, test_logits, _ = split_outputs(model, meta, data.test_images)
    rows = {split: (calibration_metrics(logits, labels, 1.0), calibration_metrics(logits, labels, temperature))
            for split, logits, labels in (("validation", val_logits, data.train_labels[val_idx]),
                                          ("test", test_logits, data.test_labels))}
    meta["calibration"]["test"] = {f"{k}_{tag}": m[k] for tag, m in zip(("before", "after"), rows["test"])
                                   for k in ("ece", "nll", "brier")}
    write_json(run / "model.json", meta)
    print(f"\ntemperature {temperature:.4f} (fitted on the validation split; ECE with 15 bins)")
    print(format_calibration(rows))
    print(f"\nwrote {run / 'model.json'} (calibration, ood) and {run / 'ood.safetensors'}")
    return 0


# --- ood-eval --------------------------------------------------------------------------------------------------

def cmd_ood_eval(args) -> int:
    from fmnist import ood_sets, runtime
    from fmnist.checkpoint import write_json
    from fmnist.data import load_fashion_mnist
    from fmnist.predict import Predictor

    runtime.setup(args.threads or None, "cpu")
    predictor = Predictor.from_run(args.run)
    if predictor.detector is None:
        print(f"fmnist ood-eval: error: {args.run} has no OOD detector; fit one with `fmnist calibrate "
              f"{args.run}`", file=sys.stderr)
        return 2
    names = list(ood_sets.SETS) if args.sets == "all" else [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in ood_sets.SETS]
    if unknown:
        raise ValueError(f"unknown OOD set(s) {', '.join(unknown)}; choose from: {', '.join(ood_sets.SETS)}")
    if args.n < 1:
        raise ValueError("--n must be >= 1")
    data = load_fashion_mnist(args.data_dir, verify=not args.no_verify)
    test = data.test_images.numpy()
    genuine = _score(predictor, list(test))
    genuine["correct"] = genuine["pred"] == data.test_labels.numpy()
    rows, missing = {}, set()
    shop = ood_sets.shop_photos(test, args.n, np.random.default_rng([args.seed, 99]))
    rows["shop-photos"] = _row(genuine, _score(predictor, shop), predictor, ood=False)
    for name in names:
        try:
            images = ood_sets.build(name, args.n, test, seed=args.seed)
        except ood_sets.MissingExtra as e:
            missing.add(str(e))
            continue
        scored = _score(predictor, list(images))
        rows[name] = _row(genuine, scored, predictor, ood=True)
        if name == "animal":  # its first image is the whole cat photo: the "bear" check
            rows[name]["whole_photo"] = {"reason": scored["reasons"][0], "ood_score": float(scored["ood"][0])}
    report = _report(predictor, genuine, rows, data.test_labels.numpy())
    print(format_ood_table(report, args.by_part))
    for m in sorted(missing):
        print(f"skipped: {m}")
    if missing:
        print(f"install the optional extras for every set: {EXTRAS_HINT}")
    if not args.no_write:
        write_json(Path(args.run) / "ood_eval.json", report)
        print(f"\nwrote {Path(args.run) / 'ood_eval.json'}")
    return 0


def _score(predictor, items) -> dict:
    """What ood-eval needs of images sent to the Predictor: OOD scores (total and per part), reasons, classes.

    The same steps as ``Predictor.analyse`` (to_image28, preprocess, one forward pass, detector), kept open
    here to also read the score of each part.
    """
    import torch

    from fmnist.ood import features_and_logits, pixels01
    from fmnist.preprocess import preprocess

    imgs = np.stack([predictor.to_image28(it) for it in items])
    feats, logits = features_and_logits(predictor.model, preprocess(imgs, predictor.spec), tta=predictor.tta)
    probs = torch.softmax(logits / predictor.temperature, dim=1)
    parts = predictor.detector.standardised(feats, pixels01(imgs), logits)
    ood = predictor.detector.combine(parts)
    conf = probs.max(1).values
    reasons = [predictor.reason(im, float(c), float(s)) for im, c, s in zip(imgs, conf, ood)]
    return {"ood": ood.numpy(), "reasons": reasons, "pred": probs.argmax(1).numpy(),
            "parts": {k: v.numpy() for k, v in parts.items()}}


def _row(genuine: dict, s: dict, predictor, ood: bool) -> dict:
    import torch

    from fmnist.ood import auroc, fpr_at_tpr

    g, o = torch.from_numpy(genuine["ood"]), torch.from_numpy(s["ood"])
    row = {
        "n": len(s["ood"]),
        "auroc": auroc(g, o),
        "fpr_at_95_tpr": fpr_at_tpr(g, o, 0.95),
        "rejected_ood": float(np.mean(s["ood"] > predictor.ood_threshold)),
        "rejected_any": float(np.mean([r is not None for r in s["reasons"]])),
        "reasons": {r or "accepted": int(sum(x == r for x in s["reasons"])) for r in set(s["reasons"])},
        "kind": "ood" if ood else "genuine",
    }
    if s["parts"] is not None:
        row["auroc_by_part"] = {k: auroc(torch.from_numpy(genuine["parts"][k]), torch.from_numpy(v))
                                for k, v in s["parts"].items()}
    return row


def _report(predictor, genuine: dict, rows: dict, labels: np.ndarray) -> dict:
    accepted = np.array([r is None for r in genuine["reasons"]])
    ood_ok = genuine["ood"] <= predictor.ood_threshold
    per_class = {predictor.class_names[c]: float(accepted[labels == c].mean()) for c in range(len(predictor.class_names))}
    from fmnist import ood_sets

    return {
        "run": str(predictor.run_dir),
        "model": predictor.meta["model"],
        "ood": {k: predictor.detector.config.get(k) for k in ("method", "threshold", "target_accept", "val_accept")},
        "test": {
            "n": len(labels),
            "accepted_ood_gate": float(ood_ok.mean()),
            "accepted_any": float(accepted.mean()),
            "accuracy": float(genuine["correct"].mean()),
            "accuracy_accepted": float(genuine["correct"][accepted].mean()) if accepted.any() else None,
            "accepted_by_class": per_class,
        },
        "sets": rows,
        "unseen": [n for n in ood_sets.UNSEEN if n in rows],
    }


def format_ood_table(report: dict, by_part: bool = False) -> str:
    t = report["test"]
    lines = [
        (f"{report['run']} ({report['model']}): OOD detector '{report['ood']['method']}', threshold "
         f"{report['ood']['threshold']:.3f} (accepts {100 * report['ood']['val_accept']:.1f} % of validation images)"),
        (f"test set: {t['n']} images, {100 * t['accepted_ood_gate']:.1f} % pass the OOD gate, "
         f"{100 * t['accepted_any']:.1f} % accepted overall; accuracy {100 * t['accuracy']:.2f} % "
         f"(on accepted images {100 * (t['accuracy_accepted'] or 0):.2f} %)"),
        "accepted per class: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in t["accepted_by_class"].items()),
        "",
        f"{'set':<18}{'n':>6}{'AUROC':>9}{'FPR@95%TPR':>12}{'rejected: OOD':>15}{'any reason':>12}",
    ]
    for name, r in report["sets"].items():
        mark = " *" if name in report["unseen"] else ("  (genuine)" if r["kind"] == "genuine" else "")
        lines.append(f"{name:<18}{r['n']:>6}{r['auroc']:>9.4f}{100 * r['fpr_at_95_tpr']:>11.1f}%"
                     f"{100 * r['rejected_ood']:>14.1f}%{100 * r['rejected_any']:>11.1f}%{mark}")
    if "whole_photo" in report["sets"].get("animal", {}):
        cat = report["sets"]["animal"]["whole_photo"]
        lines.append(f"the whole cat photo: {'accepted' if cat['reason'] is None else 'refused, ' + cat['reason']} "
                     f"(ood_score {cat['ood_score']:.2f})")
    lines += ["",
              ("AUROC: genuine test images vs the set, by OOD score. FPR@95%TPR: share of the set accepted when 95 % "
               "of test images are. rejected: at the run's threshold, by the OOD gate alone / for any reason "
               "(blank, out_of_distribution, low_confidence). shop-photos: test garments re-drawn as product "
               "photos (should be accepted). * not used to choose the detector's scores (see the README).")]
    if by_part:
        parts = list(next(iter(report["sets"].values())).get("auroc_by_part", {}))
        lines += ["", "AUROC of each OOD score alone:", f"{'set':<18}" + "".join(f"{p:>13}" for p in parts)]
        for name, r in report["sets"].items():
            lines.append(f"{name:<18}" + "".join(f"{r['auroc_by_part'][p]:>13.4f}" for p in parts))
    return "\n".join(lines)
