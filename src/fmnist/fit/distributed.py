"""Data-parallel training under ``torchrun``: one model trained by several processes, one per core or GPU.

``torchrun`` starts the processes and says where each sits through the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); :func:`session` reads it, joins the process group (gloo on CPU, nccl on
CUDA) and leaves it at the end, errors included. Without those variables everything here is a no-op and the
training loop runs as one process, exactly as before.

How the loop shares the work (:mod:`fmnist.fit.train` calls these hooks):

- every rank shuffles with the same generator, so all see the same permutation, and takes a contiguous,
  equal share of each global batch (:func:`share`): the batch size and learning rate mean what they mean in
  one process. DistributedDataParallel averages the gradients, and each rank's loss is the mean over its own
  share, so equal shares make the step the one of the whole batch. A batch that does not split evenly (the
  last one of an epoch) drops its last ``len % world_size`` images; the global batch size itself must be a
  multiple of the number of processes (:func:`check`).
- augmentation and dropout draw from generators seeded from (run seed, rank, epoch) at the start of each
  epoch (:func:`reseed`): every rank draws differently, and a resumed run draws what it would have drawn,
  whatever was saved, so ``last.pt`` needs no per-rank state and a run may resume on another world size.
- BatchNorm's running statistics are averaged over the ranks at the end of each epoch
  (:func:`average_buffers`; SyncBatchNorm does not run on CPU), before rank 0 validates.
- whatever depends on the clock (the time budget's stop and its learning-rate progress) or on validation
  (early stopping, the caller's stop) is rank 0's decision, broadcast (:func:`agree`), so no rank waits in a
  collective that another has left.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from inspect import signature

import torch
import torch.distributed as dist

from fmnist.core.errors import InputError


@dataclass(frozen=True)
class Context:
    """Where this process sits in a run: one process, or one rank of several. Only the main process writes."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


ONE_PROCESS = Context()


def context_from_env(env=os.environ) -> Context:
    """The context torchrun's variables describe; a plain process (no ``RANK``/``WORLD_SIZE``) is rank 0 of 1."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return ONE_PROCESS
    try:
        ctx = Context(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                      int(env.get("LOCAL_WORLD_SIZE", 1)))
    except ValueError:
        raise InputError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers") from None
    if not 0 <= ctx.rank < ctx.world_size:
        raise InputError(f"RANK {ctx.rank} is outside WORLD_SIZE {ctx.world_size}")
    return ctx


@contextmanager
def session(device: str = "auto"):
    """Join the process group torchrun describes for the length of the block; yield the :class:`Context`.

    ``device`` is the run's device setting: CUDA gets nccl and this process's GPU (``cuda:LOCAL_RANK``),
    the CPU gets gloo."""
    from fmnist.fit.runtime import pick_device

    ctx = context_from_env()
    if ctx.world_size == 1 or dist.is_initialized():
        yield ctx
        return
    cuda = pick_device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=ctx.rank, world_size=ctx.world_size)
    try:
        yield ctx
        # Leave together: rank 0 still runs the trust fit when the others are done, and a process that tears
        # its gloo connections down while a peer is still attached was seen to abort ("terminate called").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check(batch_size: int, ctx: Context) -> None:
    if batch_size % ctx.world_size:
        raise InputError(f"--batch-size {batch_size} is the global batch: it must be a multiple of the "
                         f"{ctx.world_size} processes, so that each takes an equal share")


def place(device: torch.device, ctx: Context) -> torch.device:
    """This process's device: its own GPU (``cuda:LOCAL_RANK``) when several share a machine's GPUs."""
    if ctx.world_size > 1 and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def default_threads(ctx: Context) -> int | None:
    """Threads per process when not set: the machine's physical cores split between its processes."""
    from fmnist.fit.runtime import physical_cores

    return None if ctx.world_size == 1 else max(1, physical_cores() // max(1, ctx.local_world_size))


def wrap(model: torch.nn.Module, ctx: Context, device: torch.device):
    """The DistributedDataParallel wrapper the training steps run through, or None in one process.

    Buffers are not copied from rank 0 at each forward pass (only once, here, as the weights are): each rank
    keeps its own BatchNorm statistics and :func:`average_buffers` merges them once an epoch."""
    if ctx.world_size == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers; the older name still works there, with a warning.
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in signature(DistributedDataParallel).parameters
               else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=ids, **no_sync)


def share(idx: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's contiguous, equal share of a global batch; a remainder of fewer images than ranks is dropped."""
    if ctx.world_size == 1:
        return idx
    n = len(idx) // ctx.world_size
    return idx[ctx.rank * n:(ctx.rank + 1) * n]


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """A 63-bit seed for (run seed, rank, epoch), unrelated between neighbouring values."""
    digest = hashlib.sha256(f"fmnist:{seed}:{rank}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def reseed(seed: int, ctx: Context, epoch: int) -> torch.Generator:
    """Seed the global RNG (dropout) and return a new augmentation generator, both for this rank and epoch."""
    torch.manual_seed(rank_seed(seed, ctx.rank, epoch))
    return torch.Generator().manual_seed(rank_seed(seed, ctx.rank, epoch) ^ 1)


def _comm_device() -> torch.device:
    # nccl moves only CUDA tensors; gloo moves CPU tensors.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree(ctx: Context, value: float) -> float:
    """Rank 0's value on every rank (a clock reading, a stop decision)."""
    if ctx.world_size == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, src=0)
    return t.item()


def sum_over_ranks(ctx: Context, values: list[float]) -> list[float]:
    """Each value summed over the ranks (the epoch's training loss, correct answers and images seen)."""
    if ctx.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def average_buffers(ctx: Context, *models: torch.nn.Module | None) -> None:
    """Average the floating-point buffers (BatchNorm running mean and variance) over the ranks.

    The mean of the ranks' variances leaves out how far their means are apart; over shares of the same
    shuffled data that is negligible. ``num_batches_tracked`` is an integer, the same on every rank, and kept."""
    if ctx.world_size == 1:
        return
    for model in models:
        if model is None:
            continue
        for b in model.buffers():
            if b.is_floating_point():
                dist.all_reduce(b)
                b.div_(ctx.world_size)
