"""Data-parallel training with real processes on gloo: two ranks with half batches take the steps one process
takes with the whole batch; a run under torchrun writes one ordinary run folder; a distributed run resumes."""
from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fmnist
from fmnist.apps.cli import main
from fmnist.core.run import Run
from fmnist.fit import distributed
from fmnist.fit.checkpoint import load_state, load_tensors
from fmnist.fit.distributed import Context, context_from_env, rank_seed, share
from fmnist.fit.models import create_model
from fmnist.fit.train import resolve_config, steps_per_epoch, train

# No BatchNorm, no dropout, no augmentation: nothing differs between one process and two but how the batch is cut.
PLAIN = dict(model="seed-b-mlp", optimizer="sgd", lr=0.05, batch_size=32, epochs=1, subset=160, val_size=100,
             augment="none", tta=False, precision="fp32", label_smoothing=0.1, threads=1, time_budget=0, seed=0,
             select="val_acc")
# BatchNorm and per-rank augmentation; 150 images = 4 batches of 32 and a last one of 22 (11 per rank).
BN = dict(model="s2d-24", optimizer="sgd", lr=0.05, batch_size=32, epochs=2, subset=150, val_size=100,
          augment="flip,crop", tta=True, precision="fp32", threads=1, time_budget=0, seed=0, select="val_acc")
TIMING_COLUMNS = {"seconds", "elapsed"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, idx_dir: str, jobs: list) -> None:
    """One rank, as torchrun would start it (the same environment variables); trains each job in turn."""
    from fmnist.fit.data import load_fashion_mnist

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    data = load_fashion_mnist(idx_dir, verify=False)
    with distributed.session("cpu") as ctx:
        assert ctx == Context(rank, 2, rank, 2)
        for out, recipe, stop_after in jobs:
            stop = (lambda epoch, row, last=stop_after: epoch >= last) if stop_after else None
            train(resolve_config("fast", **recipe), out=out, data=data, quiet=True, on_epoch_end=stop, ctx=ctx)


def spawn_two(jobs: list, idx_dir, timeout: float = 120) -> None:
    """Run :func:`_worker` in two spawned processes; fail (never hang) if they do not finish in time."""
    procs = mp.start_processes(_worker, args=(free_port(), str(idx_dir), jobs), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"two-process training did not finish in {timeout} s")


