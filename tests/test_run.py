"""The run object: one loader that checks a run folder once, old runs still load, tampering gives one clear error."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_synthetic

import fmnist
from fmnist.core.run import SCHEMA_VERSION, Run
from fmnist.fit.checkpoint import CheckpointError, read_json, write_json
from fmnist.fit.data import split_indices

V1 = Path(__file__).parent / "fixtures" / "run-v1"  # written by fmnist before schema_version existed


@pytest.fixture()
def v1(tmp_path) -> Path:
    return Path(shutil.copytree(V1, tmp_path / "v1"))


def test_a_run_of_the_previous_format_loads_and_answers_as_before(v1):
    run = Run.load(v1)
    assert run.schema_version == 1 and run.model_name == "tiny" and run.detector is not None
    assert split_indices(make_synthetic().train_labels, run.config)[1].numel() == 200  # its config.json's split
    expected = json.loads((v1 / "expected.json").read_text())
    got = fmnist.load(v1).predict_batch(list(make_synthetic().test_images[:6].numpy()))
    assert run.conformal is None  # fitted before candidate sets existed
    for e, g in zip(expected, got):
        assert (g["label"], g["accepted"], g["reason"]) == (e["label"], e["accepted"], e["reason"])
        # The same gates give the verdict; without conformal parameters there are no candidates to name.
        assert g["verdict"] == ("answer" if e["accepted"] else
                                "uncertain" if e["reason"] == "low_confidence" else "refused")
        assert g["candidates"] is None
        assert g["score"] == pytest.approx(e["score"], abs=1e-5)
        assert g["ood_score"] == pytest.approx(e["ood_score"], abs=1e-4)


def test_update_writes_the_current_schema_and_keeps_the_rest(v1):
    run = Run.load(v1)
    run.update(thresholds={"confidence": 0.7})
    meta = read_json(v1 / "model.json")
    assert meta["schema_version"] == SCHEMA_VERSION and meta["thresholds"] == {"confidence": 0.7}
    assert meta["ood"] == read_json(V1 / "model.json")["ood"]
    assert Run.load(v1).confidence_threshold == 0.7


def test_an_ood_section_older_than_combination_rules_is_read_as_their_maximum(v1):
    """The one conversion of an older schema (core.model_json.upgrade): no "combine" was the parts' maximum."""
    _tamper(v1, lambda m: {**m, "ood": {k: v for k, v in m["ood"].items() if k != "combine"}})
    run = Run.load(v1)
    assert run.detector.rule == "max" and run.meta["ood"]["combine"] == "max"
    assert "combine" not in read_json(v1 / "model.json")["ood"]  # reading converts in memory, never on disk


def _tamper(path: Path, change) -> None:
    meta = read_json(path / "model.json")
    write_json(path / "model.json", change(meta))


