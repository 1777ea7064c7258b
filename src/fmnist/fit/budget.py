"""A wall-clock budget for a training run: how long the steps may take so that the whole run fits.

A run's budget pays for its training steps, its validation passes and, after training, a *reserve*: what the
caller will spend next (the trust fit, :func:`fmnist.fit.trust.fit.cost_seconds`). The steps may use what is left
once the last validation and the reserve are paid for. Both costs are predicted from the first steps on (a
forward pass costs about a third of a training step per image), so the learning-rate schedule, which runs on
the fraction of this spendable time used, never jumps.
"""
from __future__ import annotations

import time
from collections.abc import Callable


class TimeBudget:
    def __init__(self, seconds: float, val_images: int, tta: bool, reserve: Callable[[float], float],
                 elapsed_before: float = 0.0):
        """``seconds``: 0 means no budget; ``reserve(validation_seconds)``: seconds kept for after training;
        ``elapsed_before``: time already spent before an interruption (``--resume``)."""
        self.seconds = seconds
        self.val_images, self.tta, self.reserve = val_images, tta, reserve
        self.t0 = time.monotonic() - elapsed_before
        self.val_seconds = 0.0  # the latest validation pass's duration
        self.step_seconds, self.step_images = 0.0, 0  # training time and images of this process

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note_step(self, seconds: float, images: int) -> None:
        self.step_seconds += seconds
        self.step_images += images

    def note_validation(self, seconds: float) -> None:
        self.val_seconds = seconds

    def validation_cost(self) -> float:
        if self.val_seconds or not self.step_images:
            return self.val_seconds
        # Before the first validation: a forward pass costs about a third of a training step per image.
        return self.val_images * (2 if self.tta else 1) * self.step_seconds / self.step_images / 3

    def spendable(self) -> float:
        """Seconds the steps may use: the rest pays for the last validation pass and the reserve."""
        if not self.val_images:
            return self.seconds
        v = self.validation_cost()
        return max(self.seconds - (v + self.reserve(v)), 0.5 * self.seconds)

    def progress(self) -> float:
        """Fraction of the spendable time used (the schedule's clock)."""
        return self.elapsed() / self.spendable()

    def spent(self) -> bool:
        return bool(self.seconds) and self.elapsed() >= self.spendable()
