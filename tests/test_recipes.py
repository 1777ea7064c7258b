"""The epoch table and the recipe a time budget picks from it on a machine of a given speed."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import make_synthetic

from fmnist.fit.recipes import EPOCH_TABLE, choose_row, predicted_accuracy, resolve_config, table_recipe
from fmnist.fit.train import train

# What one epoch of each table model costs on three made-up machines (seconds): relative costs as measured on a
# 2-core AVX2 CPU (s2dw-24 : s2dw-32 : air-32 : resnet9-s : resnet9-m : resnet9-l about 0.6 : 1 : 2.3 : 3.3 : 11
# : 40), the GPU far flatter.
CPU = {"s2dw-24": 12.0, "air-16": 18.0, "s2dw-32": 20.0, "air-32": 46.0, "resnet9-s": 66.0, "resnet9-m": 220.0, "resnet9-l": 800.0}
FAST_CPU = {k: v / 3 for k, v in CPU.items()}
GPU = {"s2dw-24": 0.5, "air-16": 0.5, "s2dw-32": 0.5, "air-32": 0.5, "resnet9-s": 0.5, "resnet9-m": 0.8, "resnet9-l": 1.2}


def chosen(spendable: float, machine: dict) -> tuple[str, int, list[str]]:
    """(model chosen, its row's epochs, the models timed)."""
    asked = []

    def seconds(recipe):
        asked.append(recipe["model"])
        return machine[recipe["model"]], 0.0

    i, epochs, accuracy = choose_row(spendable, seconds, EPOCH_TABLE)
    assert accuracy == pytest.approx(predicted_accuracy(EPOCH_TABLE, EPOCH_TABLE[i][1]["model"], epochs))
    return EPOCH_TABLE[i][1]["model"], EPOCH_TABLE[i][0], asked


@pytest.mark.parametrize("spendable,machine,model,row", [
    (45, CPU, "s2dw-24", 4),      # fast on an AVX2 laptop: under 4 epochs of anything; s2dw-24 trains the most
    (160, CPU, "air-32", 3),      # default: 3.5 epochs of air-32 beat 8 of s2dw-32
    (860, CPU, "air-32", 10),     # best: 19 epochs of air-32 (94.5 %, flat past its 10) beat 13 of resnet9-s
    (45, FAST_CPU, "air-32", 1.5),  # a machine 3x faster affords the better model for the same budget
    (60, GPU, "resnet9-m", 20),   # a GPU: 75 epochs of resnet9-m (95.6 % predicted) beat 50 of resnet9-l
    (1, CPU, "s2dw-24", 4),       # nothing fits: the cheapest model, trained for what the budget allows
])
def test_measured_speed_picks_the_model_predicted_best(spendable, machine, model, row):
    assert chosen(spendable, machine)[:2] == (model, row)


def test_models_that_cannot_matter_are_not_timed():
    _, _, asked = chosen(45, CPU)  # resnet9-m would train 0.2 epochs: never timed; nor resnet9-l
    assert "resnet9-m" not in asked and "resnet9-l" not in asked
    assert asked[0] == "s2dw-24" and len(asked) == len(set(asked))  # cheapest first, each once


def test_predicted_accuracy_interpolates_and_stays_flat_past_the_table():
    rows = [(e, r, acc) for e, r, acc in EPOCH_TABLE if r["model"] == "resnet9-m"]
    assert predicted_accuracy(EPOCH_TABLE, "resnet9-m", 10) == rows[0][2]
    assert rows[0][2] < predicted_accuracy(EPOCH_TABLE, "resnet9-m", 14) < rows[1][2]
    assert predicted_accuracy(EPOCH_TABLE, "resnet9-m", 500) == rows[-1][2]
    assert predicted_accuracy(EPOCH_TABLE, "resnet9-m", 5) == pytest.approx(rows[0][2] - 2.0)


@pytest.mark.parametrize("epochs,model,row", [(1, "air-32", 1.5), (3, "air-32", 3), (10, "resnet9-m", 10),
                                              (39, "resnet9-l", 40), (100, "resnet9-l", 100)])
def test_epochs_pick_the_model_predicted_best_at_that_many(epochs, model, row):
    e, recipe = table_recipe(epochs)
    assert (recipe["model"], e) == (model, row)


def test_epochs_without_a_budget_train_the_table_recipe():
    row = next(r for e, r, _ in EPOCH_TABLE if e == 10 and r["model"] == "resnet9-m")
    cfg = resolve_config("default", epochs=10, time_budget=0)
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.augment) == (row["model"], row["batch_size"], row["lr"],
                                                                 row["augment"])
    assert cfg.epochs == 10 and cfg.time_budget == 0 and cfg.select == "last"
    # explicit values still win over the row
    assert resolve_config("default", epochs=10, time_budget=0, lr=0.05, model="s2d-24").lr == 0.05
    assert resolve_config("tiny", epochs=30, time_budget=0).model == "s2d-24"


def test_a_budgeted_auto_recipe_keeps_what_its_user_gave():
    cfg = resolve_config("fast", batch_size=64, augment="flip")
    assert cfg.model == "auto" and cfg.pinned == "augment,batch_size"
    from fmnist.fit.throughput import size_recipe

    picked, note = size_recipe(cfg, torch.device("cpu"), n_train=640, n_val=64, reserve=0.0)
    assert picked.batch_size == 64 and picked.augment == "flip" and picked.model in {r["model"] for _, r, _ in
                                                                                    EPOCH_TABLE}
    assert "as given" in note


def test_auto_needs_a_budget_or_epochs():
    from fmnist.fit.recipes import TrainConfig, validate

    with pytest.raises(ValueError, match="time budget"):
        validate(TrainConfig(model="auto", time_budget=0))


def test_a_budgeted_preset_probes_trains_the_row_and_ends_within_its_budget(tmp_path):
    """The whole run (probe, training, validation, trust fit) ends within its budget, plus one epoch's
    overrun at most, and its config names the concrete recipe it trained (so --resume needs no probe)."""
    data = make_synthetic(n_train=900, n_test=60, seed=3)
    budget = 8.0
    cfg = resolve_config("fast", time_budget=budget, val_size=150, threads=1)
    t0 = time.monotonic()
    summary = train(cfg, out=tmp_path / "run", data=data, quiet=True)
    wall = time.monotonic() - t0
    log = (tmp_path / "run" / "train.log").read_text()
    assert "recipe: " in log and "epoch table" in log and "probe" in log
    from fmnist.fit.recipes import read_config

    saved = read_config(tmp_path / "run" / "config.json")
    assert saved.model in {row["model"] for _, row, _ in EPOCH_TABLE} and saved.time_budget == budget
    import csv

    with open(tmp_path / "run" / "history.csv") as f:
        epoch = max(float(r["seconds"]) for r in csv.DictReader(f))
    assert summary["train_seconds"] <= budget + epoch
    assert wall <= budget + epoch + 2.0, f"{wall:.1f} s for a {budget} s budget"


def test_augmentation_generator_is_the_training_generator_on_the_cpu():
    """On an accelerator augmentation draws its random numbers there (a host generator would copy and sync every
    step); on the CPU it uses the one generator of shuffling, so CPU runs repeat as before."""
    from fmnist.fit.train import build

    st = build(resolve_config("seed-a", epochs=1), torch.device("cpu"))
    assert st.aug_gen is None and st.gen.device.type == "cpu"


def test_the_budget_keeps_more_in_hand_after_bf16_training():
    """The trust fit runs the served fp32 model: after a run validated in bf16 its passes cost about twice as
    much, and the budget's reserve says so (a budget that kept too little ended 12 s late on resnet9-m)."""
    from fmnist.fit.trust.fit import COST_FIXED_SECONDS, DRAW_SECONDS, cost_seconds

    assert cost_seconds(0.0, "bf16") == cost_seconds(0.0) == COST_FIXED_SECONDS + DRAW_SECONDS
    assert cost_seconds(0.0, drawn=True) == COST_FIXED_SECONDS  # the non-garments read from disk
    assert cost_seconds(6.0, "bf16") > cost_seconds(6.0, "fp32") > COST_FIXED_SECONDS + DRAW_SECONDS
