"""Hostile and ambiguous inputs: the Python API's input contract on both backends, and run folders from
strangers (malicious ONNX graphs, files that are not files), each case with its exact outcome."""
from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper

import fmnist
from fmnist.apps.cli import main
from fmnist.core import backends
from fmnist.core.errors import CheckpointError, InputError
from fmnist.core.runfolder import read_json, record_complete, sha256, write_json
from fmnist.fit.export import FP32, export_onnx

FRESH = shutil.ignore_patterns("metrics.json", "export.json")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run, synthetic_data):
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("hostile") / "run", ignore=FRESH)
    export_onnx(run)
    return run


@pytest.fixture(scope="module", params=["torch", "onnx"])
def predictor(request, exported):
    p = fmnist.load(exported, backend=request.param)
    assert p.backend.name == request.param
    return p


@pytest.fixture(scope="module")
def garments(synthetic_data):
    x = synthetic_data.test_images.numpy()
    return x[[i for i in range(len(x)) if x[i].max() >= 200][:5]]


@pytest.fixture
def run(tmp_path, exported):
    return Path(shutil.copytree(exported, tmp_path / "run"))


def same(a: dict, b: dict) -> bool:
    return a["label"] == b["label"] and a["verdict"] == b["verdict"] and a["score"] == pytest.approx(b["score"],
                                                                                                       abs=1e-5)


# --- the input contract ----------------------------------------------------------------------------------------

def test_the_default_backend_is_onnx_where_exported(exported):
    assert fmnist.load(exported).backend.name == "onnx"


def test_one_image_gives_one_result(predictor, garments, tmp_path):
    one = predictor.predict(garments[0])
    assert isinstance(one, dict) and "label" in one
    path = tmp_path / "g.png"
    Image.fromarray(garments[0]).save(path)
    rgb = np.repeat(garments[0][..., None], 3, axis=2)
    for item in (str(path), path, path.read_bytes(), bytearray(path.read_bytes()), Image.fromarray(garments[0]),
                 Image.fromarray(garments[0]).convert("RGBA"),
                 garments[0][..., None], rgb, np.dstack([rgb, np.full((28, 28), 255, np.uint8)]),
                 torch.from_numpy(garments[0]), torch.from_numpy(rgb)):
        r = predictor.predict(item)
        assert isinstance(r, dict) and same(r, one), type(item)


def test_several_images_give_a_list_in_order(predictor, garments, tmp_path):
    singles = [predictor.predict(g) for g in garments]
    paths = []
    for i, g in enumerate(garments):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(g).save(paths[-1])
    x = garments  # (5, 28, 28)
    for batch in (x, torch.from_numpy(x), x[:, None], torch.from_numpy(x[:, None]), x[..., None],
                  np.repeat(x[..., None], 3, axis=3), list(x), tuple(x), paths, np.array(paths)):
        results = predictor.predict(batch)
        assert isinstance(results, list) and len(results) == len(garments)
        assert all(same(r, s) for r, s in zip(results, singles))
    assert predictor.predict([]) == []
    ones = predictor.predict(x[:1])  # (1, H, W): a batch of one
    assert isinstance(ones, list) and len(ones) == 1 and same(ones[0], singles[0])


def test_each_image_of_a_list_is_its_own_success_or_error(predictor, garments):
    results = predictor.predict([garments[0], b"not an image", np.zeros((2, 2, 2, 2)), garments[1], 42])
    assert len(results) == 5
    assert same(results[0], predictor.predict(garments[0])) and same(results[3], predictor.predict(garments[1]))
    assert set(results[1]) == {"error"} and "image" in results[1]["error"]
    assert "expected one image" in results[2]["error"]
    assert results[4] == {"error": "cannot read a int as an image: give a path, bytes, a PIL image, or an array "
                                   "or tensor of shape (H, W) or (H, W, C)"}


@pytest.mark.parametrize("shape, message", [
    ((3, 28, 28), r"\(3, 28, 28\) is ambiguous: one channels-first image or 3 grayscale ones\? .*x\[:, None\]"
                  r".*x.transpose\(1, 2, 0\)"),
    ((4, 28, 28), r"\(4, 28, 28\) is ambiguous"),
    ((2, 28, 28), r"\(2, 28, 28\) is ambiguous"),
    ((5, 3, 28, 28), r"is not \(N, 1, H, W\) nor \(N, H, W, C\).*x.transpose\(0, 2, 3, 1\)"),
    ((28,), r"cannot read an array of shape \(28,\) as images"),
    ((1, 1, 1, 28, 28), r"cannot read an array of shape \(1, 1, 1, 28, 28\)"),
])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ambiguous_shapes_are_refused_with_how_to_pass_them(predictor, shape, message, kind):
    x = np.zeros(shape, np.uint8)
    with pytest.raises(InputError, match=message):
        predictor.predict(x if kind == "numpy" else torch.from_numpy(x))