@pytest.mark.parametrize("change, message", [
    (lambda m: [m], "does not hold a JSON object"),
    (lambda m: "a string", "does not hold a JSON object"),
    (lambda m: {**m, "class_names": None}, "class_names must be a list"),
    (lambda m: {**m, "class_names": ["a", "a"]}, "class_names must be a list of distinct names"),
    (lambda m: {k: v for k, v in m.items() if k != "preprocessing"}, "preprocessing is missing"),
    (lambda m: {**m, "preprocessing": {**m["preprocessing"], "std": 0.0}}, "preprocessing.std"),
    (lambda m: {**m, "preprocessing": {**m["preprocessing"], "std": 1e-30}}, "preprocessing.std"),
    (lambda m: {**m, "preprocessing": {**m["preprocessing"], "size": 32}}, "preprocessing.size"),
    (lambda m: {**m, "calibration": {**m["calibration"], "temperature": -1}}, "calibration.temperature"),
    (lambda m: {**m, "thresholds": {"confidence": 2}}, "thresholds.confidence"),
    (lambda m: {**m, "ood": {**m["ood"], "threshold": None}}, "ood.threshold must be a finite number"),
    (lambda m: {**m, "ood": {**m["ood"], "standardise": {**m["ood"]["standardise"], "stats": [0.0, 0.0]}}},
     r"ood.standardise.stats scale must be a finite number in \(0.0"),
    (lambda m: {**m, "ood": {**m["ood"], "standardise": {"energy": [0.0, 1.0]}}}, "median and scale of each part"),
    (lambda m: {**m, "ood": {**m["ood"], "combine": "median"}}, "unknown OOD combination rule 'median'"),
    (lambda m: {**m, "ood": {**m["ood"], "parts": "energy"}}, "unsupported OOD format"),
    (lambda m: {**m, "tta": "false"}, "tta must be true or false"),
    (lambda m: {**m, "best_epoch": -1}, "best_epoch must be a whole number"),
    (lambda m: {**m, "onnx": {"files": {}, "weights_sha256": 5}}, "onnx.weights_sha256"),
    (lambda m: {**m, "schema_version": SCHEMA_VERSION + 1}, "a newer fmnist wrote it"),
    (lambda m: {**m, "schema_version": True}, "schema_version True"),
    (lambda m: {**m, "model": 7}, "model must name an architecture"),
    (lambda m: {**m, "ood": "yes"}, "ood must be an object"),
    (lambda m: {**m, "onnx": []}, "onnx must be an object"),
    (lambda m: {**m, "onnx": {"files": {"model.onnx": "x"}}}, "onnx must be an object"),
    (lambda m: {**m, "conformal": {"method": "raps", "coverage": 0.95, "classes": 5, "k_reg": 2, "lam": 0.1,
                                   "qhat": 0.5, "n": 100}}, "conformal parameters are for 5 classes"),
])
def test_tampered_model_json_gives_one_clear_error(v1, change, message):
    _tamper(v1, change)
    with pytest.raises(CheckpointError, match=message) as e:
        Run.load(v1)
    assert "model.json" in str(e.value)


def test_non_finite_numbers_in_model_json_are_refused(v1):
    text = (v1 / "model.json").read_text()
    meta = json.loads(text)
    meta["calibration"]["temperature"] = float("nan")
    (v1 / "model.json").write_text(json.dumps(meta))  # Python's json writes NaN; a tamperer can too
    with pytest.raises(CheckpointError, match="temperature must be a finite number"):
        Run.load(v1)


def test_deeply_nested_model_json_is_a_clear_error(v1):
    (v1 / "model.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="model.json"):
        Run.load(v1)


def test_a_fifo_instead_of_model_json_does_not_hang(v1):
    (v1 / "model.json").unlink()
    os.mkfifo(v1 / "model.json")
    with pytest.raises(CheckpointError, match="not a regular file"):
        Run.load(v1)


def test_a_missing_detector_file_is_an_error_when_model_json_describes_one(v1):
    (v1 / "ood.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ood.safetensors not found"):
        Run.load(v1)
    _tamper(v1, lambda m: {k: v for k, v in m.items() if k != "ood"})
    assert Run.load(v1, complete=False).detector is None  # a run that says it has none...
    with pytest.raises(CheckpointError, match="fmnist calibrate"):  # ...is not served without its trust layer
        Run.load(v1)


def test_non_finite_detector_statistics_are_refused(v1):
    from safetensors.torch import load_file, save_file

    tensors = load_file(v1 / "ood.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_file(tensors, v1 / "ood.safetensors", metadata={"format": "fmnist-ood/1"})
    with pytest.raises(CheckpointError, match="non-finite OOD statistics"):
        Run.load(v1)


def test_a_config_json_that_is_not_an_object(v1):
    (v1 / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="config.json does not hold a JSON object"):
        Run.load(v1)


def test_a_detector_file_from_another_fit_is_refused(tmp_path):
    """model.json records the SHA-256 of the statistics it was fitted with (runs fitted before this have none)."""
    from conftest import make_synthetic

    from fmnist.fit.trust.fit import fit_trust

    run = Path(shutil.copytree(V1, tmp_path / "run"))
    fit_trust(run, make_synthetic(), parts=["energy", "stats"])
    assert "sha256" in read_json(run / "model.json")["ood"] and Run.load(run).detector is not None
    other = Path(shutil.copytree(run, tmp_path / "other"))
    fit_trust(other, make_synthetic(seed=3), parts=["energy", "stats"])
    shutil.copy(other / "ood.safetensors", run / "ood.safetensors")
    with pytest.raises(CheckpointError, match="not the file .*model.json was fitted with"):
        Run.load(run)
