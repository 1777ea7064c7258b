"""`fmnist report` and `fmnist compare`: figures, the self-contained HTML page, the run table, bad input."""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from fmnist.apps import cli  # noqa: E402
from fmnist.apps.report import FIGURES, build_report, calibration_bins, predict_test  # noqa: E402
from fmnist.apps.report.compare import format_compare, run_row  # noqa: E402
from fmnist.apps.report.figures import overfit_start  # noqa: E402
from fmnist.core.run import Run  # noqa: E402
from fmnist.fit.checkpoint import CheckpointError, read_json, write_json  # noqa: E402


@pytest.fixture()
def run_copy(trained_run, tmp_path) -> Path:
    """A private copy of the session's trained run, so a test can add files without touching the others."""
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def noisy_data(synthetic_data):
    """The synthetic set with 40 test labels shifted by one class: the tiny model may be perfect on the real
    labels, and a report needs mistakes to show (confused pairs, worst misclassifications)."""
    labels = synthetic_data.test_labels.clone()
    labels[:40] = (labels[:40] + 1) % 10
    return dataclasses.replace(synthetic_data, test_labels=labels)


UNSURE = 0.95  # the report's run's confidence threshold: the tiny model's raw scores leave many images under it


@pytest.fixture(scope="module")
def report(trained_run, noisy_data, tmp_path_factory) -> Path:
    """The report of an uncalibrated run without metrics.json, built once for the module; its confidence
    threshold leaves test images "uncertain", so the candidate-set gallery has something to show."""
    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("report") / "run",
                               ignore=shutil.ignore_patterns("metrics.json", "ood.safetensors")))
    meta = json.loads((run / "model.json").read_text())  # training calibrates and fits OOD: undo both here
    meta.pop("calibration", None)
    meta.pop("ood", None)
    meta["thresholds"] = {"confidence": UNSURE}
    (run / "model.json").write_text(json.dumps(meta))
    from fmnist.core.runfolder import record_complete

    record_complete(run, trust=False)  # as a run trained without its trust layer
    return build_report(run, data=noisy_data, threads=1)


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("L"))


# --- numbers -----------------------------------------------------------------------------------------------


def test_ece_is_zero_when_confidence_matches_accuracy_and_measures_overconfidence():
    labels = np.zeros(100, dtype=int)
    # Confidence 0.7 on class 0 for all; right 70 times out of 100: perfectly calibrated.
    probs = np.tile([0.7, 0.3], (100, 1))
    labels[70:] = 1
    ece, bins = calibration_bins(probs, labels)
    assert ece == pytest.approx(0.0, abs=1e-9)
    assert sum(b["count"] for b in bins) == 100 and len(bins) == 15
    # Confidence 0.9, right half the time: ECE = |0.5 - 0.9| = 0.4.
    probs = np.tile([0.9, 0.1], (100, 1))
    labels[50:] = 1
    labels[:50] = 0
    assert calibration_bins(probs, labels)[0] == pytest.approx(0.4)


def test_overfit_region_starts_at_the_validation_loss_minimum_only_when_loss_turns_up():
    assert overfit_start([1.0, 0.8, 0.6, 0.65, 0.8]) == 2
    assert overfit_start([1.0, 0.8, 0.6, 0.55, 0.5]) is None      # still improving
    assert overfit_start([1.0, 0.6, 0.6001, 0.6005]) is None       # flat tail is noise, not over-fitting
    assert overfit_start([float("nan")] * 5) is None               # no validation split


def test_figures_of_a_perfect_model_say_so_instead_of_failing():
    from fmnist import CLASS_NAMES
    from fmnist.apps.report.figures import confused_pairs, misclassified

    images = np.random.default_rng(0).integers(0, 255, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20) % 10
    probs = np.eye(10)[labels] * 0.9 + 0.01
    assert misclassified(images, labels, probs, list(CLASS_NAMES))._suptitle.get_text() == "No misclassifications"
    fig = confused_pairs(images, labels, labels, probs, [], list(CLASS_NAMES))
    assert fig._suptitle.get_text().startswith("No confused pairs")


def test_run_temperature_scales_the_probabilities(run_copy, synthetic_data):
    plain = predict_test(Run.load(run_copy), synthetic_data, limit=50, threads=1)
    meta = read_json(run_copy / "model.json")
    write_json(run_copy / "model.json", {**meta, "calibration": {"temperature": 3.0}})
    hot_run = Run.load(run_copy)
    hot = predict_test(hot_run, synthetic_data, limit=50, threads=1)
    assert hot_run.temperature == 3.0
    assert np.allclose(hot["logits"], plain["logits"])
    assert hot["probs"].max(1).mean() < plain["probs"].max(1).mean()  # softer, same ranking
    assert (hot["probs"].argmax(1) == plain["probs"].argmax(1)).all()


