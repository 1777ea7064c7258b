"""Garments imperfectly shown: how often a run refuses them, and how often it is right about them.

Takes a fixed random sample of the official test images, corrupts each with every family of
:mod:`fmnist.fit.trust.corruptions` (one mild draw per image) and sends them through
``fmnist.load(run).predict_batch``, as a user's images would go. Prints, for clean images and each family: the
share refused (verdict ``refused``, any reason), answered as uncertain, and the top label's accuracy over all
images and over those not refused. Goal (docs/trust.md): at most 10 % refused and within 4 points of clean
accuracy, for each family. Families marked * are never drawn by a detector's fit.

    python benchmarks/corruptions.py runs/latest
    python benchmarks/corruptions.py runs/fast-s0 runs/default-s0 -n 2000 --json out.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

import fmnist
from fmnist.fit.data import load_fashion_mnist
from fmnist.fit.trust.corruptions import HELD_OUT, KINDS, corrupt


def measure(predictor, images: np.ndarray, labels: np.ndarray) -> dict:
    results = predictor.predict_batch(list(images))
    verdicts = np.array([r.get("verdict", "error") for r in results])
    right = np.array([r.get("class_id") == y for r, y in zip(results, labels)])
    kept = verdicts != "refused"
    return {"refused": float((~kept).mean()), "uncertain": float((verdicts == "uncertain").mean()),
            "accuracy": float(right.mean()), "accuracy_not_refused": float(right[kept].mean()) if kept.any() else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders")
    ap.add_argument("-n", type=int, default=2000, help="test images per family (default: 2000)")
    ap.add_argument("--seed", type=int, default=0, help="sample and corruption seed (default: 0)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (default: the usual search)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    data = load_fashion_mnist(args.data_dir, download=False)
    pick = np.random.default_rng(args.seed).permutation(len(data.test_labels))[:args.n]
    images, labels = data.test_images.numpy()[pick], data.test_labels.numpy()[pick]
    sets = {"clean": images, **{k: corrupt(images, k, args.seed) for k in KINDS}}
    out = {}
    for run in args.runs:
        predictor = fmnist.load(run)
        rows = out[run] = {name: measure(predictor, x, labels) for name, x in sets.items()}
        clean = rows["clean"]["accuracy"]
        print(f"\n{run}: {len(labels)} test images per family")
        print("| family | refused | uncertain | accuracy | not refused: accuracy | vs clean |\n|---|---|---|---|---|---|")
        for name, r in rows.items():
            mark = " *" if name in HELD_OUT else ""
            print(f"| {name}{mark} | {100 * r['refused']:.1f} % | {100 * r['uncertain']:.1f} % | "
                  f"{100 * r['accuracy']:.1f} % | {100 * r['accuracy_not_refused']:.1f} % | "
                  f"{100 * (r['accuracy'] - clean):+.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
