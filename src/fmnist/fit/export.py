"""``fmnist export RUN``: the run's model as ONNX, checked against PyTorch image by image.

``export_onnx`` writes ``RUN/model.onnx``: one self-contained file (weights inside, no ``.data`` file), a
dynamic batch axis, input ``image`` (float32, N x 1 x 28 x 28, normalised as model.json's "preprocessing"
says) and two outputs, ``features`` (what the OOD detector scores) and ``logits``, BatchNorm folded into the
convolutions. With ``int8=True`` it also writes ``RUN/model.int8.onnx``, statically quantised (QDQ) with
ranges calibrated on training images only. model.json gets an "onnx" record: opset, exporter, versions,
each file's SHA-256 and that of the weights it came from, so a damaged or stale file is refused at load
(:class:`fmnist.core.backends.OnnxBackend`).

``validate_onnx`` compares ONNX Runtime with PyTorch on given images (the CLI: the whole official test set):
the ONNX checker, top-1 agreement, largest logit and feature differences, accuracy both ways with and
without the mirror; it prints them and writes ``RUN/export.json``.

The exporter is torch.onnx's ``dynamo=True`` one (``torch.export`` + onnxscript), chosen over the legacy
TorchScript exporter: the legacy one is deprecated (a FutureWarning in torch 2.13, "will be removed") and
leaves Identity and Constant nodes in the graph; the dynamo one gives the plain Conv/Relu/MaxPool/Gemm chain.
It writes large weights to an external ``.data`` file by default, hence ``external_data=False``.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from fmnist.core.backends import (
    FP32,
    INPUT,
    INT8,
    OUTPUTS,
    MissingDependency,
    OnnxBackend,
    importable,
)
from fmnist.core.errors import InputError
from fmnist.core.progress import Bar
from fmnist.core.runfolder import (
    EXPORT_REPORT,
    MANIFEST,
    MODEL_JSON,
    ONNX_FILES,
    WEIGHTS,
    CheckpointError,
    check_complete,
    is_present,
    record_complete,
    sha256,
    write_files,
    write_json,
)
from fmnist.fit.data import split_indices

# 18: the oldest opset the dynamo exporter emits natively (older ones go through a lossy version converter);
# ONNX Runtime has run it since 1.14.
DEFAULT_OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=True)"
CALIBRATION_IMAGES = 300
# fp32 ONNX Runtime and PyTorch differ by float rounding only (about 1e-6 here); more means a wrong export.
FP32_TOLERANCE = 1e-3
# int8 goal of the project: at most this many accuracy points lost against fp32 PyTorch.
INT8_MAX_DROP = 0.3
# Static QDQ quantisation for x86 CPUs: uint8 activations, int8 weights per output channel. Weights use a
# 7-bit range (reduce_range), so that CPUs without VNNI (AVX2 only) cannot saturate their 16-bit
# intermediate sums; on the test set this cost nothing measurable. MinMax ranges: entropy and percentile
# calibration gave the same accuracy on a few hundred images.
QUANTISATION = {"format": "QDQ", "activations": "uint8", "weights": "int8, per channel, 7-bit range",
                "calibration": "MinMax", "source": "training split"}
EXPORT_EXTRA = "pip install 'fmnist[export]' (onnx, onnxscript, onnxruntime)"


def withdraw(run_dir) -> None:
    """Remove a run's exported files and their record (an export that failed its check must not be served)."""
    from fmnist.core.run import Run

    run = Run.load(run_dir, detector=False, complete=False)
    run.update(onnx=None)
    for name in (FP32, INT8):
        (run.path / name).unlink(missing_ok=True)
    record_complete(run.path)


def load_exportable(run_dir):
    """The run to export: complete, or complete but for an export that did not finish (its ONNX files and
    model.json's record of them). A run written before manifests existed gets one first, so that an export
    interrupted later is told apart from the run it began with."""
    from fmnist.core.run import Run

    run = Run.load(run_dir, detector=False, complete=False)
    check_complete(run.path, run.meta, ignore=(*ONNX_FILES, MODEL_JSON))
    if not is_present(run.path / MANIFEST):
        record_complete(run.path)
    return run


def finish(run_dir) -> None:
    """Record a validated export: the run is complete again with it (its manifest is written last)."""
    record_complete(run_dir)


