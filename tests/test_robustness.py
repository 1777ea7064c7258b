"""Bad runs, bad files and bad flags outside the server: one clear error each, and nothing lost.

No run overwritten by `train --out`; NaN weights refused before they answer; strict JSON from `predict`, which
goes on past any one file; a damaged resume state or config.json, a full disk: one line, previous files intact;
an explicit --epochs wins over a preset's clock.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_synthetic
from PIL import Image

from fmnist.apps.cli import main
from fmnist.core.run import RUN_MARKERS, Run
from fmnist.fit.checkpoint import CheckpointError, load_state, load_tensors, save_state, save_tensors
from fmnist.fit.data import load_fashion_mnist
from fmnist.fit.train import resolve_config, train

V1 = Path(__file__).parent / "fixtures" / "run-v1"  # a small finished run ("tiny" model)
SRC = Path(__file__).parents[1] / "src"


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(n_train=160, n_test=20, seed=2)


@pytest.fixture()
def v1(tmp_path) -> Path:
    return Path(shutil.copytree(V1, tmp_path / "v1"))


def recipe(**kw):
    """A one-second recipe: the MLP, one epoch on the tiny data, no clock."""
    return resolve_config("fast", **{**dict(model="seed-b-mlp", time_budget=0, epochs=1, lr=0.1, batch_size=32,
                                          val_size=40, threads=1, seed=0, augment="none", tta=False,
                                          select="val_acc"), **kw})


def strict_json_lines(text: str) -> list[dict]:
    """Each output line parsed as strict JSON (NaN, Infinity are not JSON: they fail here)."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def one_line_error(captured, command: str) -> str:
    err = captured.err.strip()
    assert err.startswith(f"fmnist {command}: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def png(path: Path, seed: int = 0) -> str:
    img = make_synthetic(n_train=10, n_test=10, seed=seed).test_images[0].numpy()
    Image.fromarray(img).save(path)
    return str(path)


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --- point 6: no run overwritten ------------------------------------------------------------------------------


@pytest.mark.parametrize("marker", RUN_MARKERS)
def test_a_folder_holding_any_part_of_a_run_is_refused(tmp_path, tiny_data, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).write_text("from an earlier run\n")
    with pytest.raises(CheckpointError, match="holds a run already") as e:
        train(recipe(), out=out, data=tiny_data, quiet=True)
    assert "--resume" in str(e.value) and "--overwrite" in str(e.value) and marker in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == [marker]  # nothing written beside it


def test_a_second_train_into_a_finished_run_is_refused_and_changes_nothing(tmp_path, tiny_data, capsys, idx_dir):
    out = tmp_path / "run"
    train(recipe(), out=out, data=tiny_data, quiet=True)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match="holds a run already"):
        train(recipe(model="tiny"), out=out, data=tiny_data, quiet=True)
    code = main(["train", "--preset", "fast", "--model", "seed-b-mlp", "--epochs", "1", "--subset", "100",
                 "--val-size", "40", "--threads", "1", "--data-dir", str(idx_dir), "--no-verify", "--out", str(out)])
    assert code == 2 and "--overwrite" in one_line_error(capsys.readouterr(), "train")
    assert snapshot(out) == before


def test_overwrite_leaves_nothing_of_the_old_run_and_keeps_other_files(tmp_path, tiny_data):
    out = tmp_path / "run"
    train(recipe(epochs=2), out=out, data=tiny_data, quiet=True)
    for name in ("metrics.json", "model.onnx", ".model.json.abc123.tmp"):  # later commands', a killed write's
        (out / name).write_text("{}")
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("old report")
    (out / "notes.txt").write_text("mine")
    train(recipe(model="tiny", epochs=1), out=out, data=tiny_data, quiet=True, overwrite=True)
    run = Run.load(out)
    assert run.model_name == "tiny" and len((out / "history.csv").read_text().splitlines()) == 2  # header + 1
    assert load_state(out / "last.pt")["epoch"] == 1
    log = (out / "train.log").read_text()
    assert log.count("model tiny") == 1 and "seed-b-mlp" not in log
    for gone in ("metrics.json", "model.onnx", ".model.json.abc123.tmp", "report"):
        assert not (out / gone).exists(), gone
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_under_torchrun_every_rank_refuses_a_folder_holding_a_run(tmp_path, idx_dir):
    """Rank 0 looks and every rank follows (no rank left waiting for the others, none seeing rank 0's files)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train.log").write_text("an earlier run\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "fmnist", "train", "--preset", "fast", "--epochs", "1", "--batch-size", "32", "--subset",
                        "100", "--val-size", "40", "--data-dir", str(idx_dir), "--no-verify", "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.count("holds a run already") == 1, p.stderr[-3000:]  # rank 0's reason
    assert p.stderr.count("refused by the main process") == 1  # and rank 1 follows it
    assert sorted(q.name for q in out.iterdir()) == ["train.log"]


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--resume", str(tmp_path), "--overwrite"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err


# --- point 5: NaN-proof --------------------------------------------------------------------------------------


def poison(run: Path) -> None:
    """Replace one weight of the run's model by NaN (damaged weights, or a diverged training)."""
    tensors = load_tensors(run / "model.safetensors")
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 1)
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_tensors(run / "model.safetensors", tensors, metadata={"format": "fmnist-model/1"})


