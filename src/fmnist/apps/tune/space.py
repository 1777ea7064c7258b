"""The search space of ``fmnist tune``: training options given as ranges, lists or single values.

Every option of ``fmnist train`` keeps its name; its value says what to search:

    --lr 1e-4:1e-1:log      a float range sampled on a log scale (``:linear``, or ``:STEP`` for a stepped range)
    --epochs 2:8            an integer range
    --batch-size 64,128     a list of choices ('|' separates choices too)
    --augment "flip|flip,crop"   choices of --augment are separated by '|' only (its values hold commas)
    --epochs 2              a single value: fixed, the same for every trial

A TOML file (``--space FILE``) says the same with the option names as keys (``preset = "seed-a"``,
``lr = "1e-4:1e-1:log"``, ``batch_size = [64, 128]``, ``lr = {low = 1e-4, high = 1e-1, log = true}``);
flags given on the command line override it. Any bad value is a ValueError naming the option.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field

from fmnist.core.errors import InputError
from fmnist.core.values import is_finite_number
from fmnist.fit.recipes import DEFAULT_PRESET, PRESETS, TrainConfig, resolve_config

# Options that describe the machine a worker runs on, not the recipe: fixed only, and not part of a study's
# identity (workers on several machines may differ in them).
MACHINE_OPTIONS = ("threads", "device", "data_dir", "data", "test_data", "class_names")
NOT_OPTIONS = ("preset", "pinned")
_TYPES = {"int": int, "float": float, "bool": bool}
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option_types() -> dict[str, type]:
    """Search-space option name -> value type, from TrainConfig (annotations are strings here)."""
    return {f.name: _TYPES.get(str(f.type), str) for f in dataclasses.fields(TrainConfig)
            if f.name not in NOT_OPTIONS + MACHINE_OPTIONS}


@dataclass
class Space:
    """What a study searches: a base recipe, searched parameters (Optuna distributions as dicts), fixed values."""
    preset: str = DEFAULT_PRESET
    params: dict[str, dict] = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)

    def identity(self, metric: str) -> str:
        """The text stored with a study; another command with a different one may not add trials to it."""
        return json.dumps({"preset": self.preset, "params": self.params, "fixed": self.fixed, "metric": metric},
                          sort_keys=True)

    def grid(self) -> list[dict]:
        """Every combination of the listed values, in the order given (the grid sampler's trials)."""
        ranges = [n for n, p in self.params.items() if p["kind"] != "categorical"]
        if ranges:
            raise InputError(f"--sampler grid needs lists of values, not ranges: {', '.join(_flag(n) for n in ranges)}")
        names = list(self.params)
        return [dict(zip(names, combo)) for combo in itertools.product(*(self.params[n]["choices"] for n in names))]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _number(name: str, kind: type, text) -> int | float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{_flag(name)}: {text!r} is not a number") from None
    if not is_finite_number(value):
        raise InputError(f"{_flag(name)}: {text!r} is not a finite number")
    if kind is int:
        if not value.is_integer():
            raise InputError(f"{_flag(name)}: {text!r} is not a whole number")
        return int(value)
    return value


def convert(name: str, kind: type, value):
    """One value of an option, from text (flags) or TOML, as the option's type."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in TRUE + FALSE:
            return text in TRUE
        raise InputError(f"{_flag(name)}: {value!r} is not true or false")
    if kind in (int, float):
        if isinstance(value, bool):
            raise InputError(f"{_flag(name)}: {value!r} is not a number")
        return _number(name, kind, value)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{_flag(name)}: {value!r} is not a text value")
    return value.strip()


def _range(name: str, kind: type, low, high, scale=None) -> dict:
    """A float or int range; ``scale`` is 'log', 'linear', None or a step."""
    low, high = _number(name, kind, low), _number(name, kind, high)
    if not low < high:
        raise InputError(f"{_flag(name)}: the range's low end {low} must be below its high end {high}")
    log, step = False, None
    if scale in ("log", True):
        if low <= 0:
            raise InputError(f"{_flag(name)}: a log range must start above 0, not at {low}")
        log = True
    elif scale not in (None, "", "linear", False):
        step = _number(name, kind, scale)
        if step <= 0:
            raise InputError(f"{_flag(name)}: the range's step must be above 0, not {step}")
    elif kind is int:
        step = 1
    return {"kind": "int" if kind is int else "float", "low": low, "high": high, "log": log, "step": step}


def parse_option(name: str, text: str):
    """(searched, value): a range or list -> (True, distribution dict); a single value -> (False, value)."""
    types = option_types()
    if name not in types:
        raise InputError(f"unknown parameter {name!r}; searchable: {', '.join(sorted(types))}")
    kind, text = types[name], str(text).strip()
    if ":" in text:
        if kind not in (int, float):
            raise InputError(f"{_flag(name)}: ranges (LOW:HIGH) are for numbers; list the choices with '|'")
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise InputError(f"{_flag(name)}: {text!r} is not LOW:HIGH, LOW:HIGH:log or LOW:HIGH:STEP")
        return True, _range(name, kind, *parts)
    sep = "|" if "|" in text or name == "augment" else ","
    pieces = text.split(sep)
    if any(not p.strip() for p in pieces):
        raise InputError(f"{_flag(name)}: {text!r} has an empty choice")
    return _choices(name, kind, pieces)


def _choices(name: str, kind: type, pieces: list):
    values = [convert(name, kind, p) for p in pieces]
    if len(values) == 1:
        return False, values[0]
    if len(set(values)) != len(values):
        raise InputError(f"{_flag(name)}: a choice is listed twice in {pieces}")
    return True, {"kind": "categorical", "choices": values}


def _toml_option(name: str, value):
    """A TOML entry: text as on the command line, a list of choices, a {low, high, log, step} table, or a value."""
    types = option_types()
    if name not in types:
        raise InputError(f"unknown parameter {name!r}; searchable: {', '.join(sorted(types))}")
    kind = types[name]
    if isinstance(value, str):
        return parse_option(name, value)
    if isinstance(value, list):
        if not value:
            raise InputError(f"{name}: an empty list of choices")
        return _choices(name, kind, value)
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log", "step"}
        if unknown or not {"low", "high"} <= set(value) or kind not in (int, float):
            raise InputError(f"{name}: a range is a table {{low = ..., high = ..., log = true|false, step = ...}} "
                             "of a numeric option")
        if value.get("log") and value.get("step") is not None:
            raise InputError(f"{name}: a range is either log or stepped, not both")
        return True, _range(name, kind, value["low"], value["high"], value.get("step") or bool(value.get("log")))
    return False, convert(name, kind, value)


#: Largest search-space file read (a real one is a few hundred bytes; /dev/zero never ends).
MAX_SPACE_BYTES = 1_000_000


def read_toml(path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SPACE_BYTES + 1)
        if len(data) > MAX_SPACE_BYTES:
            raise InputError(f"--space {path}: larger than {MAX_SPACE_BYTES:,} bytes; a search space is a short "
                             "TOML file")
        doc = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise InputError(f"--space {path}: no such file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--space {path}: not a readable TOML file: {e}") from None
    except RecursionError:
        raise InputError(f"--space {path}: not a readable TOML file: nested too deeply") from None
    return {str(k).replace("-", "_"): v for k, v in doc.items()}


def build_space(preset: str | None, flags: dict[str, str], toml_path=None) -> tuple[Space, dict]:
    """The Space from a TOML file and flags (flags win), and the machine options given; checked value by value."""
    entries: dict = read_toml(toml_path) if toml_path else {}
    preset = preset or entries.pop("preset", None) or DEFAULT_PRESET
    entries.pop("preset", None)
    if preset not in PRESETS:
        raise InputError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    machine = {k: entries.pop(k) for k in MACHINE_OPTIONS if k in entries}
    space = Space(preset=preset)
    for name, value in entries.items():
        _add(space, name, *_toml_option(name, value))
    for name, text in flags.items():
        space.params.pop(name, None)
        space.fixed.pop(name, None)
        _add(space, name, *parse_option(name, text))
    check(space)
    return space, machine


def _add(space: Space, name: str, searched: bool, value) -> None:
    (space.params if searched else space.fixed)[name] = value


def candidates(space: Space) -> list[dict]:
    """One set of overrides per value to check: each choice, and both ends of each range."""
    out = []
    for name, p in space.params.items():
        values = p["choices"] if p["kind"] == "categorical" else [p["low"], p["high"]]
        out.extend({**space.fixed, name: v} for v in values)
    return out or [dict(space.fixed)]


def check(space: Space) -> None:
    """Every value the search may pick must make a valid training recipe (a clear error now, not mid-study)."""
    from fmnist.fit.models import model_names

    known = set(model_names())
    if "epochs" in space.params and any(resolve_config(space.preset, **o).time_budget for o in candidates(space)):
        raise InputError(f"--epochs is searched, but the {space.preset!r} recipe has a time budget, which sizes the "
                         "epochs itself: add --time-budget 0 (or search --time-budget instead)")
    for overrides in candidates(space):
        model = overrides.get("model")
        if model is not None and model not in known:
            raise InputError(f"--model: unknown architecture {model!r}; see `fmnist models`")
        if resolve_config(space.preset, **overrides).val_size <= 0:
            raise InputError("--val-size must be above 0: trials are judged on the validation split, never the test set")


def suggest(trial, params: dict[str, dict]) -> dict:
    """Ask an Optuna trial for one value of each searched parameter."""
    values = {}
    for name, p in params.items():
        if p["kind"] == "categorical":
            values[name] = trial.suggest_categorical(name, p["choices"])
        elif p["kind"] == "int":
            values[name] = trial.suggest_int(name, p["low"], p["high"], log=p["log"], step=p["step"] or 1)
        else:
            values[name] = trial.suggest_float(name, p["low"], p["high"], log=p["log"], step=p["step"])
    return values


__all__ = ["MACHINE_OPTIONS", "Space", "build_space", "convert", "option_types", "parse_option", "suggest"]