# --- export ----------------------------------------------------------------------------------------------------

def export_onnx(run_dir, int8: bool = False, opset: int = DEFAULT_OPSET, data=None,
                calibration_images: int = CALIBRATION_IMAGES, complete: bool = True) -> dict[str, Path]:
    """Write RUN/model.onnx (and with ``int8`` RUN/model.int8.onnx) and record them in model.json.

    ``data`` (a :class:`fmnist.fit.data.FashionMNIST`) is needed for ``int8``: its training images, in the run's
    training split, calibrate the quantisation. Everything is built in memory and checked before the first
    file is written; the ONNX files are written together (a full disk leaves the previous ones), then model.json,
    then the run's manifest unless ``complete=False`` (the command line records it once the export is
    validated, :func:`finish`): until then the run is refused, never served with an unrecorded file.
    Returns {file name: path}.
    """
    require("onnx", "onnxscript", *(("onnxruntime",) if int8 else ()))
    check_opset(opset)
    loaded = load_exportable(run_dir)
    run, model, meta = loaded.path, loaded.model(), loaded.meta
    if int8 and data is None:
        raise InputError("int8 export needs the training images to calibrate on (data=...)")
    weights = sha256((run / WEIGHTS).read_bytes())
    blobs = {FP32: _export_fp32(model, meta, opset)}
    records = {FP32: {"opset": opset}}
    if int8:
        images = calibration_images_of(loaded, data, calibration_images)
        blobs[INT8] = _quantise(blobs[FP32], images)
        records[INT8] = {"opset": opset, "quantisation": {**QUANTISATION, "images": len(images)}}
    previous = loaded.description.onnx or {}
    if not int8 and previous.get("weights_sha256") == weights and loaded.description.onnx_record(INT8):
        records[INT8] = loaded.description.onnx_record(INT8)  # still quantised from these weights: keep it
    stale = run / INT8 if INT8 not in records and (run / INT8).exists() else None
    for name, blob in blobs.items():
        records[name].update(sha256=sha256(blob), bytes=len(blob))
    write_files(run, blobs)
    record = {"exporter": EXPORTER, "opset": opset, "versions": _versions(),
                    "feature_dim": int(model.head.in_features), "classes": len(meta["class_names"]),
                    "input": INPUT, "outputs": list(OUTPUTS), "weights_sha256": weights,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": records}
    loaded.update(onnx=record)
    if stale is not None:
        stale.unlink()  # quantised from other weights; without a record it would be served unchecked
    if complete:
        finish(run)
    return {name: run / name for name in blobs}


def require(*modules: str) -> None:
    missing = [m for m in modules if not importable(m)]
    if missing:
        raise MissingDependency(f"export needs {', '.join(missing)}: {EXPORT_EXTRA}")


def check_opset(opset: int) -> None:
    """Refuse opsets the exporter would silently not produce (below 18 its version converter fails and
    leaves the graph at 18; above what the installed onnx knows, the same)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not DEFAULT_OPSET <= opset <= newest:
        raise InputError(f"opset {opset} is not supported: the exporter writes opsets {DEFAULT_OPSET} to {newest} "
                         f"(onnx {onnx.__version__})")


def _versions() -> dict:
    out = {}
    for name in ("torch", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _export_fp32(model, meta: dict, opset: int) -> bytes:
    """The model (BatchNorm folded, features and logits out) as a checked, self-contained ONNX file."""
    import copy

    import torch

    from fmnist.fit.models import fuse_conv_bn

    model = copy.deepcopy(model).eval()
    fuse_conv_bn(model)
    size = int(meta["preprocessing"].get("size", 28))
    # A batch of 2, not 1: torch.export fixes any dimension of size 1 in the example to a constant.
    example = (torch.zeros(2, 1, size, size),)
    with _quiet_exporter():
        program = torch.onnx.export(
            _two_outputs(model), example, None, dynamo=True, external_data=False, optimize=True, verbose=False,
            opset_version=opset, input_names=[INPUT], output_names=list(OUTPUTS),
            dynamic_shapes={"image": {0: torch.export.Dim("batch")}})
    proto = program.model_proto
    written = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if written != opset:
        raise CheckpointError(f"asked the exporter for opset {opset}, it wrote opset {written}")
    _strip_exporter_metadata(proto)
    for key, value in (("fmnist.model", meta["model"]), ("fmnist.class_names", json.dumps(meta["class_names"])),
                       ("fmnist.preprocessing", json.dumps(meta["preprocessing"]))):
        proto.metadata_props.add(key=key, value=value)
    return _checked(proto)


def _strip_exporter_metadata(proto) -> None:
    """Drop the exporter's debugging notes: each node carries the Python stack that made it (file paths of
    this machine), each value its FX name. Not for shipping, and a third of the file's non-weight bytes."""
    graph = proto.graph
    for item in (*graph.node, *graph.input, *graph.output, *graph.value_info, *graph.initializer):
        del item.metadata_props[:]
    del graph.metadata_props[:]
    del proto.metadata_props[:]


