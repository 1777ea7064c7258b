"""The package as a user installs it: `python -m build` makes a wheel that installs into a fresh virtual
environment and runs, with the files the server needs and the version its metadata states."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import fmnist

ROOT = Path(fmnist.__file__).resolve().parents[2]


def _run(*argv, cwd=None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what the environment installed
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=300, env=env)
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_in_a_fresh_venv_and_runs(tmp_path):
    pytest.importorskip("build")
    if not (ROOT / "pyproject.toml").is_file():
        pytest.skip("not a source checkout")
    # Built from a copy of what the package is made of: the checkout gets no build/ or egg-info folder.
    src = tmp_path / "src-copy"
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", tmp_path / "dist", src)
    wheels = list((tmp_path / "dist").glob("fmnist-*.whl"))
    assert len(wheels) == 1

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # The wheel alone, no dependency from an index: those (PyTorch, NumPy, ...) are this environment's, seen
    # through a path file, so that the test needs no network. The wheel's own fmnist comes first on the path.
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheels[0])
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = _run(python, "-c", "import fmnist, importlib.metadata as m; print(fmnist.__file__); "
                               "print(m.version('fmnist'))", cwd=tmp_path).split()
    assert Path(where[0]).is_relative_to(venv), where  # the installed copy, not the checkout
    static = Path(where[0]).parent / "apps" / "serve" / "static"
    assert (static / "index.html").is_file(), "the server's page is missing from the wheel"
    fmnist_cmd = venv / "bin" / "fmnist"
    assert _run(fmnist_cmd, "--version", cwd=tmp_path).split()[-1] == where[1]
    models = _run(fmnist_cmd, "models", cwd=tmp_path)
    assert "air-16" in models and "resnet9-s" in models
