"""Training speed and accuracy of each preset, against a reference recipe and seed A's recipe, in one invocation.

For each preset and seed: wall time of the whole `train` (probe, training, validation, calibration/OOD fit; the
data already in memory), the recipe it chose, epochs, training images per second, test accuracy (flip TTA) and
the time to reach 91.6 % validation accuracy (seed A's reported test accuracy), read off history.csv (the
validation split, never the test set).

The reference recipe (``--reference``, on by default) is a plain ResNet-9 at the preset's budget:
``fmnist train --model resnet9-s --augment flip,crop --batch-size 256 --time-budget T``. The peer
(``--peer keras``) is seed A's recipe in Keras (tensorflow-cpu 2.21 in a virtual environment this script creates
on first use, never a dependency of fmnist), on the same split, timed to 91.6 % validation accuracy.

    python benchmarks/train_speed.py --presets fast,default --seeds 0,1,2 --peer keras
    python benchmarks/train_speed.py --presets seed-a --seeds 0 --stop-at-target --no-reference

Prints one line per run, then a table: mean ± std and median over seeds, and the time-to-target ratio against
the Keras peer (or the seed-a preset) when it ran in the same invocation.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fmnist.fit.data import load_fashion_mnist
from fmnist.fit.evaluate import evaluate_run
from fmnist.fit.runtime import environment
from fmnist.fit.train import PRESETS, resolve_config, train

TARGET = 0.916
REFERENCE = dict(model="resnet9-s", augment="flip,crop", batch_size=256)
PEER_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fmnist" / "keras-peer-venv"
PEER_REQUIREMENT = "tensorflow-cpu==2.21.*"


def time_to_target(history_csv: Path, target: float) -> float | None:
    """Elapsed seconds at the first validated epoch at or above ``target``. A run that validates only its last
    epoch (``select`` last: the budgeted presets) gives its whole training time: an upper bound."""
    with open(history_csv) as f:
        for row in csv.DictReader(f):
            if row["val_acc"] and float(row["val_acc"]) >= target:
                return float(row["elapsed"])
    return None


def mean_std(xs: list[float]) -> str:
    if not xs:
        return "n/a"
    if len(xs) == 1:
        return f"{xs[0]:.2f}"
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def run_one(name: str, cfg, data, out: Path, stop_at_target: bool) -> dict:
    """Train ``cfg`` into ``out``, evaluate it on the test set, and return its figures."""
    def stop(epoch, row):
        return stop_at_target and not cfg.time_budget and row["val_acc"] >= TARGET

    t0 = time.monotonic()
    summary = train(cfg, out=out, data=data, quiet=True, on_epoch_end=stop)
    wall = time.monotonic() - t0
    with open(out / "history.csv") as f:
        hist = list(csv.DictReader(f))
    trained = json.loads((out / "config.json").read_text())  # the recipe an "auto" model chose
    m = evaluate_run(out, data=data, write=True)
    imgs = int(hist[-1]["step"]) * trained["batch_size"]  # the last epoch of a budgeted run is partial
    return {"name": name, "seed": cfg.seed, "model": trained["model"], "augment": trained["augment"],
            "batch_size": trained["batch_size"], "wall_s": wall, "train_s": summary["train_seconds"],
            "epochs": len(hist), "img_per_s": imgs / float(hist[-1]["elapsed"]), "test_acc": m["accuracy"],
            "test_acc_no_tta": m.get("accuracy_no_tta", m["accuracy"]),
            "time_to_target_s": time_to_target(out / "history.csv", TARGET), "best_epoch": summary["best_epoch"]}


def print_run(r: dict) -> None:
    ttt = r["time_to_target_s"]
    print(f"{r['name']:<12} seed {r['seed']}  {r['model']:<10} {r['augment']:<16} b{r['batch_size']:<4} wall "
          f"{r['wall_s']:6.1f} s  {r['epochs']:3d} epochs  {r['img_per_s']:6.0f} img/s  test "
          f"{100 * r['test_acc']:.2f} % (no TTA {100 * r['test_acc_no_tta']:.2f} %)  to 91.6 % val: "
          f"{'not reached' if ttt is None else f'{ttt:.0f} s'}", flush=True)


def ensure_peer_venv() -> Path:
    """The Keras peer's interpreter, in a virtual environment of its own (created and filled on first use)."""
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {PEER_VENV} with {PEER_REQUIREMENT} (first use; a few minutes)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    probe = subprocess.run([str(python), "-c", "import tensorflow"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "-q", PEER_REQUIREMENT], check=True)
    return python


