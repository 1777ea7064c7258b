"""Wall time of seed A's learning-rate sweep (`fmnist tune`, grid of four rates) with 1 and 2 worker processes.

    python benchmarks/tune_speed.py                              # seed A's recipe in full: 4 x 30 epochs
    python benchmarks/tune_speed.py --epochs 2 --subset 10000    # a quicker look

Each setting runs the command a user would type, as its own process, into a fresh study folder:

    fmnist tune --preset seed-a --lr 1e-1,1e-2,1e-3,1e-4 --sampler grid --workers N

so the figures include starting Python, loading the data in each worker and fitting each trial's calibration.
`fmnist tune` gives each of N workers max(1, physical cores / N) threads. Prints one line per setting, then the
speed-up of each against one worker. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LRS = "1e-1,1e-2,1e-3,1e-4"


def sweep_command(out: Path, workers: int, args) -> list[str]:
    cmd = [sys.executable, "-m", "fmnist.apps.cli", "tune", "--preset", "seed-a", "--lr", LRS, "--sampler", "grid",
           "--workers", str(workers), "--out", str(out), "--study", f"seed-a-w{workers}"]
    for flag, value in (("--epochs", args.epochs), ("--subset", args.subset), ("--val-size", args.val_size),
                        ("--data-dir", args.data_dir)):
        if value:
            cmd += [flag, str(value)]
    return cmd + (["--no-verify"] if args.no_verify else [])


def run_sweep(out: Path, workers: int, args) -> dict:
    cmd = sweep_command(out, workers, args)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    with open(out / f"seed-a-w{workers}" / "trials.csv", newline="") as f:
        trials = list(csv.DictReader(f))
    best = min((t for t in trials if t["state"] == "COMPLETE"), key=lambda t: float(t["val_loss"]))
    return {"workers": workers, "wall": wall, "trials": len(trials),
            "trial_seconds": sum(float(t["duration_s"]) for t in trials), "best_lr": best["lr"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts (default: 1,2)")
    p.add_argument("--epochs", type=int, default=0, help="epochs per trial (default: seed A's 30)")
    p.add_argument("--subset", type=int, default=0, help="training images per trial (default: all 50,000)")
    p.add_argument("--val-size", type=int, default=0, help="validation images (default: 10,000)")
    p.add_argument("--data-dir", default=None, help="folder holding the IDX files (default: search)")
    p.add_argument("--no-verify", action="store_true", help="accept IDX files that are not the official ones")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep the study folders here (default: discard)")
    args = p.parse_args(argv)

    from fmnist.fit.runtime import physical_cores

    rows = []
    with tempfile.TemporaryDirectory(prefix="fmnist-tune-speed-") as tmp:
        out = Path(args.keep or tmp)
        for workers in (int(w) for w in args.workers.split(",")):
            row = run_sweep(out, workers, args)
            rows.append(row)
            print(f"{workers} worker(s) x {max(1, physical_cores() // workers)} thread(s): {row['wall']:.1f} s wall, "
                  f"{row['trials']} trials ({row['trial_seconds']:.1f} s of trials), best lr {row['best_lr']}",
                  flush=True)
    base = rows[0]["wall"]
    print(f"\n{'workers':>8}  {'wall s':>8}  {'speed-up':>8}   ({os.cpu_count()} CPUs, {physical_cores()} physical cores)")
    for r in rows:
        print(f"{r['workers']:>8}  {r['wall']:>8.1f}  {base / r['wall']:>7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
