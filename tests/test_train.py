"""The training loop: schedule, learning, reproducibility, resume, best epoch, stopping rules, EMA, TTA."""
from __future__ import annotations

import csv
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_synthetic

from fmnist.core.backends import TorchBackend
from fmnist.core.forward import forward
from fmnist.core.run import Run
from fmnist.fit.checkpoint import load_state, load_tensors
from fmnist.fit.data import preprocess, split_indices
from fmnist.fit.models import create_model, model_names
from fmnist.fit.train import EMA, PRESETS, TrainConfig, lr_at, resolve_config, train


def load_model(path):
    run = Run.load(path)
    return run.model(), run.meta

TIMING_COLUMNS = {"seconds", "elapsed"}  # wall-clock columns: the only ones allowed to differ between runs


@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(n_train=360, n_test=60, seed=1)


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(n_train=160, n_test=20, seed=2)


def config(**kw) -> TrainConfig:
    """A fast MLP recipe on the small data; tests override what they exercise."""
    base = dict(model="seed-b-mlp", time_budget=0, epochs=3, lr=0.1, batch_size=32, val_size=60, threads=1,
                seed=0, augment="flip,crop", tta=True, select="val_acc")
    base.update(kw)
    return resolve_config("fast", **base)


def history(run) -> list[dict]:
    with open(run / "history.csv") as f:
        return list(csv.DictReader(f))


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --- learning-rate schedule ---------------------------------------------------------------------------------


def test_onecycle_schedule():
    cfg = TrainConfig(lr=0.4, schedule="onecycle", warmup=0.2)
    assert lr_at(cfg, 0.0) == 0.0
    assert lr_at(cfg, 0.1) == pytest.approx(0.2)
    assert lr_at(cfg, 0.2) == pytest.approx(0.4)  # peak at the end of warm-up
    assert lr_at(cfg, 0.6) == pytest.approx(0.2)  # linear decay
    assert lr_at(cfg, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(cfg, 1.5) == pytest.approx(0.0, abs=1e-12)  # progress past the end is clamped
    values = [lr_at(cfg, p / 100) for p in range(101)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[:peak], values[1:peak + 1]))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1:]))


def test_cosine_schedule():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup=0.1)
    assert lr_at(cfg, 0.0) == 0.0
    assert lr_at(cfg, 0.1) == pytest.approx(1.0)
    assert lr_at(cfg, 0.55) == pytest.approx(0.5)  # halfway through the decay
    assert lr_at(cfg, 1.0) == pytest.approx(0.0, abs=1e-12)
    no_warmup = TrainConfig(lr=1.0, schedule="cosine", warmup=0.0)
    assert lr_at(no_warmup, 0.0) == pytest.approx(1.0)
    assert lr_at(no_warmup, 0.5) == pytest.approx(0.5)


def test_constant_schedule():
    cfg = TrainConfig(lr=0.003, schedule="constant", warmup=0.3)
    assert {lr_at(cfg, p) for p in (0.0, 0.1, 0.5, 1.0)} == {0.003}


# --- learning and reproducibility ---------------------------------------------------------------------------


