"""Evaluation metrics on hand-made predictions, and evaluate_run on a trained run folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from fmnist.core.run import Run
from fmnist.fit.data import preprocess
from fmnist.fit.evaluate import classification_metrics, evaluate_run, format_report

# Copies of the shared trained run leave out files other tests may have added to it.
FRESH = shutil.ignore_patterns("metrics.json")
NAMES = ["a", "b", "c"]
# rows: true class, columns: predicted class
CM = [[3, 1, 0],
      [0, 2, 0],
      [2, 0, 1]]


@pytest.fixture
def run(tmp_path, trained_run):
    """A private copy of the trained run: evaluation writes metrics.json, other tests share the original."""
    return shutil.copytree(trained_run, tmp_path / "run", ignore=FRESH)


def hand_made():
    labels, preds = [], []
    for t, row in enumerate(CM):
        for p, n in enumerate(row):
            labels += [t] * n
            preds += [p] * n
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(labels), 3, generator=g)
    logits[torch.arange(len(labels)), torch.tensor(preds)] += 10.0  # argmax is the chosen prediction
    return logits, torch.tensor(labels)


def test_classification_metrics_by_hand():
    logits, labels = hand_made()
    m = classification_metrics(logits, labels, NAMES)
    assert m["n"] == 9
    assert m["confusion_matrix"] == CM
    assert m["accuracy"] == pytest.approx(6 / 9)
    expected_loss = float(-torch.log_softmax(logits, 1)[torch.arange(9), labels].mean())
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-5)
    precision = [3 / 5, 2 / 3, 1 / 1]
    recall = [3 / 4, 2 / 2, 1 / 3]
    f1 = [2 / 3, 4 / 5, 1 / 2]
    for i, c in enumerate(m["per_class"]):
        assert c["class"] == NAMES[i]
        assert c["precision"] == pytest.approx(precision[i])
        assert c["recall"] == pytest.approx(recall[i])
        assert c["f1"] == pytest.approx(f1[i])
        assert c["support"] == sum(CM[i])
    assert m["macro_precision"] == pytest.approx(sum(precision) / 3)
    assert m["macro_recall"] == pytest.approx(sum(recall) / 3)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)


def test_most_confused_is_ordered_by_errors_both_ways():
    logits, labels = hand_made()
    pairs = classification_metrics(logits, labels, NAMES)["most_confused"]
    assert [(p["a"], p["b"], p["total"]) for p in pairs[:2]] == [("a", "c", 2), ("a", "b", 1)]
    assert (pairs[0]["a_as_b"], pairs[0]["b_as_a"]) == (0, 2)
    assert (pairs[1]["a_as_b"], pairs[1]["b_as_a"]) == (1, 0)
    totals = [p["total"] for p in pairs]
    assert totals == sorted(totals, reverse=True)


def test_class_never_predicted_nor_present_scores_zero_not_nan():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    m = classification_metrics(logits, torch.tensor([0, 1]), NAMES)
    c = m["per_class"][2]
    assert (c["precision"], c["recall"], c["f1"], c["support"]) == (0.0, 0.0, 0.0, 0)
    assert m["accuracy"] == 1.0
    json.dumps(m)  # plain JSON-able data


def test_format_report_shows_the_figures():
    logits, labels = hand_made()
    text = format_report(classification_metrics(logits, labels, NAMES), title="hand")
    assert text.startswith("hand: 9 images")
    assert "accuracy 66.67 %" in text
    assert "a <-> c: 2" in text


def test_evaluate_run_writes_metrics(run, synthetic_data):
    m = evaluate_run(run, data=synthetic_data, threads=1)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    for key in ("n", "accuracy", "loss", "macro_precision", "macro_recall", "macro_f1", "per_class",
                "confusion_matrix", "most_confused", "tta", "model", "accuracy_no_tta"):
        assert key in saved, f"metrics.json lacks {key}"
    assert saved["n"] == len(synthetic_data.test_labels)
    assert sum(map(sum, saved["confusion_matrix"])) == saved["n"]
    assert saved["model"] == "s2d-24" and saved["tta"] is True
    assert len(saved["per_class"]) == 10
    # the number reported is the model's accuracy on the test images, computed independently here
    loaded = Run.load(run)
    model = loaded.model()
    x = preprocess(synthetic_data.test_images, loaded.spec)
    with torch.no_grad():
        logits = 0.5 * (model(x) + model(x.flip(3)))
    labels = synthetic_data.test_labels
    assert saved["accuracy"] == pytest.approx(float((logits.argmax(1) == labels).double().mean()))
    assert saved["loss"] == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)
    assert saved["accuracy"] > 0.5  # the tiny model learnt the synthetic classes (chance: 0.1)


def test_evaluate_run_limit_no_tta_no_write(run, synthetic_data):
    m = evaluate_run(run, data=synthetic_data, tta=False, limit=50, write=False, threads=1)
    assert m["n"] == 50 and m["tta"] is False and "accuracy_no_tta" not in m
    assert not (run / "metrics.json").exists()
