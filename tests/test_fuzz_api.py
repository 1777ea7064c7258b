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
