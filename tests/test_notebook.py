"""The quickstart notebook runs top to bottom (on synthetic data, one tiny epoch) and only uses the package."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fmnist.fit.data import write_idx

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _code_cells() -> list[str]:
    nb = json.loads(NOTEBOOK.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_notebook_calls_the_package_instead_of_copying_its_code():
    code = "\n".join(_code_cells())
    # No functions or classes of its own, no model or loop rebuilt in the notebook: the package does the work.
    for copied in ("def ", "class ", "nn.Module", "optimizer.step", "torch.nn", ".backward("):
        assert copied not in code, copied
    for call in ("load_fashion_mnist(", "train(", "evaluate_run(", "build_report(", "fmnist.load(", ".predict("):
        assert call in code, call
    nb = json.loads(NOTEBOOK.read_text())
    assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), "commit it without outputs"


@pytest.mark.slow
def test_quickstart_notebook_executes(synthetic_data, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name, array in (("train-images-idx3-ubyte", synthetic_data.train_images),
                        ("train-labels-idx1-ubyte", synthetic_data.train_labels),
                        ("t10k-images-idx3-ubyte", synthetic_data.test_images),
                        ("t10k-labels-idx1-ubyte", synthetic_data.test_labels)):
        write_idx(data_dir / name, array)
    run = tmp_path / "run"
    # The kernel inherits this process's environment: the notebook reads its parameters from it.
    monkeypatch.setenv("FMNIST_QUICKSTART_BUDGET", "tiny")
    monkeypatch.setenv("FMNIST_QUICKSTART_DATA", str(data_dir))
    monkeypatch.setenv("FMNIST_QUICKSTART_RUN", str(run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 6  # five report figures and the photo
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "1,200 training and 300 test images" in text
    assert "accuracy" in text and "predicted:" in text
    assert (run / "model.safetensors").is_file() and (run / "metrics.json").is_file()
    assert (run / "report" / "index.html").is_file()