def test_nan_weights_are_refused_before_they_answer(v1, tmp_path, capsys, synthetic_data):
    from fmnist.core.predict import Predictor
    from fmnist.fit.evaluate import evaluate_run

    poison(v1)
    run = Run.load(v1)
    with pytest.raises(CheckpointError, match="non-finite outputs") as e:
        run.backend("torch")
    assert str(v1 / "model.safetensors") in str(e.value)
    with pytest.raises(CheckpointError, match="non-finite outputs"):
        Predictor(run)
    with pytest.raises(CheckpointError, match="non-finite outputs"):
        evaluate_run(v1, data=synthetic_data, threads=1, backend="torch", write=False)
    assert main(["predict", str(v1), png(tmp_path / "a.png")]) == 2
    captured = capsys.readouterr()
    assert "model.safetensors" in one_line_error(captured, "predict") and captured.out == ""


def test_non_finite_logits_on_the_test_set_are_an_error_not_a_figure(v1, synthetic_data):
    """What `fmnist report` and `evaluate` compute from (run_logits), even with a backend built around the probe."""
    from fmnist.core.backends import TorchBackend
    from fmnist.fit.evaluate import run_logits

    poison(v1)
    run = Run.load(v1, detector=False)
    with pytest.raises(CheckpointError, match=r"non-finite outputs \(NaN or infinity\) for 20 of 20 images"):
        run_logits(TorchBackend(run.model()), run, synthetic_data.test_images[:20])


def test_an_onnx_model_with_nan_weights_is_refused(v1):
    pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    from fmnist.fit.export import export_onnx

    export_onnx(v1)
    model = onnx.load(str(v1 / "model.onnx"))
    init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1)
    array = numpy_helper.to_array(init).copy()
    array[...] = float("nan")
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(v1 / "model.onnx"))
    meta = json.loads((v1 / "model.json").read_text())
    del meta["onnx"]["files"]["model.onnx"]  # as if exported by other means: no checksum to fail first
    (v1 / "model.json").write_text(json.dumps(meta))
    from fmnist.core.runfolder import record_complete

    record_complete(v1)  # and a manifest that matches
    with pytest.raises(CheckpointError, match="non-finite outputs") as e:
        Run.load(v1).backend("onnx")
    assert str(v1 / "model.onnx") in str(e.value)


@pytest.mark.parametrize("value", ["nan", "-0.1", "1.5", "inf", "high"])
def test_predict_threshold_outside_0_to_1_is_refused(v1, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(v1), png(tmp_path / "a.png"), "--threshold", value])
    assert e.value.code == 2 and "--threshold: must be a number from 0 to 1" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [dict(ood_threshold=float("nan")), dict(ood_threshold=float("inf")),
                                    dict(ood_threshold=-float("inf")), dict(confidence_threshold=float("nan"))])
def test_predictor_thresholds_that_would_turn_a_gate_off_are_refused(v1, kwargs):
    from fmnist.core.predict import Predictor

    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be a finite number"):
        Predictor(Run.load(v1), **kwargs)


def test_predict_prints_strict_json_even_for_non_finite_numbers(v1, tmp_path, capsys, monkeypatch):
    from fmnist.core.predict import Predictor

    real = Predictor.predict_prepared

    def with_nan(self, images28, return_image=False):
        return [{**r, "score": float("nan"), "ood_score": float("inf")} for r in real(self, images28)]

    monkeypatch.setattr(Predictor, "predict_prepared", with_nan)
    assert main(["predict", str(v1), png(tmp_path / "a.png")]) == 0
    [line] = strict_json_lines(capsys.readouterr().out)
    assert line["score"] is None and line["ood_score"] is None and line["label"]


# --- point 7: predict survives any file ----------------------------------------------------------------------


