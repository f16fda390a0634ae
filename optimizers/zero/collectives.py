"""The collectives of ZeRO, as ranks see them: who sends what to whom.

Every communication region is one bucket of a flat buffer, laid out by ``zero_layout`` as
``world_size`` equal chunks; rank r owns chunk r. Three operations move data:

- **reduce-scatter** (gradients, stages 1 and 2): every rank sends its chunk c of the bucket
  towards rank c; rank c ends with the sum over ranks of chunk c. Nobody else keeps a sum.
- **all-gather** (parameters, after the step): rank r sends its updated chunk r to every
  rank; every rank ends with the whole bucket.
- **all-reduce** (gradients, stage 0; scalars such as the squared gradient norm): every
  rank ends with the sum of the whole tensor.

On NCCL (and other backends with native ``reduce_scatter_tensor`` /
``all_gather_into_tensor``, in every torch since 2.0) each is one call. On gloo those two
are emulated and measured several times slower than its ``reduce`` and ``broadcast``
(bench/zero.py), so on gloo a reduce-scatter is one ``reduce`` per chunk to its owner and
an all-gather one ``broadcast`` per chunk from its owner: the same bytes on the wire, in
``world_size`` calls. Every call is asynchronous and
returns the works to wait on; calls are issued in the same order on every rank (the order
of buckets in the layout), which is what keeps collectives from deadlocking.
"""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


class Collectives:
    """The data-parallel group's reduce-scatter, all-gather and all-reduce over buckets.

    Every method is a collective: call it on all ranks of the group, in the same order."""

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self.native = dist.get_backend(process_group) != "gloo"
        # torch.distributed addresses sources and destinations by global rank.
        self.global_ranks = [
            dist.get_global_rank(process_group, r) if process_group is not None else r
            for r in range(self.world_size)
        ]

    def reduce_scatter(self, region: Tensor) -> tuple[list[Any], Tensor]:
        """Start summing ``region`` (one bucket: world_size chunks) over ranks into this
        rank's chunk; ``region`` may be overwritten. Returns the works to wait for and the
        tensor that then holds this rank's sum. A collective: call it on all ranks."""
        if self.native:
            out = torch.empty(
                region.numel() // self.world_size, dtype=region.dtype, device=region.device
            )
            work = dist.reduce_scatter_tensor(out, region, group=self.group, async_op=True)
            return [work], out
        chunks = region.chunk(self.world_size)
        works = [
            dist.reduce(chunk, dst=self.global_ranks[r], group=self.group, async_op=True)
            for r, chunk in enumerate(chunks)
        ]
        return works, chunks[self.rank]

    def all_gather(self, region: Tensor) -> list[Any]:
        """Start filling every rank's chunk of ``region`` from its owner (this rank's chunk
        already holds its values). Returns the works to wait for. A collective: call it on
        all ranks."""
        chunks = region.chunk(self.world_size)
        if self.native:
            mine = chunks[self.rank].clone()
            return [dist.all_gather_into_tensor(region, mine, group=self.group, async_op=True)]
        return [
            dist.broadcast(chunk, src=self.global_ranks[r], group=self.group, async_op=True)
            for r, chunk in enumerate(chunks)
        ]

    def all_reduce(self, tensor: Tensor, async_op: bool = False) -> Any:
        """Sum ``tensor`` over ranks, in place. A collective: call it on all ranks."""
        return dist.all_reduce(tensor, group=self.group, async_op=async_op)

    def broadcast_from_first(self, tensor: Tensor) -> None:
        """Every rank gets the group's first rank's ``tensor`` (start from the same
        parameters, as DDP does). A collective: call it on all ranks."""
        dist.broadcast(tensor, src=self.global_ranks[0], group=self.group)

    def barrier(self) -> None:
        """Return once every rank has called it. A collective: call it on all ranks."""
        dist.barrier(group=self.group)


def wait(works: list[Any]) -> None:
    for work in works:
        work.wait()


def end_process_group() -> None:
    """Destroy the default process group in a process that is about to exit.

    Garbage is collected first. Otherwise the interpreter's last collection, at exit, can
    free the Python side of a tensor that a finished gloo work still holds; the gloo
    thread that then releases it must take the GIL of a finalizing interpreter, which ends
    the thread inside C++ and aborts the process (SIGABRT, "terminate called without an
    active exception") after its work is done. Measured on torch 2.13, two-rank runs of
    ZeroOptimizer's misuse scenario: 3 of 20 and 5 of 30 aborted at exit without this,
    0 of 30 with it."""
    gc.collect()
    dist.destroy_process_group()
