"""Training speed and accuracy of each preset against seed A's own recipe, measured in one run.

For each preset and seed: wall time of `train` (data already in memory), seconds per epoch, training images per
second, test accuracy (with the run's TTA setting), and the time to reach 91.6 % validation accuracy (seed A's
reported test accuracy) read off history.csv. Time-to-target uses the validation split, never the test set.

    python benchmarks/train_speed.py --presets fast,default --seeds 0,1,2
    python benchmarks/train_speed.py --presets seed-a --seeds 0 --stop-at-target   # seed A's reference

Prints one line per run, then a table with mean ± std over seeds and the time-to-target ratio against seed-a
(when both are in the same invocation).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fmnist.data import load_fashion_mnist
from fmnist.evaluate import evaluate_run
from fmnist.runtime import environment
from fmnist.train import PRESETS, resolve_config, train

TARGET = 0.916


def time_to_target(history_csv: Path, target: float) -> float | None:
    with open(history_csv) as f:
        for row in csv.DictReader(f):
            if float(row["val_acc"]) >= target:
                return float(row["elapsed"])
    return None


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="fast,default,tiny,best,seed-a",
                    help="comma-separated presets (default: fast,default,tiny,best,seed-a)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    ap.add_argument("--reference-seeds", default=None,
                    help="seeds for seed A's recipe, which is slow (default: --seeds)")
    ap.add_argument("--stop-at-target", action="store_true",
                    help="stop epoch-based presets (seed-a) once val accuracy reaches 91.6 %% (default: off)")
    ap.add_argument("--out", default=None, help="keep run folders here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file (default: none)")
    args = ap.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    data = load_fashion_mnist()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fmnist-bench-"))
    env = environment()
    print(f"machine: {env['cpu']}, {env['physical_cores']} cores, torch {env['torch']}, "
          f"capability {env['cpu_capability']}", flush=True)

    results: dict[str, list[dict]] = {}
    ref_seeds = [int(s) for s in args.reference_seeds.split(",")] if args.reference_seeds else seeds
    for preset in presets:
        for seed in (ref_seeds if preset == "seed-a" else seeds):
            cfg = resolve_config(preset, seed=seed)
            out = root / f"{preset}-s{seed}"

            def stop_at_target(epoch, row, _cfg=cfg):
                return args.stop_at_target and not _cfg.time_budget and row["val_acc"] >= TARGET

            t0 = time.monotonic()
            summary = train(cfg, out=out, data=data, quiet=True, on_epoch_end=stop_at_target)
            wall = time.monotonic() - t0
            hist = list(csv.DictReader(open(out / "history.csv")))
            epochs = len(hist)
            train_imgs = int(hist[-1]["step"]) * cfg.batch_size  # the last epoch of a budgeted run is partial
            epoch_imgs = cfg.subset or (len(data.train_labels) - cfg.val_size)
            m = evaluate_run(out, data=data, write=True)
            r = {"preset": preset, "seed": seed, "model": cfg.model, "wall_s": wall, "epochs": epochs,
                 # per full pass over the training split, validation included (elapsed counts it)
                 "s_per_epoch": epoch_imgs * float(hist[-1]["elapsed"]) / train_imgs,
                 "img_per_s": train_imgs / float(hist[-1]["elapsed"]),
                 "test_acc": m["accuracy"], "test_acc_no_tta": m.get("accuracy_no_tta", m["accuracy"]),
                 "time_to_target_s": time_to_target(out / "history.csv", TARGET),
                 "best_epoch": summary["best_epoch"]}
            results.setdefault(preset, []).append(r)
            ttt = r["time_to_target_s"]
            print(f"{preset:<10} seed {seed}  {cfg.model:<10} wall {wall:7.1f} s  {epochs:3d} epochs  "
                  f"{r['s_per_epoch']:6.1f} s/epoch  {r['img_per_s']:6.0f} img/s  test {100 * r['test_acc']:.2f} % "
                  f"(no TTA {100 * r['test_acc_no_tta']:.2f} %)  to 91.6 % val: "
                  f"{'not reached' if ttt is None else f'{ttt:.0f} s'}", flush=True)

    ref = results.get("seed-a")
    ref_ttt = [r["time_to_target_s"] for r in ref or [] if r["time_to_target_s"] is not None]
    print("\n| preset | model | wall s | s/epoch | img/s | test acc % | test acc % no TTA | time to 91.6 % val | "
          "speed-up vs seed A |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, rs in results.items():
        ttt = [r["time_to_target_s"] for r in rs if r["time_to_target_s"] is not None]
        ratio = (f"{statistics.mean(ref_ttt) / statistics.mean(ttt):.1f}x" if ref_ttt and ttt else "n/a")
        print(f"| {preset} | {rs[0]['model']} | {mean_std([r['wall_s'] for r in rs])} | "
              f"{mean_std([r['s_per_epoch'] for r in rs])} | {mean_std([r['img_per_s'] for r in rs])} | "
              f"{mean_std([100 * r['test_acc'] for r in rs])} | {mean_std([100 * r['test_acc_no_tta'] for r in rs])} | "
              f"{mean_std(ttt) + ' s' if ttt else 'not reached'} ({len(ttt)}/{len(rs)}) | {ratio} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
