"""Both inference backends give the same answers: temperature, OOD detector and thresholds apply identically."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fmnist.checkpoint import CheckpointError  # noqa: E402
from fmnist.cli import main  # noqa: E402
from fmnist.evaluate import evaluate_run  # noqa: E402
from fmnist.export import export_onnx  # noqa: E402
from fmnist.predict import Predictor  # noqa: E402
from fmnist.trust import eval_sets  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run):
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("backends") / "run",
                          ignore=shutil.ignore_patterns("metrics.json", "model*.onnx"))
    export_onnx(run)
    return run


def _images(synthetic_data) -> list:
    rng = np.random.default_rng(0)
    ood = list(eval_sets.uniform_noise(10, rng)) + list(eval_sets.build("rotated-90", 10,
                                                                        synthetic_data.test_images.numpy()))
    return list(synthetic_data.test_images[:60].numpy()) + ood


def test_torch_and_onnx_give_the_same_answers_to_garments_and_to_ood_images(exported, synthetic_data):
    torch_p = Predictor.from_run(exported, backend="torch")
    onnx_p = Predictor.from_run(exported, backend="onnx")
    assert (torch_p.backend.name, onnx_p.backend.name) == ("torch", "onnx")
    a, b = torch_p.predict_batch(_images(synthetic_data)), onnx_p.predict_batch(_images(synthetic_data))
    assert any(r["reason"] == "out_of_distribution" for r in a)  # the OOD gate is exercised
    for x, y in zip(a, b):
        assert (x["label"], x["accepted"], x["reason"]) == (y["label"], y["accepted"], y["reason"])
        assert x["score"] == pytest.approx(y["score"], abs=1e-5)
        assert x["ood_score"] == pytest.approx(y["ood_score"], abs=1e-4)


def test_auto_picks_onnx_where_exported_and_torch_elsewhere(exported, trained_run):
    assert Predictor.from_run(exported, backend="auto").backend.name == "onnx"
    assert Predictor.from_run(trained_run, backend="auto").backend.name == "torch"


def test_onnx_backend_without_an_export_is_a_clear_error(trained_run, capsys):
    with pytest.raises(CheckpointError, match="model.onnx not found"):
        Predictor.from_run(trained_run, backend="onnx")
    code = main(["predict", str(trained_run), "x.png", "--backend", "onnx"])
    assert code == 2 and "model.onnx not found" in capsys.readouterr().err


def test_evaluate_and_predict_commands_on_the_onnx_backend(exported, synthetic_data, idx_dir, capsys, tmp_path):
    torch_m = evaluate_run(exported, data=synthetic_data, write=False, threads=1, backend="torch")
    onnx_m = evaluate_run(exported, data=synthetic_data, write=False, threads=1, backend="onnx")
    assert onnx_m["backend"] == "onnx" and torch_m["backend"] == "torch"
    assert onnx_m["accuracy"] == torch_m["accuracy"] and onnx_m["loss"] == pytest.approx(torch_m["loss"], abs=1e-5)
    assert main(["predict", str(exported), str(idx_dir / "t10k-images-idx3-ubyte"), "--backend", "onnx"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(synthetic_data.test_labels) and all("label" in r for r in lines)


def test_unknown_backend_is_refused(exported):
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor.from_run(exported, backend="tensorrt")
