"""One's own data through the whole tool: an image folder trained with `fmnist train --data`, its class names in
model.json, predict, the API and the page's class descriptions, evaluate finding the run's data again; and a run of
an older fmnist still answering with Fashion-MNIST's names."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fmnist import CLASS_NAMES
from fmnist.apps.cli import main

NAMES = ("flat", "square", "tall", "taller")
FIXTURE = Path(__file__).parent / "fixtures" / "run-v1"


def shape(k: int, rng) -> np.ndarray:
    """A dark bar on white, as a photo would be: its aspect ratio tells the class."""
    im = np.full((40, 40), 250, np.uint8) - rng.integers(0, 5, (40, 40)).astype(np.uint8)
    hh, ww = [(8, 24), (16, 16), (24, 12), (30, 8)][k]
    hh, ww = hh + rng.integers(-2, 3), ww + rng.integers(-2, 3)
    top, left = 20 - hh // 2 + rng.integers(-2, 3), 20 - ww // 2 + rng.integers(-2, 3)
    im[top:top + hh, left:left + ww] = rng.integers(0, 80, (hh, ww))  # a textured bar
    return im


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bars")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 12)):
        for k, name in enumerate(NAMES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(shape(k, rng)).save(d / f"{i}.png")
    (root / "classes.json").write_text(json.dumps({"classes": [{"name": "flat", "description": "Wider than tall."},
                                                               "square", "tall", "taller"]}))
    return root


@pytest.fixture(scope="module")
def run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("own") / "run"
    code = main(["train", "--data", str(folder), "--model", "s2d-24", "--epochs", "3", "--lr", "0.05",
                 "--batch-size", "32", "--threads", "1", "--out", str(out)])
    assert code == 0
    return out


def test_names_and_defaults_recorded(run, folder):
    meta = json.loads((run / "model.json").read_text())
    assert meta["class_names"] == list(NAMES)
    assert meta["dataset"]["name"] == "custom" and meta["dataset"]["mirror_symmetric"] is False
    assert meta["dataset"]["descriptions"] == {"flat": "Wider than tall."}
    cfg = json.loads((run / "config.json").read_text())
    assert "flip" not in cfg["augment"] and cfg["tta"] is False  # bars are not known to look alike mirrored
    assert cfg["data"] == str(folder.resolve()) and cfg["val_size"] == 40  # a sixth of 240 training images
    assert meta["calibration"] and meta.get("conformal") is not None  # the trust layer fits four classes


def test_predict_api_and_page_use_the_runs_names(run):
    from fmnist.core.predict import Predictor

    p = Predictor.from_run(run)
    buf = io.BytesIO()
    Image.fromarray(shape(3, np.random.default_rng(5))).save(buf, format="PNG")
    out = p.predict(buf.getvalue())
    assert {c["label"] for c in out["top_k"]} <= set(NAMES)
    from fastapi.testclient import TestClient

    from fmnist.apps.serve.app import create_app

    with TestClient(create_app(run), base_url="http://localhost") as c:
        info = c.get("/api/model").json()
        classes = info["classes"]
        assert [x["name"] for x in classes] == list(NAMES)
        assert [x["description"] for x in classes] == ["Wider than tall.", "", "", ""]  # no garment texts
        r = c.post("/api/predict", files={"file": ("x.png", buf.getvalue(), "image/png")}).json()
        assert r.get("label") in (*NAMES, None)
        assert all(x["label"] in NAMES for x in r["top_k"])


def test_evaluate_finds_the_runs_data(run, capsys):
    assert main(["evaluate", str(run), "--threads", "1"]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["n"] == 48 and [c["class"] for c in m["per_class"]] == list(NAMES)
    assert "data set's test set" in capsys.readouterr().out


def test_evaluate_refuses_data_of_other_classes(run, tmp_path, capsys):
    from fmnist.fit.data import write_idx

    rng = np.random.default_rng(0)
    for name, a in (("train-images-idx3-ubyte", rng.integers(0, 255, (20, 28, 28))), ("train-labels-idx1-ubyte",
                    np.arange(20) % 2), ("t10k-images-idx3-ubyte", rng.integers(0, 255, (4, 28, 28))),
                    ("t10k-labels-idx1-ubyte", np.arange(4) % 2)):
        write_idx(tmp_path / name, a.astype(np.uint8))
    assert main(["evaluate", str(run), "--data", str(tmp_path), "--threads", "1"]) == 2
    assert "2 classes, but the run knows 4" in capsys.readouterr().err


def test_mirror_asked_for(folder, tmp_path):
    out = tmp_path / "m"
    assert main(["train", "--data", str(folder), "--model", "s2d-24", "--epochs", "1", "--batch-size", "64",
                 "--threads", "1", "--augment", "flip", "--tta", "--mirror", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["augment"] == "flip" and cfg["tta"] is True


def test_a_run_of_an_older_fmnist_has_fashion_mnist_names(tmp_path):
    from fmnist.apps.serve.texts import CLASS_DESCRIPTIONS, class_info
    from fmnist.core.predict import Predictor

    run = tmp_path / "old"
    shutil.copytree(FIXTURE, run)
    assert "dataset" not in json.loads((run / "model.json").read_text())
    p = Predictor.from_run(run)
    assert list(p.class_names) == list(CLASS_NAMES) and p.dataset["name"] == "fashion-mnist"
    info = class_info(p.class_names, p.dataset)
    assert [x["description"] for x in info] == [CLASS_DESCRIPTIONS[n] for n in CLASS_NAMES]
