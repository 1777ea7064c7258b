"""One forward pass (features and logits) of an exported run: PyTorch eager vs ONNX Runtime fp32 vs int8.

For each backend: single-image latency (p50, p90, p99 over timed calls, one thread by default) and batch
throughput (images per second at --batch). PyTorch runs the model as the server does (BatchNorm folded,
channels_last weights, inference mode); ONNX Runtime runs RUN/model.onnx and RUN/model.int8.onnx with the
settings of :class:`fmnist.core.backends.OnnxBackend`. Every backend goes through the same ``run(x)`` interface
(NumPy in, NumPy out), so conversion costs count on both sides. No preprocessing, TTA or trust layer: this
is the model alone. Export first (``fmnist export RUN --int8``); run on an otherwise idle machine.

    python benchmarks/onnx_speed.py runs/latest
    python benchmarks/onnx_speed.py runs/latest --batch-threads 2 --seconds 5
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fmnist.core.backends import OnnxBackend
from fmnist.core.run import Run
from fmnist.fit import runtime
from fmnist.fit.export import FP32, INT8

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    return " ".join(f for f in CPU_FLAGS if f in flags) or "none of " + ", ".join(CPU_FLAGS)


def latencies_ms(fn, x: np.ndarray, seconds: float) -> np.ndarray:
    for _ in range(20):  # warm-up: kernel selection, allocator caches
        fn(x)
    times = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop or len(times) < 20:
        t0 = time.perf_counter_ns()
        fn(x)
        times.append(time.perf_counter_ns() - t0)
    return np.asarray(times) / 1e6


def images_per_second(fn, x: np.ndarray, seconds: float) -> float:
    for _ in range(3):
        fn(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or n < 3:
        fn(x)
        n += 1
    return n * len(x) / (time.perf_counter() - t0)


def backends(run: Path, threads: int) -> dict:
    """name -> backend.run, with ``threads`` intra-op threads each (PyTorch's setting is process-wide)."""
    torch.set_num_threads(threads or runtime.physical_cores())
    loaded = Run.load(run, detector=False)
    out = {"PyTorch eager": loaded.backend(fold_bn=True).run}  # as the server runs it
    for label, name in (("ORT fp32", FP32), ("ORT int8", INT8)):
        if (run / name).exists():
            out[label] = OnnxBackend(run / name, loaded.description, threads=threads).run
    return out


def sample_images(run: Path, n: int, data_dir) -> tuple[np.ndarray, str]:
    """Official test images, preprocessed as the run's model expects; random ones where there are none (int8
    ranges are calibrated on garments, so int8 agreement on noise says little)."""
    from fmnist.fit.data import DataError, load_fashion_mnist, preprocess

    try:
        data = load_fashion_mnist(data_dir, download=False)
    except DataError:
        x = np.random.default_rng(0).standard_normal((n, 1, 28, 28), dtype=np.float32)
        return x, "random images (no data set found; int8 agreement means little on them)"
    spec = Run.load(run, detector=False).spec
    return preprocess(data.test_images[:n], spec).numpy(), "official test images"


def check_agreement(fns: dict, x: np.ndarray) -> None:
    """The backends must compute the same function before their speeds mean anything."""
    ref_f, ref_l = fns["PyTorch eager"](x)
    for label, fn in fns.items():
        f, l = fn(x)
        print(f"  {label:<14} max |logit diff| vs PyTorch {np.abs(l - ref_l).max():.2e}, "
              f"max |feature diff| {np.abs(f - ref_f).max():.2e}, top-1 agrees on "
              f"{(l.argmax(1) == ref_l.argmax(1)).sum()} of {len(x)}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="exported run folder (fmnist export RUN --int8)")
    ap.add_argument("--threads", type=int, default=1, help="threads for single-image latency (default: 1)")
    ap.add_argument("--batch-threads", type=int, default=1,
                    help="threads for batch throughput (0 = physical cores) (default: 1)")
    ap.add_argument("--batch", type=int, default=256, help="images per call for throughput (default: 256)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per figure (default: 3)")
    ap.add_argument("--data-dir", default=None, help="folder holding the IDX files (default: search)")
    args = ap.parse_args(argv)
    run = Path(args.run)
    if not (run / FP32).exists():
        ap.error(f"{run / FP32} not found: run `fmnist export {run} --int8` first")
    torch.set_flush_denormal(True)  # as fmnist.fit.runtime.setup does; ONNX Runtime gets the same setting
    import onnxruntime

    print(f"{runtime.cpu_model()}; flags: {cpu_flags()}; torch {torch.__version__} "
          f"({torch.backends.cpu.get_cpu_capability()}), onnxruntime {onnxruntime.__version__}")
    batch, source = sample_images(run, args.batch, args.data_dir)
    one = batch[:1]

    fns = backends(run, args.threads)
    print(f"agreement on {len(batch)} {source}:")
    check_agreement(fns, batch)
    print(f"\n| backend | 1 image p50 ms | p90 ms | p99 ms | (threads {args.threads}) |")
    print("|---|---|---|---|---|")
    for label, fn in fns.items():
        ms = latencies_ms(fn, one, args.seconds)
        print(f"| {label} | {np.percentile(ms, 50):.3f} | {np.percentile(ms, 90):.3f} | "
              f"{np.percentile(ms, 99):.3f} | {len(ms):,} calls |")

    fns = backends(run, args.batch_threads)
    print(f"\n| backend | images/s at batch {args.batch} (threads {args.batch_threads or 'all cores'}) |")
    print("|---|---|")
    for label, fn in fns.items():
        print(f"| {label} | {images_per_second(fn, batch, args.seconds):,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
