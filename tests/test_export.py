"""ONNX export and the ONNX Runtime backend: parity with PyTorch, int8, the record in model.json, bad files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from fmnist import CLASS_NAMES
from fmnist.apps.cli import main
from fmnist.core.backends import MissingDependency, OnnxBackend, TorchBackend
from fmnist.core.preprocess import DEFAULT_SPEC
from fmnist.core.run import MODEL_FORMAT, Run
from fmnist.core.runfolder import record_complete
from fmnist.fit.checkpoint import CheckpointError, read_json, save_model, save_tensors, write_json
from fmnist.fit.data import preprocess
from fmnist.fit.export import FP32, INT8, calibration_images_of, export_onnx, validate_onnx
from fmnist.fit.models import create_model

FRESH = shutil.ignore_patterns("metrics.json", "export.json")



def onnx_backend(path: Path, **kwargs) -> OnnxBackend:
    """An ONNX backend on ``path``, with the model.json of the run folder it lies in."""
    # complete=False: the backend's own checks, which hold for a stranger's folder whose manifest matches too
    return OnnxBackend(path, Run.load(path.parent, detector=False, complete=False).description, **kwargs)

def images(data, n, start=0) -> np.ndarray:
    return preprocess(data.test_images[start:start + n], DEFAULT_SPEC).numpy()


def assert_parity(run: Path, name: str, x: np.ndarray, atol: float = 1e-4) -> None:
    model, _ = load_model(run)
    f_ref, l_ref = TorchBackend(model).run(x)
    f, l = onnx_backend(run / name, threads=1).run(x)
    assert f.shape == f_ref.shape and l.shape == l_ref.shape and f.dtype == l.dtype == np.float32
    np.testing.assert_allclose(f, f_ref, atol=atol, rtol=0)
    np.testing.assert_allclose(l, l_ref, atol=atol, rtol=0)
    assert (l.argmax(1) == l_ref.argmax(1)).all()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run, synthetic_data):
    """The shared trained run (s2d-24), copied and exported once, fp32 and int8. Tests that change it copy it."""
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("export") / "run", ignore=FRESH)
    export_onnx(run, int8=True, data=synthetic_data, calibration_images=96)
    return run


@pytest.fixture
def run(tmp_path, exported):
    return shutil.copytree(exported, tmp_path / "run")


# --- what export writes ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7])
def test_onnx_runtime_matches_pytorch_at_any_batch_size(exported, synthetic_data, n):
    assert_parity(exported, FP32, images(synthetic_data, n))


def test_one_self_contained_file_with_the_agreed_signature(exported):
    assert not [p.name for p in exported.iterdir() if p.suffix == ".data" or p.name.endswith(".tmp")]
    for name in (FP32, INT8):
        proto = onnx.load(str(exported / name), load_external_data=False)
        assert not [t.name for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        onnx.checker.check_model(proto, full_check=True)
        (inp,) = proto.graph.input
        dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
        assert inp.name == "image" and dims == ["batch", 1, 28, 28]
        assert [o.name for o in proto.graph.output] == ["features", "logits"]
        assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
        assert b"/tmp" not in (exported / name).read_bytes()  # the exporter's stack traces are stripped
    record = read_json(exported / "model.json")["onnx"]
    assert record["opset"] == 18 and record["exporter"] == "torch.onnx.export(dynamo=True)"
    assert set(record["versions"]) == {"torch", "onnx", "onnxscript", "onnxruntime"}
    assert record["feature_dim"] == 192 and record["classes"] == 10
    assert record["files"][INT8]["quantisation"]["images"] == 96


def test_residual_model_with_batchnorm_statistics(tmp_path, synthetic_data):
    """resnet9-s with random BatchNorm statistics and affine parameters: folding and export stay exact."""
    torch.manual_seed(0)
    model = create_model("resnet9-s").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_(1, 0.2)
            m.bias.data.normal_(0, 0.2)
    save_model(tmp_path, model, {"class_names": list(CLASS_NAMES), "preprocessing": DEFAULT_SPEC})
    record_complete(tmp_path, trust=False)
    export_onnx(tmp_path)
    proto = onnx.load(str(tmp_path / FP32))
    assert {"Add", "Conv"} <= {n.op_type for n in proto.graph.node}
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    for n in (1, 7):
        assert_parity(tmp_path, FP32, images(synthetic_data, n, start=10))


def test_int8_is_smaller_and_agrees_on_most_answers(exported, synthetic_data):
    assert (exported / INT8).stat().st_size < 0.5 * (exported / FP32).stat().st_size
    x = images(synthetic_data, 200)
    _, l_ref = TorchBackend(load_model(exported)[0]).run(x)
    _, l_q = onnx_backend(exported / INT8, threads=1).run(x)
    assert (l_q.argmax(1) == l_ref.argmax(1)).mean() >= 0.95


def test_calibration_images_come_from_the_training_split_only(exported, synthetic_data):
    from fmnist.fit.data import stratified_split

    meta = read_json(exported / "model.json")
    calib = calibration_images_of(Run.load(exported), synthetic_data, 64)
    assert calib.shape == (64, 1, 28, 28) and calib.dtype == np.float32
    train_idx, val_idx = stratified_split(synthetic_data.train_labels, 200, 0)  # as the run was trained
    keys = lambda imgs: {preprocess(i[None], meta["preprocessing"]).numpy().tobytes() for i in imgs}  # noqa: E731
    train, val = keys(synthetic_data.train_images[train_idx]), keys(synthetic_data.train_images[val_idx])
    got = {c[None].tobytes() for c in calib}
    assert got <= train and not got & val and not got & keys(synthetic_data.test_images)


def test_validation_report(exported, synthetic_data):
    report = validate_onnx(exported, synthetic_data.test_images[:120], synthetic_data.test_labels[:120], threads=1)
    assert read_json(exported / "export.json") == json.loads(json.dumps(report))
    fp32, q = report["files"][FP32], report["files"][INT8]
    assert report["ok"] and report["images"] == 120
    assert fp32["top1_disagreements"] == fp32["top1_disagreements_mirror"] == 0
    assert max(fp32[k] for k in fp32 if k.startswith("max_abs_")) < 1e-4
    assert fp32["accuracy"]["torch"] == fp32["accuracy"]["onnx"] > 0.8
    assert fp32["accuracy"]["torch_mirror"] == fp32["accuracy"]["onnx_mirror"]
    assert q["top1_disagreements"] <= 6 and 0 < q["size_vs_fp32"] < 0.5
    assert set(q["accuracy_drop_points"]) == set(q["accuracy_drop_vs_fp32_onnx"]) == {"plain", "mirror"}


@pytest.mark.slow
def test_command_line(tmp_path, trained_run, idx_dir, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    rc = main(["export", str(run), "--int8", "--calibration-images", "64", "--limit", "50", "--threads", "1",
               "--data-dir", str(idx_dir), "--no-verify"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "top-1 disagreements   0 of 50" in out and "accuracy drop" in out
    assert (run / FP32).is_file() and (run / INT8).is_file() and (run / "export.json").is_file()


# --- re-export and stale files -----------------------------------------------------------------------------------

def test_new_weights_make_the_export_stale_until_exported_again(run, synthetic_data):
    export_onnx(run)  # same weights: the int8 file stays valid and recorded
    onnx_backend(run / INT8)
    model, _ = load_model(run)
    state = {k: v * 1.1 if k == "head.weight" else v for k, v in model.state_dict().items()}
    save_tensors(run / "model.safetensors", state, metadata={"format": MODEL_FORMAT})
    with pytest.raises(CheckpointError, match="exported from other weights"):
        onnx_backend(run / FP32)
    with pytest.raises(CheckpointError, match="model.safetensors does not match its checksum in the manifest"):
        export_onnx(run)  # weights changed behind fmnist's back: not a run fmnist wrote
    record_complete(run)
    export_onnx(run)
    assert not (run / INT8).exists() and INT8 not in read_json(run / "model.json")["onnx"]["files"]
    assert_parity(run, FP32, images(synthetic_data, 7))


# --- bad input: one clear error each, nothing half-written --------------------------------------------------------

def test_run_without_weights(tmp_path, trained_run):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    (run / "model.safetensors").unlink()
    before = (run / "model.json").read_bytes()
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        export_onnx(run)
    assert main(["export", str(run)]) == 2
    assert not (run / FP32).exists() and (run / "model.json").read_bytes() == before


def test_an_export_that_fails_its_check_is_withdrawn(tmp_path, trained_run, idx_dir, capsys, monkeypatch):
    import fmnist.fit.export
    from fmnist.core.predict import Predictor

    monkeypatch.setattr(fmnist.fit.export, "FP32_TOLERANCE", -1.0)  # any difference from PyTorch fails the check
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    assert main(["export", str(run), "--limit", "20", "--threads", "1", "--data-dir", str(idx_dir),
                 "--no-verify"]) == 1
    assert "files are removed" in capsys.readouterr().out
    assert not (run / FP32).exists() and read_json(run / "model.json").get("onnx") is None
    assert read_json(run / "export.json")["ok"] is False  # kept, to see what differed
    assert Predictor.from_run(run, backend="auto").backend.name == "torch"


def test_failure_while_quantising_writes_nothing(tmp_path, trained_run, synthetic_data, monkeypatch):
    import fmnist.fit.export

    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    before = sorted(p.name for p in run.iterdir()), (run / "model.json").read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("quantiser failed")

    monkeypatch.setattr(fmnist.fit.export, "_quantise", fail)
    with pytest.raises(RuntimeError, match="quantiser failed"):
        export_onnx(run, int8=True, data=synthetic_data)
    assert (sorted(p.name for p in run.iterdir()), (run / "model.json").read_bytes()) == before


def test_unsupported_opset(run):
    with pytest.raises(ValueError, match="opset 17 is not supported"):
        export_onnx(run, opset=17)
    assert main(["export", str(run), "--opset", "99"]) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_or_truncated_model(run, damage):
    data = bytearray((run / FP32).read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside the weights: still parses, computes something else
    else:
        data = data[: len(data) // 3]
    (run / FP32).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="has changed since it was exported"):
        onnx_backend(run / FP32)
    meta = read_json(run / "model.json")
    del meta["onnx"]["files"][FP32]  # no record to compare with: the graph check must catch it
    write_json(run / "model.json", meta)
    if damage == "truncate":
        with pytest.raises(CheckpointError, match="model.onnx is not a valid ONNX file"):
            onnx_backend(run / FP32)


def test_missing_model_onnx(tmp_path, trained_run):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    with pytest.raises(CheckpointError, match="model.onnx not found: export the run first"):
        onnx_backend(run / FP32)


def small_graph(path: Path, input_name="image", batch="batch", classes=10, hidden=784) -> None:
    """A valid ONNX model of the wrong shape for the run: flatten, then one matrix product."""
    x = helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, 1, 28, 28])
    f = helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, hidden])
    g = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    weights = [numpy_helper.from_array(np.zeros((784, hidden), np.float32), "w1"),
               numpy_helper.from_array(np.zeros((hidden, classes), np.float32), "w2")]
    nodes = [helper.make_node("Flatten", [input_name], ["flat"]),
             helper.make_node("MatMul", ["flat", "w1"], ["features"]),
             helper.make_node("MatMul", ["features", "w2"], ["logits"])]
    graph = helper.make_graph(nodes, "wrong", [x], [f, g], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("kwargs, message", [
    ({"input_name": "x"}, r"inputs \['x'\], expected \['image'\]"),
    ({"classes": 5}, "5 logits per image, but the run has 10 classes"),
    ({"batch": 1}, "with a dynamic batch axis"),
    ({"hidden": 100}, "100 features per image, but the run's model has 192"),
])
def test_model_that_does_not_match_the_run(run, kwargs, message):
    small_graph(run / FP32, **kwargs)
    with pytest.raises(CheckpointError, match="has changed since it was exported"):
        onnx_backend(run / FP32)  # recorded checksum first
    meta = read_json(run / "model.json")
    del meta["onnx"]["files"][FP32]
    write_json(run / "model.json", meta)
    with pytest.raises(CheckpointError, match="does not match the run.*" + message):
        onnx_backend(run / FP32)


def test_weights_kept_outside_the_graph_are_refused(run, tmp_path, monkeypatch):
    """ONNX Runtime would read external data from the working folder, which no checksum covers: refused."""
    model = onnx.load(str(run / FP32))
    onnx.save_model(model, str(run / FP32), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.data", size_threshold=0)
    meta = read_json(run / "model.json")
    del meta["onnx"]["files"][FP32]  # no recorded checksum: the graph check alone must refuse it
    write_json(run / "model.json", meta)
    monkeypatch.chdir(run)  # the external file is where the runtime would find it
    with pytest.raises(CheckpointError, match="refers to external data"):
        onnx_backend(run / FP32)


def test_wrong_input_shape_at_run_time(exported):
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 1, 28, 28\)"):
        onnx_backend(exported / FP32).run(np.zeros((2, 28, 28), np.float32))


def test_without_onnxruntime_or_onnxscript(run, monkeypatch):
    before = (run / "model.json").read_bytes()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(MissingDependency, match="needs ONNX Runtime: pip install onnxruntime"):
        onnx_backend(run / FP32)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    (run / FP32).unlink()
    with pytest.raises(MissingDependency, match=r"export needs onnxscript: pip install 'fmnist\[export\]'"):
        export_onnx(run)
    assert not (run / FP32).exists() and (run / "model.json").read_bytes() == before


# --- no PyTorch ------------------------------------------------------------------------------------------------

def test_onnx_backend_runs_where_torch_cannot_be_imported(exported, synthetic_data, tmp_path):
    x = images(synthetic_data, 5)
    np.save(tmp_path / "x.npy", x)
    code = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now fails
import numpy as np
from fmnist.core.backends import OnnxBackend
from fmnist.core.run import Run
meta = Run.load({str(exported)!r}, detector=False).description
features, logits = OnnxBackend({str(exported / FP32)!r}, meta).run(np.load({str(tmp_path / 'x.npy')!r}))
np.save({str(tmp_path / 'logits.npy')!r}, logits)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors")))
"""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['torch']"  # only the blocking entry: nothing else of torch was loaded
    _, l_ref = TorchBackend(load_model(exported)[0]).run(x)
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), l_ref, atol=1e-4, rtol=0)


def load_model(path):
    run = Run.load(path, complete=False)
    return run.model(), run.meta