# --- the report --------------------------------------------------------------------------------------------


def test_report_writes_every_figure_as_a_nontrivial_png(report):
    assert report.name == "index.html" and report.parent.name == "report"
    for name in FIGURES:
        path = report.parent / f"{name}.png"
        assert path.is_file(), name
        pixels = _png(path.read_bytes())
        assert pixels.shape[0] >= 150 and pixels.shape[1] >= 600, (name, pixels.shape)
        assert pixels.std() > 10, f"{name}.png is nearly blank"


def test_report_html_is_self_contained_and_embeds_every_figure(report):
    text = report.read_text()
    sources = re.findall(r"<img[^>]*src='([^']*)'", text)
    assert len(sources) == len(FIGURES)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert _png(base64.b64decode(src.split(",", 1)[1])).std() > 10
    # Nothing is fetched: no remote URLs, scripts or stylesheets links.
    assert not re.search(r"(src|href)=['\"]?(https?:|//)", text)
    assert "<script" not in text and "<link" not in text


def test_report_has_a_model_card_and_says_when_uncalibrated(report, trained_run):
    text = report.read_text()
    meta = read_json(trained_run / "model.json")
    for needle in ("Model card", "Known limits", f"{meta['parameters']:,} parameters", "Not calibrated",
                   "No out-of-distribution detector", "low_confidence", "blank", "Most-confused pairs",
                   "Worst misclassifications", "Learning curves", "Machine"):
        assert needle in text, needle


def test_report_shows_coverage_and_set_sizes_of_the_candidate_sets(report, noisy_data):
    from fmnist.core import conformal
    from fmnist.core.forward import probabilities

    run = Run.load(report.parent.parent)
    assert run.conformal is not None  # training fits the sets
    pred = predict_test(run, noisy_data, threads=1)
    probs = probabilities(pred["logits"], run.temperature)
    m = conformal.set_metrics(conformal.candidate_sets(probs, run.conformal), noisy_data.test_labels.numpy())
    text = report.read_text()
    section = text[text.index("<h2 id=sets>"):text.index("<h2 id=ood>")]
    for label, value in (("coverage reached", f"{100 * m['coverage']:.2f} %"), ("target", "95.00 %"),
                         ("mean set size", f"{m['mean_size']:.3f}"),
                         ("singletons", f"{100 * m['singleton_share']:.2f} %")):
        assert f"<div>{label}<b>{value}</b></div>" in section, label
    for b in m["by_size"]:  # the table of set sizes with their coverage
        assert (f"<tr><td class=num>{b['size']}</td><td class=num>{b['count']}</td>"
                f"<td class=num>{100 * b['share']:.2f} %</td><td class=num>{100 * b['coverage']:.2f} %</td></tr>"
                ) in section
    unsure = int((probs.max(1) < UNSURE).sum())
    assert unsure > 0 and f"{unsure:,} test images" in section and "uncertain answers and their candidates" in section
    assert "sampling noise" in section and "No candidate sets" not in section


def test_uncertain_gallery_shows_true_label_and_candidates_coloured_by_coverage():
    from fmnist import CLASS_NAMES
    from fmnist.apps.report.figures import BAD, GOOD, uncertain

    images = np.random.default_rng(0).integers(0, 255, (4, 28, 28), dtype=np.uint8)
    labels = np.array([6, 0, 4, 9])
    probs = np.full((4, 10), 0.01)
    probs[:, 6], probs[:, 0] = 0.48, 0.44  # Shirt or T-shirt/top
    fig = uncertain(images, labels, probs, np.array([0, 2]), [[6, 0], [6, 0]], list(CLASS_NAMES), 0.6)
    texts = {t.get_text(): t.get_color() for t in fig.axes[0].texts}
    assert texts == {"true Shirt\nShirt 0.48\nT-shirt 0.44": GOOD, "true Coat\nShirt 0.48\nT-shirt 0.44": BAD}
    assert fig._suptitle.get_text().startswith("2 of the 2 test images with an uncertain answer (best score under 0.60)")


def test_report_of_a_run_without_candidate_sets_says_so(run_copy, synthetic_data):
    out = run_copy / "report"
    out.mkdir()
    (out / "uncertain.png").write_bytes(b"an older report's gallery")
    meta = read_json(run_copy / "model.json")
    write_json(run_copy / "model.json", {**meta, "thresholds": {"confidence": 0.0}})  # nothing is uncertain
    text = build_report(run_copy, data=synthetic_data, limit=100, threads=1).read_text()
    assert "No test image is under the confidence threshold" in text and "coverage reached" in text
    assert not (out / "uncertain.png").exists()  # a stale gallery would mislead

    write_json(run_copy / "model.json", {k: v for k, v in meta.items() if k != "conformal"})  # an older run
    text = build_report(run_copy, data=synthetic_data, limit=100, threads=1).read_text()
    assert "Candidate sets</h2>" in text and "No candidate sets in this run" in text
    assert "coverage reached" not in text and not (out / "uncertain.png").exists()