def test_training_lowers_the_loss(tmp_path, small_data):
    cfg = config(epochs=4)
    summary = train(cfg, out=tmp_path / "run", data=small_data, quiet=True)
    rows = history(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    first, last = rows[0], rows[-1]
    assert float(last["train_loss"]) < float(first["train_loss"])
    assert float(last["val_loss"]) < 0.8 * float(first["val_loss"])
    assert float(last["val_acc"]) > 0.5  # chance is 0.1
    assert summary["epochs"] == 4
    # steps per epoch: 300 training images in batches of 32 -> 9 full + 1 partial
    assert [int(r["step"]) for r in rows] == [10, 20, 30, 40]


def test_same_seed_gives_identical_runs(tmp_path, small_data):
    cfg = config(augment="flip,crop,erase,noise,jitter")
    train(cfg, out=tmp_path / "a", data=small_data, quiet=True)
    train(cfg, out=tmp_path / "b", data=small_data, quiet=True)
    train(dataclasses.replace(cfg, seed=1), out=tmp_path / "c", data=small_data, quiet=True)
    assert untimed(history(tmp_path / "a")) == untimed(history(tmp_path / "b"))
    assert_same_tensors(load_tensors(tmp_path / "a" / "model.safetensors"),
                        load_tensors(tmp_path / "b" / "model.safetensors"))
    assert_same_tensors(load_state(tmp_path / "a" / "last.pt")["model"],
                        load_state(tmp_path / "b" / "last.pt")["model"])
    other = load_tensors(tmp_path / "c" / "model.safetensors")["head.weight"]
    assert not torch.equal(other, load_tensors(tmp_path / "a" / "model.safetensors")["head.weight"])


@pytest.mark.parametrize("model", ["s2d-24", "tiny", "seed-b-cnn"])  # BatchNorm + channels_last; dropout (global RNG)
def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_data, model):
    cfg = config(model=model, epochs=2, batch_size=30, val_size=40, ema=0.9, optimizer="sgd",
                 augment="flip,crop,erase")
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg, out=a, data=tiny_data, quiet=True)

    def interrupt(epoch, row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=b, data=tiny_data, quiet=True, on_epoch_end=interrupt)
    assert len(history(b)) == 1 and load_state(b / "last.pt")["epoch"] == 1
    summary = train(None, data=tiny_data, quiet=True, resume=b)

    assert summary["epochs"] == 2
    assert untimed(history(a)) == untimed(history(b))
    assert_same_tensors(load_tensors(a / "model.safetensors"), load_tensors(b / "model.safetensors"))
    state_a, state_b = load_state(a / "last.pt"), load_state(b / "last.pt")
    assert_same_tensors(state_a["model"], state_b["model"])
    assert_same_tensors(state_a["ema"], state_b["ema"])
    assert state_a["step"] == state_b["step"]
    assert json.loads((a / "model.json").read_text())["best_epoch"] == \
        json.loads((b / "model.json").read_text())["best_epoch"]