def _checked(proto) -> bytes:
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise CheckpointError(f"the exported graph fails the ONNX checker: {e}") from None
    return proto.SerializeToString()


def _two_outputs(model):
    """The model as a module that returns (features, logits); defined here to keep torch out of the import."""
    import torch

    class TwoOutputs(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, image):
            features = self.model.features(image)
            return features, self.model.head(features)

    return TwoOutputs(model).eval()


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's chatter that says nothing about this model (missing torchvision, deprecations)."""
    import logging
    import warnings

    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# --- int8 --------------------------------------------------------------------------------------------------------

def calibration_images_of(run, data, n: int) -> np.ndarray:
    """``n`` images of the run's own training split (never validation or test), preprocessed as it was."""
    from fmnist.fit.data import preprocess

    train_idx = np.asarray(split_indices(data.train_labels, run.config)[0])
    pick = np.sort(np.random.default_rng(0).choice(train_idx, min(n, len(train_idx)), replace=False))
    return preprocess(data.train_images[pick], run.spec).numpy()


def _quantise(fp32: bytes, images: np.ndarray, batch: int = 50) -> bytes:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images[i:i + batch] for i in range(0, len(images), batch))

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {INPUT: x}

    # The quantiser works on files; a private temporary folder holds them, the run folder sees only the result.
    with tempfile.TemporaryDirectory(prefix="fmnist-int8-") as tmp:
        src, pre, out = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True, calibrate_method=CalibrationMethod.MinMax)
        proto = onnx.load_model_from_string(out.read_bytes())
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise CheckpointError("the int8 graph refers to external data; expected one self-contained file")
    # The pre-processing step declares every ONNX Runtime operator domain; the graph uses standard ops only,
    # so keep just the domains its nodes use: other runtimes then need not know of the rest.
    used = {n.domain for n in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if o.domain in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    return _checked(proto)


# --- validation --------------------------------------------------------------------------------------------------

def validate_onnx(run_dir, images, labels, threads: int = 0, batch: int = 1000) -> dict:
    """ONNX Runtime against PyTorch on ``images`` (uint8 N x 28 x 28, data-set format) for every exported file.

    The PyTorch side is the run's model as trained (BatchNorm not folded), so the figures cover folding and
    export together. Writes RUN/export.json (atomically) and returns what it holds; "ok" is False when the
    fp32 file differs from PyTorch by more than FP32_TOLERANCE.
    """
    import onnx

    from fmnist.core.backends import TorchBackend
    from fmnist.fit.data import preprocess

    loaded = load_exportable(run_dir)
    run, model = loaded.path, loaded.model()
    files = [name for name in (FP32, INT8) if loaded.description.onnx_record(name)]
    if not files:
        raise CheckpointError(f"{run}: nothing exported to validate: run fmnist export {run}")
    x = preprocess(images, loaded.spec).numpy()
    y = np.asarray(labels).reshape(-1)
    if len(y) == 0 or len(y) != len(x):
        raise InputError(f"validation needs images and as many labels, got {len(x)} images, {len(y)} labels")
    bar = Bar(1 + len(files), f"export validation ({len(y):,} images)", unit="model")
    bar.update(0, on="PyTorch")
    reference = _outputs(TorchBackend(model), x, batch)
    report = {"images": len(y), "tolerance": FP32_TOLERANCE, "files": {},
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for name in files:
        bar.update(1, on=name)
        backend = OnnxBackend(run / name, loaded.description, threads=threads)  # checksum, load, signature: clear errors
        try:
            onnx.checker.check_model(str(run / name), full_check=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise CheckpointError(f"{run / name} fails the ONNX checker: {e}") from None
        report["files"][name] = {"checker": "passed", "bytes": (run / name).stat().st_size,
                                 **_compare(reference, _outputs(backend, x, batch), y)}
    bar.update(1)
    bar.close()
    fp32 = report["files"].get(FP32)
    if fp32 is not None and INT8 in report["files"]:
        q = report["files"][INT8]
        q["size_vs_fp32"] = round(q["bytes"] / fp32["bytes"], 4)
        q["accuracy_drop_vs_fp32_onnx"] = {
            k.strip("_") or "plain": 100 * (fp32["accuracy"]["onnx" + k] - q["accuracy"]["onnx" + k])
            for k in ("", "_mirror")}
    report["ok"] = fp32 is None or max(fp32[k] for k in fp32 if k.startswith("max_abs_")) <= FP32_TOLERANCE
    write_json(run / EXPORT_REPORT, report)
    return report


def _outputs(backend, x: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """Features and logits of each image, alone and mirrored, through the one forward pass (fmnist.core.forward)."""
    from fmnist.core.forward import forward

    (f, g), (fm, gm) = (forward(backend, x, tta=tta, batch_size=batch) for tta in (False, True))
    return {"features": f, "logits": g, "features_mirror": fm, "logits_mirror": gm}


def _compare(ref: dict, out: dict, y: np.ndarray) -> dict:
    result = {}
    for m in ("", "_mirror"):
        a, b = ref["logits" + m].argmax(1), out["logits" + m].argmax(1)
        result["top1_disagreements" + m] = int((a != b).sum())
        result["max_abs_logit_diff" + m] = _max_diff(ref["logits" + m], out["logits" + m])
        result["max_abs_feature_diff" + m] = _max_diff(ref["features" + m], out["features" + m])
        result.setdefault("accuracy", {}).update({"torch" + m: float((a == y).mean()),
                                                  "onnx" + m: float((b == y).mean())})
    result["accuracy_drop_points"] = {
        k.strip("_") or "plain": 100 * (result["accuracy"]["torch" + k] - result["accuracy"]["onnx" + k])
        for k in ("", "_mirror")}
    return result


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max())


def format_validation(report: dict) -> str:
    n = report["images"]
    lines = [f"ONNX Runtime vs PyTorch on {n:,} images (mirrored: mean of the image and its flip)"]
    for name, r in report["files"].items():
        size = f"{r['bytes'] / 1024:,.0f} KiB" + (f", {r['size_vs_fp32']:.2f}x fp32" if "size_vs_fp32" in r else "")
        acc = r["accuracy"]
        lines += [
            f"{name} ({size}; ONNX checker passed)",
            f"  top-1 disagreements   {r['top1_disagreements']:,} of {n:,}, mirrored {r['top1_disagreements_mirror']:,}",
            f"  max |logit diff|      {r['max_abs_logit_diff']:.2e}, mirrored {r['max_abs_logit_diff_mirror']:.2e}",
            f"  max |feature diff|    {r['max_abs_feature_diff']:.2e}, mirrored {r['max_abs_feature_diff_mirror']:.2e}",
            f"  accuracy PyTorch      {100 * acc['torch']:.2f} %, mirrored {100 * acc['torch_mirror']:.2f} %",
            f"  accuracy ONNX Runtime {100 * acc['onnx']:.2f} %, mirrored {100 * acc['onnx_mirror']:.2f} %",
        ]
        if name == INT8:
            drop = r["accuracy_drop_points"]
            flag = "" if max(drop.values()) <= INT8_MAX_DROP else f"  (over the {INT8_MAX_DROP} point goal)"
            lines.append(f"  accuracy drop         {drop['plain']:+.2f} points, mirrored {drop['mirror']:+.2f}{flag}")
    if not report["ok"]:
        lines.append(f"error: {FP32} differs from PyTorch by more than {FP32_TOLERANCE:g}: do not deploy it")
    return "\n".join(lines)
