"""``fmnist calibrate RUN`` and ``fmnist ood-eval RUN``: fit and measure the trust layer of a run (:mod:`fmnist.fit.trust`).

``calibrate`` (re)fits the temperature, the OOD detector and the candidate sets of an existing run, as ``fmnist
train`` does at its end, and prints ECE / NLL / Brier before and after, and the sets' coverage and sizes, on the
validation and test splits.
``ood-eval`` scores every OOD set the way the Predictor sees it (:mod:`fmnist.fit.trust.evaluation`) and prints AUROC, FPR at 95 % TPR and the rejection rates at the run's threshold.
"""
from __future__ import annotations

import sys
from pathlib import Path

from fmnist.apps.cli.flags import add_data_flags
from fmnist.core.errors import InputError
from fmnist.core.runfolder import DETECTOR, MODEL_JSON, OOD_REPORT
from fmnist.fit.data import split_indices

EXTRAS_HINT = "pip install scikit-image scikit-learn"


def register(sub, formatter_class) -> None:
    from fmnist.core.conformal import DEFAULT_COVERAGE
    from fmnist.core.ood import DEFAULT_PARTS, DEFAULT_TARGET, PARTS
    from fmnist.fit.trust.fit import FIT_SIZE

    p = sub.add_parser("calibrate", formatter_class=formatter_class,
                       help="fit temperature scaling, the OOD detector and the candidate sets of a run "
                            "(done by train too)",
                       description="Fit the temperature on the validation split, the out-of-distribution "
                                   "detector on the training split (threshold on validation) and the candidate "
                                   "sets (split conformal, on validation), store them with the model, and print "
                                   "ECE / NLL / Brier before and after and the sets' coverage and sizes.")
    p.add_argument("run", help="run folder")
    p.add_argument("--target-accept", type=float, default=DEFAULT_TARGET,
                   help="fraction of genuine validation images the OOD threshold accepts")
    p.add_argument("--ood-parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated OOD scores combined, from: {', '.join(PARTS)}")
    p.add_argument("--fit-size", type=int, default=FIT_SIZE, help="training images that fit the OOD statistics")
    p.add_argument("--coverage", type=float, default=DEFAULT_COVERAGE,
                   help="share of images whose candidate set holds the true label, strictly between 0 and 1")
    add_data_flags(p)
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
    add_data_flags(p)
    p.set_defaults(func=cmd_ood_eval)


# --- calibrate -------------------------------------------------------------------------------------------------

def cmd_calibrate(args) -> int:
    from fmnist.core.backends import TorchBackend
    from fmnist.core.run import Run
    from fmnist.fit import runtime
    from fmnist.fit.evaluate import run_logits
    from fmnist.fit.sources import data_from_args
    from fmnist.fit.trust.calibration import calibration_metrics, format_calibration
    from fmnist.fit.trust.fit import describe, fit_trust

    if not 0 < args.coverage < 1:  # NaN fails this too
        raise InputError(f"--coverage must be strictly between 0 and 1, got {args.coverage}")
    parts = [s.strip() for s in args.ood_parts.split(",") if s.strip()]
    device = runtime.setup(args.threads or None, "cpu")
    run = Run.load(args.run, detector=False, complete=False)  # fails early on a bad run folder (this completes it)
    if not run.config:
        print(f"{run.path}: no config.json; assuming the default split (10,000 validation images, seed 0)")
    data = data_from_args(args, args.run)
    from fmnist.fit.sources import check_run_classes

    check_run_classes(run.class_names, data)
    summary = fit_trust(run.path, data, target_accept=args.target_accept, parts=parts, fit_size=args.fit_size,
                        device=device, coverage=args.coverage)
    print(describe(summary))
    if "skipped" in summary:
        return 1
    run = Run.load(run.path, detector=False)
    backend = TorchBackend(run.model(device))
    _, val_idx = split_indices(data.train_labels, run.config)
    splits = {"validation": (run_logits(backend, run, data.train_images[val_idx]), data.train_labels[val_idx]),
              "test": (run_logits(backend, run, data.test_images), data.test_labels)}
    rows = {split: (calibration_metrics(logits, labels, 1.0), calibration_metrics(logits, labels, run.temperature))
            for split, (logits, labels) in splits.items()}
    test = {f"{k}_{tag}": m[k] for tag, m in zip(("before", "after"), rows["test"]) for k in ("ece", "nll", "brier")}
    run.update(calibration={**run.calibration, "test": test})
    print(f"\ntemperature {run.temperature:.4f} (fitted on the validation split; ECE with 15 bins)")
    print(format_calibration(rows))
    print("\n" + _measure_candidate_sets(run, splits))
    print(f"\nwrote {run.path / MODEL_JSON} (calibration, ood, conformal) and {run.path / DETECTOR}")
    return 0


