"""model.json, the description of a trained run: its sections, each checked once, here, when it is read.

Sections (all but the first three optional):

- identity: ``format``, ``schema_version``, ``model`` (the architecture's name), ``class_names``, ``dataset``;
- ``preprocessing``: the input size and the mean and std the pixels are normalised with;
- ``tta``, ``best_epoch``, ``select``, ``parameters``, ``metrics``, ``recipe``: what training kept;
- ``calibration``: the temperature (``fmnist.fit.trust``);
- ``thresholds``: the confidence under which an answer is "uncertain";
- ``ood``: the JSON half of the OOD detector (its arrays are in ood.safetensors, checked by
  :meth:`fmnist.core.ood.Detector.load` against this half);
- ``conformal``: the candidate-set parameters (their rule is :func:`fmnist.core.conformal.validate_params`);
- ``onnx``: what ``fmnist export`` recorded of its files.

A value out of place is one :class:`CheckpointError` naming the file and the field. Older schemas are brought
to the current one by :func:`upgrade`, the one place that knows how they differ; the rest of fmnist reads
only the current one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fmnist.core.conformal import validate_params
from fmnist.core.runfolder import CheckpointError
from fmnist.core.values import is_count, is_finite_number

MODEL_FORMAT = "fmnist-model/1"
OOD_FORMAT = "fmnist-ood/1"
# 1: before this field existed (same layout); 2: adds schema_version itself; 3: a run is complete only with its
# manifest.json (core.runfolder.check_complete; runs of schema 1 and 2 without one are complete with their trust layer)
SCHEMA_VERSION = 3

# Seed B's threshold. Scores are calibrated, so an answer under 0.60 is wrong about 40 % of the time or more:
# the user is told the model is not sure. (The OOD detector, not this gate, tells garments from other images.)
DEFAULT_CONFIDENCE = 0.60
# The smallest pixel spread a trained model may divide by: below it the images were (near) constant and
# preprocessing would blow every input up into huge values.
MIN_STD = 1e-3
#: The ``dataset`` section of a run that has none (trained before runs recorded their data set).
FASHION_DATASET = {"name": "fashion-mnist", "mirror_symmetric": True, "descriptions": {}}
# How the detector's parts make one score (core.ood): the evidence sum; the standardised sum or maximum of
# runs fitted before it.
OOD_RULES = ("fisher", "sum", "max")
OBJECT_SECTIONS = ("calibration", "ood", "conformal", "thresholds", "metrics", "recipe", "dataset", "onnx")


@dataclass(frozen=True)
class ModelJson:
    """model.json's sections, checked; ``raw`` is the content in the current schema (what :meth:`Run.update`
    writes back, section by section), ``written_version`` the schema it was written in."""

    raw: dict
    written_version: int
    model: str
    class_names: list
    dataset: dict
    preprocessing: dict
    tta: bool
    calibration: dict | None
    temperature: float
    confidence: float
    ood: dict | None
    conformal: dict | None
    onnx: dict | None
    metrics: dict
    recipe: dict
    best_epoch: int | None
    select: str
    parameters: int | None

    def onnx_record(self, filename: str) -> dict | None:
        """What ``fmnist export`` recorded about one of its files (None if it recorded nothing)."""
        return ((self.onnx or {}).get("files") or {}).get(filename)


def upgrade(meta: dict) -> dict:
    """``meta`` in the current schema (a copy). Schemas 1 and 2 share its layout; an OOD section written before
    the parts had a combination rule used their maximum."""
    meta = dict(meta)
    if isinstance(meta.get("ood"), dict) and "combine" not in meta["ood"]:
        meta["ood"] = {**meta["ood"], "combine": "max"}
    return meta


def read(meta, where: Path) -> ModelJson:
    """The checked description of the model.json content ``meta`` read from ``where``."""
    version = _identity(meta, where)
    meta = upgrade(meta)
    calibration = meta.get("calibration") or None
    return ModelJson(
        raw=meta, written_version=version, model=meta["model"], class_names=list(meta["class_names"]),
        dataset={**FASHION_DATASET, **(meta.get("dataset") or {})},
        preprocessing=_preprocessing(meta.get("preprocessing"), where),
        tta=_flag(meta.get("tta", False), "tta", where),
        calibration=calibration,
        temperature=finite((calibration or {}).get("temperature", 1.0), "calibration.temperature", where, 0,
                           open_low=True),
        confidence=finite((meta.get("thresholds") or {}).get("confidence", DEFAULT_CONFIDENCE),
                          "thresholds.confidence", where, 0.0, 1.0),
        ood=ood_section(meta.get("ood"), where),
        conformal=_conformal(meta.get("conformal"), len(meta["class_names"]), where),
        onnx=_onnx(meta.get("onnx"), where),
        metrics=meta.get("metrics") or {}, recipe=meta.get("recipe") or {},
        best_epoch=_count_or_none(meta.get("best_epoch"), "best_epoch", where),
        select=_text(meta.get("select", ""), "select", where),
        parameters=_count_or_none(meta.get("parameters"), "parameters", where),
    )


def finite(value, what: str, path: Path, low: float = -math.inf, high: float = math.inf,
           open_low: bool = False) -> float:
    """``value`` as a float, or one CheckpointError naming ``path`` and ``what``: not a finite number, or out of
    [low, high] ((low, high] with ``open_low``)."""
    ok = is_finite_number(value) and (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise CheckpointError(f"{path}: {what} must be a finite number"
                              + (f" in ({low}, {high}]" if open_low else f" in [{low}, {high}]"
                                 if is_finite_number(low) or is_finite_number(high) else "") + f", got {value!r}")
    return float(value)


# --- sections ----------------------------------------------------------------------------------------------

def _identity(meta, where: Path) -> int:
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} does not hold a JSON object")
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{where}: unsupported format {meta.get('format')!r}")
    version = meta.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= SCHEMA_VERSION:
        raise CheckpointError(f"{where}: schema_version {version!r} is not one this fmnist reads "
                              f"(1 to {SCHEMA_VERSION}); a newer fmnist wrote it?")
    names = meta.get("class_names")
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names)
            or len(set(names)) != len(names)):
        raise CheckpointError(f"{where}: class_names must be a list of distinct names, got {names!r}")
    if not isinstance(meta.get("model"), str):
        raise CheckpointError(f"{where}: model must name an architecture, got {meta.get('model')!r}")
    for key in OBJECT_SECTIONS:
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise CheckpointError(f"{where}: {key} must be an object")
    dataset = meta.get("dataset") or {}
    if not isinstance(dataset.get("descriptions", {}), dict):
        raise CheckpointError(f"{where}: dataset.descriptions must be an object (class name -> text)")
    return version


def _preprocessing(spec, where: Path) -> dict:
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: preprocessing is missing or not an object")
    if spec.get("size") != 28:
        raise CheckpointError(f"{where}: preprocessing.size must be 28 (the models take 28x28 images), "
                              f"got {spec.get('size')!r}")
    finite(spec.get("mean"), "preprocessing.mean", where, 0.0, 1.0)
    finite(spec.get("std"), "preprocessing.std", where, MIN_STD, 1.0)
    return spec


def ood_section(config, where: Path) -> dict | None:
    """The JSON half of the OOD detector, checked (None where the run has none)."""
    if not config:
        return None
    if config.get("format") != OOD_FORMAT or not isinstance(config.get("parts"), list) or not config["parts"] \
            or not all(isinstance(p, str) for p in config["parts"]):
        raise CheckpointError(f"{where}: unsupported OOD format {config.get('format')!r} (refit the detector with "
                              "`fmnist calibrate RUN`)")
    if config.get("combine") not in OOD_RULES:
        raise CheckpointError(f"{where}: unknown OOD combination rule {config.get('combine')!r}")
    finite(config.get("threshold"), "ood.threshold", where)
    std = config.get("standardise")
    if not isinstance(std, dict) or set(std) != set(config["parts"]):
        raise CheckpointError(f"{where}: ood.standardise must hold the median and scale of each part "
                              f"({', '.join(config['parts'])}): refit with `fmnist calibrate RUN`")
    for name, pair in std.items():
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise CheckpointError(f"{where}: ood.standardise.{name} must be [median, scale], got {pair!r}")
        finite(pair[0], f"ood.standardise.{name} median", where)
        finite(pair[1], f"ood.standardise.{name} scale", where, 0.0, open_low=True)
    if not isinstance(config.get("sha256", ""), str):
        raise CheckpointError(f"{where}: ood.sha256 must be a hex digest")
    return config


def _conformal(params, classes: int, where: Path) -> dict | None:
    if not params:
        return None
    try:
        params = validate_params(params)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if params["classes"] != classes:
        raise CheckpointError(f"{where}: conformal parameters are for {params['classes']} classes, the model has "
                              f"{classes}")
    return params


def _onnx(record, where: Path) -> dict | None:
    if record is None:
        return None
    files = record.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(f, dict) and isinstance(f.get("sha256", ""), str)
                                              for f in files.values()):
        raise CheckpointError(f"{where}: onnx must be an object whose files are objects (written by fmnist export)")
    for key in ("feature_dim", "classes"):
        _count_or_none(record.get(key), f"onnx.{key}", where)
    if not isinstance(record.get("weights_sha256", ""), (str, type(None))):
        raise CheckpointError(f"{where}: onnx.weights_sha256 must be a hex digest")
    return record


def _flag(value, what: str, where: Path) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}: {what} must be true or false, got {value!r}")
    return value


def _count_or_none(value, what: str, where: Path) -> int | None:
    if value is None or is_count(value):
        return value
    raise CheckpointError(f"{where}: {what} must be a whole number >= 0, got {value!r}")


def _text(value, what: str, where: Path) -> str:
    if not isinstance(value, str):
        raise CheckpointError(f"{where}: {what} must be a string, got {value!r}")
    return value
