"""`fmnist tune`: the search space, seed A's sweep, pruning, several workers on a journal file and on a real
PostgreSQL, a worker killed mid-trial, and every bad input (one clear line, nothing written)."""
from __future__ import annotations

import csv
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("matplotlib")

import fmnist  # noqa: E402
from fmnist.apps.cli import main  # noqa: E402
from fmnist.apps.report.compare import expand_runs  # noqa: E402
from fmnist.apps.tune.space import build_space, parse_option  # noqa: E402
from fmnist.apps.tune.storage import engine_url  # noqa: E402
from fmnist.fit.checkpoint import read_json  # noqa: E402

SRC = str(Path(fmnist.__file__).resolve().parents[1])
SEED_A_LRS = [0.1, 0.01, 0.001, 0.0001]


@pytest.fixture()
def tiny(idx_dir, tmp_path):
    """Options that make a trial take about a second on one thread: small subset, one epoch, no time budget."""
    return ["--out", str(tmp_path / "tune"), "--subset", "300", "--val-size", "200", "--epochs", "1", "--time-budget", "0",
            "--threads", "1", "--data-dir", str(idx_dir), "--no-verify"]


def journal_study(study_dir: Path, name: str):
    from optuna.storages.journal import JournalFileBackend

    storage = optuna.storages.JournalStorage(JournalFileBackend(str(study_dir / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def states(study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def tune_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "fmnist.apps.cli", "tune", *args]


def child_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


# --- the search space ----------------------------------------------------------------------------------------


def test_space_ranges_lists_and_fixed_values():
    assert parse_option("lr", "1e-4:1e-1:log") == (True, {"kind": "float", "low": 1e-4, "high": 0.1, "log": True,
                                                          "step": None})
    assert parse_option("lr", "0.01:0.1") == (True, {"kind": "float", "low": 0.01, "high": 0.1, "log": False,
                                                     "step": None})
    assert parse_option("label_smoothing", "0:0.2:0.05")[1]["step"] == 0.05
    assert parse_option("epochs", "2:8") == (True, {"kind": "int", "low": 2, "high": 8, "log": False, "step": 1})
    assert parse_option("batch_size", "64,128,256") == (True, {"kind": "categorical", "choices": [64, 128, 256]})
    assert parse_option("batch_size", "64|128")[1]["choices"] == [64, 128]
    assert parse_option("augment", "flip|flip,crop") == (True, {"kind": "categorical",
                                                                "choices": ["flip", "flip,crop"]})
    assert parse_option("augment", "flip,crop") == (False, "flip,crop")  # commas belong to one --augment value
    assert parse_option("model", "s2d-24,seed-b-mlp")[1]["choices"] == ["s2d-24", "seed-b-mlp"]
    assert parse_option("tta", "true|false")[1]["choices"] == [True, False]
    assert parse_option("epochs", "3") == (False, 3)
    assert parse_option("weight_decay", "5e-4") == (False, 5e-4)


def test_space_from_toml_with_flags_winning(tmp_path):
    f = tmp_path / "space.toml"
    f.write_text('preset = "seed-a"\nlr = {low = 1e-4, high = 1e-1, log = true}\nbatch-size = [32, 64]\n'
                 'augment = "none|flip"\nepochs = 2\nweight_decay = "0:1e-3"\nthreads = 1\n')
    space, machine = build_space(None, {"epochs": "3"}, f)
    assert space.preset == "seed-a"
    assert space.params["lr"] == {"kind": "float", "low": 1e-4, "high": 0.1, "log": True, "step": None}
    assert space.params["batch_size"]["choices"] == [32, 64]
    assert space.params["augment"]["choices"] == ["none", "flip"]
    assert space.params["weight_decay"]["kind"] == "float"
    assert space.fixed == {"epochs": 3}
    assert machine == {"threads": 1}
    with pytest.raises(ValueError, match="--sampler grid needs lists"):
        space.grid()


@pytest.mark.parametrize("name, text, message", [
    ("lr", "1e-1:1e-4", "low end"),
    ("lr", "0:1e-1:log", "log range must start above 0"),
    ("lr", "1e-4:1e-1:logarithmic", "not a number"),
    ("lr", "1:2:3:4", "LOW:HIGH"),
    ("lr", "1e-3:", "not a number"),
    ("lr", "fast", "not a number"),
    ("lr", "1e-3,1e-3", "listed twice"),
    ("lr", "nan", "finite"),
    ("epochs", "1.5", "whole number"),
    ("epochs", "1:4:0", "step must be above 0"),
    ("batch_size", "64,,128", "empty choice"),
    ("model", "s2d-24:s2d-32", "ranges"),
    ("tta", "maybe", "true or false"),
    ("no_such_option", "1", "unknown parameter"),
])
def test_space_rejects_bad_values(name, text, message):
    with pytest.raises(ValueError, match=message):
        parse_option(name, text)


@pytest.mark.parametrize("flags, message", [
    ({"model": "s2d-24,nope"}, "unknown architecture"),
    ({"optimizer": "sgd|rmsprop"}, "--optimizer"),
    ({"augment": "flip|blur"}, "blur"),
    ({"lr": "1e-3,1e-2", "val_size": "0"}, "--val-size must be above 0"),
    ({"lr": "-1:1"}, "--lr must be > 0"),
    ({"epochs": "2:5"}, "add --time-budget 0"),
])
def test_space_checks_every_value_as_a_recipe(flags, message):
    with pytest.raises(ValueError, match=message):
        build_space("fast", flags)


@pytest.mark.parametrize("text, message", [
    ("colour = [1, 2]\n", "unknown parameter 'colour'"),
    ("lr = {low = 1e-3}\n", "a range is a table"),
    ("lr = [\n", "not a readable TOML file"),
    ("lr = []\n", "empty list"),
])
def test_space_file_errors(tmp_path, text, message):
    f = tmp_path / "space.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=message):
        build_space(None, {}, f)
    with pytest.raises(ValueError, match="no such file"):
        build_space(None, {}, tmp_path / "missing.toml")


@pytest.mark.parametrize("argv, message", [
    (["--lr", "1e-1:1e-4"], "low end"),
    (["--lr", "1e-4:1e-1:log", "--sampler", "grid"], "--sampler grid needs lists"),
    (["--epochs", "2"], "nothing to search"),
    (["--lr", "1e-3,1e-2", "--study", "../x"], "--study"),
    (["--lr", "1e-3,1e-2", "--storage", "postgresql://nobody@127.0.0.1:1/none"], "cannot use --storage"),
    (["--lr", "1e-3,1e-2", "--storage", "mysql://db/x"], "give postgresql://"),
    (["--lr", "1e-3,1e-2", "--workers", "0"], "--workers must be at least 1"),
    (["--lr", "1e-3,1e-2", "--n-trials", "0"], "--n-trials must be at least 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, argv, message):
    assert main(["tune", *argv, *tiny]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "tune").exists()


def test_database_password_is_not_printed(tiny, capsys):
    assert main(["tune", "--lr", "1e-3,1e-2", "--storage", "postgresql://me:s3cret@127.0.0.1:1/db", *tiny]) == 2
    err = capsys.readouterr().err
    assert "s3cret" not in err and "me:***@127.0.0.1:1/db" in err


# --- on a journal file -----------------------------------------------------------------------------------------


def test_seed_a_sweep_reproduced(tiny, tmp_path, idx_dir, capsys):
    """Seed A's hand sweep in one command: four trials, one per learning rate, and which one won."""
    argv = ["tune", "--preset", "seed-a", "--lr", "1e-1,1e-2,1e-3,1e-4", "--sampler", "grid", *tiny]
    assert main(argv) == 0
    out = capsys.readouterr().out
    study_dir = tmp_path / "tune" / "seed-a"
    with open(study_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4
    assert sorted(float(r["lr"]) for r in rows) == sorted(SEED_A_LRS)
    assert [float(r["lr"]) for r in rows] == SEED_A_LRS  # in the order given, as seed A ran them
    winner = min(rows, key=lambda r: float(r["val_loss"]))  # seed A kept the lowest validation loss
    assert f"lr={float(winner['lr']):g}" in out.splitlines()[-1]
    best = study_dir / "best"
    assert best.is_symlink() and os.readlink(best) == winner["run"]
    marker = read_json(best / "tune_trial.json")
    assert marker["state"] == "COMPLETE" and marker["params"] == {"lr": float(winner["lr"])}
    page = (study_dir / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace("http-equiv", "")

    # The best trial is an ordinary run folder: evaluate, compare read it as they are.
    assert main(["evaluate", str(best), "--data-dir", str(idx_dir), "--no-verify", "--threads", "1"]) == 0
    assert (best / "metrics.json").is_file()
    assert sorted(p.name for p in expand_runs([study_dir])) == [r["run"] for r in rows]

    # The same command again continues the study: it is complete, so nothing runs and nothing changes.
    journal = (study_dir / "journal.log").read_bytes()
    assert main(argv) == 0
    assert (study_dir / "journal.log").read_bytes() == journal
    assert states(journal_study(study_dir, "seed-a")) == {"COMPLETE": 4}


def test_study_with_another_space_is_refused(tiny, tmp_path, capsys):
    argv = ["tune", "--model", "seed-b-mlp", "--lr", "1e-3,1e-2", "--sampler", "grid", "--n-trials", "1",
            "--study", "s", *tiny]
    assert main(argv) == 0
    study_dir = tmp_path / "tune" / "s"
    before = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    argv[argv.index("1e-3,1e-2")] = "1e-3,1e-1"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "created with another search space" in err and "--lr" in err and len(err.splitlines()) == 1
    after = {p: p.stat().st_mtime_ns for p in study_dir.rglob("*") if p.is_file()}
    assert after == before  # the journal, the trials, the page: all untouched


def test_pruning_stops_a_bad_trial(tiny, tmp_path):
    """Two good learning rates run in full; a useless one is stopped by the median pruner after one epoch."""
    tiny[tiny.index("--epochs") + 1] = "3"
    argv = ["tune", "--preset", "seed-b-mlp", "--metric", "val_loss",
            "--lr", "1e-2|3e-3|1e-7", "--sampler", "grid", "--pruner", "median", "--prune-after", "2",
            "--study", "p", *tiny]
    assert main(argv) == 0
    study_dir = tmp_path / "tune" / "p"
    study = journal_study(study_dir, "p")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert study.trials[2].params["lr"] == 1e-7
    assert len(study.trials[0].intermediate_values) == 3
    assert list(study.trials[2].intermediate_values) == [1]  # stopped after its first epoch
    with open(study_dir / "trial-0002" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 1
    assert read_json(study_dir / "trial-0002" / "tune_trial.json")["state"] == "PRUNED"
    assert os.readlink(study_dir / "best") != "trial-0002"
    assert [p.name for p in expand_runs([study_dir])] == ["trial-0000", "trial-0001"]


@pytest.mark.slow
def test_two_local_workers_share_a_journal(tiny, tmp_path, capfd):
    argv = ["tune", "--model", "seed-b-mlp", "--lr", "1e-4:1e-1:log", "--batch-size", "32,64",
            "--sampler", "random", "--n-trials", "5", "--workers", "2", "--study", "w", *tiny]
    assert main(argv) == 0
    study = journal_study(tmp_path / "tune" / "w", "w")
    assert states(study) == {"COMPLETE": 5}
    assert len({t.params["lr"] for t in study.trials}) == 5  # the two workers' samplers do not repeat each other
    finished = sorted(p.name for p in expand_runs([tmp_path / "tune" / "w"]))
    assert finished == [f"trial-{i:04d}" for i in range(5)]
    out = capfd.readouterr().out  # the workers are processes of their own: their lines reach the terminal
    assert "[worker 0] trial" in out and "[worker 1] trial" in out
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2


def kill_worker_while_training(args: list[str], study_dir, trial: int) -> None:
    """Start a `fmnist tune` worker and SIGKILL it once trial ``trial`` is training (its history.csv exists)."""
    proc = subprocess.Popen(tune_command(args), env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (study_dir / f"trial-{trial:04d}" / "history.csv").exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"the worker ended before trial {trial} began"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_killed_worker_leaves_no_finished_looking_trial(tiny, tmp_path):
    """SIGKILL a worker mid-trial: its trial is failed and run again by the next command, never taken as done."""
    tiny[tiny.index("--epochs") + 1] = "6"
    args = ["--model", "s2d-24", "--lr", "1e-2,3e-3,1e-3", "--sampler", "grid", "--pruner", "none",
            "--study", "k", *tiny]
    study_dir = tmp_path / "tune" / "k"
    kill_worker_while_training(args, study_dir, trial=1)
    killed = journal_study(study_dir, "k")
    assert killed.trials[1].state.name == "RUNNING"  # what the dead worker left in the storage
    assert not (study_dir / "trial-0001" / "tune_trial.json").exists()
    assert [p.name for p in expand_runs([study_dir])] == ["trial-0000"]

    assert main(["tune", *args]) == 0
    study = journal_study(study_dir, "k")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and sorted(t.params["lr"] for t in done) == [1e-3, 3e-3, 1e-2]
    assert study.trials[1].state.name == "FAIL"
    assert read_json(study_dir / "trial-0001" / "tune_trial.json")["state"] == "FAIL"
    assert "trial-0001" not in {p.name for p in expand_runs([study_dir])}


# --- on PostgreSQL -----------------------------------------------------------------------------------------------


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))  # Debian keeps them off PATH
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster in a temporary folder, reached through a unix socket there."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="fmnist-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as Debian's postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root, and there is no 'postgres' user to run initdb as")
        os.chown(folder, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data = folder / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", "fmnist", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-c listen_addresses='' -k {folder} -c fsync=off"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w", "-o", options,
                    "start"], check=True, capture_output=True)
    try:
        yield f"postgresql://fmnist@/postgres?host={folder}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_two_workers_share_a_study_on_postgres(postgres_url, tiny, tmp_path):
    """Two workers started with the same command, as on two machines: each grid point runs exactly once."""
    args = ["--model", "seed-b-mlp", "--lr", "1e-1,1e-2,1e-3,1e-4", "--sampler", "grid", "--study", "pg2",
            "--storage", postgres_url, *tiny]
    procs = [subprocess.Popen(tune_command(args), env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    storage = optuna.storages.RDBStorage(engine_url(postgres_url))
    study = optuna.load_study(study_name="pg2", storage=storage)
    assert states(study) == {"COMPLETE": 4}
    assert sorted(t.params["lr"] for t in study.trials) == sorted(SEED_A_LRS)
    # (Which worker ran how many trials depends on the machine's load: a busy one may start the second worker
    # after the first has taken every point. What must hold either way: each point ran once, none twice.)
    assert len(expand_runs([tmp_path / "tune" / "pg2"])) == 4


@pytest.mark.slow
def test_killed_worker_on_postgres_is_failed_by_heartbeat(postgres_url, tiny, tmp_path):
    """A worker killed mid-trial stops its heartbeat; the next command fails its trial and runs it again."""
    tiny[tiny.index("--epochs") + 1] = "6"
    args = ["--model", "s2d-24", "--lr", "1e-2,1e-3", "--sampler", "grid", "--pruner", "none", "--heartbeat", "1",
            "--study", "pgk", "--storage", postgres_url, *tiny]
    study_dir = tmp_path / "tune" / "pgk"
    kill_worker_while_training(args, study_dir, trial=0)
    assert main(["tune", *args]) == 0
    storage = optuna.storages.RDBStorage(engine_url(postgres_url))
    study = optuna.load_study(study_name="pgk", storage=storage)
    assert study.trials[0].state.name == "FAIL"
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and sorted(t.params["lr"] for t in done) == [1e-3, 1e-2]