def test_one_unreadable_image_raises(predictor):
    from fmnist.core.images import ImageError

    with pytest.raises(ImageError):
        predictor.predict(b"not an image")
    with pytest.raises(InputError, match="cannot read a dict"):
        predictor.predict({"image": 1})


@pytest.mark.parametrize("kwargs, message", [
    ({"threshold": 5}, "threshold must be a number from 0 to 1"),
    ({"threshold": -1}, "threshold must be a number from 0 to 1"),
    ({"threshold": float("nan")}, "threshold must be a finite number"),
    ({"threshold": "0.5"}, "threshold must be a finite number"),
    ({"ood_threshold": float("inf")}, "ood_threshold must be a finite number"),
    ({"top_k": 0}, "top_k must be a whole number from 1 to 10"),
    ({"top_k": -5}, "top_k must be a whole number from 1 to 10"),
    ({"top_k": 1000}, "top_k must be a whole number from 1 to 10"),
    ({"top_k": 2.5}, "top_k must be a whole number"),
    ({"top_k": True}, "top_k must be a whole number"),
    ({"backend": "tensorflow"}, "unknown backend 'tensorflow'"),
])
def test_load_checks_its_arguments(exported, kwargs, message):
    with pytest.raises(InputError, match=message):
        fmnist.load(exported, **kwargs)


def test_load_takes_its_options_by_name_only(exported):
    with pytest.raises(TypeError):
        fmnist.load(exported, "torch")
    p = fmnist.load(exported, backend="torch", threshold=0.9, ood_threshold=1.5, top_k=10)
    assert (p.confidence_threshold, p.ood_threshold, p.top_k) == (0.9, 1.5, 10)


# --- run files that are not files --------------------------------------------------------------------------------

def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _to_dev_zero(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _to_passwd(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/etc/passwd")


def _sparse_3gb(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(3 * 1024 ** 3)


@pytest.mark.parametrize("name", ["model.onnx", "model.json", "config.json", "model.safetensors",
                                  "ood.safetensors", "metrics.json"])
@pytest.mark.parametrize("damage, message", [
    (_fifo, "is a FIFO, not a regular file: a run file must be a regular file inside the run folder"),
    (_to_dev_zero, "is a symbolic link, not a regular file: a run file must be a regular file inside the run folder"),
    (_to_passwd, "is a symbolic link"),
    (_sparse_3gb, r"is 3,221,225,472 bytes, over the [\d,]+-byte limit"),
])
def test_a_run_file_that_is_not_a_regular_file_of_its_size_is_refused(run, name, damage, message):
    if name == "metrics.json":
        write_json(run / name, {"accuracy": 0.5})
    damage(run / name)
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"^{run / name} " + message):
        p = fmnist.load(run, backend="onnx")
        p.info()  # metrics.json is read when the model is described
    assert time.perf_counter() - start < 20  # refused, not read (a FIFO would hang, /dev/zero never ends)


def test_metrics_json_values_are_checked(run):
    write_json(run / "metrics.json", {"accuracy": "high"})
    with pytest.raises(CheckpointError, match=r"metrics.json: accuracy must be a finite number, got 'high'"):
        fmnist.load(run, backend="torch").info()
    write_json(run / "metrics.json", [1, 2])
    with pytest.raises(CheckpointError, match="metrics.json does not hold a JSON object"):
        fmnist.load(run, backend="torch").info()


def test_predict_command_refuses_a_fifo_in_one_line(run, capsys, tmp_path):
    _fifo(run / FP32)
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert main(["predict", str(run), str(png), "--backend", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.onnx is a FIFO" in err[0]


# --- malicious ONNX graphs -------------------------------------------------------------------------------------

def _graph(extra_nodes, extra_out: str | None, initializers=(), opset=18, domain_ops=()):
    """A graph of the run's signature (features (batch, 192), logits (batch, 10)) whose features are passed
    through ``extra_nodes``: ``extra_out`` is added to them."""
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 28, 28])
    f = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 192])
    g = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])
    inits = [numpy_helper.from_array(np.zeros((784, 192), np.float32), "w1"),
             numpy_helper.from_array(np.zeros((192, 10), np.float32), "w2"), *initializers]
    nodes = [helper.make_node("Flatten", ["image"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["f0"]), *extra_nodes,
             helper.make_node("Add", ["f0", extra_out], ["features"]) if extra_out else
             helper.make_node("Identity", ["f0"], ["features"]),
             helper.make_node("MatMul", ["features", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "hostile", [x], [f, g], inits)
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domain_ops)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 9
    return model.SerializeToString()


def _const(name, value, dtype=np.int64):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value, dtype), name))