def test_predict_goes_on_past_memory_errors_directories_and_fifos(v1, tmp_path, capsys, monkeypatch):
    import fmnist.core.predict

    good = png(tmp_path / "good.png")
    huge = png(tmp_path / "huge.png", seed=1)
    real = fmnist.core.predict.decode_image

    def decode(data, *args, **kwargs):
        if str(data) == huge:
            raise MemoryError  # what decoding an image too large for the machine raises
        return real(data, *args, **kwargs)

    monkeypatch.setattr(fmnist.core.predict, "decode_image", decode)
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it would block forever
    (tmp_path / "folder.png").mkdir()
    files = [good, huge, str(tmp_path / "folder.png"), str(fifo), str(tmp_path / "gone.png"), good]
    assert main(["predict", str(v1), *files]) == 1
    lines = strict_json_lines(capsys.readouterr().out)
    assert [r["file"] for r in lines] == files
    assert ["error" in r for r in lines] == [False, True, True, True, True, False]
    assert "not enough memory" in lines[1]["error"] and "is a directory" in lines[2]["error"]
    assert "not a regular file" in lines[3]["error"] and "no such file" in lines[4]["error"]


def test_a_genuine_bug_in_predict_is_not_hidden(v1, tmp_path, monkeypatch):
    import fmnist.core.predict

    def broken(data, *args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(fmnist.core.predict, "decode_image", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["predict", str(v1), png(tmp_path / "a.png")])


# --- point 8: one clear error --------------------------------------------------------------------------------


def interrupted(tmp_path: Path, data, **kw) -> Path:
    """A run stopped after its first epoch (of two), ready for --resume."""
    out = tmp_path / "run"

    def stop(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(recipe(epochs=2, **kw), out=out, data=data, quiet=True, on_epoch_end=stop)
    return out


@pytest.fixture()
def half_run(tmp_path, idx_dir):
    return interrupted(tmp_path, load_fashion_mnist(idx_dir, verify=False), data_dir=str(idx_dir), subset=200,
                       val_size=100)


def resume(run: Path) -> list[str]:
    return ["train", "--resume", str(run), "--no-verify"]


@pytest.mark.parametrize("damage, message", [
    (lambda s: {k: v for k, v in s.items() if k not in ("optimizer", "generator")}, "lacks optimizer, generator"),
    (lambda s: {**s, "model": {k: v[..., :1] if v.ndim else v for k, v in s["model"].items()}}, "size mismatch"),
    (lambda s: {**s, "model": {k: v for k, v in list(s["model"].items())[1:]}}, "Missing key"),
    (lambda s: {**s, "optimizer": {**s["optimizer"], "state": {
        i: {k: v[:1] if torch.is_tensor(v) and v.ndim else v for k, v in b.items()}
        for i, b in s["optimizer"]["state"].items()}}}, "optimizer momentum_buffer of shape"),
    (lambda s: {**s, "generator": torch.zeros(3, dtype=torch.uint8)}, "does not fit"),
    (lambda s: {**s, "epoch": "1"}, "not what training writes"),
    (lambda s: {**s, "elapsed": float("nan")}, "not what training writes"),
    (lambda s: {**s, "elapsed": -5.0}, "not what training writes"),
    (lambda s: {**s, "history": ["epoch one"] * len(s["history"])}, "not what training writes"),
    (lambda s: {**s, "history": [{**r, "train_loss": "low"} for r in s["history"]]}, "not what training writes"),
    (lambda s: {**s, "best": {"epoch": 7, "value": 0.5}}, "not what training writes"),
    (lambda s: {**s, "step": True}, "not what training writes"),
    (lambda s: [1, 2], "lacks model"),
])
def test_a_damaged_resume_state_is_one_clear_error(half_run, capsys, damage, message):
    state = load_state(half_run / "last.pt")
    save_state(half_run / "last.pt", damage(state))
    assert main(resume(half_run)) == 2
    err = one_line_error(capsys.readouterr(), "train")
    assert message in err and str(half_run / "last.pt") in err


@pytest.mark.parametrize("change, message", [
    (lambda c: {**c, "learning_rate": 0.1}, "unknown key 'learning_rate'"),
    (lambda c: {**c, "epochs": "2"}, "epochs must be int, got '2'"),
    (lambda c: {**c, "tta": 1}, "tta must be bool"),
    (lambda c: {**c, "batch_size": True}, "batch_size must be int"),
    (lambda c: {**c, "lr": None}, "lr must be float"),
    (lambda c: {**c, "data_dir": 5}, "data_dir must be str or None"),
    (lambda c: {**c, "epochs": 0}, "--epochs must be >= 1"),
    (lambda c: {**c, "label_smoothing": 5}, "--label-smoothing must be in [0, 1)"),
    (lambda c: {**c, "threads": 100000}, "--threads must be in [0, 1024]"),
    (lambda c: {**c, "subset": -5}, "--subset must be >= 0"),
    (lambda c: {**c, "tta": "false"}, "tta must be bool, got 'false'"),
    (lambda c: {**c, "warmup": 1.5}, "--warmup must be in [0, 1)"),
    (lambda c: {**c, "time_budget": 1e12}, "--time-budget must be at most"),
    (lambda c: [c], "does not hold a JSON object"),
])
def test_a_damaged_config_json_on_resume_names_the_key(half_run, capsys, change, message):
    config = json.loads((half_run / "config.json").read_text())
    (half_run / "config.json").write_text(json.dumps(change(config)))
    assert main(resume(half_run)) == 2
    err = one_line_error(capsys.readouterr(), "train")
    assert message in err and "config.json" in err


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_text("[1]"), "does not hold a JSON object"),
    (lambda p: p.write_text('"a string"'), "does not hold a JSON object"),
    (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    (lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "class_names": None})), "class_names"),
    (lambda p: p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items()
                                        if k != "preprocessing"})), "preprocessing is missing"),
    (lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file"),
])
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_damaged_model_json_is_one_line_from_the_cli(v1, tmp_path, capsys, idx_dir, damage, message, command):
    damage(v1 / "model.json")
    extra = [png(tmp_path / "a.png")] if command == "predict" else [
        "--data-dir", str(idx_dir), "--no-verify", "--threads", "1"]
    assert main([command, str(v1), *extra]) == 2
    assert message in one_line_error(capsys.readouterr(), command)


