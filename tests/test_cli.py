"""The command line, run in-process: models, help, dry runs, predict's JSON lines and its error handling."""
from __future__ import annotations

import json
import re
import shutil
import tempfile

import pytest
from conftest import make_synthetic
from PIL import Image

from fmnist.apps.cli import main
from fmnist.fit.data import load_fashion_mnist, write_idx
from fmnist.fit.models import count_parameters, create_model, model_names
from fmnist.fit.train import resolve_config, train

# Copies of the shared trained run leave out files other tests may have added to it.
FRESH = shutil.ignore_patterns("metrics.json")
RESULT_KEYS = {"file", "label", "class_id", "score", "top_k"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small, unofficial data set in the four IDX files the loader expects (hence --no-verify)."""
    d = tmp_path_factory.mktemp("idx")
    data = make_synthetic(n_train=700, n_test=100, seed=3)
    write_idx(d / "train-images-idx3-ubyte.gz", data.train_images)
    write_idx(d / "train-labels-idx1-ubyte.gz", data.train_labels)
    write_idx(d / "t10k-images-idx3-ubyte", data.test_images)
    write_idx(d / "t10k-labels-idx1-ubyte", data.test_labels)
    return d


@pytest.fixture
def run(tmp_path, trained_run):
    return shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)


@pytest.fixture(scope="module")
def garment(synthetic_data):
    x = synthetic_data.test_images.numpy()
    return x[[i for i in range(len(x)) if x[i].max() >= 200]]


def png(path, img):
    Image.fromarray(img).save(path, format="PNG")
    return str(path)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_models_lists_every_name_with_its_count(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in model_names():
        line = next(l for l in out.splitlines() if l.split()[:1] == [name])
        assert f"{count_parameters(create_model(name)):,}" in line
    assert "1,630,474" in out  # seed A, as Keras counts it


def test_train_help_states_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside hyphenated names such as resnet-lite
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for text in ("--batch-size", "--time-budget", "--label-smoothing", "--preset", "(default: auto)",
                 "(default: the epoch table's row)", "(default: 175)"):
        assert text in out, f"train --help lacks {text!r}"
    for flag, (takes_value, text) in flag_helps("train", capsys).items():
        assert "_" not in flag, f"{flag} is not kebab-case"
        if takes_value and flag != "--resume":  # --resume has no meaningful default
            assert "default" in text, f"{flag} help does not state its default"


def flag_helps(command: str, capsys) -> dict[str, tuple[bool, str]]:
    """Each flag of `fmnist COMMAND --help`: (whether it takes a value, its whole help text)."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    blocks, current = {}, None
    for line in capsys.readouterr().out.splitlines():
        m = re.match(r"^  (--[\w-]+)( [A-Z_]+)?", line)
        if m:
            current = m.group(1)
            blocks[current] = (m.group(2) is not None, line)
        elif current and line.startswith("      "):
            blocks[current] = (blocks[current][0], blocks[current][1] + " " + line.strip())
        else:
            current = None
    assert blocks, f"no flags found in `fmnist {command} --help`"
    return blocks


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "calibrate", "ood-eval", "report", "serve"])
def test_help_states_each_default_once(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    doubled = [flag for flag, (_, text) in flag_helps(command, capsys).items() if text.count("(default") > 1]
    assert doubled == []


def test_train_dry_run_writes_nothing(tmp_path, monkeypatch, capsys, data_dir):
    cwd, scratch = tmp_path / "cwd", tmp_path / "scratch"
    cwd.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = main(["train", "--data-dir", str(data_dir), "--no-verify", "--val-size", "100", "--threads", "1",
                 "--batch-size", "32", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"dry run ok: [\w-]+, 2 steps", out) and "nothing written" in out
    assert f"run {scratch}/fmnist-dry-run-" in out  # it trained in a temporary folder
    assert list(cwd.iterdir()) == []
    assert [p for p in scratch.iterdir() if p.name.startswith("fmnist")] == []  # the temporary run is gone


def test_train_checksums_are_verified_by_default(capsys, data_dir):
    code = main(["train", "--data-dir", str(data_dir), "--val-size", "100", "--threads", "1", "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and "checksum" in err and "Traceback" not in err


@pytest.mark.parametrize("flags,needle", [(["--epochs", "0"], "--epochs"), (["--augment", "blur"], "blur"),
                                          (["--select", "f1"], "--select")])
def test_train_bad_values_exit_2_with_a_message(capsys, flags, needle):
    try:
        code = main(["train", *flags, "--dry-run"])
    except SystemExit as e:  # refused by the parser (a value outside a flag's choices)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert "fmnist train: error:" in err and needle in err


def test_evaluate_dry_run_and_real(run, capsys, data_dir):
    common = ["--data-dir", str(data_dir), "--no-verify", "--threads", "1"]
    assert main(["evaluate", str(run), *common, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dry run: 100 images") and "accuracy" in out
    assert not (run / "metrics.json").exists()
    assert main(["evaluate", str(run), *common, "--no-tta"]) == 0
    out = capsys.readouterr().out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n"] == 100 and metrics["tta"] is False
    assert f"accuracy {100 * metrics['accuracy']:.2f} %" in out and "wrote" in out


def test_predict_png_prints_one_json_line(run, tmp_path, capsys, garment):
    path = png(tmp_path / "a.png", garment[0])
    assert main(["predict", str(run), path]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert len(lines) == 1
    r = lines[0]
    assert RESULT_KEYS <= set(r) and r["file"] == path
    assert isinstance(r["score"], float) and len(r["top_k"]) == 3


def test_predict_idx_prints_one_line_per_image(run, tmp_path, capsys, garment):
    path = str(tmp_path / "batch.idx")
    write_idx(path, garment[:4])
    assert main(["predict", str(run), path, "--top-k", "2"]) == 0
    lines = json_lines(capsys.readouterr().out)
    assert [r["file"] for r in lines] == [f"{path}[{i}]" for i in range(4)]
    assert all(RESULT_KEYS <= set(r) and len(r["top_k"]) == 2 for r in lines)


def test_predict_bad_files_are_reported_and_the_rest_go_on(run, tmp_path, capsys, garment):
    good = png(tmp_path / "good.png", garment[0])
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    missing = str(tmp_path / "missing.png")
    assert main(["predict", str(run), good, missing, str(corrupt), good]) == 1
    lines = json_lines(capsys.readouterr().out)
    assert [r["file"] for r in lines] == [good, missing, str(corrupt), good]
    assert RESULT_KEYS <= set(lines[0]) and RESULT_KEYS <= set(lines[3])
    assert set(lines[1]) == set(lines[2]) == {"file", "error"}
    assert "missing.png" in lines[1]["error"]


def test_predict_bad_idx_file_is_reported_and_the_rest_go_on(run, tmp_path, capsys, garment):
    good = png(tmp_path / "good.png", garment[0])
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x00\x00\x08\x03 truncated")
    code = main(["predict", str(run), good, str(bad), str(tmp_path / "missing-ubyte"), good])
    lines = json_lines(capsys.readouterr().out)
    assert [r.get("error") is not None for r in lines] == [False, True, True, False]
    assert code == 1


def test_predict_dry_run_prints_no_predictions(run, tmp_path, capsys, garment):
    good = png(tmp_path / "good.png", garment[0])
    assert main(["predict", str(run), good, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert json_lines(out) == [] and "dry run ok" in out


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_not_a_run_folder_exits_2_with_a_message(tmp_path, capsys, command, data_dir, garment):
    extra = [png(tmp_path / "a.png", garment[0])] if command == "predict" else [
        "--data-dir", str(data_dir), "--no-verify", "--threads", "1"]
    for folder in (tmp_path / "empty", tmp_path / "does-not-exist"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert main([command, str(folder), *extra]) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith(f"fmnist {command}: error:") and str(folder) in captured.err
        assert "Traceback" not in captured.err and json_lines(captured.out) == []


def test_resume_from_the_cli_on_unverified_data(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    cfg = resolve_config("fast", model="seed-b-mlp", time_budget=0, epochs=2, batch_size=64, val_size=100,
                         threads=1, data_dir=str(data_dir))

    def interrupt(epoch, row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=out, data=load_fashion_mnist(data_dir, verify=False), quiet=True,
              on_epoch_end=interrupt)
    code = main(["train", "--resume", str(out), "--no-verify"])
    assert capsys.readouterr().err == ""
    assert code == 0
    assert json.loads((out / "train_summary.json").read_text())["epochs"] == 2


def test_predict_on_an_idx_file_batches_the_model_calls(trained_run, idx_dir, capsys, monkeypatch):
    from fmnist.core.predict import Predictor

    calls = []
    real = Predictor.predict_prepared
    monkeypatch.setattr(Predictor, "predict_prepared", lambda self, images, return_image=False: calls.append(
        len(images)) or real(self, images, return_image))
    assert main(["predict", str(trained_run), str(idx_dir / "t10k-images-idx3-ubyte")]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 300 and lines[0]["file"].endswith("[0]") and lines[-1]["file"].endswith("[299]")
    assert calls == [256, 44]  # two model calls, not one per image


def test_bad_input_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from fmnist.core.errors import CheckpointError, FmnistError

    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fmnist evaluate: error: ") and err.count("\n") == 1
    with pytest.raises(CheckpointError) as caught:
        main(["--debug", "evaluate", str(tmp_path / "missing")])
    assert isinstance(caught.value, FmnistError)


def test_a_bug_is_not_reported_as_bad_input(monkeypatch):
    """Anything but an FmnistError is a bug: it propagates (a traceback, exit status 1), never one line."""
    import argparse

    import fmnist.apps.cli as cli

    def broken(args):
        raise ValueError("a bug")

    args = argparse.Namespace(func=broken, command="evaluate", debug=False)
    monkeypatch.setattr(cli, "build_parser", lambda: argparse.Namespace(parse_args=lambda argv: args))
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["evaluate", "x"])


def test_help_documents_the_exit_status(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit status" in out and "--debug" in out
