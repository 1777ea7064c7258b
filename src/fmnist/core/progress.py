"""Progress of the phases that take more than a few seconds: a tqdm bar on a terminal, plain lines elsewhere.

On a terminal (stderr is a TTY) a phase shows a tqdm bar with its rate and the time left. When stderr is not a
terminal (a log file, CI, a pipe) there are no bars, which would fill a log with carriage returns: a phase prints
a plain line when it starts and then one every ``every`` seconds (``plain=False``: none, for a phase that prints
lines of its own, as training does once per epoch). No PyTorch here: ``predict`` and ``serve`` run without it.
"""
from __future__ import annotations

import sys
import time


def interactive() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


class Bar:
    """One phase: ``update(n, **postfix)`` as work is done, ``close()`` (or a ``with`` block) at the end.

    ``enabled``: None = a bar only on a terminal; False = nothing at all (quiet callers, other ranks)."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool | None = None,
                 plain: bool = True, every: float = 10.0, leave: bool = False):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.postfix, self.started = 0, {}, time.monotonic()
        self.last_line = self.started
        self.bar = None
        self.plain = False
        if enabled is False:
            return
        if enabled or interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit != "it", leave=leave,
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.25)
        elif plain:
            self.plain = True
            print(f"{desc}: started" + (f" ({total:,} {unit})" if total else ""), file=sys.stderr, flush=True)

    @property
    def enabled(self) -> bool:
        """Whether someone watches a bar (callers skip the work of a postfix otherwise)."""
        return self.bar is not None

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        if postfix:
            self.postfix = postfix
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.plain and time.monotonic() - self.last_line >= self.every:
            self.last_line = time.monotonic()
            print(self._line(), file=sys.stderr, flush=True)

    def _line(self) -> str:
        seconds = time.monotonic() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        text = f"{self.desc}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"
        text += f", {rate:,.0f} {self.unit}/s"
        if self.total and rate > 0:
            text += f", {max(self.total - self.done, 0) / rate:.0f} s left"
        if self.postfix:
            text += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.plain:
            self.plain = False
            print(f"{self.desc}: done in {time.monotonic() - self.started:.1f} s", file=sys.stderr, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def track(iterable, desc: str, total: int | None = None, unit: str = "it", enabled: bool | None = None,
          plain: bool = True):
    """Iterate with a :class:`Bar` (closed when the loop ends, however it ends)."""
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    with Bar(total, desc, unit, enabled=enabled, plain=plain) as bar:
        for item in iterable:
            yield item
            bar.update(1)
