import contextlib
import dataclasses
import datetime
import faulthandler
import os
import socket
from typing import Any, Callable, Iterator, Optional

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec import KeyedJaggedTensor
from torchrec.streamable import Pipelineable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _gloo_group(rank: int, world: int, port: int, timeout_s: Optional[float] = None) -> Iterator[None]:
    """A real gloo default group of ``world`` ranks for the block, with torchrun's environment
    variables set (the trainer and DMP read them), destroyed after it."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world)
    )
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    dist.init_process_group("gloo", rank=rank, world_size=world, **timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _gloo_rank(rank: int, world: int, port: int, body: Callable[..., None], args: tuple, timeout_s: Optional[float]) -> None:
    """One spawned rank: ``body(rank, world, *args)`` in the ranks' gloo group. faulthandler is on,
    so a native abort (SIGABRT, SIGSEGV) prints every thread's Python stack to the test's output
    instead of dying silently."""
    faulthandler.enable(all_threads=True)
    with _gloo_group(rank, world, port, timeout_s):
        body(rank, world, *args)


def run_ranks(body: Callable[..., None], world: int, *args: Any, timeout_s: Optional[float] = None) -> None:
    """Runs ``body(rank, world, *args)`` (a module-level function) on ``world`` spawned processes
    joined by a real gloo process group; raises if any rank fails."""
    mp.start_processes(_gloo_rank, args=(world, free_port(), body, args, timeout_s), nprocs=world, start_method="spawn")


@pytest.fixture
def single_rank_pg() -> Iterator[None]:
    """A real world-size-1 gloo process group, as DistributedModelParallel needs."""
    with _gloo_group(0, 1, free_port()):
        yield


def local_part(kjt: KeyedJaggedTensor, rank: int, world: int) -> KeyedJaggedTensor:
    """Rank ``rank``'s contiguous 1/world of the samples of a global-batch KJT."""
    n = kjt.stride() // world
    lo, hi = rank * n, (rank + 1) * n
    lengths, values = [], []
    for key in kjt.keys():
        jt = kjt[key]
        offsets = jt.offsets()
        lengths.append(jt.lengths()[lo:hi])
        values.append(jt.values()[offsets[lo] : offsets[hi]])
    return KeyedJaggedTensor(keys=kjt.keys(), values=torch.cat(values), lengths=torch.cat(lengths))


class FieldsBatch(Pipelineable):
    """Base of a dataclass batch for TrainPipelineSparseDist: ``to`` and ``record_stream`` act on
    every field (tensors and KJTs)."""

    def to(self, device: torch.device, non_blocking: bool = False) -> Any:
        return type(self)(*(getattr(self, f.name).to(device=device, non_blocking=non_blocking) for f in dataclasses.fields(self)))

    def record_stream(self, stream: torch.Stream) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).record_stream(stream)