def run_keras_peer(data, val_size: int, seed: int, epochs: int) -> dict:
    """Seed A's recipe in Keras on fmnist's own split (benchmarks/keras_peer.py), timed to 91.6 % validation."""
    import numpy as np

    from fmnist.fit.data import split_indices

    python = ensure_peer_venv()
    train_idx, val_idx = split_indices(data.train_labels, resolve_config("seed-a", val_size=val_size, seed=seed))
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "split.npz"
        np.savez(npz, x_train=data.train_images[train_idx].numpy(), y_train=data.train_labels[train_idx].numpy(),
                 x_val=data.train_images[val_idx].numpy(), y_val=data.train_labels[val_idx].numpy())
        t0 = time.monotonic()
        done = subprocess.run([str(python), str(Path(__file__).with_name("keras_peer.py")), "--data", str(npz),
                               "--epochs", str(epochs), "--target", str(TARGET), "--stop-at-target",
                               "--seed", str(seed)], capture_output=True, text=True)
        wall = time.monotonic() - t0
    if done.returncode != 0:
        raise RuntimeError(f"the Keras peer failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    last, reached = result["epochs"][-1], result["time_to_target"]
    print(f"{'keras-peer':<12} seed {seed}  seed A's recipe, TensorFlow {result['tensorflow']}, "
          f"{result['parameters']:,} parameters: {last['epoch']} epochs in {last['elapsed']:.0f} s, val "
          f"{100 * last['val_acc']:.2f} %; to 91.6 % val: "
          f"{'not reached' if reached is None else f'{reached:.1f} s'}",
          flush=True)
    return result


def print_table(results: dict[str, list[dict]], peer: dict | None) -> None:
    ref_ttt = peer["time_to_target"] if peer else None
    if ref_ttt is None and results.get("seed-a"):
        ttts = [r["time_to_target_s"] for r in results["seed-a"] if r["time_to_target_s"] is not None]
        ref_ttt = statistics.mean(ttts) if ttts else None
    against = "Keras seed A" if peer else "seed-a preset"
    print(f"\n| run | recipe chosen | wall s | epochs | img/s | test acc % (TTA) | median | time to 91.6 % val | "
          f"speed-up vs {against} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, rs in results.items():
        ttt = [r["time_to_target_s"] for r in rs if r["time_to_target_s"] is not None]
        ratio = f"{ref_ttt / statistics.mean(ttt):.1f}x" if ref_ttt and ttt else "n/a"
        recipes = sorted({f"{r['model']} {r['augment']} b{r['batch_size']}" for r in rs})
        test = [100 * r["test_acc"] for r in rs]
        print(f"| {name} | {'; '.join(recipes)} | {mean_std([r['wall_s'] for r in rs])} | "
              f"{mean_std([r['epochs'] for r in rs])} | {mean_std([r['img_per_s'] for r in rs])} | {mean_std(test)} | "
              f"{statistics.median(test):.2f} | {mean_std(ttt) + ' s' if ttt else 'not reached'} "
              f"({len(ttt)}/{len(rs)}) | {ratio} |")
    if peer:
        print(f"| keras-peer | seed A in Keras {peer['tensorflow']} | {peer['wall_s']:.1f} | "
              f"{peer['epochs'][-1]['epoch']} | | | | {peer['time_to_target'] or 'not reached'} s | 1.0x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="fast,default,best,tiny",
                    help="comma-separated presets (default: fast,default,best,tiny)")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                    help="also train the reference ResNet-9 recipe at each budgeted preset's budget (default: on)")
    ap.add_argument("--reference-seeds", default=None, help="seeds of the reference recipe (default: --seeds)")
    ap.add_argument("--peer", choices=["keras"], default=None, help="also run seed A's recipe in Keras (default: no)")
    ap.add_argument("--peer-epochs", type=int, default=30, help="most epochs of the Keras peer (default: 30)")
    ap.add_argument("--stop-at-target", action="store_true",
                    help="stop epoch-based presets (seed-a) once val accuracy reaches 91.6 %% (default: off)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    ap.add_argument("--out", default=None, help="keep run folders here (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write all results to this JSON file (default: none)")
    args = ap.parse_args(argv)

    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        if p not in PRESETS:
            ap.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    ref_seeds = [int(s) for s in args.reference_seeds.split(",")] if args.reference_seeds else seeds
    data = load_fashion_mnist()
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="fmnist-bench-"))
    env = environment()
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in Path("/proc/cpuinfo").read_text()]
    print(f"machine: {env['cpu']} ({', '.join(flags)}), {env['physical_cores']} cores, torch {env['torch']}, "
          f"capability {env['cpu_capability']}", flush=True)

    peer = run_keras_peer(data, 10_000, 0, args.peer_epochs) if args.peer == "keras" else None
    results: dict[str, list[dict]] = {}
    for preset in presets:
        for seed in seeds:
            cfg = resolve_config(preset, seed=seed, device=args.device)
            r = run_one(preset, cfg, data, root / f"{preset}-s{seed}", args.stop_at_target)
            results.setdefault(preset, []).append(r)
            print_run(r)
            if args.reference and cfg.time_budget and seed in ref_seeds:
                ref = resolve_config(preset, seed=seed, device=args.device, **REFERENCE)
                name = f"ref@{preset}"
                r = run_one(name, ref, data, root / f"{name}-s{seed}", False)
                results.setdefault(name, []).append(r)
                print_run(r)
    print_table(results, peer)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "results": results, "peer": peer}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
