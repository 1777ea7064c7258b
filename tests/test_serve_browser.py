"""The page in a real browser: uvicorn on 127.0.0.1, headless Chromium driven by Selenium.

Upload (file picker, drop, paste), drawing with a mouse and with a finger, errors in plain words.
Skipped when Chromium, chromedriver or Selenium is missing.

Environment (optional): FMNIST_SERVE_RUN=RUN serves that run instead of the tiny synthetic one, and
FMNIST_SCREENSHOT=PATH saves the screenshot of a shown prediction there (docs/serve.png was made with both);
FMNIST_SCREENSHOT_UNCERTAIN=PATH that of an uncertain answer with its candidates.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
OFFICIAL = Path("/usr/share/datasets/fashion-mnist")

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")
if not (Path(CHROMIUM).exists() or shutil.which("chromium")) or not Path(CHROMEDRIVER).exists():
    pytest.skip("chromium and chromedriver are needed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fmnist.apps.serve.app import create_app
from fmnist.apps.serve.background import serve_in_thread
from fmnist.apps.serve.texts import CLASS_DESCRIPTIONS


@pytest.fixture(scope="module")
def server_url(trained_run):
    run = os.environ.get("FMNIST_SERVE_RUN") or trained_run
    with serve_in_thread(create_app(run)) as url:
        yield url


@pytest.fixture(scope="module")
def hedged_run(trained_run, tmp_path_factory) -> Path:
    """A run whose answers are never certain: the tiny run's calibrated scores of its own synthetic images
    round to exactly 1.0 (its temperature is small), so this copy scores with its raw softmax (temperature 1)."""
    if os.environ.get("FMNIST_SERVE_RUN"):
        return Path(os.environ["FMNIST_SERVE_RUN"])
    from fmnist.fit.checkpoint import read_json, write_json

    run = Path(shutil.copytree(trained_run, tmp_path_factory.mktemp("hedged") / "run"))
    meta = read_json(run / "model.json")
    write_json(run / "model.json", {**meta, "calibration": {**meta["calibration"], "temperature": 1.0}})
    return run


@pytest.fixture(scope="module")
def hedged_url(hedged_run):
    """A server whose confidence threshold is 1.0: no answer is confident enough, so garments get candidates."""
    with serve_in_thread(create_app(hedged_run, threshold=1.0)) as url:
        yield url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1200,900", "--force-device-scale-factor=1",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def garment_png(synthetic_data) -> bytes:
    """A real Fashion-MNIST ankle boot when the official data is here, else a synthetic image."""
    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        from fmnist.fit.data import read_idx

        img = np.asarray(read_idx(OFFICIAL / "t10k-images-idx3-ubyte.gz")[0])  # test image 0: an ankle boot
    else:
        img = synthetic_data.test_images[0].numpy()
    return png(img)


@pytest.fixture(scope="module")
def hedged_png(hedged_run, synthetic_data) -> bytes:
    """A PNG that the hedged server answers "uncertain" (it passes the blank and OOD gates): the first such
    test image, official ones first when the data is here."""
    import fmnist

    images = list(synthetic_data.test_images[:100].numpy())
    if (OFFICIAL / "t10k-images-idx3-ubyte.gz").exists():
        from fmnist.fit.data import read_idx

        images = list(np.asarray(read_idx(OFFICIAL / "t10k-images-idx3-ubyte.gz")[:100])) + images
    predictor = fmnist.load(hedged_run, threshold=1.0)
    pngs = [png(img, scale=1) for img in images]  # 28x28: the data set's format, prepared as is
    for data, r in zip(pngs, predictor.predict_batch(pngs)):
        if r["verdict"] == "uncertain":
            return data
    pytest.fail("no test image passes the blank and OOD gates below the 1.0 threshold")


def png(img: np.ndarray, scale: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).resize((28 * scale, 28 * scale), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


# --- helpers --------------------------------------------------------------------------------------------

def open_page(driver, url):
    driver.get(url + "/")
    WebDriverWait(driver, 20).until(lambda d: "parameters" in d.find_element(By.ID, "model-info").text)


def wait_for_answer(driver, n: int, state: str = "done") -> None:
    """Wait until the page has shown its n-th answer and is in ``state``."""
    def ready(d):
        r = d.find_element(By.ID, "result")
        return r.get_attribute("data-requests") == str(n) and r.get_attribute("data-state") == state

    WebDriverWait(driver, 20).until(ready)


def shown(driver) -> dict:
    top = driver.find_elements(By.CSS_SELECTOR, "#top-k li")
    return {
        "verdict": driver.find_element(By.ID, "verdict").text,
        "top_k": [li.find_element(By.CLASS_NAME, "label").text for li in top],
        "description": driver.find_element(By.ID, "description").text,
        "image_width": driver.execute_script("return document.getElementById('input-image').naturalWidth"),
        "image_src": driver.find_element(By.ID, "input-image").get_attribute("src"),
    }


def api_predict(url: str, data: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(url + "/api/predict", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=20) as r:
        return json.loads(r.read())


def canvas_ink(driver) -> int:
    """How many canvas pixels are not black."""
    return driver.execute_script("""
        const c = document.getElementById('canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4) if (d[i] > 0) n++;
        return n;""")


# --- tests ----------------------------------------------------------------------------------------------

def test_upload_shows_the_models_answer(browser, server_url, garment_png, tmp_path):
    path = tmp_path / "garment.png"
    path.write_bytes(garment_png)
    open_page(browser, server_url)
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    wait_for_answer(browser, 1)

    expected = api_predict(server_url, garment_png)
    page = shown(browser)
    assert expected["label"] in page["verdict"]
    if expected["verdict"] == "uncertain" and expected["candidates"]:
        assert page["verdict"].endswith("not sure which")
    else:
        assert page["verdict"].startswith("This looks like" if expected["accepted"] else "No answer")
        assert page["description"] == CLASS_DESCRIPTIONS[expected["label"]]
    assert page["top_k"] == [t["label"] for t in expected["top_k"]]
    assert page["image_width"] == 28 and page["image_src"].endswith(expected["input_png"])

    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []  # no script error, nothing blocked by the content security policy

    screenshot = Path(os.environ.get("FMNIST_SCREENSHOT") or tmp_path / "serve.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot))
    with Image.open(screenshot) as shot:
        assert shot.size[0] >= 800 and np.asarray(shot.convert("L")).std() > 10  # not an empty page


def test_drawing_with_the_mouse_is_classified(browser, server_url):
    open_page(browser, server_url)
    canvas = browser.find_element(By.ID, "canvas")
    assert canvas_ink(browser) == 0
    # A boot-like outline: down, along the sole, up.
    chain = ActionChains(browser).move_to_element_with_offset(canvas, -60, -90).click_and_hold()
    for dx, dy in [(0, 60), (0, 60), (50, 30), (60, 0), (0, -40), (-50, -20), (0, -90)]:
        chain.move_by_offset(dx, dy)
    chain.release().perform()
    wait_for_answer(browser, 1)  # classified by itself once the stroke ends
    assert canvas_ink(browser) > 1000
    page = shown(browser)
    assert page["verdict"] and len(page["top_k"]) == 3 and page["image_width"] == 28


def test_drawing_with_a_finger_is_classified(browser, server_url):
    open_page(browser, server_url)
    canvas = browser.find_element(By.ID, "canvas")
    actions = ActionBuilder(browser, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
    actions.pointer_action.move_to(canvas, -80, -40).pointer_down()
    for dx, dy in [(40, 0), (40, 0), (40, 0), (0, 40), (-40, 0), (-40, 0), (-40, 0), (0, 40), (120, 0)]:
        actions.pointer_action.move_by(dx, dy)
    actions.pointer_action.pointer_up()
    actions.perform()
    wait_for_answer(browser, 1)
    assert canvas_ink(browser) > 1000
    assert shown(browser)["verdict"]


def test_blank_drawing_is_refused_in_plain_words(browser, server_url):
    open_page(browser, server_url)
    browser.find_element(By.ID, "classify-drawing").click()
    wait_for_answer(browser, 1)
    verdict = shown(browser)["verdict"]
    assert verdict.startswith("No answer") and "empty" in verdict


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_dropped_and_pasted_images_are_classified(browser, server_url, garment_png, how):
    open_page(browser, server_url)
    browser.execute_script("""
        const [b64, how] = arguments;
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "garment.png", {type: "image/png"}));
        const init = {bubbles: true, cancelable: true};
        if (how === "drop") {
          document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", {...init, dataTransfer: dt}));
        } else {
          document.body.dispatchEvent(new ClipboardEvent("paste", {...init, clipboardData: dt}));
        }""", base64.b64encode(garment_png).decode(), how)
    wait_for_answer(browser, 1)
    assert api_predict(server_url, garment_png)["label"] in shown(browser)["verdict"]


def test_bad_file_shows_an_error_and_the_page_recovers(browser, server_url, garment_png, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"just some text, not a picture\n" * 10)
    good = tmp_path / "garment.png"
    good.write_bytes(garment_png)
    open_page(browser, server_url)
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    wait_for_answer(browser, 1, state="error")
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed() and "could not be read as an image" in error.text
    browser.find_element(By.ID, "file-input").send_keys(str(good))
    wait_for_answer(browser, 2)
    assert not error.is_displayed() and shown(browser)["verdict"]


def test_an_uncertain_answer_names_each_candidate_with_its_score(browser, hedged_url, hedged_png, tmp_path):
    path = tmp_path / "garment.png"
    path.write_bytes(hedged_png)
    browser.get_log("browser")  # drop what earlier tests logged (a 400 on purpose)
    open_page(browser, hedged_url)
    assert "names the garments it could be" in browser.find_element(By.ID, "model-info").text
    browser.find_element(By.ID, "file-input").send_keys(str(path))
    wait_for_answer(browser, 1)

    expected = api_predict(hedged_url, hedged_png)
    assert expected["verdict"] == "uncertain" and expected["accepted"] is False
    labels = [c["label"] for c in expected["candidates"]]
    assert len(labels) >= 2 and labels[0] == expected["label"]
    verdict = browser.find_element(By.ID, "verdict")
    names = labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} or {labels[-1]}"
    assert verdict.text == f"{names} — not sure which"  # e.g. "Shirt or T-shirt/top — not sure which"
    assert "uncertain" in verdict.get_attribute("class").split()
    assert browser.execute_script("return [orList(['A', 'B', 'C']), orList(['A'])]") == ["A, B or C", "A"]
    items = browser.find_elements(By.CSS_SELECTOR, "#candidates li")
    assert [li.find_element(By.CLASS_NAME, "label").text for li in items] == labels
    for li, c in zip(items, expected["candidates"]):
        shown_score = float(li.find_element(By.CLASS_NAME, "score").text.rstrip(" %"))
        assert shown_score == pytest.approx(100 * c["score"], abs=0.51)
        assert li.find_element(By.CLASS_NAME, "about").text == CLASS_DESCRIPTIONS[c["label"]]
        assert li.is_displayed()
    assert "not sure enough" in browser.find_element(By.ID, "candidates-note").text
    # Each candidate carries its description: the single best guess's is not shown as well.
    assert not browser.find_element(By.ID, "description").is_displayed()
    assert shown(browser)["top_k"] == [t["label"] for t in expected["top_k"]]

    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    screenshot = Path(os.environ.get("FMNIST_SCREENSHOT_UNCERTAIN") or tmp_path / "uncertain.png")
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(screenshot))


def test_a_refused_answer_after_an_uncertain_one_hides_the_candidates(browser, hedged_url, hedged_png, tmp_path):
    uncertain, blank = tmp_path / "garment.png", tmp_path / "blank.png"
    uncertain.write_bytes(hedged_png)
    blank.write_bytes(png(np.zeros((28, 28), np.uint8)))
    open_page(browser, hedged_url)
    browser.find_element(By.ID, "file-input").send_keys(str(uncertain))
    wait_for_answer(browser, 1)
    assert browser.find_element(By.ID, "candidates-block").is_displayed()
    browser.find_element(By.ID, "file-input").send_keys(str(blank))
    wait_for_answer(browser, 2)
    assert shown(browser)["verdict"].startswith("No answer")
    assert not browser.find_element(By.ID, "candidates-block").is_displayed()
    assert browser.find_element(By.ID, "description").is_displayed()  # the best guess's, as before
