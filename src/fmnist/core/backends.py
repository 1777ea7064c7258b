"""Inference backends: one forward pass of a run's model, giving (features, logits) as NumPy arrays.

``OnnxBackend`` runs ``RUN/model.onnx`` (or ``model.int8.onnx``, see :mod:`fmnist.fit.export`) with ONNX Runtime
and needs neither PyTorch nor ``onnx``. ``TorchBackend`` runs a PyTorch model; it and :func:`torch_model` are the
PyTorch edge of the core layer: they import ``torch`` and the architectures of :mod:`fmnist.fit.models` only when
called, so the rest of core, and a deployment without PyTorch, never load it. Both are built by
:meth:`fmnist.core.run.Run.backend`. Test-time augmentation is the caller's job: ``run`` is one pass.
"""
from __future__ import annotations

import importlib
import math
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from fmnist.core.errors import InputError
from fmnist.core.model_json import ModelJson
from fmnist.core.runfolder import (
    MODEL_JSON,
    ONNX_FP32,
    ONNX_INT8,
    WEIGHTS,
    CheckpointError,
    is_present,
    load_safetensors,
    read_run_file,
    sha256,
)

FP32, INT8 = ONNX_FP32, ONNX_INT8  # the files `fmnist export` writes in a run folder
INPUT = "image"
OUTPUTS = ("features", "logits")
INSTALL_HINT = "pip install onnxruntime (or: pip install 'fmnist[serve]')"


BACKENDS = ("torch", "onnx", "onnx-int8", "auto")


