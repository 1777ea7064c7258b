"""Both inference backends give the same answers: temperature, OOD detector and thresholds apply identically."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from fmnist.apps.cli import main  # noqa: E402
from fmnist.core.predict import Predictor  # noqa: E402
from fmnist.core.runfolder import record_complete  # noqa: E402
from fmnist.fit.checkpoint import CheckpointError  # noqa: E402
from fmnist.fit.evaluate import evaluate_run  # noqa: E402
from fmnist.fit.export import export_onnx  # noqa: E402
from fmnist.fit.trust import eval_sets  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_run, synthetic_data):
    run = shutil.copytree(trained_run, tmp_path_factory.mktemp("backends") / "run",
                          ignore=shutil.ignore_patterns("metrics.json", "model*.onnx"))
    export_onnx(run, int8=True, data=synthetic_data, calibration_images=96)
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


def test_int8_backend_evaluates_close_to_fp32(exported, synthetic_data):
    fp32 = evaluate_run(exported, data=synthetic_data, write=False, threads=1, backend="onnx")
    int8 = evaluate_run(exported, data=synthetic_data, write=False, threads=1, backend="onnx-int8")
    assert int8["backend"] == "onnx-int8" and abs(int8["accuracy"] - fp32["accuracy"]) <= 0.03


def test_new_weights_remove_the_exported_files(exported, tmp_path):
    """ONNX files of earlier weights must never answer for the model now in the folder."""
    from fmnist.core.run import Run
    from fmnist.fit.checkpoint import save_model

    run = shutil.copytree(exported, tmp_path / "run")
    save_model(run, Run.load(run).model(), {k: v for k, v in Run.load(run).meta.items() if k != "onnx"})
    assert not (run / "model.onnx").exists() and not (run / "model.int8.onnx").exists()
    with pytest.raises(CheckpointError, match="not a complete run"):  # new weights: not served before their trust fit
        Predictor.from_run(run, backend="auto")
    record_complete(run)  # (the same trust layer: the weights are the same)
    assert Predictor.from_run(run, backend="auto").backend.name == "torch"


def test_serve_refuses_a_missing_engine_before_starting(trained_run, capsys):
    assert main(["serve", str(trained_run), "--backend", "onnx", "--port", "8765"]) == 2
    err = capsys.readouterr()
    assert "model.onnx not found" in err.err and "serving" not in err.out


def test_unknown_backend_is_refused(exported):
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor.from_run(exported, backend="tensorrt")


# --- a deployment without PyTorch ----------------------------------------------------------------------------

# Runs a module as `python -m`, with PyTorch made unimportable first (as in an environment without it).
NO_TORCH = ("import runpy, sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n")


def _no_torch(module: str, *args: str, **kw):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", NO_TORCH, module, *args], **kw)


def _png(img) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_predict_without_pytorch(exported, synthetic_data, tmp_path):
    import subprocess

    files = []
    for i, img in enumerate(_images(synthetic_data)[::8]):
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(_png(img))
    proc = _no_torch("fmnist.apps.cli", "predict", str(exported), *map(str, files), "--backend", "onnx",
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = [json.loads(line) for line in out.splitlines()]
    want = Predictor.from_run(exported, backend="torch").predict_batch([f.read_bytes() for f in files])
    assert [(g["label"], g["verdict"], g["reason"]) for g in got] == [(w["label"], w["verdict"], w["reason"])
                                                                     for w in want]


@pytest.mark.parametrize("argv", [["models"], ["evaluate", "RUN", "--backend", "onnx"], ["report", "RUN"],
                                  ["export", "RUN"], ["calibrate", "RUN"], ["train", "--epochs", "1"],
                                  ["ood-eval", "RUN"]])
def test_a_command_that_needs_pytorch_says_so_in_one_line(exported, tmp_path, argv):
    import subprocess

    run = shutil.copytree(exported, tmp_path / "run")  # nothing may be written into the shared fixture
    argv = [str(run) if a == "RUN" else a for a in argv]
    proc = _no_torch("fmnist.apps.cli", *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                     cwd=tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "needs PyTorch" in err and "Traceback" not in err


@pytest.mark.slow
def test_server_without_pytorch_answers_and_refuses(exported, synthetic_data):
    import socket
    import subprocess
    import time
    import urllib.request

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _no_torch("fmnist.apps.serve", str(exported), "--port", str(port), "--backend", "onnx",
                     "--log-level", "warning", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                urllib.request.urlopen(url + "/api/health", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        info = httpx.get(url + "/api/model").json()
        assert info["backend"] == "onnx"
        images = _images(synthetic_data)
        want = Predictor.from_run(exported, backend="torch").predict_batch(images)
        for img, w in zip(images, want):
            r = httpx.post(url + "/api/predict", files={"file": ("x.png", _png(img), "image/png")}).json()
            assert (r["label"], r["verdict"], r["reason"]) == (w["label"], w["verdict"], w["reason"])
            assert r["score"] == pytest.approx(w["score"], abs=1e-5)
        assert any(w["reason"] == "out_of_distribution" for w in want)  # noise and turned garments refused
    finally:
        proc.terminate()
        proc.wait(timeout=20)
