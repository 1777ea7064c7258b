"""Temperature scaling and its metrics: ECE (15 bins), NLL, Brier; the fit done by train and `fmnist calibrate`."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from fmnist.apps.cli import main
from fmnist.core.ood import DEFAULT_PARTS
from fmnist.fit.trust.calibration import (
    brier_score,
    calibrate,
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    nll,
)


def overconfident(n: int = 4000, true_t: float = 2.5, seed: int = 0):
    """Logits whose labels are drawn from softmax(z), reported as z * true_t: T = true_t undoes it."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 10, generator=g) * 2
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=g).flatten()
    return z * true_t, labels


def test_fitted_temperature_lowers_validation_nll_and_recovers_the_truth():
    logits, labels = overconfident()
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.1)
    assert nll(logits, labels, t) < nll(logits, labels, 1.0) - 0.05
    before, after = calibration_metrics(logits, labels), calibration_metrics(logits, labels, t)
    assert after["ece"] < before["ece"] / 2
    assert after["accuracy"] == before["accuracy"]  # dividing logits by T > 0 never changes the argmax


def test_underconfident_logits_get_a_temperature_below_one():
    logits, labels = overconfident(true_t=0.5)
    assert fit_temperature(logits, labels) == pytest.approx(0.5, rel=0.1)


def test_calibrate_returns_the_model_json_fields():
    logits, labels = overconfident()
    cal = calibrate(logits, labels)
    for key in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after", "brier_before", "brier_after"):
        assert isinstance(cal[key], float) and math.isfinite(cal[key])
    assert cal["nll_after"] < cal["nll_before"] and cal["ece_bins"] == 15
    json.dumps(cal)


def test_ece_is_the_gap_between_confidence_and_accuracy():
    probs = torch.full((10, 2), 0.2)
    probs[:, 0] = 0.8  # confidence 0.8 everywhere, class 0 predicted
    right = torch.zeros(10, dtype=torch.long)
    assert expected_calibration_error(probs, right) == pytest.approx(0.2)  # 100 % right at 80 % confidence
    half = torch.tensor([0, 1] * 5)
    assert expected_calibration_error(probs, half) == pytest.approx(0.3)  # 50 % right at 80 % confidence
    mixed = torch.tensor([0] * 8 + [1] * 2)
    assert expected_calibration_error(probs, mixed) == pytest.approx(0.0, abs=1e-6)


def test_brier_score_extremes():
    labels = torch.arange(10)
    assert brier_score(torch.eye(10), labels) == pytest.approx(0.0)
    assert brier_score(torch.full((10, 10), 0.1), labels) == pytest.approx(0.9)
    assert brier_score(torch.eye(10).roll(1, 1), labels) == pytest.approx(2.0)


def test_train_stores_calibration_and_ood_with_the_model(trained_run):
    meta = json.loads((trained_run / "model.json").read_text())
    cal = meta["calibration"]
    assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert meta["ood"]["target_accept"] == 0.98 and math.isfinite(meta["ood"]["threshold"])
    assert (trained_run / "ood.safetensors").is_file()
    summary = json.loads((trained_run / "train_summary.json").read_text())
    assert summary["trust"]["temperature"] == cal["temperature"]


def test_calibrate_command_refits_a_run_without_trust(tmp_path, trained_run, idx_dir, capsys):
    run = shutil.copytree(trained_run, tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    del meta["calibration"], meta["ood"], meta["conformal"]  # as a run trained before calibration existed
    (run / "model.json").write_text(json.dumps(meta))
    (run / "ood.safetensors").unlink()
    code = main(["calibrate", str(run), "--data-dir", str(idx_dir), "--no-verify", "--threads", "1",
                 "--coverage", "0.9"])
    out = capsys.readouterr().out
    assert code == 0
    assert "validation" in out and "test" in out and "ECE" in out and "Brier" in out
    meta = json.loads((run / "model.json").read_text())
    assert meta["calibration"]["temperature"] > 0 and "ece_after" in meta["calibration"]["test"]
    assert meta["ood"]["parts"] == list(DEFAULT_PARTS) and meta["ood"]["combine"] == "fisher"
    assert "procedural non-garments" in meta["ood"]["fit_on"]
    assert (run / "ood.safetensors").is_file()
    # The candidate sets, fitted for the coverage asked, measured on the test split and stored with the run.
    sets = meta["conformal"]
    assert sets["coverage"] == 0.9 and sets["n"] == 200  # the run's validation split
    test = sets["test"]
    assert test["n"] == 300 and 0 <= test["coverage"] <= 1 and test["mean_size"] >= 1
    assert 0 <= test["singleton_share"] <= 1 and sum(b["count"] for b in test["by_size"]) == 300
    table = out[out.index("candidate sets for 90 % coverage ("):].splitlines()
    assert table[3].split()[:2] == ["validation", "200"] and table[4].split()[:2] == ["test", "300"]
    assert f"{100 * test['coverage']:.2f} %" in table[4] and f"{test['mean_size']:.3f}" in table[4]


@pytest.mark.parametrize("coverage", ["0", "1", "1.5", "-0.2", "nan"])
def test_calibrate_refuses_a_coverage_outside_0_1_and_changes_nothing(tmp_path, trained_run, idx_dir, capsys,
                                                                      coverage):
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = (run / "model.json").read_bytes()
    code = main(["calibrate", str(run), "--data-dir", str(idx_dir), "--no-verify", "--coverage", coverage])
    assert code == 2
    assert "--coverage must be strictly between 0 and 1" in capsys.readouterr().err
    assert (run / "model.json").read_bytes() == before
