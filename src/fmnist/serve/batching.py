"""Micro-batching: requests that arrive while the model is busy are served together by its next call.

A model call on a 28x28 image costs mostly fixed overhead (Python, layer dispatch), so 16 images cost little
more than one. Nothing waits for a batch to fill: an idle worker takes whatever is queued at once, alone if
need be, so a lone request pays no extra latency; under load, batches form by themselves while the workers
are busy. Everything here runs on the event loop (plain lists, no locks); the work itself runs on
``workers`` threads.
"""
from __future__ import annotations

import asyncio
import functools

import anyio

from fmnist.serve import inference


class Batcher:
    def __init__(self, predictor, max_pixels: int, workers: int = 1, max_images: int = 64):
        self.predictor = predictor
        self.max_pixels = max_pixels
        self.workers = workers
        self.max_images = max_images  # per model call; a bigger single request still goes alone
        self.limiter = anyio.CapacityLimiter(workers)
        self._queue: list[tuple[list[tuple[str, bytes]], asyncio.Future]] = []
        self._running = 0

    async def submit(self, uploads: list[tuple[str, bytes]]) -> list[dict]:
        """The API results for one request's uploads; raises its :class:`~inference.UploadError`."""
        future = asyncio.get_running_loop().create_future()
        self._queue.append((uploads, future))
        if self._running < self.workers:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        outcome = await future
        if isinstance(outcome, inference.UploadError):
            raise outcome
        return outcome

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._take()
                job = functools.partial(inference.run_batch, self.predictor, [u for u, _ in batch], self.max_pixels)
                try:
                    outcomes = await anyio.to_thread.run_sync(job, limiter=self.limiter)
                except Exception as e:  # noqa: BLE001 - a bug must fail these requests, not the worker
                    outcomes = [e] * len(batch)
                for (_, future), outcome in zip(batch, outcomes):
                    if future.done():  # the client went away
                        continue
                    if isinstance(outcome, Exception) and not isinstance(outcome, inference.UploadError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._running -= 1

    def _take(self) -> list:
        """The oldest requests, up to ``max_images`` images in all (at least one request)."""
        count, n = 0, 0
        for uploads, _ in self._queue:
            if n and count + len(uploads) > self.max_images:
                break
            count += len(uploads)
            n += 1
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch
