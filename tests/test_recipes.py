"""The epoch table and the recipe a time budget picks from it on a machine of a given speed."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import make_synthetic

from fmnist.fit.recipes import EPOCH_TABLE, TINY_TABLE, choose_row, resolve_config, table_recipe
from fmnist.fit.train import train

# What one epoch of each table model costs on three made-up machines (seconds): relative costs as measured on a
# 2-core CPU (s2d-32 : resnet9-s : resnet9-m : resnet9-l about 1 : 3 : 8 : 30), the GPU far flatter.
CPU = {"s2d-32": 6.0, "resnet9-s": 17.0, "resnet9-m": 48.0, "resnet9-l": 180.0}
FAST_CPU = {k: v / 3 for k, v in CPU.items()}
GPU = {"s2d-32": 0.6, "resnet9-s": 0.5, "resnet9-m": 0.8, "resnet9-l": 1.2}
PARAMS = {"s2d-32": 143_242, "resnet9-s": 415_066, "resnet9-m": 1_650_346, "resnet9-l": 6_581_578}


def rows_chosen(spendable: float, machine: dict) -> tuple[int, list[str]]:
    asked = []

    def seconds(recipe):
        asked.append(recipe["model"])
        return machine[recipe["model"]]

    i = choose_row(spendable, seconds, EPOCH_TABLE, size=lambda r: PARAMS[r["model"]])
    return EPOCH_TABLE[i][0], asked


@pytest.mark.parametrize("spendable,machine,row", [
    (51, CPU, 3),          # the fast preset on a 2-core CPU: 3 epochs of s2d-32 fit, 5 of resnet9-s do not
    (171, CPU, 5),         # the default preset: 5 epochs of resnet9-s
    (876, CPU, 10),        # the best preset: 10 epochs of resnet9-m, not 20
    (51, FAST_CPU, 5),     # a machine 3x faster buys a longer row for the same budget
    (171, FAST_CPU, 10),
    (60, GPU, 40),         # a GPU: 40 epochs of resnet9-l in a minute
    (70, GPU, 80),         # and 80 of resnet9-m a little above it
    (1, CPU, 3),           # nothing fits: the shortest row, trained for what the budget allows
])
def test_measured_speed_picks_the_row(spendable, machine, row):
    assert rows_chosen(spendable, machine)[0] == row


def test_a_model_too_slow_for_a_row_is_not_probed_for_longer_rows():
    row, asked = rows_chosen(171, CPU)  # resnet9-m fails at 10 epochs: resnet9-l (40 epochs) is never timed
    assert row == 5 and "resnet9-l" not in asked
    # but a smaller model of a longer row still is: 80 epochs of resnet9-m after 40 of resnet9-l failed
    assert rows_chosen(70, GPU)[1].count("resnet9-m") >= 2


@pytest.mark.parametrize("epochs,row", [(1, 3), (3, 3), (4, 3), (7, 5), (10, 10), (39, 20), (100, 80)])
def test_epochs_pick_the_longest_row_not_longer(epochs, row):
    assert table_recipe(epochs)[0] == row


def test_epochs_without_a_budget_train_the_table_recipe():
    row = dict(EPOCH_TABLE)[10]
    cfg = resolve_config("default", epochs=10, time_budget=0)
    assert (cfg.model, cfg.batch_size, cfg.lr, cfg.augment) == (row["model"], row["batch_size"], row["lr"],
                                                                 row["augment"])
    assert cfg.epochs == 10 and cfg.time_budget == 0 and cfg.select == "val_acc"
    # explicit values still win over the row
    assert resolve_config("default", epochs=10, time_budget=0, lr=0.05, model="s2d-24").lr == 0.05
    assert resolve_config("tiny", epochs=30, time_budget=0).model == dict(TINY_TABLE)[20]["model"]


def test_a_budgeted_auto_recipe_keeps_what_its_user_gave():
    cfg = resolve_config("fast", batch_size=64, augment="flip")
    assert cfg.model == "auto" and cfg.pinned == "augment,batch_size"
    from fmnist.fit.throughput import size_recipe

    chosen, note = size_recipe(cfg, torch.device("cpu"), n_train=640, n_val=64, reserve=0.0)
    assert chosen.batch_size == 64 and chosen.augment == "flip" and chosen.model in {r["model"] for _, r in
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
    assert "recipe: row '" in log and "probe" in log
    from fmnist.fit.recipes import read_config

    saved = read_config(tmp_path / "run" / "config.json")
    assert saved.model in {row["model"] for _, row in EPOCH_TABLE} and saved.time_budget == budget
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
    from fmnist.fit.trust.fit import COST_FIXED_SECONDS, cost_seconds

    assert cost_seconds(0.0, "bf16") == cost_seconds(0.0) == COST_FIXED_SECONDS
    assert cost_seconds(6.0, "bf16") > cost_seconds(6.0, "fp32") > COST_FIXED_SECONDS