def loop_graph() -> bytes:
    """A Loop of 2^62 trips that adds one each time."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"]), _const("one", [1.0], np.float32),
         helper.make_node("Add", ["v", "one"], ["v_out"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])])
    nodes = [_const("trips", 2 ** 62), _const("go", True, np.bool_), _const("v0", [0.0], np.float32),
             helper.make_node("Loop", ["trips", "go", "v0"], ["v_end"], body=body)]
    return _graph(nodes, "v_end")


def constant_of_shape_graph() -> bytes:
    """14 GB of zeros at run time (60,000 x 60,000 floats)."""
    nodes = [_const("shape", [60000, 60000]),
             helper.make_node("ConstantOfShape", ["shape"], ["big"],
                              value=numpy_helper.from_array(np.zeros(1, np.float32))),
             helper.make_node("ReduceMean", ["big"], ["m"], keepdims=0)]
    return _graph(nodes, "m")


def expand_graph() -> bytes:
    nodes = [_const("shape", [20000, 20000]), _const("one", [1.0], np.float32),
             helper.make_node("Expand", ["one", "shape"], ["big"]),
             helper.make_node("ReduceMean", ["big"], ["m"], keepdims=0)]
    return _graph(nodes, "m")


def doubling_graph() -> bytes:
    """Allowed operators only, but each Concat doubles the tensor: 784 x 2^16 floats per image (200 MB)."""
    nodes, last = [], "flat"
    for i in range(16):
        nodes.append(helper.make_node("Concat", [last, last], [f"c{i}"], axis=1))
        last = f"c{i}"
    nodes += [_const("axes", [1]), helper.make_node("ReduceMean", [last, "axes"], ["m"], keepdims=1)]
    return _graph(nodes, "m")


def custom_op_graph() -> bytes:
    nodes = [helper.make_node("Gelu", ["f0"], ["gelu"], domain="com.microsoft")]
    return _graph(nodes, "gelu", domain_ops=["com.microsoft"])


def plant(run: Path, data: bytes) -> None:
    """Put ``data`` as the run's model.onnx, with its SHA-256 recorded as an export's (what an attacker does)."""
    (run / FP32).write_bytes(data)
    meta = read_json(run / "model.json")
    meta["onnx"]["files"][FP32]["sha256"] = sha256(data)
    meta["onnx"]["files"][FP32]["bytes"] = len(data)
    write_json(run / "model.json", meta)
    record_complete(run)  # and its manifest: only the graph check stands between it and ONNX Runtime


@pytest.mark.parametrize("build, message", [
    (loop_graph, r"operator Loop \(node ''\) is not allowed"),
    (constant_of_shape_graph, r"operator ConstantOfShape \(node ''\) is not allowed"),
    (expand_graph, r"operator Expand \(node ''\) is not allowed"),
    (doubling_graph, r"tensor 'c12' would hold 6,422,528 elements per image"),
    (custom_op_graph, r"operator com.microsoft.Gelu \(node ''\) is not allowed"),
])
def test_a_graph_fmnist_export_does_not_write_is_refused_before_it_runs(run, build, message, capsys, tmp_path):
    plant(run, build())
    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=f"^{run / FP32} is not a graph fmnist export writes, refused "
                                              f"before it runs: .*{message}"):
        fmnist.load(run, backend="onnx")
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert main(["predict", str(run), str(png), "--backend", "onnx"]) == 2  # one line, exit status 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a graph fmnist export writes" in err[0]
    assert time.perf_counter() - start < 30


def test_a_graph_that_is_not_onnx_is_refused(run):
    plant(run, b"\x08\x09garbage" * 100)
    with pytest.raises(CheckpointError, match=f"^{run / FP32} is not "):
        fmnist.load(run, backend="onnx")


def test_a_call_past_its_time_limit_is_stopped(exported, monkeypatch):
    backend = fmnist.load(exported, backend="onnx").backend
    monkeypatch.setattr(backends, "RUN_TIMEOUT_S", 0.0)
    monkeypatch.setattr(backends, "RUN_TIMEOUT_PER_IMAGE_S", 0.0)
    with pytest.raises(CheckpointError, match=r"model.onnx: ONNX Runtime did not finish 4000 image\(s\) within 0 s "
                                              "and was stopped"):
        backend.run(np.zeros((4000, 1, 28, 28), np.float32))
    monkeypatch.undo()
    features, logits = backend.run(np.zeros((3, 1, 28, 28), np.float32))  # the session still works
    assert features.shape == (3, 192) and logits.shape == (3, 10)


def test_the_exports_of_fmnist_pass_the_check(exported):
    backends.check_graph((exported / FP32).read_bytes(), exported / FP32)


def test_png_bytes_through_io(predictor, garments):
    buf = io.BytesIO()
    Image.fromarray(garments[2]).save(buf, format="PNG")
    assert same(predictor.predict(memoryview(buf.getvalue())), predictor.predict(garments[2]))


def test_a_blocked_torch_module_counts_as_absent(monkeypatch):
    import sys

    pytest.importorskip("threadpoolctl")
    from fmnist.apps.serve.inference import single_threaded_compute

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises; the entry itself is None
    single_threaded_compute()  # the server's start: no AttributeError on None
    assert not backends.importable("torch")
