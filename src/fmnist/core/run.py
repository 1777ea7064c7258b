"""A run folder, loaded and checked once: :class:`Run` is what every command and the server work from.

A run folder holds ``model.safetensors`` (weights), ``model.json`` (what the weights are: architecture, class
names, preprocessing, test-time augmentation, kept epoch, validation metrics, and after the trust fit the
temperature and the OOD detector's settings), ``ood.safetensors`` (the detector's statistics),
``config.json`` (the training recipe), ``history.csv``, ``env.json``, ``train_summary.json`` and, once
evaluated, ``metrics.json``. This module reads and writes ``model.json``; :mod:`fmnist.core.model_json` describes
its sections and checks them (:attr:`Run.description`), and brings older schemas to the current one.

``Run.load(path)`` validates the folder once and gives typed fields; a missing, truncated or tampered file
gives one :class:`~fmnist.fit.checkpoint.CheckpointError` naming the file.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fmnist.core import backends, model_json
from fmnist.core.errors import InputError
from fmnist.core.model_json import (  # noqa: F401 (re-exported)
    DEFAULT_CONFIDENCE,
    FASHION_DATASET,
    MODEL_FORMAT,
    SCHEMA_VERSION,
)
from fmnist.core.ood import Detector
from fmnist.core.preprocess import preprocess_array
from fmnist.core.runfolder import (  # noqa: F401 (RUN_FILES, RUN_MARKERS, REPORT_DIR: re-exported)
    CONFIG,
    MODEL_JSON,
    ONNX_FP32,
    ONNX_INT8,
    REPORT_DIR,
    RUN_FILES,
    RUN_MARKERS,
    WEIGHTS,
    CheckpointError,
    check_complete,
    is_complete,
    is_present,
    read_json,
    record_complete,
    write_json,
)


class Run:
    """A trained run folder. Fields are plain values; the weights load on demand (:meth:`model`)."""

    def __init__(self, path: Path, meta: dict, config: dict):
        self.path, self.config = path, config
        self._read(meta)
        self.detector = None

    def _read(self, meta: dict) -> None:
        """The fields, from model.json's content, checked (at load, and again after :meth:`update`)."""
        d = model_json.read(meta, self.path / MODEL_JSON)
        self.description: model_json.ModelJson = d
        self.meta = d.raw  # in the current schema
        self.schema_version = d.written_version
        self.model_name, self.class_names, self.spec, self.tta = d.model, d.class_names, d.preprocessing, d.tta
        self.calibration, self.temperature, self.confidence_threshold = d.calibration, d.temperature, d.confidence
        self.metrics, self.recipe, self.dataset = d.metrics, d.recipe, d.dataset
        self.best_epoch, self.select, self.parameters = d.best_epoch, d.select, d.parameters
        self.conformal: dict | None = d.conformal  # candidate-set parameters (fmnist.core.conformal), if fitted

    # --- loading -------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path, detector: bool = True, complete: bool = True) -> Run:
        """Read and check ``path``; ``detector=False`` skips loading the OOD detector (the trust fit refits it);
        ``complete=False`` loads a run whose writing did not finish (the commands that finish it), which is
        otherwise refused with how to finish it (:func:`fmnist.core.runfolder.check_complete`)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path} is not a folder ({'not found' if not path.exists() else 'a file'}): "
                                  "give a run folder written by `fmnist train`")
        where = path / MODEL_JSON
        if not is_present(where):
            raise CheckpointError(f"{path} is not a run folder: {MODEL_JSON} not found")
        config_path = path / CONFIG
        config = read_json(config_path) if is_present(config_path) else {}  # a link or FIFO is refused
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} does not hold a JSON object")
        run = cls(path, read_json(where), config)  # checks model.json
        if not is_present(path / WEIGHTS):
            raise CheckpointError(f"{path / WEIGHTS} not found: is {path} a finished run?")
        if detector:
            run.detector = Detector.load(path, run.description.ood)
        if complete:
            check_complete(path, run.meta)
        return run

    def model(self, device="cpu"):
        """The PyTorch model with its weights, in eval mode, on ``device`` (needs PyTorch)."""
        return backends.torch_model(self, device)

    def backend(self, kind: str = "torch", device="cpu", fold_bn: bool = False, threads: int = 1):
        """The run's model as an inference backend (:mod:`fmnist.core.forward`): ``torch`` (PyTorch, BatchNorm
        optionally folded), ``onnx`` (ONNX Runtime on ``RUN/model.onnx``, see ``fmnist export``; ``threads``
        intra-op threads), ``onnx-int8`` (``RUN/model.int8.onnx``) or ``auto`` (ONNX Runtime where the run was exported and onnxruntime is installed)."""
        if kind not in backends.BACKENDS:
            raise InputError(f"unknown backend {kind!r}; choose one of: {', '.join(backends.BACKENDS)}")
        if kind == "auto":
            kind = "onnx" if is_present(self.path / ONNX_FP32) and backends.onnxruntime_available() else "torch"
        if kind in ("onnx", "onnx-int8"):
            path = self.path / (ONNX_FP32 if kind == "onnx" else ONNX_INT8)
            return self._probed(backends.OnnxBackend(path, self.description, threads=threads), path)
        if not backends.importable("torch"):
            hint = ("use --backend onnx" if (self.path / ONNX_FP32).is_file() else
                    f"export the run where PyTorch is (fmnist export {self.path}) to serve it with ONNX Runtime")
            raise backends.MissingDependency(f"{self.path}: the torch backend needs PyTorch, which is not installed here: "
                                    f"install torch, or {hint}")
        return self._probed(backends.TorchBackend(self.model(device), fold_bn=fold_bn), self.path / WEIGHTS)

    def _probed(self, backend, weights: Path):
        """``backend``, once it gives finite outputs for a few fixed images: NaN scores would pass every gate
        (``score < threshold`` is false for NaN), so damaged or diverged weights are refused here, once."""
        features, logits = backend.run(preprocess_array(_probe_images(), self.spec))
        if not (np.isfinite(features).all() and np.isfinite(logits).all()):
            raise CheckpointError(f"{weights}: the model gives non-finite outputs (NaN or infinity) for plain "
                                  "test images: its weights are damaged or its training diverged; train it again")
        if self.detector is not None:  # a detector fitted on another model's features would fail on every request
            self.detector.check_model(features.shape[1], logits.shape[1])
        return backend

    def read_optional(self, name: str) -> dict:
        """A run's optional JSON file (metrics, summary, env) or {} when absent; a corrupt one still errors."""
        path = self.path / name
        data = read_json(path) if is_present(path) else {}  # a link, FIFO or oversized file is refused
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} does not hold a JSON object")
        return data

    # --- writing ---------------------------------------------------------------------------------------------

    def update(self, **sections) -> None:
        """Replace top-level sections of ``model.json`` (e.g. calibration, ood), re-read right before writing. A
        complete run stays complete: its manifest is written again after model.json."""
        meta = read_json(self.path / MODEL_JSON)
        was_complete = is_complete(self.path, meta)
        meta.update(sections)
        meta["schema_version"] = SCHEMA_VERSION
        self._read(meta)  # what is written is checked like what is loaded, and the fields follow it
        write_json(self.path / MODEL_JSON, self.meta)
        if was_complete:
            record_complete(self.path)


