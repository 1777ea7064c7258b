"""A run is complete or it is not a run: interrupted at any write of train, calibrate or export (SIGKILL, or a
full disk), a run folder is afterwards served exactly as before or refused with one line that says how to finish
it; never served without its trust layer."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fmnist.core.run import Run
from fmnist.core.runfolder import MANIFEST, SERVABLE, CheckpointError, IncompleteRun, record_complete

ROOT = Path(__file__).resolve().parent.parent
V1 = Path(__file__).parent / "fixtures" / "run-v1"

# The child runs one command with its N-th os.replace (every run file is written to a temporary and renamed:
# the moment a file changes) turned into a SIGKILL, or into a full disk (ENOSPC).
CHILD = textwrap.dedent("""
    import errno, os, signal, sys
    sys.path[:0] = [{src!r}, {tests!r}]
    mode, n, what, run = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    real, count = os.replace, [0]
    def replace(a, b):
        count[0] += 1
        if count[0] == n:
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)
    os.replace = replace
    from conftest import make_synthetic
    data = make_synthetic()
    if what == "calibrate":
        from fmnist.fit.trust.fit import fit_trust
        fit_trust(run, data)
    elif what == "export":
        from fmnist.fit.export import export_onnx
        export_onnx(run, int8=True, data=data, calibration_images=50)
    else:
        from fmnist.fit.train import resolve_config, train
        cfg = resolve_config("fast", model="s2d-24", time_budget=0, epochs=1, batch_size=64, val_size=200,
                             threads=1, seed=0)
        train(cfg, out=run, data=data, quiet=True, overwrite=True)
    print("DONE", count[0])
""").format(src=str(ROOT / "src"), tests=str(ROOT / "tests"))


def interrupt(mode: str, n: int, what: str, run: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD, mode, str(n), what, str(run)], env=env,
                          capture_output=True, text=True, timeout=300)


def servable(run: Path) -> dict:
    return {name: (run / name).read_bytes() for name in (*SERVABLE, "model.json") if (run / name).exists()}


def check_after(run: Path, before: dict) -> str:
    """'as before', 'refused' (one line) or 'new' (a complete run with its trust layer)."""
    try:
        loaded = Run.load(run)
    except CheckpointError as e:
        assert "\n" not in str(e) and ("fmnist calibrate" in str(e) or "fmnist train --resume" in str(e)
                                       or "fmnist export" in str(e)
                                       or "not a run folder" in str(e)), str(e)  # --overwrite removed the old
        return "refused"
    assert loaded.calibration and loaded.detector is not None  # never served without its trust layer
    assert loaded.backend("auto") is not None
    return "as before" if servable(run) == before else "new"


def every_write(tmp_path: Path, source: Path, what: str, modes=("kill", "full")) -> dict:
    outcomes = {}
    for mode in modes:
        n = 1
        while True:
            run = tmp_path / f"{what}-{mode}-{n}"
            shutil.copytree(source, run)
            before = servable(run)
            p = interrupt(mode, n, what, run)
            if p.returncode == 0:  # fewer writes than n: the command finished
                assert check_after(run, before) in ("new", "as before")
                break
            assert "Traceback" in p.stderr or p.returncode < 0, p.stderr  # it did stop at write n
            outcomes[(mode, n)] = check_after(run, before)
            n += 1
    assert outcomes, "no write was interrupted"
    return outcomes


def test_a_trained_run_is_complete_and_an_old_one_loads(trained_run):
    assert (trained_run / MANIFEST).is_file()
    assert Run.load(trained_run).detector is not None
    assert Run.load(V1).detector is not None  # written before manifests: complete with its trust layer


def test_calibrate_interrupted_at_every_write(tmp_path, trained_run):
    outcomes = every_write(tmp_path, trained_run, "calibrate")
    assert "refused" in outcomes.values()


def test_export_interrupted_at_every_write(tmp_path, trained_run):
    pytest.importorskip("onnxruntime")
    outcomes = every_write(tmp_path, trained_run, "export")
    assert set(outcomes.values()) <= {"as before", "refused"}
    # a full disk at the ONNX files (written together) leaves the run as it was, int8 included
    assert outcomes[("full", 1)] == "as before"


def test_train_interrupted_at_every_write(tmp_path, trained_run):
    outcomes = every_write(tmp_path, trained_run, "train", modes=("kill",))
    assert "refused" in outcomes.values()


def test_an_interrupted_calibration_is_refused_and_calibrate_finishes_it(tmp_path, trained_run, synthetic_data):
    from fmnist.fit.trust.fit import fit_trust

    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / MANIFEST).unlink()  # as a run killed in its trust fit leaves it
    with pytest.raises(IncompleteRun, match=f"finish it with `fmnist train --resume {run}`.*fmnist calibrate"):
        Run.load(run)
    fit_trust(run, synthetic_data)
    assert Run.load(run).detector is not None


def test_a_changed_detector_is_refused(tmp_path, trained_run):
    run = shutil.copytree(trained_run, tmp_path / "run")
    data = bytearray((run / "ood.safetensors").read_bytes())
    data[-1] ^= 1
    (run / "ood.safetensors").write_bytes(bytes(data))
    with pytest.raises(IncompleteRun, match=r"ood.safetensors does not match .* fmnist calibrate"):
        Run.load(run, detector=False)


def test_predict_and_evaluate_refuse_an_incomplete_run_in_one_line(tmp_path, trained_run, capsys):
    from fmnist.apps.cli import main

    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / MANIFEST).unlink()
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("L", (28, 28)).save(image)
    assert main(["predict", str(run), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a complete run" in err[0] and "fmnist calibrate" in err[0]
    assert main(["evaluate", str(run)]) == 2
    assert "not a complete run" in capsys.readouterr().err


def test_overwrite_refuses_before_removing_when_report_is_a_link(tmp_path, trained_run, synthetic_data):
    from fmnist.fit.train import resolve_config, train

    run = shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    (run / "report").symlink_to(tmp_path / "elsewhere")
    before = servable(run)
    cfg = resolve_config("fast", model="s2d-24", time_budget=0, epochs=1, val_size=200, threads=1)
    with pytest.raises(CheckpointError, match=r"report is a symbolic link\); nothing was removed"):
        train(cfg, out=run, data=synthetic_data, quiet=True, overwrite=True)
    assert servable(run) == before and Run.load(run).detector is not None


def test_a_manifest_keeps_a_run_trained_without_trust_servable(tmp_path, trained_run):
    run = shutil.copytree(trained_run, tmp_path / "run")
    record_complete(run, trust=False)
    assert Run.load(run) is not None
