"""Run-folder files: weights as safetensors, metadata as JSON, resume state as tensors only.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash never leaves a
half-written checkpoint. Nothing here unpickles arbitrary objects: weights load through safetensors, and the
resume state through ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fmnist.models import count_parameters, create_model
from fmnist.runfiles import CheckpointError, _atomic, read_json, write_json  # noqa: F401 (re-exported)

MODEL_FORMAT = "fmnist-model/1"


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt headers/data
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None


def save_model(run_dir, model: torch.nn.Module, meta: dict) -> None:
    """Write model.safetensors then model.json (the JSON names the architecture and preprocessing)."""
    run_dir = Path(run_dir)
    state = {k: v for k, v in model.state_dict().items()}
    save_tensors(run_dir / "model.safetensors", state, metadata={"format": MODEL_FORMAT})
    meta = {"format": MODEL_FORMAT, "model": model.arch_name, "parameters": count_parameters(model), **meta}
    write_json(run_dir / "model.json", meta)


def load_model(run_dir, map_location="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model named in model.json and load its weights; return (model in eval mode, metadata)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run folder {run_dir} not found")
    meta = read_json(run_dir / "model.json")
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{run_dir / 'model.json'}: unsupported format {meta.get('format')!r}")
    try:
        model = create_model(meta["model"], num_classes=len(meta["class_names"]))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{run_dir / 'model.json'}: cannot build the model: {e}") from None
    state = load_tensors(run_dir / "model.safetensors")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{run_dir / 'model.safetensors'} does not match {meta['model']}: {e}") from None
    return model.to(map_location).eval(), meta


def save_state(path, state: dict) -> None:
    """Full training state for --resume (model, optimizer, RNG, epoch, history); tensors and plain data only."""
    _atomic(Path(path), lambda tmp: torch.save(state, tmp))


def load_state(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found: nothing to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid resume state: {e}") from None