def torchrun(*args, timeout: float = 120, ok: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=2 -m fmnist ARGS`, the command the README gives."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(fmnist.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "fmnist", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert (done.returncode == 0) == ok, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def history(run) -> list[dict]:
    with open(Path(run) / "history.csv") as f:
        return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, idx_dir):
    """In one pair of processes: the plain model for 5 steps, the BatchNorm model for 2 epochs in one go, and the
    same stopped after epoch 1 (to resume)."""
    root = tmp_path_factory.mktemp("ddp")
    runs = {"plain": root / "plain", "straight": root / "straight", "resumed": root / "resumed"}
    spawn_two([(str(runs["plain"]), PLAIN, 0), (str(runs["straight"]), BN, 0), (str(runs["resumed"]), BN, 1)],
              idx_dir)
    return runs


# --- the pieces, in one process -----------------------------------------------------------------------------


def test_context_from_torchrun_environment():
    assert context_from_env({}) == Context(0, 1)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ctx = context_from_env(env)
    assert ctx == Context(3, 4, 1, 2) and not ctx.is_main
    with pytest.raises(ValueError, match="outside"):
        context_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_rank_takes_an_equal_contiguous_share():
    batch = torch.arange(10, 21)  # 11 images on 2 ranks: 5 each, the 11th dropped
    assert share(batch, Context(0, 1)).tolist() == batch.tolist()
    assert share(batch, Context(0, 2)).tolist() == list(range(10, 15))
    assert share(batch, Context(1, 2)).tolist() == list(range(15, 20))
    # A last batch is kept only when each rank's share of it holds 2 images (BatchNorm needs 2).
    assert steps_per_epoch(130, 32) == 5 and steps_per_epoch(130, 32, world_size=2) == 4
    assert steps_per_epoch(132, 32, world_size=2) == 5 and steps_per_epoch(132, 32, world_size=4) == 4


def test_rank_seeds_differ_by_rank_and_epoch():
    seeds = {rank_seed(0, r, e) for r in range(4) for e in range(10)} | {rank_seed(1, 0, 0)}
    assert len(seeds) == 41 and all(0 <= s < 2**63 for s in seeds)


def test_a_batch_that_does_not_split_evenly_is_refused(tmp_path, synthetic_data):
    cfg = resolve_config("fast", **dict(PLAIN, batch_size=33))
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        train(cfg, out=tmp_path / "run", data=synthetic_data, quiet=True, ctx=Context(0, 2))
    assert not (tmp_path / "run").exists()


# --- two real processes ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_with_half_batches_take_the_steps_of_one_process(tmp_path, two_process_runs, idx_dir):
    from fmnist.fit.data import load_fashion_mnist

    one = tmp_path / "one"
    train(resolve_config("fast", **PLAIN), out=one, data=load_fashion_mnist(idx_dir, verify=False), quiet=True)
    a, b = load_state(one / "last.pt"), load_state(two_process_runs["plain"] / "last.pt")
    assert a["step"] == b["step"] == 5
    torch.manual_seed(PLAIN["seed"])
    start = create_model("seed-b-mlp").state_dict()  # the weights both started from
    moved = max(float((w - start[k]).abs().max()) for k, w in a["model"].items())
    assert moved > 1e-2  # the steps changed the weights: the comparison below proves something
    for k, w in a["model"].items():
        torch.testing.assert_close(b["model"][k], w, atol=1e-5, rtol=0)
    # The logged training loss is the whole batch's on both.
    assert float(history(one)[0]["train_loss"]) == pytest.approx(float(history(two_process_runs["plain"])[0]
                                                                       ["train_loss"]), abs=1e-5)


@pytest.mark.slow
def test_torchrun_writes_one_ordinary_run_folder(tmp_path, idx_dir, capsys):
    """Under a time budget, which only rank 0's clock decides; the folder is read as any other."""
    out = tmp_path / "run"
    done = torchrun("train", "--preset", "fast", "--time-budget", "3", "--batch-size", "32", "--subset", "300",
                    "--val-size", "100", "--threads", "1", "--precision", "fp32", "--data-dir", str(idx_dir),
                    "--no-verify", "--out", str(out))
    assert done.stdout.count("kept epoch") == 1  # rank 0 alone speaks
    rows = history(out)
    epoch_lines = [ln for ln in (out / "train.log").read_text().splitlines() if ln.startswith("epoch")]
    assert len(epoch_lines) == len(rows) >= 1
    assert [int(ln.split()[1]) for ln in epoch_lines] == [int(r["epoch"]) for r in rows]
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    assert json.loads((out / "train_summary.json").read_text())["world_size"] == 2
    assert "x 2 processes" in (out / "train.log").read_text()
    # The preset's recipe is the epoch table's: the ranks agree on rank 0's row (nothing fits 3 s: the cheapest)
    assert (out / "train.log").read_text().count("recipe: ") == 1
    run = Run.load(out)
    assert run.config["model"] == "s2dw-24" and run.config["batch_size"] == 32 and "calibration" in run.meta
    assert main(["evaluate", str(out), "--data-dir", str(idx_dir), "--no-verify", "--threads", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["n"] == 300


@pytest.mark.slow
def test_a_distributed_run_resumes_to_the_weights_of_an_uninterrupted_one(two_process_runs, idx_dir):
    straight, resumed = two_process_runs["straight"], two_process_runs["resumed"]
    assert len(history(resumed)) == 1
    torchrun("train", "--resume", str(resumed), "--data-dir", str(idx_dir), "--no-verify")
    assert history(resumed) == history(straight) and len(history(straight)) == 2
    a, b = load_state(straight / "last.pt"), load_state(resumed / "last.pt")
    assert a["step"] == b["step"] == 10
    for k, w in a["model"].items():  # weights and the averaged BatchNorm statistics
        torch.testing.assert_close(b["model"][k], w, atol=1e-6, rtol=0)
    kept_a, kept_b = load_tensors(straight / "model.safetensors"), load_tensors(resumed / "model.safetensors")
    assert all(torch.equal(kept_a[k], kept_b[k]) for k in kept_a)
    assert "resuming" in (resumed / "train.log").read_text()


@pytest.mark.slow
def test_a_failure_of_rank_0_stops_every_process(tmp_path, idx_dir):
    """Rank 0 alone validates: when that fails (here a diverging recipe), the others stop too, not wait."""
    done = torchrun("train", "--model", "seed-b-mlp", "--epochs", "2", "--lr", "1e12", "--batch-size", "32",
                    "--subset", "300", "--val-size", "100", "--threads", "1", "--precision", "fp32",
                    "--data-dir", str(idx_dir), "--no-verify", "--out", str(tmp_path / "run"), timeout=90, ok=False)
    assert "training diverged" in done.stderr + done.stdout
