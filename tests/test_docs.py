"""The docs cannot go stale: every `fmnist COMMAND --flag` that README.md and docs/*.md show is a flag of that
command, every command they name exists, and every relative link or image points at a file of the checkout."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from fmnist.apps.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
# `fmnist CMD` then the rest of its command line: up to a shell separator, a comment, or the end of the span
COMMAND = re.compile(r"(?<![\w./-])fmnist((?:\s+--[a-z][\w-]*)*)\s+([a-z][a-z-]+)\b([^`|;&#\n]*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")


def _commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    top = set(parser._option_string_actions)
    return top, {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def _spans(text: str):
    """Code the page shows: fenced blocks, line by line (a trailing backslash joins the next line), and inline
    code spans."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S):
        yield from block.replace("\\\n", " ").splitlines()
    yield from re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))


def _mentions():
    for page in PAGES:
        for span in _spans(page.read_text(encoding="utf-8")):
            for m in COMMAND.finditer(span):
                yield page.relative_to(ROOT), m.group(1), m.group(2), m.group(3)


WORDS = {"grew", "is", "was", "does", "and", "the", "fmnist", "itself", "developers", "project"}  # prose, not commands


def test_every_documented_flag_exists():
    top, commands = _commands()
    bad, seen = [], 0
    for page, before, command, rest in _mentions():
        if command in WORDS and command not in commands:
            continue
        seen += 1
        bad += [f"{page}: fmnist {flag}" for flag in FLAG.findall(before) if flag not in top]
        if command not in commands:
            bad.append(f"{page}: fmnist {command} (no such command)")
            continue
        bad += [f"{page}: fmnist {command} {flag}" for flag in FLAG.findall(rest) if flag not in commands[command]]
    assert seen > 50, "the docs show fewer commands than expected: is the pattern still right?"
    assert bad == [], "flags or commands the docs show but fmnist lacks:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    text = page.read_text(encoding="utf-8")
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        if not path.exists():
            missing.append(target)
    assert missing == []


def test_readme_is_short_and_keeps_the_two_commands():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "bash scripts/setup.sh && .venv/bin/fmnist train && .venv/bin/fmnist evaluate runs/latest\n" in text
    assert "bash scripts/setup.sh --dev && .venv/bin/python -m pytest\n" in text
    for page in PAGES:
        assert "this round" not in page.read_text(encoding="utf-8").lower(), page