class Backend(Protocol):
    name: str

    def run(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), logits (N, C)), float32, of a normalised (N, 1, 28, 28) float32 batch."""


class TorchBackend:
    """A PyTorch model on a device, in eval mode, optionally under autocast (``precision`` bf16/fp16).

    ``channels_last`` stores weights and inputs NHWC (1.5-2x faster convolutions with oneDNN on CPU);
    ``fold_bn`` folds BatchNorm into the convolutions before it (the same function, fewer layers).
    """

    name = "torch"

    def __init__(self, model, device=None, precision: str = "fp32", channels_last: bool = True,
                 fold_bn: bool = False):
        import torch

        from fmnist.fit import runtime
        from fmnist.fit.models import fuse_conv_bn

        self.model = model.eval()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.precision = precision
        self.folded = fuse_conv_bn(self.model) if fold_bn else 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._autocast = lambda: runtime.autocast(self.device, precision)

    def run(self, x) -> tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            xb = torch.as_tensor(x).to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            with self._autocast():
                feats = self.model.features(xb)
                logits = self.model.head(feats)
            return feats.float().cpu().numpy(), logits.float().cpu().numpy()


def torch_model(run, device="cpu"):
    """The PyTorch model of ``run`` (a :class:`fmnist.core.run.Run`) with its weights, in eval mode, on ``device``."""
    from safetensors.torch import load

    from fmnist.fit.models import create_model

    try:
        model = create_model(run.model_name, num_classes=len(run.class_names))
    except ValueError as e:
        raise CheckpointError(f"{run.path / MODEL_JSON}: cannot build the model: {e}") from None
    state = load_safetensors(run.path / WEIGHTS, load)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{run.path / WEIGHTS} does not match {run.model_name}: {e}") from None
    return model.to(device).eval()


class MissingDependency(CheckpointError):
    """An optional package the requested backend or command needs is not installed."""


def importable(module: str) -> bool:
    """Whether ``import module`` works (not merely whether it is on disk: a broken install, or one blocked by
    setting ``sys.modules[module] = None``, counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def onnxruntime_available() -> bool:
    return importable("onnxruntime")


class OnnxBackend:
    """ONNX Runtime on the CPU, with its thread settings chosen for small models.

    ``threads``: intra-op threads (0 = ONNX Runtime's default, one per physical core). One thread suits a
    28x28 image; batches gain from more. ``spinning``: whether idle pool threads busy-wait for work. Spinning
    shaves microseconds off back-to-back calls but burns a core between requests, which a server sharing
    its cores with the event loop cannot afford, so it is off unless asked for.
    """

    name = "onnx"

    def __init__(self, path, desc: ModelJson, threads: int = 1, spinning: bool = False):
        self.path = Path(path)
        self.name = "onnx-int8" if self.path.name == INT8 else "onnx"
        if not onnxruntime_available():
            raise MissingDependency(f"{self.path}: the onnx backend needs ONNX Runtime: {INSTALL_HINT}")
        model_bytes = _read_checked(self.path, desc)
        check_graph(model_bytes, self.path)  # before ONNX Runtime sees it
        self.session = _session(model_bytes, self.path, threads, spinning)
        self.feature_dim, self.num_classes = _check_signature(self.session, self.path, desc)
        self.size = desc.preprocessing["size"]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x: float32 (N, 1, 28, 28), already normalised -> (features (N, D), logits (N, C)), float32.

        A call that runs past :func:`run_timeout` is stopped (ONNX Runtime's terminate flag, set from a timer)
        and, like any failure of ONNX Runtime, raised as one CheckpointError naming the file."""
        import onnxruntime as ort

        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (1, self.size, self.size):
            raise InputError(f"expected images of shape (N, 1, {self.size}, {self.size}), got {x.shape}")
        options = ort.RunOptions()
        limit = run_timeout(len(x))
        timer = threading.Timer(limit, lambda: setattr(options, "terminate", True))
        timer.daemon = True
        timer.start()
        try:
            features, logits = self.session.run(list(OUTPUTS), {INPUT: x}, options)
        except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors share no base class but Exception
            if options.terminate:
                raise CheckpointError(f"{self.path}: ONNX Runtime did not finish {len(x)} image(s) within "
                                      f"{limit:.0f} s and was stopped: the graph is not one fmnist export "
                                      "writes, or this machine is far too slow") from None
            raise CheckpointError(f"{self.path}: ONNX Runtime failed: {_first_line(e)}") from None
        finally:
            timer.cancel()
        return features, logits


# A call to ONNX Runtime is stopped past this many seconds (plus a share per image): fmnist's exports take
# milliseconds per image, so only a graph built to hang reaches it.
RUN_TIMEOUT_S = 30.0
RUN_TIMEOUT_PER_IMAGE_S = 0.05


def run_timeout(images: int) -> float:
    return RUN_TIMEOUT_S + RUN_TIMEOUT_PER_IMAGE_S * images


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


# --- the graphs fmnist export writes ------------------------------------------------------------------------

# The operators an export of fmnist's architectures holds (fp32 from torch.onnx's dynamo exporter, BatchNorm
# folded; int8 as QDQ from onnxruntime.quantization): what a run folder's ONNX file may use. Control flow
# (Loop, Scan, If), operators that allocate a size they compute (ConstantOfShape, Expand, Tile, Range, Resize,
# Pad...), custom domains and anything else are refused before ONNX Runtime loads the graph.
ALLOWED_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Clip", "Concat", "Constant", "Conv", "DepthToSpace",
    "DequantizeLinear", "Div", "Dropout", "Erf", "Flatten", "Gemm", "GlobalAveragePool", "GlobalMaxPool",
    "HardSigmoid", "HardSwish", "Identity", "LeakyRelu", "MatMul", "Max", "MaxPool", "Mean", "Min", "Mul",
    "Neg", "Pow", "QuantizeLinear", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Sigmoid", "Softmax", "SpaceToDepth",
    "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze",
})
MAX_NODES = 10_000
MAX_VALUES_PER_IMAGE = 1 << 22  # elements of one intermediate tensor per image (4 M floats: 16 MB)
MAX_FIXED_VALUES = 1 << 26  # elements of a tensor without the batch axis (weights, constants)


def check_graph(model_bytes: bytes, path: Path) -> None:
    """Refuse an ONNX graph that is not of the kind ``fmnist export`` writes (one CheckpointError naming
    ``path``): operators outside :data:`ALLOWED_OPS` (or outside the default domain), subgraphs, more than
    :data:`MAX_NODES` nodes, or any intermediate tensor whose inferred shape is not fixed but for the batch
    axis (once at most) or that holds more than :data:`MAX_VALUES_PER_IMAGE` elements per image. Its run time
    and memory are then those of a fixed chain of small layers. Needs the ``onnx`` package."""
    try:
        import onnx
    except ImportError:
        raise MissingDependency(f"{path}: checking an ONNX graph before it runs needs the onnx package: pip "
                                "install onnx (or: pip install 'fmnist[serve]')") from None
    try:
        model = onnx.load_model_from_string(model_bytes)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and others
        raise CheckpointError(f"{path} is not a valid ONNX file: {_first_line(e)}") from None
    problems = _graph_problems(model.graph)
    if not problems:
        try:
            one, two = _sizes(model, 1), _sizes(model, 2)
        except Exception as e:  # noqa: BLE001 - onnx's InferenceError, ValidationError...
            problems = [f"its shapes cannot be inferred ({_first_line(e)})"]
        else:
            problems = _size_problems(one, two)
    if problems:
        raise CheckpointError(f"{path} is not a graph fmnist export writes, refused before it runs: "
                              + "; ".join(problems[:5]))


def _graph_problems(graph) -> list[str]:
    if len(graph.node) > MAX_NODES:
        return [f"{len(graph.node)} nodes (at most {MAX_NODES})"]
    problems = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"operator {node.domain}.{node.op_type} (node {node.name!r}) is not allowed")
        elif node.op_type not in ALLOWED_OPS:
            problems.append(f"operator {node.op_type} (node {node.name!r}) is not allowed")
        elif any(a.type in (a.GRAPH, a.GRAPHS) for a in node.attribute):
            problems.append(f"node {node.name!r} holds a subgraph")
    # A tensor kept in an external file would be read from wherever ONNX Runtime looks (the working folder),
    # outside the run folder and its checksum: fmnist export writes every weight inside the graph.
    tensors = [*graph.initializer, *(a.t for n in graph.node for a in n.attribute if a.type == a.TENSOR),
               *(s.values for s in graph.sparse_initializer)]
    for tensor in tensors:
        if tensor.data_location == tensor.EXTERNAL or tensor.external_data:
            problems.append(f"tensor {tensor.name!r} refers to external data (a file outside the graph); an "
                            "fmnist export holds every weight inside model.onnx")
    for init in graph.initializer:
        if math.prod(init.dims) > MAX_FIXED_VALUES:
            problems.append(f"initializer {init.name!r} of shape {list(init.dims)} is too large")
    return problems


def _sizes(model, batch: int) -> dict[str, int | None]:
    """The number of elements of every tensor of the graph for a batch of ``batch`` images (None where its
    shape is not known before it runs), from onnx's shape inference with the batch axis fixed."""
    from onnx import ModelProto, shape_inference

    fixed = ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]  # shapes recorded in the file (with a symbolic batch) are inferred anew
    for value in (*fixed.graph.input, *fixed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    graph = shape_inference.infer_shapes(fixed, check_type=True, strict_mode=True, data_prop=True).graph
    sizes = {}
    for value in (*graph.value_info, *graph.output):
        t = value.type.tensor_type
        dims = list(t.shape.dim) if value.type.HasField("tensor_type") and t.HasField("shape") else None
        known = dims is not None and all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims)
        sizes[value.name] = math.prod(d.dim_value for d in dims) if known else None
    return sizes


def _size_problems(one: dict, two: dict) -> list[str]:
    """What is wrong with the tensors' sizes for one image (``one``) and two (``two``): unknown before the
    run, too large per image (or, for a tensor that does not grow with the batch, too large at all), or
    growing faster than the batch."""
    problems = []
    for name, n1 in one.items():
        n2 = two.get(name)
        if n1 is None or n2 is None:
            problems.append(f"tensor {name!r} has a size computed at run time")
        elif n2 > 2 * n1:
            problems.append(f"tensor {name!r} grows faster than the batch")
        elif n1 > (MAX_FIXED_VALUES if n2 == n1 else MAX_VALUES_PER_IMAGE):
            problems.append(f"tensor {name!r} would hold {n1:,} elements" + ("" if n2 == n1 else " per image"))
    return problems


def _read_checked(path: Path, desc: ModelJson) -> bytes:
    """The file's bytes, refused if they differ from what the export recorded or the weights changed since.

    A file with no record (exported by other means) is accepted here; its signature is still checked.
    """
    run = path.parent
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(f"{path} not found: export the run first (fmnist export {run})")
    data = read_run_file(path)
    record = desc.onnx_record(path.name)
    if record is None:
        return data
    if sha256(data) != record.get("sha256"):
        raise CheckpointError(f"{path} has changed since it was exported (its SHA-256 is not the one "
                              f"{run / MODEL_JSON} records): export the run again (fmnist export {run})")
    weights = run / WEIGHTS
    recorded_weights = desc.onnx.get("weights_sha256")
    if recorded_weights and is_present(weights) and sha256(read_run_file(weights)) != recorded_weights:
        raise CheckpointError(f"{path} was exported from other weights than {weights} holds now: export the run "
                              f"again (fmnist export {run})")
    return data


def _session(model_bytes: bytes, path: Path, threads: int, spinning: bool):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads > 0:
        opts.intra_op_num_threads = threads
    # One operator at a time: a chain of small convolutions has no parallel branches worth a second pool.
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    # Denormals as zero, as fmnist.fit.runtime.setup has PyTorch do: tiny activations then cost no slow path.
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    opts.log_severity_level = 3  # errors only: its warnings about unused initializers etc. are noise here
    try:
        return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's errors share no base class but Exception
        reason = _first_line(e)
        raise CheckpointError(f"ONNX Runtime cannot load {path} (damaged, truncated, or newer than ONNX Runtime "
                              f"{ort.__version__}?): {reason}") from None


def _check_signature(session, path: Path, desc: ModelJson) -> tuple[int, int]:
    """Check the graph's inputs and outputs against the run; return (feature dim, classes)."""
    size, classes = desc.preprocessing["size"], len(desc.class_names)
    recorded = (desc.onnx or {}).get("feature_dim")
    problems = []
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT]:
        problems.append(f"inputs {[i.name for i in inputs]}, expected [{INPUT!r}]")
    elif inputs[0].type != "tensor(float)" or list(inputs[0].shape[1:]) != [1, size, size] \
            or len(inputs[0].shape) != 4 or isinstance(inputs[0].shape[0], int):
        problems.append(f"input {INPUT!r} is {inputs[0].type} {inputs[0].shape}, expected float32 "
                        f"['batch', 1, {size}, {size}] with a dynamic batch axis")
    found = {o.name: o for o in outputs}
    if sorted(found) != sorted(OUTPUTS):
        problems.append(f"outputs {sorted(found)}, expected {list(OUTPUTS)}")
    else:
        f, g = found["features"], found["logits"]
        for o in (f, g):
            if o.type != "tensor(float)" or len(o.shape) != 2 or not isinstance(o.shape[1], int):
                problems.append(f"output {o.name!r} is {o.type} {o.shape}, expected float32 (batch, fixed size)")
        if len(g.shape) == 2 and g.shape[1] != classes:
            problems.append(f"{g.shape[1]} logits per image, but the run has {classes} classes")
        if len(f.shape) == 2 and recorded and f.shape[1] != recorded:
            problems.append(f"{f.shape[1]} features per image, but the run's model has {recorded}")
    if problems:
        raise CheckpointError(f"{path} does not match the run in {path.parent}: " + "; ".join(problems))
    return int(found["features"].shape[1]), classes
