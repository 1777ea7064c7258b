"""Run-folder files: round trips, clear errors for damaged checkpoints, no unpickling, atomic writes."""
from __future__ import annotations

import json
import os

import pytest
import torch

from fmnist import CLASS_NAMES
from fmnist.core.preprocess import make_spec
from fmnist.core.run import MODEL_FORMAT, Run
from fmnist.fit.checkpoint import (
    CheckpointError,
    load_state,
    load_tensors,
    read_json,
    save_model,
    save_state,
    save_tensors,
    write_json,
)
from fmnist.fit.models import create_model


def load_model(path):
    """The weights and model.json of a run folder, through the one loader (:class:`fmnist.core.run.Run`)."""
    run = Run.load(path, complete=False)  # the files themselves: a run without its trust fit
    return run.model(), run.meta


class Payload:
    """An arbitrary object: a resume state must never be able to smuggle one in."""

    def __init__(self):
        self.command = "rm -rf /"


def leftovers(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture
def saved_run(tmp_path):
    torch.manual_seed(0)
    model = create_model("tiny")
    with torch.no_grad():  # non-trivial BatchNorm statistics, so the round trip covers buffers too
        model(torch.randn(8, 1, 28, 28) * 2 + 1)
    model.eval()
    run = tmp_path / "run"
    save_model(run, model, {"class_names": list(CLASS_NAMES), "preprocessing": make_spec(), "tta": False})
    return run, model


def test_save_load_round_trip_gives_identical_outputs(saved_run):
    run, model = saved_run
    loaded, meta = load_model(run)
    assert not loaded.training
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert meta["format"] == MODEL_FORMAT and meta["model"] == "tiny"
    assert meta["class_names"] == list(CLASS_NAMES) and meta["preprocessing"] == make_spec()
    assert isinstance(meta["parameters"], int) and meta["parameters"] > 0


def test_corrupt_weights_give_a_clear_error(saved_run):
    run, _ = saved_run
    (run / "model.safetensors").write_bytes(b"\x00garbage, not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors.*not a valid safetensors file"):
        load_model(run)


def test_truncated_weights_give_a_clear_error(saved_run):
    run, _ = saved_run
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(run)


def test_missing_weights(saved_run):
    run, _ = saved_run
    (run / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors not found"):
        load_model(run)


def test_weights_of_another_architecture(saved_run):
    run, _ = saved_run
    meta = read_json(run / "model.json")
    write_json(run / "model.json", {**meta, "model": "seed-b-mlp"})
    with pytest.raises(CheckpointError, match="does not match seed-b-mlp"):
        load_model(run)


def test_missing_model_json(saved_run):
    run, _ = saved_run
    (run / "model.json").unlink()
    with pytest.raises(CheckpointError, match="model.json not found"):
        load_model(run)


def test_bad_json(saved_run):
    run, _ = saved_run
    (run / "model.json").write_text('{"format": "fmnist-model/1", ')
    with pytest.raises(CheckpointError, match="model.json is not valid JSON"):
        load_model(run)


def test_binary_garbage_instead_of_json(tmp_path):
    (tmp_path / "x.json").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_json(tmp_path / "x.json")


@pytest.mark.parametrize("fmt", [None, "fmnist-model/99", "keras"])
def test_wrong_format(saved_run, fmt):
    run, _ = saved_run
    meta = read_json(run / "model.json")
    if fmt is None:
        del meta["format"]
    else:
        meta["format"] = fmt
    write_json(run / "model.json", meta)
    with pytest.raises(CheckpointError, match="unsupported format"):
        load_model(run)


def test_unknown_architecture_in_model_json(saved_run):
    run, _ = saved_run
    write_json(run / "model.json", {**read_json(run / "model.json"), "model": "gpt-5"})
    with pytest.raises(CheckpointError, match="cannot build the model.*gpt-5"):
        load_model(run)


def test_not_a_run_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="model.json not found"):
        load_model(tmp_path)


def test_resume_state_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {"model": {"w": torch.randn(3, 4)}, "generator": gen.get_state(), "epoch": 2, "step": 17,
             "history": [{"epoch": 1, "val_loss": 0.5}], "best": {"epoch": 1, "value": 0.5}}
    save_state(tmp_path / "last.pt", state)
    back = load_state(tmp_path / "last.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert torch.equal(back["generator"], state["generator"])
    assert back["history"] == state["history"] and back["best"] == state["best"] and back["step"] == 17


def test_load_state_refuses_arbitrary_objects(tmp_path):
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="not a valid resume state"):
        load_state(tmp_path / "last.pt")


def test_load_state_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        load_state(tmp_path / "last.pt")
    (tmp_path / "last.pt").write_bytes(b"not a zip, not a pickle")
    with pytest.raises(CheckpointError, match="not a valid resume state"):
        load_state(tmp_path / "last.pt")


def test_tensors_round_trip_with_metadata(tmp_path):
    # "a" is a transposed (non-contiguous) view
    t = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2], dtype=torch.int64)}
    save_tensors(tmp_path / "t.safetensors", t, metadata={"format": "x"})
    back = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_writes_leave_no_temp_files(saved_run):
    run, _ = saved_run
    write_json(run / "extra.json", {"a": 1})
    save_state(run / "last.pt", {"x": torch.zeros(2)})
    save_tensors(run / "t.safetensors", {"x": torch.zeros(2)})
    assert leftovers(run) == []
    assert sorted(p.name for p in run.iterdir()) == [
        "extra.json", "last.pt", "model.json", "model.safetensors", "t.safetensors"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "meta.json"
    write_json(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})  # fails half-way through json.dump
    assert json.loads(path.read_text()) == {"ok": True}
    assert leftovers(tmp_path) == []


def test_written_files_get_normal_permissions(tmp_path):
    write_json(tmp_path / "a.json", {})
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~umask
