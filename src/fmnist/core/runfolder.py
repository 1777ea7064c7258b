"""The run folder's contract: the name of every file fmnist writes in a run, and how files are written and read
(atomic writes, strict JSON, checksums, safetensors as NumPy arrays), with the errors they raise.

No other module names a run file: they import the constants below. Free of ``torch``, so that a deployment
without it (ONNX Runtime only) reads run folders too; :mod:`fmnist.core.run` reads ``model.json``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path

from fmnist.core.errors import CheckpointError  # noqa: F401 (re-exported)

# Every file of a run folder, in the order `train --overwrite` removes them (model.json first, so that a
# half-removed run never loads), with what it holds and what writes it. Other files in the folder are kept.
MODEL_JSON = "model.json"  # what the weights are: architecture, preprocessing, trust sections (core.run)
WEIGHTS = "model.safetensors"  # the kept epoch's weights (fit.checkpoint.save_model)
CONFIG = "config.json"  # the training recipe, a TrainConfig (fit.train)
LAST = "last.pt"  # the last epoch's full state, for --resume (fit.train)
HISTORY = "history.csv"  # one row per epoch (fit.train)
TRAIN_LOG = "train.log"  # what training printed (fit.train)
DETECTOR = "ood.safetensors"  # the OOD detector's statistics and sorted validation scores (core.ood)
ENV = "env.json"  # the machine and library versions of the training (fit.train)
SUMMARY = "train_summary.json"  # timings and the kept epoch (fit.train)
METRICS = "metrics.json"  # test-set figures (fmnist evaluate)
ONNX_FP32 = "model.onnx"  # fmnist export
ONNX_INT8 = "model.int8.onnx"  # fmnist export --int8
EXPORT_REPORT = "export.json"  # ONNX Runtime against PyTorch (fmnist export)
OOD_REPORT = "ood_eval.json"  # fmnist ood-eval
TUNE_TRIAL = "tune_trial.json"  # a tune trial's outcome, written once the study recorded it
RUN_FILES = (MODEL_JSON, WEIGHTS, CONFIG, LAST, HISTORY, TRAIN_LOG, DETECTOR, ENV, SUMMARY, METRICS, ONNX_FP32,
             ONNX_INT8, EXPORT_REPORT, OOD_REPORT, TUNE_TRIAL)
# Files that show a folder holds a run: `fmnist train --out` refuses to mix a new run into it.
RUN_MARKERS = (MODEL_JSON, WEIGHTS, CONFIG, LAST, HISTORY, TRAIN_LOG)
ONNX_FILES = (ONNX_FP32, ONNX_INT8)  # exports of the weights: removed whenever the weights are rewritten
REPORT_DIR = "report"  # `fmnist report`'s default output folder, inside the run

_UMASK = os.umask(0)
os.umask(_UMASK)

# The most a run file of each kind may hold: a run folder may come from a stranger, and a file in it is read
# only if it is a regular file inside the folder of at most this many bytes (fmnist's own are far smaller:
# model.json some kB, the largest preset's weights and export a few MB).
MiB = 1 << 20
SIZE_LIMITS = {".json": 16 * MiB, ".safetensors": 256 * MiB, ".onnx": 256 * MiB, ".csv": 64 * MiB,
               ".log": 64 * MiB, ".pt": 1024 * MiB}
DEFAULT_SIZE_LIMIT = 64 * MiB


def size_limit(name: str) -> int:
    """The size limit of a run file, by its kind (its suffix)."""
    return SIZE_LIMITS.get(Path(name).suffix, DEFAULT_SIZE_LIMIT)


def _file_kind(mode: int) -> str:
    for test, what in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "something else"


def _check_stat(path: Path, st: os.stat_result, limit: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is {_file_kind(st.st_mode)}, not a regular file: a run file must be a "
                              "regular file inside the run folder")
    if st.st_size > limit:
        raise CheckpointError(f"{path} is {st.st_size:,} bytes, over the {limit:,}-byte limit for a "
                              f"{path.suffix or 'run'} file: not a file fmnist wrote")


def is_present(path) -> bool:
    """Whether something is at ``path`` (a file, or a link, FIFO or device that :func:`read_run_file` refuses)."""
    return os.path.lexists(path)


def read_run_file(path, limit: int | None = None) -> bytes:
    """The bytes of a run file, read only if it is a regular file (not a symlink, FIFO, device or folder) of
    at most ``limit`` bytes (default: :func:`size_limit` of its kind). One CheckpointError naming it otherwise.

    The file is opened without following a link and without blocking (a FIFO swapped in after the check
    cannot hang the read), then checked again on the open descriptor."""
    path = Path(path)
    limit = size_limit(path.name) if limit is None else limit
    try:
        _check_stat(path, os.lstat(path), limit)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        _check_stat(path, os.fstat(fd), limit)
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since the check
        raise CheckpointError(f"{path} is over the {limit:,}-byte limit for a {path.suffix or 'run'} file")
    return data


def _atomic(path: Path, write, io_errors: tuple = ()) -> None:
    """Write through ``write(tmp)`` to a temporary file beside ``path``, then rename it into place.

    A write that fails for want of space or permission (OSError, or one of ``io_errors``: what the writer
    raises for them) is one CheckpointError naming the file; the previous file, if any, is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise _write_error(path, e) from e
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, (OSError, *io_errors)):
            raise _write_error(path, e) from e
        raise


def _write_error(path: Path, e: BaseException) -> CheckpointError:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    kept = f"the previous {path.name} is unchanged" if path.exists() else "nothing was written"
    return CheckpointError(f"cannot write {path} (disk full or not writable?): {reason}; {kept}")


def write_json(path, obj) -> None:
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)  # NaN is not JSON: browsers and servers reject it
            f.write("\n")

    _atomic(Path(path), w)


def read_json(path) -> dict:
    """A JSON file fmnist wrote, read as a run file (:func:`read_run_file`). Non-finite numbers are left to
    the checks of the fields that hold them."""
    path = Path(path)
    data = read_run_file(path)
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a file fmnist wrote") from None


def write_bytes(path, data: bytes) -> None:
    def w(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(Path(path), w)


def jsonable(v):
    """Plain JSON types; NaN and infinities become null (strict JSON has no such numbers)."""
    import numpy as np

    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray) or hasattr(v, "detach"):  # arrays, and tensors without importing PyTorch
        return jsonable(v.tolist())
    if isinstance(v, np.generic):
        return jsonable(v.item())
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_arrays(path, arrays: dict, metadata: dict | None = None) -> None:
    """NumPy arrays to a safetensors file, atomically (the PyTorch-free twin of checkpoint.save_tensors)."""
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    _atomic(Path(path), lambda tmp: save_file(arrays, tmp, metadata=metadata), io_errors=(SafetensorError,))


def load_arrays(path, data: bytes | None = None) -> dict:
    """A safetensors file (or its bytes, ``data``, read already) as NumPy arrays; a clear CheckpointError for a
    missing or damaged file."""
    from safetensors.numpy import load

    return load_safetensors(path, load, data)


def load_safetensors(path, load, data: bytes | None = None) -> dict:
    """``load(bytes)`` of a safetensors module (numpy or torch) on the run file ``path`` (:func:`read_run_file`)
    or on its bytes ``data``, with one clear error for a missing or damaged file."""
    path = Path(path)
    data = read_run_file(path) if data is None else data
    try:
        return load(data)
    except Exception as e:  # safetensors raises several types for corrupt headers/data
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
