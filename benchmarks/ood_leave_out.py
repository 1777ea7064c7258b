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

from fmnist.core.predict import Predictor
from fmnist.core.run import Run
from fmnist.fit import runtime
from fmnist.fit.data import load_fashion_mnist, split_indices
from fmnist.fit.trust import eval_sets, leave_out
from fmnist.fit.trust.fit import FIT_SIZE, run_outputs, stratified_sample
from fmnist.fit.trust.metrics import auroc
from fmnist.fit.trust.ood_fit import fit_detector
from fmnist.fit.trust.outliers import COUNT, FAMILIES, drawn, procedural


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
    bench = Bench(run, load_fashion_mnist(args.data_dir, download=False))
    measured = bench.measured_sets(args.n, args.seed)
    all_in = bench.fit(families)
    test_pass = float(np.mean(bench.score(all_in, bench.test) <= all_in.threshold))
    rows = {name: {"all_in": bench.figures(all_in, out)} for name, out in measured.items()}
    for step in leave_out.plan(families):
        det = bench.fit(step["fit_families"])
        for name in list(step["sets"]) + [f"procedural: {f}" for f in step["left_out"]]:
            rows[name].setdefault("left_out", []).append({"without": step["left_out"],
                                                           **bench.figures(det, measured[name])})
    print(f"\n{args.run} ({run.model_name}): all-in fit on {', '.join(families)}; official test images through "
          f"the OOD gate {100 * test_pass:.1f} %")
    print_table(rows)
    print(f"({time.perf_counter() - started:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "families": families, "test_pass": test_pass, "sets": rows}, f, indent=1)
    return 0


class Bench:
    """The run's model and split, its outputs computed once, and detectors fitted on them as the trust fit does."""

    def __init__(self, run, data):
        self.run, self.data = run, data
        self.backend = run.backend("torch", "cpu")
        train_idx, val_idx = split_indices(data.train_labels, run.config)
        train_idx = train_idx[stratified_sample(data.train_labels[train_idx], FIT_SIZE, 0)]
        self.labels = data.train_labels[train_idx]
        self.train = run_outputs(run, self.backend, data.train_images[train_idx])
        self.val = run_outputs(run, self.backend, data.train_images[val_idx])
        self.test = self.outputs(data.test_images.numpy())

    def outputs(self, images):
        """(features, logits, pixels) of images prepared as the Predictor prepares them."""
        prepared = np.stack([Predictor.to_image28(np.asarray(i)) for i in images])
        return run_outputs(self.run, self.backend, torch.from_numpy(prepared))

    def measured_sets(self, n: int, seed: int) -> dict:
        """Outputs of every ood-eval set and of fresh draws of each family (never the fits' seed)."""
        out = {}
        for name in eval_sets.SETS:
            try:
                out[name] = self.outputs(eval_sets.build(name, n, self.data.test_images.numpy(), seed=seed))
            except eval_sets.MissingExtra as e:
                print(f"skipped {name}: {e}")
        fresh, kinds = drawn(n * len(FAMILIES), seed + 1000)
        for f in FAMILIES:
            out[f"procedural: {f}"] = self.outputs(fresh[np.array(kinds) == f][:n])
        return out

    def fit(self, fit_families):
        (tf, tl, tp), (vf, vl, vp) = self.train, self.val
        outliers = run_outputs(self.run, self.backend, torch.from_numpy(procedural(COUNT, 0, fit_families)))
        return fit_detector(tf, self.labels, tp, vf, vp, len(self.run.class_names), val_logits=vl,
                            train_logits=tl, outliers=outliers)

    @staticmethod
    def score(det, out):
        feats, logits, pixels = out
        return det.score(feats, pixels, logits)

    def figures(self, det, out) -> dict:
        genuine, other = self.score(det, self.test), self.score(det, out)
        return {"refused": float(np.mean(~(other <= det.threshold))),  # NaN counts as refused
                "auroc": auroc(torch.from_numpy(genuine), torch.from_numpy(other))}


def print_table(rows: dict) -> None:
    """One line per set, then the worst all-in set and the worst left-out ood-eval set."""
    print("| set | all-in: refused (AUROC) | left out: refused (AUROC), the worst fit | fitted without |\n"
          "|---|---|---|---|")
    worst_in, worst_out = [], []
    for name, r in rows.items():
        a = r["all_in"]
        worst_in.append((a["refused"], name))
        cell, without, left = "as all-in (nothing in the fit imitates it)", "-", a
        if "left_out" in r:
            left = min(r["left_out"], key=lambda x: x["refused"])
            cell, without = f"{100 * left['refused']:.1f} % ({left['auroc']:.3f})", " + ".join(left["without"])
        if "left_out" in r or not name.startswith("procedural"):
            worst_out.append((left["refused"], name))
        print(f"| {name} | {100 * a['refused']:.1f} % ({a['auroc']:.3f}) | {cell} | {without} |")
    (wi, ni), (wo, no) = min(worst_in), min(worst_out)
    print(f"worst all-in: {ni} {100 * wi:.1f} %; worst left-out: {no} {100 * wo:.1f} %")


if __name__ == "__main__":
    raise SystemExit(main())
