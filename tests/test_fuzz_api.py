"""The HTTP API fuzzed from its own /openapi.json (schemathesis): a few hundred generated requests per
operation, none answered with a 5xx. benchmarks/fuzz_api.py runs it with more examples or on any run."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from fuzz_api import fuzz  # noqa: E402


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(tmp_path):
    run = shutil.copytree(ROOT / "tests" / "fixtures" / "run-v1", tmp_path / "run")
    results = fuzz(run, examples=200)
    assert {"POST /api/predict", "POST /api/predict/batch", "GET /api/model"} <= set(results)
    for op, (cases, failures, _) in results.items():
        assert not failures, (op, failures)
        assert op.startswith("GET") or cases >= 150, (op, cases)


def _png() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    img = np.zeros((28, 28), np.uint8)
    img[6:22, 9:19] = 220
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_answers_are_what_the_openapi_document_says(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from fmnist.apps.serve.app import Prediction, create_app

    run = shutil.copytree(ROOT / "tests" / "fixtures" / "run-v1", tmp_path / "run")
    with TestClient(create_app(run), base_url="http://localhost") as client:
        doc = client.get("/openapi.json").json()
        for path, schema in (("/api/predict", {"$ref": "#/components/schemas/Prediction"}),
                             ("/api/predict/batch", {"type": "array", "items": {
                                 "$ref": "#/components/schemas/Prediction"}})):
            got = doc["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
            assert {k: v for k, v in got.items() if k != "title"} == schema
        fields = set(doc["components"]["schemas"]["Prediction"]["properties"])
        assert fields == set(Prediction.model_fields) >= {"ood_score", "input_png", "verdict", "candidates"}
        r = client.post("/api/predict", files={"file": ("x.png", _png(), "image/png")})
        assert r.status_code == 200 and set(r.json()) == fields
        Prediction.model_validate(r.json())

        predictor = client.app.state.predictor
        real = predictor._result
        monkeypatch.setattr(predictor, "_result", lambda *a: {**real(*a), "verdict": "maybe"})
        r = client.post("/api/predict", files={"file": ("x.png", _png(), "image/png")})
        assert r.status_code == 500 and r.json() == {"detail": "internal server error"}  # never sent as is