def test_a_failed_write_is_one_error_and_the_previous_file_stays(tmp_path, monkeypatch):
    import errno

    import fmnist.fit.checkpoint

    path = tmp_path / "model.safetensors"
    save_tensors(path, {"w": torch.ones(3)})
    before = path.read_bytes()

    def full_disk(tensors, tmp, metadata=None):
        Path(tmp).write_bytes(b"half a fi")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fmnist.fit.checkpoint, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        save_tensors(path, {"w": torch.zeros(3)})
    assert str(path) in str(e.value) and "previous model.safetensors is unchanged" in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def _limit_file_size():
    """In the child: files may not grow past 64 KB (the weights and resume state are larger), as on a full disk;
    the write then fails (EFBIG) instead of the process being killed."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))


def test_a_full_disk_while_training_is_one_line_and_the_run_resumes_afterwards(half_run):
    before = {n: (half_run / n).read_bytes() for n in ("last.pt", "model.safetensors", "model.json")}
    assert len(before["last.pt"]) > 64_000 and len(before["model.safetensors"]) > 64_000
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run([sys.executable, "-m", "fmnist", *resume(half_run)], env=env, capture_output=True,
                       text=True, timeout=120, preexec_fn=_limit_file_size)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fmnist train: error: cannot write") and "Traceback" not in p.stderr
    assert {n: (half_run / n).read_bytes() for n in before} == before  # all still the first epoch's
    assert not [p.name for p in half_run.iterdir() if p.name.endswith(".tmp")]
    assert main(resume(half_run)) == 0  # space again: it goes on from the last finished epoch
    assert load_state(half_run / "last.pt")["epoch"] == 2


# --- point 9: an explicit --epochs wins over a preset's clock ------------------------------------------------


def test_explicit_epochs_replace_the_presets_time_budget(tmp_path, idx_dir, capsys):
    out = tmp_path / "run"
    flags = ["--model", "seed-b-mlp", "--subset", "100", "--val-size", "40", "--threads", "1",
             "--data-dir", str(idx_dir), "--no-verify"]
    assert main(["train", "--preset", "fast", "--epochs", "2", "--out", str(out), *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["epochs"], config["time_budget"], config["preset"]) == (2, 0, "fast")
    assert load_state(out / "last.pt")["epoch"] == 2
    assert "2 epochs" in (out / "train.log").read_text().splitlines()[0]


def test_epochs_with_a_time_budget_say_the_budget_wins(capsys):
    from argparse import Namespace

    from fmnist.apps.cli.train import _overrides
    from fmnist.fit.recipes import TrainConfig

    base = {f: None for f in TrainConfig.__dataclass_fields__}
    assert _overrides(Namespace(**{**base, "epochs": 3}))["time_budget"] == 0
    assert _overrides(Namespace(**{**base, "epochs": 3, "time_budget": 0}))["time_budget"] == 0
    assert _overrides(Namespace(**{**base, "time_budget": 60.0}))["time_budget"] == 60.0
    assert capsys.readouterr().err == ""
    assert _overrides(Namespace(**{**base, "epochs": 3, "time_budget": 60.0}))["time_budget"] == 60.0
    assert "--epochs 3 is ignored: --time-budget 60 sizes the schedule" in capsys.readouterr().err
