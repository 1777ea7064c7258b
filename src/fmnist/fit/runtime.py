"""Where and how tensors are computed: device, threads, precision, and a record of the environment."""
from __future__ import annotations

import contextlib
import os
import platform
import sys

import torch

import fmnist
from fmnist.core.errors import InputError


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's vector units, so extra threads on them rarely help)."""
    try:
        seen = set()
        phys = core = None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip() and core is not None:
                    seen.add((phys, core))
                    phys = core = None
        if core is not None:
            seen.add((phys, core))
        if seen:
            return len(seen)
    except OSError:
        pass
    return os.cpu_count() or 1


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but no CUDA device is available")
        return dev
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def setup(threads: int | None = None, device: str = "auto") -> torch.device:
    """Set thread count once, flush denormals (a late-training slowdown of up to 13x without it)."""
    torch.set_num_threads(threads or physical_cores())
    torch.set_flush_denormal(True)
    dev = pick_device(device)
    if dev.type == "cuda":
        # Fixed input shapes: let cuDNN time its algorithms once and keep the fastest.
        torch.backends.cudnn.benchmark = True
    return dev


def cpu_has_fast_bf16() -> bool:
    """bf16 pays on CPU only with native bf16 dot products (AVX512-BF16 or AMX); elsewhere it is emulated."""
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def resolve_precision(precision: str, device: torch.device, batch_size: int) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # On CPU, oneDNN's bf16 kernels win only at larger batches and only with native support.
    return "bf16" if batch_size >= 128 and cpu_has_fast_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=device.type, dtype=dtype)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict:
    info = {
        "fmnist": fmnist.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "physical_cores": physical_cores(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "device": str(device) if device is not None else "cpu",
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    return info