def test_report_shows_calibration_ood_and_saved_metrics_when_present(run_copy, synthetic_data):
    meta = read_json(run_copy / "model.json")
    meta["calibration"] = {"temperature": 1.7, "ece_before": 0.081, "ece_after": 0.012}
    meta["ood"] = {**meta["ood"], "threshold": -4.25}  # a fitted detector's section (its parts include energy)
    write_json(run_copy / "model.json", meta)
    n = len(synthetic_data.test_labels)
    write_json(run_copy / "metrics.json", {"n": n, "tta": meta["tta"], "accuracy": 0.5, "accuracy_no_tta": 0.4321})
    text = build_report(run_copy, data=synthetic_data, threads=1).read_text()
    assert "Not calibrated" not in text and "temperature 1.7" in text and "0.012" in text
    assert "energy" in text and "-4.25" in text and "No out-of-distribution" not in text
    assert "43.21 %" in text  # the no-TTA accuracy is taken from metrics.json


def test_report_without_history_skips_only_the_learning_curves(run_copy, synthetic_data):
    (run_copy / "history.csv").unlink()
    index = build_report(run_copy, data=synthetic_data, out=run_copy / "elsewhere", limit=100, threads=1)
    assert index == run_copy / "elsewhere" / "index.html"
    assert "No history.csv" in index.read_text()
    assert not (index.parent / "learning_curves.png").exists()
    assert (index.parent / "confusion.png").is_file()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, synthetic_data, monkeypatch, capsys):
    with pytest.raises(CheckpointError, match="not a run folder"):
        build_report(tmp_path, data=synthetic_data)
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.realdata
@pytest.mark.slow
def test_report_command_on_the_official_data(run_copy, monkeypatch, capsys):
    from fmnist.fit.data import DataError, find_data_dir

    try:
        find_data_dir(download=False)
    except DataError:
        pytest.skip("official Fashion-MNIST files not available")
    assert cli.main(["report", str(run_copy), "--limit", "500", "--threads", "1"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert "test images<b>500</b>" in (run_copy / "report" / "index.html").read_text()


# --- compare -----------------------------------------------------------------------------------------------


def test_compare_tables_two_runs_in_the_terminal_and_as_html(trained_run, run_copy, tmp_path, monkeypatch, capsys):
    write_json(run_copy / "metrics.json", {"n": 300, "accuracy": 0.8765})
    row = run_row(run_copy)
    assert row["test_acc"] == 0.8765 and row["model"] == read_json(trained_run / "model.json")["model"]
    assert run_row(trained_run)["test_acc"] is None  # not evaluated yet: shown as '-'
    text = format_compare([run_row(trained_run), row])
    assert "87.65%" in text and text.splitlines()[0].startswith("run")
    html_path = tmp_path / "cmp.html"
    assert cli.main(["compare", str(trained_run), str(run_copy), "--html", str(html_path)]) == 0
    out = capsys.readouterr().out
    assert trained_run.name in out and "run" in out and "87.65%" in out
    page = html_path.read_text()
    assert page.count("<tr>") == 3 and "87.65%" in page and "<script" not in page


def test_compare_names_the_folder_that_is_not_a_run(trained_run, tmp_path, monkeypatch, capsys):
    assert cli.main(["compare", str(trained_run), str(tmp_path), "--html", ""]) == 2
    assert f"{tmp_path} is not a run folder" in capsys.readouterr().err


# --- the page in a real browser ----------------------------------------------------------------------------


def _chromium():
    """A headless Chromium driven by Selenium, or a skip when either is missing."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    binary, driver = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
    if not (binary.exists() and driver.exists()):
        pytest.skip("chromium/chromedriver not installed")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(binary)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver, Service(str(driver)), opts


@pytest.mark.browser
def test_report_renders_in_headless_chromium(report, tmp_path):
    webdriver, service, opts = _chromium()
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    browser = webdriver.Chrome(service=service, options=opts)
    try:
        browser.set_page_load_timeout(30)
        browser.get(report.resolve().as_uri())
        state = browser.execute_script("return document.readyState")
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        logs = browser.get_log("browser")
        title = browser.title
    finally:
        browser.quit()
    assert state == "complete" and title.startswith("fmnist report")
    assert len(images) == len(FIGURES)
    for alt, complete, width, height in images:
        assert complete and width > 300 and height > 100, (alt, width, height)
    severe = [entry for entry in logs if entry["level"] == "SEVERE"]
    assert not severe, json.dumps(severe, indent=1)
