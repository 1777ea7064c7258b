"""The code's own rules that a reader relies on: one module for each (see docs/architecture.md)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fmnist.core.values import is_finite_number

SRC = Path(__file__).resolve().parents[1] / "src" / "fmnist"


def _sources():
    return {p.relative_to(SRC).as_posix(): p.read_text() for p in SRC.rglob("*.py")}


@pytest.mark.parametrize("value, ok", [(1, True), (0.5, True), (-3.0, True), (float("nan"), False),
                                       (float("inf"), False), (True, False), ("1", False), (None, False)])
def test_the_one_rule_for_a_number(value, ok):
    import numpy as np

    assert is_finite_number(value) is ok
    if isinstance(value, float):
        assert is_finite_number(np.float32(value)) is ok


def test_single_values_are_checked_for_nan_in_one_place():
    found = [name for name, text in _sources().items() if "math.isfinite(" in text and name != "core/values.py"]
    assert not found, f"use fmnist.core.values.is_finite_number in {found}"


def test_model_json_sections_are_checked_in_one_module():
    """Only core/model_json.py checks a section's format or rules (its readers take the checked sections)."""
    pattern = re.compile(r"meta(?:\.get\(|\[)\"(?:ood|conformal|onnx|calibration|thresholds|preprocessing)\"")
    found = {name for name, text in _sources().items() if pattern.search(text)}
    # What reads checked sections to show or write them: the report, the export, the trust fit's writer, and
    # the completeness rule (runfolder) reading whether the trust layer is there.
    assert found <= {"core/model_json.py", "apps/report/html.py", "fit/export.py", "core/runfolder.py"}, found


def test_every_argparse_definition_is_in_apps_cli():
    found = [name for name, text in _sources().items() if re.search(r"\bargparse\b|add_argument\(", text)
             and not name.startswith("apps/cli/")]
    assert not found, found
