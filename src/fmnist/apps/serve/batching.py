"""Micro-batching: requests whose images are ready while the model is busy are served together by its next call.

A model call on a 28x28 image costs mostly fixed overhead (Python, layer dispatch), so 16 images cost little
more than one. Nothing waits for a batch to fill: an idle worker takes whatever is queued at once, alone if
need be, so a lone request pays no extra latency; under load, batches form by themselves while the workers
are busy.

Each upload is decoded and prepared as a job of its own on the same ``workers`` threads, which take jobs in
order of arrival: a request with 32 large images takes its turns one image at a time, so a small upload that
arrives behind it waits for at most one of them, not for all. Everything here runs on the event loop (plain
lists, no locks); the work itself runs on the threads.
"""
from __future__ import annotations

import asyncio
import functools
import logging

import anyio

from fmnist.apps.serve import inference
from fmnist.core.images import Deferred

log = logging.getLogger("fmnist.apps.serve")


class Batcher:
    def __init__(self, predictor, max_pixels: int, workers: int = 1, max_images: int = 64, decoder=None,
                 large_decoder=None, max_request_pixels: int | None = None, max_decode_work: int | None = None,
                 max_frames: int | None = None):
        self.predictor = predictor
        self.max_pixels = max_pixels
        self.decoder = decoder  # a DecodePool (decoding in worker processes, with a deadline), or None
        self.large_decoder = large_decoder  # the pool for the images the first one defers
        self.max_request_pixels = max_request_pixels
        self.limits = {k: v for k, v in (("max_work", max_decode_work), ("max_frames", max_frames)) if v}
        self.workers = workers
        self.max_images = max_images  # per model call; a bigger single request still goes alone
        # A job first waits its turn here (FIFO: in the order jobs were queued), then runs on a thread.
        self.limiter = anyio.CapacityLimiter(workers)
        self._threads = anyio.CapacityLimiter(workers)
        self._queue: list[tuple[list, asyncio.Future]] = []
        self._tasks: set = set()
        self._running = 0

    async def submit(self, uploads: list[tuple[str, bytes]]) -> list[dict]:
        """The API results for one request's (name, bytes) uploads; raises its :class:`~inference.UploadError`
        (that of its first upload that fails, naming it when there are several)."""
        images = []
        left = self.max_request_pixels
        for i, (name, data) in enumerate(uploads):
            try:
                if self.decoder is not None:
                    budget = left if left is not None else 1 << 62
                    try:
                        image, pixels = await self.decoder.prepare(data, budget)
                    except Deferred:  # a large image: to the low-priority process
                        image, pixels = await self.large_decoder.prepare(data, budget)
                    images.append(image)
                    if left is not None:
                        left -= pixels
                    continue
                async with self.limiter:
                    job = functools.partial(inference.prepare_upload, self.predictor, data, self.max_pixels,
                                            **self.limits)
                    images.append(await anyio.to_thread.run_sync(job, limiter=self._threads))
            except Exception as e:  # noqa: BLE001 - inference.upload_error sorts the upload's faults from bugs
                raise inference.upload_error(e, name, many=len(uploads) > 1, index=i) from None
        outcome = await self._classify(images)
        if isinstance(outcome, inference.UploadError):
            raise outcome
        return outcome

    async def _classify(self, images: list):
        future = asyncio.get_running_loop().create_future()
        self._queue.append((images, future))
        if self._running < self.workers:
            self._running += 1
            # The event loop keeps only a weak reference to a task: hold it until it is done.
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                async with self.limiter:  # the batch is taken once a worker is free: all queued by then
                    batch = self._take()
                    if not batch:  # another worker took them meanwhile
                        continue
                    job = functools.partial(inference.classify_batch, self.predictor, [i for i, _ in batch])
                    try:
                        outcomes = await anyio.to_thread.run_sync(job, limiter=self._threads)
                    except Exception as e:  # noqa: BLE001 - classify_batch isolates failures; a last resort
                        log.error("error in a model batch", exc_info=e)
                        outcomes = [inference.UploadError(500, inference.INTERNAL_ERROR)] * len(batch)
                for (_, future), outcome in zip(batch, outcomes):
                    if not future.done():  # else the client went away
                        future.set_result(outcome)
        finally:
            self._running -= 1

    def _take(self) -> list:
        """The oldest requests, up to ``max_images`` images in all (at least one request)."""
        count, n = 0, 0
        for images, _ in self._queue:
            if n and count + len(images) > self.max_images:
                break
            count += len(images)
            n += 1
        batch, self._queue = self._queue[:n], self._queue[n:]
        return batch
