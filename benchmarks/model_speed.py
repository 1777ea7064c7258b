"""Training and inference throughput of each registered model on this machine (random data, no accuracy).

For each model: images per second of a full SGD training step (forward, backward, Nesterov update) at the given
batch sizes, in the training loop's memory format (channels_last), and of an eval-mode forward pass on 1,000
images. This is what decides how many epochs a time budget buys; run it on an otherwise idle machine
(PyTorch's OpenMP threads busy-wait, so any other busy process distorts the figures badly).

    python benchmarks/model_speed.py                      # every fast model, batch 128 and 256, all cores
    python benchmarks/model_speed.py --models s2d-24,tiny --batch-sizes 256 --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from fmnist.fit import runtime
from fmnist.fit.models import count_parameters, create_model, model_names

FAST_MODELS = "s2d-24,s2d-32,s2d-48,tiny,resnet-lite,resnet9-s"


def images_per_second(fn, batch: int, seconds: float) -> float:
    for _ in range(3):  # warm-up: oneDNN picks and caches its kernels on the first calls
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n * batch / (time.perf_counter() - t0)


def measure(name: str, batch_sizes: list[int], seconds: float) -> dict:
    torch.manual_seed(0)
    model = create_model(name).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    out = {"model": name, "parameters": count_parameters(model)}
    for bs in batch_sizes:
        x = torch.randn(bs, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (bs,))

        def step(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        model.train()
        out[f"train_{bs}"] = images_per_second(step, bs, seconds)
    model.eval()
    xe = torch.randn(1000, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out["eval_1000"] = images_per_second(lambda: model(xe), 1000, seconds / 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=FAST_MODELS, help=f"comma-separated model names (default: {FAST_MODELS})")
    ap.add_argument("--batch-sizes", default="128,256", help="training batch sizes (default: 128,256)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = physical cores) (default: 0)")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per figure (default: 6)")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(names) - set(model_names()))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(model_names())}")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    runtime.setup(args.threads, device="cpu")
    print(f"{runtime.cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    header = "| model | parameters | " + " | ".join(f"train img/s (batch {b})" for b in batch_sizes)
    print(header + " | eval img/s (batch 1,000) |")
    print("|---" * (3 + len(batch_sizes)) + "|")
    for name in names:
        r = measure(name, batch_sizes, args.seconds)
        cells = " | ".join(f"{r[f'train_{b}']:,.0f}" for b in batch_sizes)
        print(f"| {name} | {r['parameters']:,} | {cells} | {r['eval_1000']:,.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
