"""The search-space file of ``fmnist tune --space`` is read with a bound: endless or absurd files are one
clear error, not a process the kernel kills."""
from __future__ import annotations

import pytest

from fmnist.apps.tune.space import read_toml
from fmnist.core.errors import FmnistError


def test_an_endless_space_file_is_refused_after_a_bounded_read():
    with pytest.raises(FmnistError, match="larger than 1,000,000 bytes"):
        read_toml("/dev/zero")


def test_a_deeply_nested_space_file_is_one_clear_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(FmnistError, match="--space"):
        read_toml(path)


def test_a_binary_space_file_is_one_clear_error(tmp_path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(FmnistError, match="not a readable TOML file"):
        read_toml(path)