def test_run_folder_contents(tmp_path, small_data):
    cfg = config(epochs=2)
    out = tmp_path / "runs" / "r1"
    summary = train(cfg, out=out, data=small_data, quiet=True)
    for name in ("config.json", "env.json", "history.csv", "train.log", "train_summary.json",
                 "model.safetensors", "model.json", "last.pt"):
        assert (out / name).is_file(), f"{name} missing"
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))
    assert TrainConfig(**json.loads((out / "config.json").read_text())) == cfg
    env = json.loads((out / "env.json").read_text())
    assert env["threads"] == 1 and env["torch"] == torch.__version__
    assert list(history(out)[0]) == ["epoch", "step", "train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                     "seconds", "elapsed"]
    meta = json.loads((out / "model.json").read_text())
    for key in ("format", "model", "parameters", "class_names", "preprocessing", "tta", "best_epoch",
                "select", "metrics", "recipe", "data", "created"):
        assert key in meta, f"model.json lacks {key}"
    assert meta["model"] == "seed-b-mlp" and meta["parameters"] == 235_146 and len(meta["class_names"]) == 10
    assert meta["data"]["source"] == "synthetic"
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["best_epoch"] == summary["best_epoch"] and saved["epochs"] == 2
    assert (out.parent / "latest").resolve() == out.resolve()
    model, _ = load_model(out)
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def _val_loss_of_saved_model(run, data, cfg) -> float:
    _, val_idx = split_indices(data.train_labels, cfg)
    model, meta = load_model(run)
    x = preprocess(data.train_images[val_idx], meta["preprocessing"])
    _, logits = forward(TorchBackend(model), x, tta=cfg.tta)
    return float(F.cross_entropy(torch.from_numpy(logits), data.train_labels[val_idx]))


def test_best_epoch_is_the_one_kept(tmp_path, small_data):
    # a constant, too-high learning rate makes the validation figures jump: the best epoch is not the last
    bests = []
    for select in ("val_loss", "val_acc"):
        cfg = config(epochs=6, lr=0.3, schedule="constant", select=select, augment="none")
        run = tmp_path / select
        train(cfg, out=run, data=small_data, quiet=True)
        rows = history(run)
        losses = [float(r["val_loss"]) for r in rows]
        accs = [float(r["val_acc"]) for r in rows]
        want = (losses.index(min(losses)) if select == "val_loss" else accs.index(max(accs))) + 1
        meta = json.loads((run / "model.json").read_text())
        assert meta["best_epoch"] == want and meta["select"] == select
        assert meta["metrics"]["val_loss"] == pytest.approx(losses[want - 1], rel=1e-9)
        # the weights on disk are that epoch's: they reproduce its validation loss
        assert _val_loss_of_saved_model(run, small_data, cfg) == pytest.approx(losses[want - 1], rel=1e-4)
        bests.append(want)
    assert any(b != 6 for b in bests), "the test needs a run whose best epoch is not the last"


def test_patience_stops_early(tmp_path, small_data):
    # a vanishing learning rate: nothing improves after epoch 1
    cfg = config(epochs=10, lr=1e-12, schedule="constant", select="val_acc", patience=2, augment="none")
    summary = train(cfg, out=tmp_path / "run", data=small_data, quiet=True)
    assert summary["epochs"] == 3
    assert summary["best_epoch"] == 1
    assert len(history(tmp_path / "run")) == 3


def test_time_budget_stops_within_budget(tmp_path, small_data):
    budget = 1.5
    cfg = config(epochs=1, time_budget=budget, schedule="onecycle", lr=0.1)
    summary = train(cfg, out=tmp_path / "run", data=small_data, quiet=True)
    rows = history(tmp_path / "run")
    # The steps stop early enough to leave time for the last validation and the calibration/OOD fit (at least
    # half the budget is spent training); one epoch's work may spill past the budget, no more.
    overhead = max(float(r["seconds"]) for r in rows) + 0.5
    assert 0.5 * budget <= summary["train_seconds"] <= budget + overhead
    assert summary["epochs"] == len(rows) > 1, "the budget, not --epochs, decides how long training runs"
    assert int(rows[-1]["step"]) > 1
    # the schedule is sized to the budget: the learning rate has decayed to (nearly) zero at the end
    assert float(rows[-1]["lr"]) < 0.1 * cfg.lr



def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_no_validation_set_keeps_the_last_epoch(tmp_path, small_data):
    summary = train(config(val_size=0, epochs=2), out=tmp_path / "run", data=small_data, quiet=True)
    assert summary["best_epoch"] == 2
    assert load_model(tmp_path / "run")[1]["best_epoch"] == 2


def test_no_validation_set_writes_valid_json(tmp_path, small_data):
    train(config(val_size=0, epochs=1), out=tmp_path / "run", data=small_data, quiet=True)
    for name in ("model.json", "train_summary.json"):
        _strict_json((tmp_path / "run" / name).read_text())

# --- EMA and TTA ------------------------------------------------------------------------------------------


def test_ema_update_is_a_lerp():
    torch.manual_seed(0)
    model = create_model("tiny")
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        for b in model.buffers():
            b.add_(3 if b.is_floating_point() else 5)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    now = model.state_dict()
    ema.update(model, step=1000)  # late in training: the full decay applies
    for k, e in ema.model.state_dict().items():
        if e.is_floating_point():
            torch.testing.assert_close(e, 0.9 * before[k] + 0.1 * now[k])
        else:
            assert torch.equal(e, now[k]), f"{k} (an integer buffer) must be copied"
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    ema.update(model, step=0)  # warm-up: decay (1 + 0) / (10 + 0) = 0.1 < 0.9
    for k, e in ema.model.state_dict().items():
        if e.is_floating_point():
            torch.testing.assert_close(e, 0.1 * before[k] + 0.9 * now[k])
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_ema_changes_the_saved_weights_not_the_training(tmp_path, small_data):
    # No validation split: the last epoch is always the one kept, so its saved weights are the final average.
    plain = train(config(ema=0.0, val_size=0), out=tmp_path / "plain", data=small_data, quiet=True)
    averaged = train(config(ema=0.9, val_size=0), out=tmp_path / "ema", data=small_data, quiet=True)
    saved_plain = load_tensors(tmp_path / "plain" / "model.safetensors")
    saved_ema = load_tensors(tmp_path / "ema" / "model.safetensors")
    assert not torch.equal(saved_plain["head.weight"], saved_ema["head.weight"])
    state = load_state(tmp_path / "ema" / "last.pt")
    # EMA is only evaluated: the raw weights follow exactly the same trajectory
    assert_same_tensors(state["model"], load_state(tmp_path / "plain" / "last.pt")["model"])
    assert averaged["best_epoch"] == averaged["epochs"]
    assert_same_tensors(saved_ema, state["ema"])
    assert plain["epochs"] == averaged["epochs"] == 3



# --- configuration ----------------------------------------------------------------------------------------


def test_resolve_config_overrides_and_ignores_none():
    cfg = resolve_config("seed-a", lr=None, epochs=3)
    assert cfg.lr == 1e-3 and cfg.epochs == 3 and cfg.preset == "seed-a"
    assert resolve_config().model == TrainConfig().model


@pytest.mark.parametrize("overrides,needle", [
    (dict(learning_rate=0.1), "learning_rate"),
    (dict(epochs=0), "--epochs"),
    (dict(batch_size=1), "--batch-size"),
    (dict(lr=-0.1), "--lr"),
    (dict(optimizer="rmsprop"), "--optimizer"),
    (dict(schedule="step"), "--schedule"),
    (dict(select="accuracy"), "--select"),
    (dict(precision="fp8"), "--precision"),
    (dict(ema=1.0), "--ema"),
    (dict(patience=-1), "negative"),
    (dict(augment="flip,blur"), "blur"),
    (dict(label_smoothing=5.0), "--label-smoothing"),
    (dict(threads=100000), "--threads"),
    (dict(subset=-5), "--subset"),
    (dict(momentum=1.0), "--momentum"),
    (dict(weight_decay=-1.0), "--weight-decay"),
])
def test_resolve_config_rejects_bad_options(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        resolve_config("seed-a", **overrides)


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError) as e:
        resolve_config("turbo")
    assert "turbo" in str(e.value) and all(p in str(e.value) for p in PRESETS)


def test_seed_a_preset_is_seed_as_recipe():
    cfg = resolve_config("seed-a")
    assert (cfg.model, cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs) == ("seed-a", "adam", 1e-3, 32, 30)
    assert cfg.augment == "flip" and cfg.select == "val_loss" and cfg.schedule == "constant"
    assert cfg.time_budget == 0 and cfg.label_smoothing == 0 and cfg.tta is False


@pytest.mark.parametrize("preset", ["fast", "default", "best", "tiny", "seed-a", "seed-b-mlp", "seed-b-cnn"])
def test_presets_resolve_to_known_models(preset):
    from fmnist.fit.models import count_parameters, create_model
    from fmnist.fit.recipes import AUTO_MODELS

    cfg = resolve_config(preset)
    if preset in ("fast", "default", "best", "tiny"):
        # the budgeted presets take their recipe from a table when they start; every row names a known model
        assert cfg.model in AUTO_MODELS and cfg.time_budget > 0 and math.isfinite(cfg.time_budget)
        rows = AUTO_MODELS[cfg.model]
        assert all(row["model"] in model_names() for _, row, _ in rows)
        if preset == "tiny":  # "under 100,000 parameters"
            assert all(count_parameters(create_model(row["model"])) < 100_000 for _, row, _ in rows)
    else:
        assert cfg.model in model_names()


def test_a_diverging_recipe_stops_with_one_clear_error(tmp_path, small_data):
    from fmnist.fit.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="training diverged at epoch 1.*lower --lr"):
        train(config(lr=1e12, epochs=2), out=tmp_path / "run", data=small_data, quiet=True)
    for name in ("config.json", "env.json"):  # what was written is still valid JSON
        _strict_json((tmp_path / "run" / name).read_text())
    assert not (tmp_path / "run" / "model.json").exists()  # no model of a diverged epoch


