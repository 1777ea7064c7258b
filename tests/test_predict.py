"""The prediction API: every input kind, the result's shape, refusals, batches and calibration."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import fmnist
from fmnist.core.images import ImageError
from fmnist.core.predict import Predictor
from fmnist.core.run import DEFAULT_CONFIDENCE

# Copies of the shared trained run leave out files other tests may have added to it.
FRESH = shutil.ignore_patterns("metrics.json")
KEYS = {"label", "class_id", "score", "accepted", "reason", "verdict", "candidates", "top_k"}


@pytest.fixture(scope="module")
def predictor(trained_run):
    return fmnist.load(trained_run)


@pytest.fixture(scope="module")
def images(synthetic_data):
    """Test images in the data set's format, bright enough to be recognised as such (max >= 200)."""
    x = synthetic_data.test_images.numpy()
    keep = [i for i in range(len(x)) if x[i].max() >= 200][:6]
    assert len(keep) == 6
    return x[keep]


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def check_result(r: dict, predictor: Predictor, k: int = 3) -> None:
    assert KEYS <= set(r)
    assert isinstance(r["label"], str) and isinstance(r["class_id"], int) and isinstance(r["score"], float)
    assert isinstance(r["accepted"], bool) and r["reason"] in (None, "blank", "out_of_distribution", "low_confidence")
    assert r["accepted"] == (r["reason"] is None)
    assert r["label"] == predictor.class_names[r["class_id"]]
    assert 0.0 <= r["score"] <= 1.0
    top = r["top_k"]
    assert len(top) == k
    scores = [t["score"] for t in top]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) <= 1.0 + 1e-6
    assert top[0] == {"label": r["label"], "score": r["score"]}
    assert all(t["label"] in predictor.class_names for t in top)
    assert len({t["label"] for t in top}) == k
    assert r["verdict"] in ("answer", "uncertain", "refused") and r["accepted"] == (r["verdict"] == "answer")
    if r["verdict"] == "refused":
        assert r["candidates"] is None  # naming garments for what is not one would pretend to know
    elif r["candidates"] is not None:
        assert r["candidates"][0] == {"label": r["label"], "score": r["score"]}
        assert len(r["candidates"]) >= (2 if r["verdict"] == "uncertain" else 1)
    json.dumps({k: v for k, v in r.items() if k != "image"})  # what the CLI and server print


def test_load_returns_a_predictor(trained_run, predictor):
    assert isinstance(predictor, Predictor)
    assert predictor.class_names == list(fmnist.CLASS_NAMES)
    assert predictor.confidence_threshold == DEFAULT_CONFIDENCE  # seed B's 0.60, with or without an OOD detector


def test_every_input_kind_gives_the_same_answer(tmp_path, predictor, images):
    img = images[0]
    path = tmp_path / "garment.png"
    path.write_bytes(png_bytes(img))
    inputs = {"array": img, "tensor": torch.from_numpy(img), "pil": Image.fromarray(img),
              "png bytes": png_bytes(img), "path": path, "str path": str(path)}
    results = {name: predictor.predict(item) for name, item in inputs.items()}
    for name, r in results.items():
        check_result(r, predictor)
        assert r == results["array"], f"{name} input differs from the uint8 array"


def test_prediction_is_the_model_argmax(predictor, images):
    probs = predictor.analyse(images).probs
    assert probs.shape == (len(images), 10)
    np.testing.assert_allclose(probs.sum(1), np.ones(len(images)), rtol=1e-9)
    for img, p in zip(images, probs):
        r = predictor.predict(img)
        assert r["class_id"] == int(p.argmax())
        assert r["score"] == pytest.approx(float(p.max()), abs=1e-6)


def test_blank_image_is_refused(predictor):
    r = predictor.predict(np.zeros((28, 28), np.uint8))
    check_result(r, predictor)
    assert r["accepted"] is False and r["reason"] == "blank"


def test_low_confidence_is_refused(trained_run, images):
    strict = fmnist.load(trained_run, ood_threshold=1e9)
    strict.confidence_threshold = 1.01  # nothing reaches it (load refuses it: a probability is at most 1)
    r = strict.predict(images[0])
    check_result(r, strict)
    assert r["accepted"] is False and r["reason"] == "low_confidence"
    lenient = fmnist.load(trained_run, threshold=0.0, ood_threshold=1e9)
    assert lenient.predict(images[0])["accepted"] is True


def test_a_confident_image_gets_a_singleton(tmp_path, trained_run, images):
    gates_off = {"ood_threshold": 1e9}  # the confidence gate and the sets alone
    p = fmnist.load(trained_run, **gates_off)
    probs = p.analyse(images).probs
    best = int(probs.max(1).argmax())
    assert probs[best].max() >= p.confidence_threshold and probs[best].max() > p.run.conformal["qhat"]
    r = p.predict(images[best])
    check_result(r, p)
    assert r["verdict"] == "answer" and r["candidates"] == [{"label": r["label"], "score": r["score"]}]
    # The set comes from the run's conformal parameters: with a qhat of 1 the runner-up's score (the top
    # label's probability) is within it, and the same confident answer has two candidates.
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "conformal": {**meta["conformal"], "qhat": 1.0}}))
    wide = fmnist.load(run, **gates_off).predict(images[best])
    assert wide["verdict"] == "answer" and [c["label"] for c in wide["candidates"]] == [
        t["label"] for t in wide["top_k"][:2]]


