"""The run folder's contract: the name of every file fmnist writes in a run, and how files are written and read
(atomic writes, strict JSON, checksums, safetensors as NumPy arrays), with the errors they raise.

No other module names a run file: they import the constants below. Free of ``torch``, so that a deployment
without it (ONNX Runtime only) reads run folders too; :mod:`fmnist.core.run` reads ``model.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path

from fmnist.core.errors import CheckpointError  # noqa: F401 (re-exported)
from fmnist.core.values import is_finite_number

# Every file of a run folder, in the order `train --overwrite` removes them (the manifest and model.json first,
# so that a half-removed run never loads), with what it holds and what writes it. Other files in the folder are kept.
MANIFEST = "manifest.json"  # the servable files of a complete run, checksummed; written last (see check_complete)
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
RUN_FILES = (MANIFEST, MODEL_JSON, WEIGHTS, CONFIG, LAST, HISTORY, TRAIN_LOG, DETECTOR, ENV, SUMMARY, METRICS, ONNX_FP32,
             ONNX_INT8, EXPORT_REPORT, OOD_REPORT, TUNE_TRIAL)
# Files that show a folder holds a run: `fmnist train --out` refuses to mix a new run into it.
RUN_MARKERS = (MODEL_JSON, WEIGHTS, CONFIG, LAST, HISTORY, TRAIN_LOG)
ONNX_FILES = (ONNX_FP32, ONNX_INT8)  # exports of the weights: removed whenever the weights are rewritten
REPORT_DIR = "report"  # `fmnist report`'s default output folder, inside the run
# The files a server reads besides model.json: what the manifest records (those present when it was written).
# model.json is checked field by field at load (and may be edited, e.g. its thresholds); each command writes it
# after these files, so an interrupted write always leaves one of them out of step with the manifest.
SERVABLE = (WEIGHTS, DETECTOR, ONNX_FP32, ONNX_INT8)
MANIFEST_FORMAT = "fmnist-manifest/1"
# model.json's schema from which a run is complete only with a manifest (core.run.SCHEMA_VERSION).
MANIFEST_SCHEMA = 3

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
    if isinstance(v, float) and not is_finite_number(v):
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


# --- complete runs -----------------------------------------------------------------------------------------------
#
# A run is complete when manifest.json lists each servable file present (name, size, SHA-256) and every one
# matches. Each command that changes servable files (train's weights and trust fit, calibrate, export) removes
# the manifest or leaves it stale before its first write and writes it again as its very last step, so a run
# interrupted anywhere (SIGKILL, a full disk) is either the complete run it was or refused by check_complete.
# A folder written before manifests existed (model.json schema_version 1 or 2, no manifest) is complete when
# model.json holds its trust layer (calibration and ood sections): fmnist then wrote them last.


class IncompleteRun(CheckpointError):
    """A run folder whose writing did not finish, with how to finish it."""


def _digest(path: Path) -> dict:
    data = read_run_file(path)
    return {"bytes": len(data), "sha256": sha256(data)}


def record_complete(run_dir, trust: bool | None = None) -> None:
    """Write manifest.json for the servable files in ``run_dir`` as they are now: the last write of a command
    that makes a run complete. ``trust``: whether the run has its trust layer (False: trained without it, on
    purpose); None keeps what the manifest there says (True without one)."""
    run_dir = Path(run_dir)
    if trust is None:
        old = read_json(run_dir / MANIFEST) if is_present(run_dir / MANIFEST) else {}
        trust = not (isinstance(old, dict) and old.get("trust") is False)
    files = {name: _digest(run_dir / name) for name in SERVABLE if is_present(run_dir / name)}
    write_json(run_dir / MANIFEST, {"format": MANIFEST_FORMAT, "trust": trust, "files": files})


def withdraw_complete(run_dir) -> None:
    """Remove manifest.json, before a command's first write to files it cannot write all at once."""
    try:
        (Path(run_dir) / MANIFEST).unlink(missing_ok=True)
    except OSError as e:
        raise _write_error(Path(run_dir) / MANIFEST, e) from e


def _hint(run_dir: Path, names) -> str:
    if set(names) & set(ONNX_FILES):
        return f"export it again: fmnist export {run_dir}"
    if WEIGHTS in names:
        return f"the weights changed after the run was written: train it again (fmnist train --overwrite --out {run_dir})"
    return f"fit its trust layer again: fmnist calibrate {run_dir}"


def check_complete(run_dir, meta: dict, ignore: tuple = ()) -> None:
    """Refuse (one IncompleteRun line that says how to finish it) a run folder whose writing did not finish:
    see the rule above. ``meta``: its model.json, read already; ``ignore``: servable files not compared (a
    command about to rewrite them)."""
    run_dir = Path(run_dir)
    where = run_dir / MANIFEST
    if not is_present(where):
        version = meta.get("schema_version", 1)
        if isinstance(version, int) and version < MANIFEST_SCHEMA:
            if meta.get("calibration") and meta.get("ood"):
                return
            raise IncompleteRun(f"{run_dir} has no calibration or OOD detector (its trust fit did not finish): "
                                f"fit them with `fmnist calibrate {run_dir}` before serving it")
        raise IncompleteRun(f"{run_dir} is not a complete run ({MANIFEST} is missing: its training or trust fit "
                            f"did not finish): finish it with `fmnist train --resume {run_dir}`, or with "
                            f"`fmnist calibrate {run_dir}` if its training finished")
    manifest = read_json(where)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if (not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict)
            or not all(isinstance(f, dict) and name in SERVABLE for name, f in files.items())):
        raise CheckpointError(f"{where} is not a manifest fmnist wrote: {_hint(run_dir, ())}")
    problems = {}
    for name in SERVABLE:
        if name in ignore:
            continue
        present, listed = is_present(run_dir / name), files.get(name)
        if listed is None:
            if present:
                problems[name] = "is not in the manifest"
        elif not present:
            problems[name] = "is listed in the manifest but missing"
        elif _digest(run_dir / name) != {"bytes": listed.get("bytes"), "sha256": listed.get("sha256")}:
            problems[name] = "does not match its checksum in the manifest"
    if problems:
        name, what = next(iter(problems.items()))
        more = f" (and {', '.join(n for n in problems if n != name)})" if len(problems) > 1 else ""
        raise IncompleteRun(f"{run_dir} is not a complete run: {name} {what}{more}, a write that did not "
                            f"finish: {_hint(run_dir, problems)}")
    if manifest.get("trust", True) is not False and not (meta.get("calibration") and meta.get("ood")):
        raise IncompleteRun(f"{run_dir} has no calibration or OOD detector: fit them with "
                            f"`fmnist calibrate {run_dir}` before serving it")


def is_complete(run_dir, meta: dict) -> bool:
    try:
        check_complete(run_dir, meta)
    except CheckpointError:
        return False
    return True


def write_files(run_dir, blobs: dict[str, bytes]) -> None:
    """Write several files of ``run_dir`` as one step as far as a full disk goes: each to a temporary file first,
    then all renamed into place; a failed write leaves every previous file as it was."""
    run_dir = Path(run_dir)
    tmps, name = {}, next(iter(blobs), "")
    try:
        for name, data in blobs.items():
            fd, tmps[name] = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmps[name], 0o666 & ~_UMASK)
        for done, tmp in tmps.items():
            os.replace(tmp, run_dir / done)
    except BaseException as e:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_error(run_dir / name, e) from e
        raise
