"""Data-parallel training over processes started by torchrun, with PyTorch's DistributedDataParallel.

Every rank draws the same global batch for a step (a task's `train_inputs(step)` is a pure
function of the step) and trains on its own contiguous slice of it; DDP averages the gradients,
so each update is the one-process update at the same global batch (every loss is a batch mean,
and the L2 term, added on every rank, survives the averaging unchanged). Only rank 0 writes.

`Solo` is the one-process stand-in with the same methods, so the engine has no special cases.
"""

from __future__ import annotations

import gc
import os
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cifarlab import CifarlabError, counted
from cifarlab.config import Config

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Rank 0 evaluates and writes checkpoints while the others wait in their next collective.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)

T = TypeVar("T")


class Solo:
    """One process: nothing to shard, reduce or wait for."""

    rank, world_size, is_main, distributed = 0, 1, True, False

    def __init__(self, device: torch.device):
        self.device = device

    def shard(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return inputs

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def gather(self, obj) -> list:
        return [obj]

    def wrap(self, task) -> Callable:
        return task.train_loss

    def on_main(self, fn: Callable[[], T]) -> T:
        return fn()

    def main_first(self):
        return nullcontext()


class _TrainForward(nn.Module):
    """A task's training loss as a module whose forward DDP can wrap: DDP must see the forward
    that uses the parameters, and the tasks call their model (or its stages) inside train_loss."""

    def __init__(self, task):
        super().__init__()
        self.model = task.model  # registers the parameters; the task keeps its plain model
        self.task = task

    def forward(self, *inputs: torch.Tensor):
        return self.task.train_loss(*inputs)


class Distributed(Solo):
    """This process's place in a torchrun job; the process group is already initialised."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        super().__init__(device)
        self.rank, self.world_size, self.is_main, self.distributed = rank, world_size, rank == 0, True

    def shard(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's contiguous rows of every input: rows r*B/W to (r+1)*B/W."""
        out = []
        for t in inputs:
            if t.shape[0] % self.world_size:
                raise CifarlabError(
                    f"a training input has {t.shape[0]} rows, which {self.world_size} processes cannot share evenly"
                )
            per = t.shape[0] // self.world_size
            out.append(t[self.rank * per:(self.rank + 1) * per])
        return tuple(out)

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def wrap(self, task) -> Callable:
        """The task's train_loss run through DDP. DDP fixes its parameters when built, so the
        engine wraps anew whenever more parameters start training."""
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(_TrainForward(task), device_ids=device_ids)

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0 only; every rank gets its result, or raises its error."""
        if not self.is_main:
            return self._receive()
        try:
            value = fn()
        except Exception as err:
            self._publish(("error", _one_line(err)))
            raise
        self._publish(("ok", value))
        return value

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (downloads, caches), then the others, which find them;
        if it fails on rank 0, every rank raises its error instead of waiting."""
        if not self.is_main:
            self._receive()
            yield
            return
        try:
            yield
        except Exception as err:
            self._publish(("error", _one_line(err)))
            raise
        self._publish(("ok", None))

    def _publish(self, outcome: tuple) -> None:
        dist.broadcast_object_list([outcome], src=0)

    def _receive(self):
        box = [None]
        dist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise CifarlabError(value)
        return value


def _one_line(err: Exception) -> str:
    return str(err) if isinstance(err, CifarlabError) else f"rank 0 failed: {err!r}"


def _torchrun_env() -> tuple[int, int, int]:
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise CifarlabError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing); "
            f"launch with: torchrun --nproc-per-node N -m cifarlab train STUDY --distributed ..."
        )
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    except ValueError:
        raise CifarlabError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, as torchrun sets them") from None


def _rank_device(requested: str, local_rank: int) -> str:
    """cuda:LOCAL_RANK on a GPU machine (or with --device cuda), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if requested not in ("auto", "cuda"):
        raise CifarlabError(
            f"--device {requested}: with --distributed each process uses the GPU of its LOCAL_RANK; "
            f"pass --device cuda (or auto)"
        )
    if torch.cuda.is_available() and local_rank >= torch.cuda.device_count():
        raise CifarlabError(
            f"LOCAL_RANK {local_rank} but torch sees {counted(torch.cuda.device_count(), 'GPU')}; "
            f"start at most that many processes per node"
        )
    return f"cuda:{local_rank}"


@contextmanager
def launch(cfg: Config) -> Iterator[Solo]:
    """This process's part in training: `Solo` on its device, or with cfg.distributed a joined
    torchrun process group (nccl on CUDA, gloo on the CPU), destroyed again on the way out."""
    from cifarlab.engine import resolve_device

    if not cfg.distributed:
        yield Solo(resolve_device(cfg.device))
        return
    rank, world_size, local_rank = _torchrun_env()
    if cfg.batch_size % world_size:
        raise CifarlabError(
            f"--batch-size {cfg.batch_size} cannot be split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    device = resolve_device(_rank_device(cfg.device, local_rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Distributed(rank, world_size, device)
        # What still holds the process group goes first (a DDP wrapper replaced when the backbone
        # unfroze sits in a reference cycle): left to the interpreter's exit, its teardown after
        # the group's was seen to abort a rank ("terminate called without an active exception").
        gc.collect()
        # All ranks reach the end before any tears its connections down (a rank whose peer had
        # already left aborted the same way). Not after an error: the others may never come.
        dist.barrier()
    finally:
        dist.destroy_process_group()