def test_select_last_validates_and_keeps_only_the_final_epoch(tmp_path, small_data):
    """Budgeted presets keep the final weights (their schedule anneals to 0): the validation split is passed
    over once, at the end, the model is written once, and the trust fit takes that pass's outputs as its own."""
    from fmnist.core.run import Run
    from fmnist.fit.trust.fit import fit_trust

    out = tmp_path / "run"
    summary = train(config(epochs=3, select="last", tta=False), out=out, data=small_data, quiet=True)
    rows = history(out)
    assert [r["val_acc"] for r in rows[:-1]] == ["", ""] and float(rows[-1]["val_acc"]) > 0
    assert summary["best_epoch"] == 3
    run = Run.load(out)
    assert run.meta["best_epoch"] == 3
    assert "not validated" in (out / "train.log").read_text()
    # the fit from the training run's outputs equals a fit that computes them again from the saved model
    stored = json.loads((out / "model.json").read_text())["calibration"]["temperature"]
    again = fit_trust(out, small_data)["temperature"]
    assert again == pytest.approx(stored, rel=1e-4)


def test_select_last_needs_an_annealed_schedule():
    with pytest.raises(ValueError, match="select last"):
        config(select="last", schedule="constant")
    with pytest.raises(ValueError, match="select last"):
        config(select="last", patience=2)
