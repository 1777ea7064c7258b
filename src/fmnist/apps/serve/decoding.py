"""Decoding uploads in worker processes that can be abandoned: a deadline per image, and no work for clients
that have gone.

:func:`fmnist.core.images.decode_image` bounds the work a decoder may do before it starts (pixels, pixels
times progressive scans, frames, chunks), but a decoder is C code that Python cannot interrupt: what if some
file still makes it run for minutes? Here each upload is decoded and brought to the 28x28 image the model
sees (:func:`prepare`) in a process of its own (``python -m fmnist.apps.serve.decoding``). One that
passes ``timeout`` seconds on an image is killed, and the upload is answered 422; so is one whose request is
cancelled (its client gone). A new process is started at once in its place (it takes about 0.5 s to be
ready). The inference threads never run a decoder, so an upload cannot hold the model's path.

The server has two pools: small images (up to ``--large-image-work`` pixel-passes, what nearly every
upload is) are decoded by ``--decode-workers`` processes at normal priority; the first look at a larger
one's header sends it to one process of lower priority (nice 10), so that ordinary uploads never queue
behind a large one, and large ones get the CPU that the ordinary traffic leaves.

Everything here runs on the event loop; the parent only writes the upload to a pipe and waits for the
answer without a thread (``loop.add_reader``).
"""
from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from fmnist.core.images import Deferred, ImageError

log = logging.getLogger("fmnist.apps.serve")

#: Seconds a new worker may take to start (its deadline per upload counts from when it is ready).
START_TIMEOUT = 60.0


class DecodeTimeout(ImageError):
    status = 422


def prepare(data: bytes, max_pixels: int, max_work: int, max_frames: int, request_pixels: int = 0,
            defer_above: int = 0, pixels_left: int | None = None) -> tuple[np.ndarray, int]:
    """Decode one upload and prepare it: (the uint8 (28, 28) image the model sees, its pixels). What a worker
    runs. ``pixels_left``: what the upload's request may still decode of its ``request_pixels`` (refused with
    413 past it). ``defer_above`` > 0: raise :class:`~fmnist.core.images.Deferred`, without decoding, for
    an image whose work is over it."""
    from fmnist.apps.serve.inference import TRIM_PIXELS, release_memory
    from fmnist.core.images import ImageTooCostly, ImageTooLarge, decode_image
    from fmnist.core.preprocess import to_dataset_format

    limit = max_pixels if pixels_left is None else max(1, min(max_pixels, pixels_left))
    try:
        image = decode_image(data, max_pixels=limit, max_work=max_work, max_frames=max_frames,
                             defer_above=defer_above or None)
    except ImageTooCostly:
        raise
    except ImageTooLarge:
        if limit == max_pixels:
            raise
        raise ImageTooLarge(f"too many pixels in one request: its images pass {request_pixels:,} pixels "
                            "together (the limit per request); send fewer or smaller images per request") from None
    pixels = image.width * image.height
    try:
        return to_dataset_format(image), pixels
    finally:
        image.close()
        del image
        if pixels >= TRIM_PIXELS:
            release_memory()