def test_a_non_garment_is_refused_never_uncertain(trained_run, images):
    from fmnist.fit.trust import eval_sets

    # Nothing reaches a threshold of 1: whatever passes the gates is hedged, so noise must be stopped by them.
    hedging = fmnist.load(trained_run)
    hedging.confidence_threshold = 1.01
    rng = np.random.default_rng(3)
    noise = list(eval_sets.uniform_noise(10, rng)) + list(eval_sets.gaussian_noise(10, rng))
    for r in hedging.predict_batch(noise):
        check_result(r, hedging)
        assert r["verdict"] == "refused" and r["candidates"] is None
        assert r["reason"] in ("out_of_distribution", "blank")
    # The same predictor does hedge a garment that passes the gates (so the above is no accident).
    garments = [r for r in hedging.predict_batch(list(images)) if r["reason"] != "out_of_distribution"]
    assert garments and all(r["verdict"] == "uncertain" and len(r["candidates"]) >= 2 for r in garments)


def test_predict_batch_equals_single_predictions(predictor, images):
    items = [images[0], Image.fromarray(images[1]), png_bytes(images[2]), np.zeros((28, 28), np.uint8),
             images[3]]
    batch = predictor.predict_batch(items)
    assert len(batch) == len(items)
    for item, b in zip(items, batch):
        single = predictor.predict(item)
        for key in ("label", "class_id", "accepted", "reason"):
            assert b[key] == single[key]
        assert b["score"] == pytest.approx(single["score"], abs=1e-5)
        assert [t["label"] for t in b["top_k"]] == [t["label"] for t in single["top_k"]]
    assert predictor.predict_batch([]) == []


def test_return_image_gives_the_28x28_the_model_saw(predictor, images):
    r = predictor.predict(Image.fromarray(images[1]), return_image=True)
    assert isinstance(r["image"], np.ndarray)
    assert r["image"].dtype == np.uint8 and r["image"].shape == (28, 28)
    assert np.array_equal(r["image"], images[1])
    big = Image.fromarray(images[1]).resize((280, 280))  # any size comes back as the model's 28x28
    r = predictor.predict(big, return_image=True)
    assert r["image"].dtype == np.uint8 and r["image"].shape == (28, 28)
    assert "image" not in predictor.predict(images[1])


@pytest.mark.parametrize("asked", [1, 5, 10])
def test_top_k_lists_that_many_classes(trained_run, images, asked):
    p = fmnist.load(trained_run, top_k=asked)
    check_result(p.predict(images[0]), p, k=asked)


@pytest.mark.parametrize("asked", [0, -5, 11, 1000])
def test_top_k_out_of_range_is_an_error_not_a_clamp(trained_run, asked):
    from fmnist.core.errors import InputError

    with pytest.raises(InputError, match="top_k must be a whole number from 1 to 10"):
        fmnist.load(trained_run, top_k=asked)


def test_undecodable_bytes_raise_image_error(predictor):
    with pytest.raises(ImageError):
        predictor.predict(b"definitely not an image")


def test_calibration_temperature_softens_scores(tmp_path, trained_run, images):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    meta = json.loads((run / "model.json").read_text())
    (run / "model.json").write_text(json.dumps({**meta, "calibration": {"temperature": 1.0}}))  # train calibrates
    plain = fmnist.load(run).analyse(images).probs
    meta["calibration"] = {"temperature": 2.0}
    meta["thresholds"] = {"confidence": 0.42}
    (run / "model.json").write_text(json.dumps(meta))
    calibrated = fmnist.load(run)
    assert calibrated.confidence_threshold == 0.42
    # softmax(z / T) is proportional to softmax(z) ** (1 / T)
    expected = np.sqrt(plain) / np.sqrt(plain).sum(1, keepdims=True)
    np.testing.assert_allclose(calibrated.analyse(images).probs, expected, rtol=1e-4, atol=1e-6)


def test_info_describes_the_model(tmp_path, trained_run):
    run = shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)
    info = fmnist.load(run).info()
    assert info["model"] == "s2d-24" and info["class_names"] == list(fmnist.CLASS_NAMES)
    assert info["parameters"] > 0 and info["test"] is None
    assert set(info["validation"]) == {"train_loss", "train_acc", "val_loss", "val_acc"}
    assert info["thresholds"]["confidence"] == DEFAULT_CONFIDENCE and info["thresholds"]["ood"] > 0
    (run / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "loss": 0.3, "n": 300, "tta": True}))
    info = fmnist.load(run).info()
    assert info["test"]["accuracy"] == 0.9 and info["test"]["n"] == 300
    json.dumps(info)


def test_light_background_array_is_prepared_like_the_same_pil_image(predictor, images):
    photo_like = 255 - images[0]  # dark object on a white background, already 28x28
    as_array = predictor.to_image28(photo_like)
    as_pil = predictor.to_image28(Image.fromarray(photo_like))
    assert np.array_equal(as_array, as_pil)
