"""Command-line conventions: --version, train --config, the presets in train --help, choices, compare's folders,
tune's SQLite storage."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fmnist.apps.cli import main
from fmnist.apps.cli.train import read_config_file
from fmnist.apps.report.compare import expand_runs
from fmnist.core.errors import InputError
from fmnist.fit.recipes import PRESETS


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse: --help, --version, a value outside a flag's choices
        return e.code


def test_version(capsys):
    assert exit_code(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fmnist ") and out.split()[1][0].isdigit()


def test_train_help_lists_what_each_preset_sets(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    assert exit_code(["train", "--help"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("presets (each sets"):].splitlines()
    for name, values in PRESETS.items():
        line = next(l for l in lines if l.split()[:1] == [name])
        for key in values:
            assert "--" + key.replace("_", "-") in line, (name, key)
    assert f"--time-budget {PRESETS['fast']['time_budget']}" in out  # the fast preset's clock


@pytest.mark.parametrize("flag, value", [("--optimizer", "lion"), ("--schedule", "step"), ("--precision", "fp8"),
                                         ("--select", "f1"), ("--device", "gpu")])
def test_enumerated_flags_refuse_other_values(capsys, flag, value):
    assert exit_code(["train", flag, value, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and value in err


def test_config_reads_a_runs_config_json_and_flags_override_it(trained_run, monkeypatch, tmp_path):
    seen = {}

    def fake_train(cfg, **kw):
        seen["cfg"] = cfg

    monkeypatch.setattr("fmnist.fit.train.train", fake_train)
    monkeypatch.setattr("fmnist.fit.sources.load_data", lambda *a, **k: None)
    config = trained_run / "config.json"
    saved = json.loads(config.read_text())
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "r")]) == 0
    cfg = seen["cfg"]
    for key in ("model", "lr", "batch_size", "epochs", "augment", "seed", "val_size"):
        assert getattr(cfg, key) == saved[key], key
    assert main(["train", "--config", str(config), "--lr", "0.01", "--seed", "3", "--out", str(tmp_path / "r")]) == 0
    assert seen["cfg"].lr == 0.01 and seen["cfg"].seed == 3 and seen["cfg"].model == saved["model"]


def test_config_reads_toml_and_epochs_without_a_budget_replace_it(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr("fmnist.fit.train.train", lambda cfg, **kw: seen.setdefault("cfg", cfg))
    monkeypatch.setattr("fmnist.fit.sources.load_data", lambda *a, **k: None)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('preset = "fast"\nmodel = "s2d-24"\nepochs = 7\nbatch-size = 64\noptimizer = "adamw"\n')
    assert main(["train", "--config", str(recipe), "--batch-size", "32"]) == 0
    cfg = seen["cfg"]
    assert (cfg.preset, cfg.model, cfg.epochs, cfg.time_budget, cfg.batch_size, cfg.optimizer) == \
        ("fast", "s2d-24", 7, 0, 32, "adamw")


@pytest.mark.parametrize("text, needle", [
    ('lr = 0.1\nlearning_rate = 0.2\n', "unknown option 'learning_rate'"),
    ('epochs = "ten"\n', "epochs must be int"),
    ('optimizer = "lion"\n', "optimizer must be one of"),
    ('preset = "huge"\n', "unknown preset"),
    ('lr = -1.0\n', "--lr must be > 0"),
    ('this is not = = toml', "not a JSON or TOML recipe"),
    ('[1, 2]', "expected a table of options"),
])
def test_config_bad_file_is_one_clear_error(tmp_path, capsys, text, needle):
    recipe = tmp_path / ("recipe.json" if text.startswith("[") else "recipe.toml")
    recipe.write_text(text)
    assert main(["train", "--config", str(recipe), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and str(recipe) in err and len(err.splitlines()) == 1, err


def test_config_missing_or_huge_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_config_file(tmp_path / "none.toml")
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * 1_100_000)
    with pytest.raises(InputError, match="larger than"):
        read_config_file(big)


def test_config_and_resume_together_are_refused(trained_run, capsys):
    assert main(["train", "--config", str(trained_run / "config.json"), "--resume", str(trained_run)]) == 2
    assert "not both" in capsys.readouterr().err


def test_compare_takes_a_parent_folder_and_lists_each_run_once(trained_run, tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    runs.mkdir()
    a = shutil.copytree(trained_run, runs / "a", ignore=shutil.ignore_patterns("metrics.json"))
    b = shutil.copytree(trained_run, runs / "b", ignore=shutil.ignore_patterns("metrics.json"))
    os.symlink("b", runs / "latest")
    assert expand_runs([runs]) == [a, b]
    assert expand_runs([runs / "a", runs / "b", runs / "latest"]) == [a, b]  # what the shell makes of runs/*
    assert expand_runs([runs / "latest", runs / "b"]) == [b]  # named by its own folder, not by the link
    monkeypatch.chdir(tmp_path)
    assert main(["compare", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.count("\na ") + out.count("\nb ") == 2 and "latest" not in out
    assert not (tmp_path / "compare.html").exists()  # HTML only where asked


def test_tune_accepts_a_sqlite_storage(idx_dir, tmp_path, capsys):
    optuna = pytest.importorskip("optuna")
    pytest.importorskip("sqlalchemy")
    db = tmp_path / "study.db"
    tiny = ["--out", str(tmp_path / "tune"), "--subset", "300", "--val-size", "200", "--epochs", "1",
            "--time-budget", "0", "--threads", "1", "--data-dir", str(idx_dir), "--no-verify"]
    argv = ["tune", "--model", "seed-b-mlp", "--lr", "1e-2,1e-3", "--sampler", "grid", "--study", "lite",
            "--storage", f"sqlite:///{db}", *tiny]
    assert main(argv) == 0
    study = optuna.load_study(study_name="lite", storage=f"sqlite:///{db}")
    assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"]
    assert main(["tune", "--lr", "1e-2,1e-3", "--storage", f"sqlite:///{tmp_path}/no/such/dir.db", *tiny]) == 2
    assert "does not exist" in capsys.readouterr().err
