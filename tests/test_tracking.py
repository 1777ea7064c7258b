"""Progress bars and plain lines (fmnist.core.progress), and `fmnist train --tensorboard`."""
from __future__ import annotations

import pytest

from fmnist.apps.cli import main
from fmnist.core import progress
from fmnist.core.progress import Bar, track


def test_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(progress, "interactive", lambda: False)
    with Bar(4, "fitting", unit="set", every=0.0) as bar:
        for _ in range(4):
            bar.update(1, set="x")
    err = capsys.readouterr().err
    assert err.startswith("fitting: started (4 set)") and "fitting: 4/4 set" in err and "fitting: done in" in err
    assert "\r" not in err  # no bar in a log
    assert list(track(range(3), "quiet", plain=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_a_bar_on_a_terminal(capsys):
    with Bar(10, "epoch 1/3", unit="img", enabled=True) as bar:
        bar.update(5, loss="0.5")
        bar.update(5)
    err = capsys.readouterr().err
    assert "epoch 1/3" in err and "img" in err


def test_disabled_prints_nothing(capsys):
    with Bar(3, "x", enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == "" and not bar.enabled


def test_train_epoch_lines_stay_when_not_a_terminal(tmp_path, capsys, idx_dir):
    """benchmarks/ parse the per-epoch lines: they stay, with no bar in between."""
    assert main(["train", "--model", "seed-b-mlp", "--epochs", "2", "--subset", "300", "--val-size", "100",
                 "--threads", "1", "--data-dir", str(idx_dir), "--no-verify", "--out", str(tmp_path / "r")]) == 0
    out, err = capsys.readouterr()
    assert [l.split()[:2] for l in out.splitlines() if l.startswith("epoch")] == [["epoch", "1/2"], ["epoch", "2/2"]]
    assert "\r" not in out + err


@pytest.mark.slow
def test_tensorboard_writes_scalars_and_figures(tmp_path, capsys, idx_dir):
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    assert main(["train", "--model", "seed-b-mlp", "--epochs", "2", "--subset", "300", "--val-size", "100",
                 "--threads", "1", "--data-dir", str(idx_dir), "--no-verify", "--out", str(run),
                 "--tensorboard"]) == 0
    assert "tensorboard --logdir" in capsys.readouterr().err
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0}).Reload()
    tags = acc.Tags()
    for tag in ("loss/train", "loss/validation", "accuracy/train", "accuracy/validation", "lr",
                "images_per_second/train"):
        assert tag in tags["scalars"], tag
        steps = [e.step for e in acc.Scalars(tag)]
        # the default preset validates only its last epoch (select last)
        assert steps == ([2] if tag.endswith("validation") else [1, 2]), tag
    assert set(tags["images"]) >= {"validation/confusion_matrix", "validation/reliability"}
    assert acc.Scalars("images_per_second/train")[0].value > 0


def test_tensorboard_elsewhere_and_missing_package(tmp_path, capsys, idx_dir, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *a, **k):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("no tensorboard")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    assert main(["train", "--model", "seed-b-mlp", "--epochs", "1", "--subset", "300", "--val-size", "100",
                 "--threads", "1", "--data-dir", str(idx_dir), "--no-verify", "--out", str(tmp_path / "r"),
                 "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert "--tensorboard needs TensorBoard" in err and "[tensorboard]" in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "tb").exists()


@pytest.mark.slow
def test_tune_trials_in_tensorboard(tmp_path, capsys, idx_dir):
    """Each trial its own folder of scalars and figures, and a row of the HParams view: its parameter, outcome."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    pytest.importorskip("optuna")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    assert main(["tune", "--model", "seed-b-mlp", "--lr", "1e-2,1e-3", "--sampler", "grid", "--study", "s",
                 "--metric", "val_acc", "--out", str(tmp_path / "tune"), "--subset", "300", "--val-size", "100",
                 "--epochs", "2", "--time-budget", "0", "--threads", "1", "--data-dir", str(idx_dir), "--no-verify",
                 "--tensorboard"]) == 0
    logdir = tmp_path / "tune" / "s" / "tensorboard"
    assert sorted(p.name for p in logdir.iterdir()) == ["trial-0000", "trial-0001"]
    lrs = set()
    for trial in logdir.iterdir():
        acc = EventAccumulator(str(trial), size_guidance={"images": 0}).Reload()
        tags = acc.Tags()
        assert [e.step for e in acc.Scalars("accuracy/validation")] == [1, 2]  # trials validate every epoch
        assert "validation/confusion_matrix" in tags["images"]
        assert [e.value for e in acc.Scalars("hparam/val_acc")] == [acc.Scalars("accuracy/validation")[-1].value]
        infos = [v.metadata.plugin_data.content for f in trial.glob("events.out.tfevents.*")
                 for e in LegacyEventFileLoader(str(f)).Load() for v in e.summary.value
                 if v.tag == "_hparams_/session_start_info"]
        assert len(infos) == 1  # one HParams row per trial
        info = plugin_data_pb2.HParamsPluginData.FromString(infos[0]).session_start_info
        lrs.add(info.hparams["lr"].number_value)
    assert lrs == {1e-2, 1e-3}
