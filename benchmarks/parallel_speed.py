"""Data-parallel training speed: one epoch of 2 processes x 1 thread against 1 process x 2 threads on this
machine's CPU and, where CUDA is available, 1 GPU against data-parallel over all of them.

Each configuration is its own `fmnist train --epochs 1 --time-budget 0` command, started as a user would
(`torchrun --standalone --nproc-per-node=N -m fmnist train ...` for several processes), into a temporary run
folder. Reported per configuration: the epoch's seconds (history.csv: training steps, plus validation on rank 0
when --val-size > 0), training images per second, and the command's wall time (start-up, data loading and the
trust fit included). The ratio is the single process's epoch seconds over the data-parallel one's: above 1 the
data-parallel run is faster, below 1 slower; it is printed either way. Run on an otherwise idle machine.

    python benchmarks/parallel_speed.py                          # the real data, the fast preset's model
    python benchmarks/parallel_speed.py --subset 2000 --data-dir DIR --no-verify   # a quick check
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

import torch

from fmnist.fit.data import load_fashion_mnist, split_indices
from fmnist.fit.recipes import resolve_config
from fmnist.fit.runtime import environment


def run_epoch(out: Path, procs: int, threads: int, device: str, train_args: list[str]) -> dict:
    """One epoch as a command of its own; returns its figures from the run folder."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
                if procs > 1 else [sys.executable])
    cmd = [*launcher, "-m", "fmnist", "train", "--epochs", "1", "--time-budget", "0", "--threads", str(threads),
           "--device", device, "--out", str(out), *train_args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t0 = time.monotonic()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    with open(out / "history.csv") as f:
        row = next(csv.DictReader(f))
    return {"seconds": float(row["seconds"]), "steps": int(row["step"]), "wall": wall}


def report(name: str, r: dict, images: int) -> None:
    print(f"{name:<34} epoch {r['seconds']:8.2f} s  {images / r['seconds']:8.0f} img/s  "
          f"({r['steps']} steps; command {r['wall']:.1f} s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="fast", help="recipe (default: fast)")
    ap.add_argument("--batch-size", type=int, default=0, help="global batch size (default: the preset's)")
    ap.add_argument("--subset", type=int, default=0, help="train on this many images (default: 0 = all)")
    ap.add_argument("--val-size", type=int, default=0,
                    help="validation images (default: 0, so that the epoch's seconds are its training steps alone)")
    ap.add_argument("--data-dir", default=None, help="folder of the IDX files (default: fmnist's search)")
    ap.add_argument("--no-verify", action="store_true", help="accept unofficial IDX files (default: off)")
    args = ap.parse_args(argv)

    train_args = ["--preset", args.preset, "--val-size", str(args.val_size), "--subset", str(args.subset)]
    train_args += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    train_args += ["--data-dir", args.data_dir] if args.data_dir else []
    train_args += ["--no-verify"] if args.no_verify else []
    cfg = resolve_config(args.preset, subset=args.subset, val_size=args.val_size)
    data = load_fashion_mnist(args.data_dir, verify=not args.no_verify)
    images = len(split_indices(data.train_labels, cfg)[0])  # the images one epoch trains on
    env = environment()
    print(f"machine: {env['cpu']}, {env['physical_cores']} cores, torch {env['torch']}; preset {args.preset}, "
          f"{images:,} training images", flush=True)
    with tempfile.TemporaryDirectory(prefix="fmnist-parallel-") as tmp:
        root = Path(tmp)
        one = run_epoch(root / "1x2", 1, 2, "cpu", train_args)
        report("CPU 1 process x 2 threads", one, images)
        two = run_epoch(root / "2x1", 2, 1, "cpu", train_args)
        report("CPU 2 processes x 1 thread", two, images)
        print(f"CPU ratio (1x2 epoch / 2x1 epoch): {one['seconds'] / two['seconds']:.2f}", flush=True)
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus:
            print("GPU: not run (no CUDA device on this machine)")
            return 0
        single = run_epoch(root / "gpu1", 1, 1, "cuda", train_args)
        report("GPU 1 process, 1 GPU", single, images)
        if gpus < 2:
            print("GPU data-parallel: not run (one GPU; it needs at least 2)")
            return 0
        many = run_epoch(root / f"gpu{gpus}", gpus, 1, "cuda", train_args)
        report(f"GPU {gpus} processes, {gpus} GPUs", many, images)
        print(f"GPU ratio (1 GPU epoch / {gpus} GPU epoch): {single['seconds'] / many['seconds']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