def _measure_candidate_sets(run, splits: dict) -> str:
    """Coverage, mean size and share of singletons of the run's candidate sets on each split, as a table; the
    test figures are stored with the sets (``model.json["conformal"]["test"]``)."""
    from fmnist.core import conformal
    from fmnist.core.forward import probabilities

    if run.conformal is None:
        return "no candidate sets: the validation split is too small for this coverage"
    figures = {split: conformal.set_metrics(conformal.candidate_sets(
        probabilities(logits.numpy(), run.temperature), run.conformal), labels.numpy())
        for split, (logits, labels) in splits.items()}
    run.update(conformal={**run.conformal, "test": figures["test"]})
    c = run.conformal
    lines = [f"candidate sets for {100 * c['coverage']:g} % coverage ({c['method'].upper()}, k_reg {c['k_reg']}, "
             f"lam {c['lam']:g}, qhat {c['qhat']:.4f}), fitted on {c['n']:,} validation images\n"
             "(in-sample there; the test split gives the honest figures)",
             f"{'split':<12}{'images':>8}{'coverage':>11}{'mean size':>11}{'singletons':>12}"]
    lines += [f"{split:<12}{m['n']:>8,}{100 * m['coverage']:>9.2f} %{m['mean_size']:>11.3f}"
              f"{100 * m['singleton_share']:>10.1f} %" for split, m in figures.items()]
    return "\n".join(lines)


# --- ood-eval --------------------------------------------------------------------------------------------------

def cmd_ood_eval(args) -> int:
    from fmnist.core.predict import Predictor
    from fmnist.core.runfolder import write_json
    from fmnist.fit import runtime
    from fmnist.fit.sources import data_from_args
    from fmnist.fit.trust import eval_sets
    from fmnist.fit.trust.evaluation import evaluate_sets, format_ood_table

    runtime.setup(args.threads or None, "cpu")
    predictor = Predictor.from_run(args.run)
    if predictor.detector is None:
        print(f"fmnist ood-eval: error: {args.run} has no OOD detector; fit one with `fmnist calibrate "
              f"{args.run}`", file=sys.stderr)
        return 2
    names = list(eval_sets.SETS) if args.sets == "all" else [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [n for n in names if n not in eval_sets.SETS]
    if unknown:
        raise InputError(f"unknown OOD set(s) {', '.join(unknown)}; choose from: {', '.join(eval_sets.SETS)}")
    if args.n < 1:
        raise InputError("--n must be >= 1")
    data = data_from_args(args, args.run)
    report, missing = evaluate_sets(predictor, data, names, args.n, args.seed)
    print(format_ood_table(report, args.by_part))
    for m in sorted(missing):
        print(f"skipped: {m}")
    if missing:
        print(f"install the optional extras for every set: {EXTRAS_HINT}")
    if not args.no_write:
        write_json(Path(args.run) / OOD_REPORT, report)
        print(f"\nwrote {Path(args.run) / OOD_REPORT}")
    return 0
