"""Leave-one-family-out for a run's OOD detector: all-in and left-out refusal rates, side by side.

For the run's own model (its kept weights, the training and validation split of its config.json), fits the
detector as ``fmnist calibrate`` does, once with every procedural family (all-in) and once per group of
:func:`fmnist.fit.trust.leave_out.plan` *without* that group; each left-out fit is measured on fresh draws of the
families it lacked (another seed) and on the ``ood-eval`` sets they imitate. Prints, per set, the share refused by
the OOD gate at the fit's own threshold and the AUROC against the official test images, for the all-in fit and
for the fit that left the set's imitators out; then the worst of each. Needs the ``ood`` extra (the sets).

    python benchmarks/ood_leave_out.py runs/latest
    python benchmarks/ood_leave_out.py runs/fast-s0 --families fractal,plain,dead-leaves   # fewer families
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from fmnist.core.preprocess import to_dataset_format
from fmnist.core.run import Run
from fmnist.fit import runtime
from fmnist.fit.data import load_fashion_mnist, split_indices
from fmnist.fit.trust import eval_sets, leave_out
from fmnist.fit.trust.fit import FIT_SIZE, run_outputs, stratified_sample
from fmnist.fit.trust.metrics import auroc
from fmnist.fit.trust.ood_fit import fit_detector
from fmnist.fit.trust.outliers import COUNT, FAMILIES, drawn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder")
    ap.add_argument("-n", type=int, default=1000, help="images per ood-eval set and per family's draws (default: 1000)")
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"procedural families of the all-in fit (default: {','.join(FAMILIES)})")
    ap.add_argument("--seed", type=int, default=0, help="seed of the sets (the fits use the run's) (default: 0)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual search)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    started = time.perf_counter()
    runtime.setup(None, "cpu")
    run = Run.load(args.run, detector=False)
    backend = run.backend("torch", "cpu")
    data = load_fashion_mnist(args.data_dir, download=False)
    train_idx, val_idx = split_indices(data.train_labels, run.config)
    train_idx = train_idx[stratified_sample(data.train_labels[train_idx], FIT_SIZE, 0)]
    labels = data.train_labels[train_idx]
    train, val = run_outputs(run, backend, data.train_images[train_idx]), run_outputs(run, backend, data.train_images[val_idx])

    def outputs(images):
        return run_outputs(run, backend, torch.from_numpy(np.stack([to_dataset_format(np.asarray(i)) for i in images])))

    def fit(fit_families):
        outliers = run_outputs(run, backend, torch.from_numpy(drawn(COUNT, 0, fit_families)[0].copy()))
        return fit_detector(train[0], labels, train[2], val[0], val[2], len(run.class_names), val_logits=val[1],
                            train_logits=train[1], outliers=outliers)

    test = outputs(data.test_images.numpy())
    measured = {}
    for name in eval_sets.SETS:
        try:
            measured[name] = outputs(eval_sets.build(name, args.n, data.test_images.numpy(), seed=args.seed))
        except eval_sets.MissingExtra as e:
            print(f"skipped {name}: {e}")
    fresh, kinds = drawn(args.n * len(FAMILIES), args.seed + 1000)  # never the fits' seed
    for f in FAMILIES:
        measured[f"procedural: {f}"] = outputs(fresh[np.array(kinds) == f][:args.n])

    def figures(det, name):
        genuine, other = det.score(test[0], test[2], test[1]), det.score(*_fpl(measured[name]))
        return {"refused": float(np.mean(~(other <= det.threshold))),
                "auroc": auroc(torch.from_numpy(genuine), torch.from_numpy(other))}

    all_in = fit(families)
    genuine_pass = float(np.mean(all_in.score(test[0], test[2], test[1]) <= all_in.threshold))
    rows = {name: {"all_in": figures(all_in, name)} for name in measured}
    for step in leave_out.plan(families):
        det = fit(step["fit_families"])
        for name in list(step["sets"]) + [f"procedural: {f}" for f in step["draws"]]:
            rows[name].setdefault("left_out", []).append({"without": step["left_out"], **figures(det, name)})

    print(f"\n{args.run} ({run.model_name}): all-in fit on {', '.join(families)}; official test images through "
          f"the OOD gate {100 * genuine_pass:.1f} %")
    print("| set | all-in: refused (AUROC) | left out: refused (AUROC), the worst fit | fitted without |\n"
          "|---|---|---|---|")
    worst_in, worst_out = None, None
    for name, r in rows.items():
        a = r["all_in"]
        worst_in = min(worst_in or (a["refused"], name), (a["refused"], name))
        cell, without = "as all-in (nothing in the fit imitates it)", "-"
        if "left_out" in r:
            w = min(r["left_out"], key=lambda x: x["refused"])
            cell, without = f"{100 * w['refused']:.1f} % ({w['auroc']:.3f})", " + ".join(w["without"])
            worst_out = min(worst_out or (w["refused"], name), (w["refused"], name))
        elif not name.startswith("procedural"):
            worst_out = min(worst_out or (a["refused"], name), (a["refused"], name))
        print(f"| {name} | {100 * a['refused']:.1f} % ({a['auroc']:.3f}) | {cell} | {without} |")
    print(f"worst all-in: {worst_in[1]} {100 * worst_in[0]:.1f} %; worst left-out: {worst_out[1]} "
          f"{100 * worst_out[0]:.1f} %  ({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "families": families, "test_pass": genuine_pass, "sets": rows}, f, indent=1)
    return 0


def _fpl(out):
    """(features, pixels, logits) in Detector.score's order from run_outputs' (features, logits, pixels)."""
    return out[0], out[2], out[1]


if __name__ == "__main__":
    raise SystemExit(main())