def _worker() -> None:
    """A worker's loop (``python -m fmnist.apps.serve.decoding``), on its standard input and output: in, the
    pixels its request has left and the upload's length (8 bytes each) and the upload; out, the length of a
    pickled outcome (8 bytes) and the outcome; until its input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops its workers
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    limits = tuple(int(v) for v in sys.argv[1:6])
    niceness = int(sys.argv[6])
    if niceness:
        os.nice(niceness)
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # anything printed goes to the log, not into the answers

    def reply(outcome) -> None:
        data = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
        sink.write(len(data).to_bytes(8, "little") + data)
        sink.flush()

    reply("ready")
    while True:
        head = source.read(16)
        if len(head) < 16:
            return
        left, size = int.from_bytes(head[:8], "little"), int.from_bytes(head[8:], "little")
        data = source.read(size)
        if len(data) < size:
            return
        try:
            outcome = ("ok", *prepare(data, *limits, pixels_left=left))
        except Deferred:
            outcome = ("deferred",)
        except ImageError as e:
            outcome = ("image", e.status, str(e))
        except MemoryError:
            outcome = ("memory",)
        except Exception as e:  # noqa: BLE001 - a bug: the parent logs it and answers 500
            outcome = ("bug", f"{type(e).__name__}: {e}")
        del data
        reply(outcome)


class _Process:
    """One worker process, started at once; ``ready`` once it has said so."""

    def __init__(self, limits, niceness: int = 0):
        import fmnist

        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        src = str(Path(fmnist.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen([sys.executable, "-m", "fmnist.apps.serve.decoding", *map(str, limits), str(niceness)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, bufsize=0)
        self.ready = False

    def send(self, data: bytes, pixels_left: int) -> None:
        pipe = self.process.stdin
        pipe.write(max(0, int(pixels_left)).to_bytes(8, "little") + len(data).to_bytes(8, "little"))
        pipe.write(data)

    def fileno(self) -> int:
        return self.process.stdout.fileno()

    def receive(self):
        """The worker's next outcome (it is in the pipe, or coming); EOFError if the worker died."""
        head = _read_exactly(self.process.stdout, 8)
        return pickle.loads(_read_exactly(self.process.stdout, int.from_bytes(head, "little")))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        for pipe in (self.process.stdin, self.process.stdout):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _read_exactly(pipe, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = pipe.read(size - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


class DecodePool:
    """``workers`` decoding processes, each preparing one upload at a time, with a ``timeout`` per upload.

    ``defer_above`` > 0: images whose work passes it are not decoded (:class:`Deferred`, for another pool);
    ``niceness``: the workers' scheduling priority, lowered by that much."""

    def __init__(self, workers: int, timeout: float, max_pixels: int, max_work: int, max_frames: int,
                 request_pixels: int, defer_above: int = 0, niceness: int = 0):
        self.workers = workers
        self.timeout = timeout
        self.limits = (max_pixels, max_work, max_frames, request_pixels, defer_above)
        self.niceness = niceness
        self._idle: list[_Process] = []
        self._free = asyncio.Semaphore(workers)
        self._all: set[_Process] = set()
        self.killed = 0  # workers killed past their deadline or for a client gone (for tests and logs)
        self.sent = 0  # uploads handed to a worker (for tests and logs)

    def start(self) -> None:
        """Start the workers now (they get ready meanwhile; else they start on first use)."""
        while len(self._all) < self.workers:
            self._idle.append(self._spawn())

    def _spawn(self) -> _Process:
        proc = _Process(self.limits, self.niceness)
        self._all.add(proc)
        return proc

    def _discard(self, proc: _Process, replace: bool = True) -> None:
        """Kill a worker; ``replace``: start its successor now, so that it is ready sooner."""
        self._all.discard(proc)
        proc.kill()
        if replace and len(self._all) < self.workers:
            self._idle.append(self._spawn())

    async def prepare(self, data: bytes, pixels_left: int) -> tuple[np.ndarray, int]:
        """(28x28 image, its pixels) of one upload; raises its ImageError (DecodeTimeout past the deadline),
        MemoryError, or RuntimeError for a bug in the worker."""
        async with self._free:
            proc = self._idle.pop() if self._idle else self._spawn()
            keep = False
            try:
                try:
                    await self._until_ready(proc)
                    self._send(proc, data, pixels_left)
                except (OSError, ValueError, EOFError):  # the worker had died (killed from outside?): a new one
                    self._discard(proc, replace=False)
                    proc = self._spawn()
                    await self._until_ready(proc)
                    self._send(proc, data, pixels_left)
                self.sent += 1
                outcome = await self._answer(proc, self.timeout)
                keep = True
            except asyncio.TimeoutError:
                self.killed += 1
                log.warning("decoding an upload took over %g s: worker killed", self.timeout)
                raise DecodeTimeout(f"the image took too long to decode (over {self.timeout:g} s, the limit); "
                                    "please upload a smaller or plainer image") from None
            except asyncio.CancelledError:  # the client has gone: its decoding stops too
                self.killed += 1
                raise
            finally:
                if keep:
                    self._idle.append(proc)
                else:
                    self._discard(proc)
        kind = outcome[0]
        if kind == "ok":
            return outcome[1], outcome[2]
        if kind == "deferred":
            raise Deferred(0)
        if kind == "image":
            error = ImageError(outcome[2])
            error.status = outcome[1]
            raise error
        if kind == "memory":
            raise MemoryError
        raise RuntimeError(f"decoding worker failed: {outcome[1]}")

    @staticmethod
    def _send(proc: _Process, data: bytes, pixels_left: int) -> None:
        proc.send(data, pixels_left)

    async def _until_ready(self, proc: _Process) -> None:
        if not proc.ready:
            try:
                await self._readable(proc, START_TIMEOUT)
            except asyncio.TimeoutError:
                raise OSError("a decoding worker did not start") from None
            proc.receive()  # "ready"
            proc.ready = True

    @staticmethod
    async def _readable(proc: _Process, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = proc.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(fd)

    async def _answer(self, proc: _Process, timeout: float):
        await self._readable(proc, timeout)
        try:
            return proc.receive()
        except (EOFError, OSError):  # the worker died on this upload (the kernel's OOM killer, a crash)
            raise MemoryError from None

    def close(self) -> None:
        for proc in list(self._all):
            self._discard(proc, replace=False)
        self._idle.clear()


if __name__ == "__main__":
    _worker()
