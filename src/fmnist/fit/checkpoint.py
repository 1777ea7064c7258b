"""Run-folder files at the file level: tensors as safetensors, metadata as JSON, resume state as tensors only
(what the files of a run *mean* is :mod:`fmnist.core.run`'s job).

Every write goes to a temporary file in the same folder and is renamed into place, so a crash never leaves a
half-written checkpoint. Nothing here unpickles arbitrary objects: weights load through safetensors, and the
resume state through ``torch.load(weights_only=True)``, which only rebuilds tensors and plain containers.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from fmnist.core.run import MODEL_FORMAT, SCHEMA_VERSION
from fmnist.core.runfolder import (  # noqa: F401 (read_json re-exported)
    MODEL_JSON,
    ONNX_FILES,
    WEIGHTS,
    CheckpointError,
    _atomic,
    load_safetensors,
    read_json,
    withdraw_complete,
    write_json,
)
from fmnist.fit.models import count_parameters


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata), io_errors=(SafetensorError,))


def load_tensors(path) -> dict[str, torch.Tensor]:
    return load_safetensors(path, load)


def save_state(path, state: dict) -> None:
    """Full training state for --resume (model, optimizer, RNG, epoch, history); tensors and plain data only."""
    # torch.save reports a failed write (a full disk) as a RuntimeError from its zip writer.
    _atomic(Path(path), lambda tmp: torch.save(state, tmp), io_errors=(RuntimeError,))


def load_state(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found: nothing to resume from")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid resume state: {e}") from None


def save_model(run_dir, model, meta: dict) -> None:
    """Write model.safetensors then model.json (the JSON names the architecture and preprocessing). The run is
    then incomplete (no manifest) until its trust fit is recorded (:func:`fmnist.core.runfolder.record_complete`)."""
    run_dir = Path(run_dir)
    withdraw_complete(run_dir)
    save_tensors(run_dir / WEIGHTS, model.state_dict(), metadata={"format": MODEL_FORMAT})
    # ONNX files exported from earlier weights would answer for a model that no longer exists (model.json,
    # rewritten below, no longer describes them): a run folder never holds them past its weights.
    for name in ONNX_FILES:
        (run_dir / name).unlink(missing_ok=True)
    meta = {"format": MODEL_FORMAT, "schema_version": SCHEMA_VERSION, "model": model.arch_name,
            "parameters": count_parameters(model), **meta}
    write_json(run_dir / MODEL_JSON, meta)
