"""Run-folder files that need no PyTorch: the error type, atomic writes, JSON metadata, checksums, strict JSON.

Kept free of ``torch`` so that a deployment without it (ONNX Runtime only) can read a run folder;
:mod:`fmnist.fit.checkpoint` re-exports these for everything else.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


class CheckpointError(Exception):
    pass


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
    path = Path(path)
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
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


def load_arrays(path) -> dict:
    """A safetensors file as NumPy arrays; a clear CheckpointError for a missing or damaged file."""
    from safetensors.numpy import load_file

    return load_safetensors(path, load_file)


def load_safetensors(path, load_file) -> dict:
    """``load_file(path)`` of a safetensors module (numpy or torch), with one clear error for a missing or
    damaged file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for corrupt headers/data
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from None