def _probe_images():
    """Four fixed uint8 28x28 images: black, white, a bright block on black (a garment's outline), a ramp."""
    x = np.zeros((4, 28, 28), np.uint8)
    x[1] = 255
    x[2, 5:23, 8:20] = 200
    x[3] = np.linspace(0, 255, 28).astype(np.uint8)
    return x


def check_new_run_folder(path, overwrite: bool = False) -> None:
    """Refuse to train a new run into a folder that holds one, unless told to replace it (``overwrite``)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} is a file, not a folder: choose another output folder")
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    if found and not overwrite:
        raise CheckpointError(f"{path} holds a run already ({', '.join(found)}): continue it with --resume "
                              f"{path}, replace it with --overwrite, or choose another output folder")
    if found:  # --overwrite: refuse now what remove_run could not finish, before anything is removed
        blocked = [f"{name} is a folder" for name in RUN_FILES if (path / name).is_dir()
                   and not (path / name).is_symlink()]
        report = path / REPORT_DIR
        if report.is_symlink() or (is_present(report) and not report.is_dir()):
            blocked.append(f"{REPORT_DIR} is {'a symbolic link' if report.is_symlink() else 'not a folder'}")
        import os

        if not os.access(path, os.W_OK | os.X_OK):
            blocked.append("the folder is not writable")
        if blocked:
            raise CheckpointError(f"{path}: cannot replace the run there ({'; '.join(blocked)}); nothing was "
                                  "removed: move it away, or choose another output folder")


def remove_run(path) -> None:
    """Remove the run in ``path``: the files fmnist writes (:data:`RUN_FILES`), temporaries of interrupted
    writes, and the report folder. Anything else in the folder is not fmnist's and stays."""
    import shutil

    path = Path(path)
    for name in RUN_FILES:
        if (path / name).is_file() or (path / name).is_symlink():
            (path / name).unlink()
    for tmp in path.glob("*.tmp"):  # .NAME.XXXX.tmp of runfiles._atomic
        if any(tmp.name.startswith(f".{name}.") for name in RUN_FILES):
            tmp.unlink()
    if (path / REPORT_DIR).is_dir():
        shutil.rmtree(path / REPORT_DIR)


def created_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
