"""Stage 2's gradient bucketer: gradients leave each parameter during backward.

A hook on every parameter (``register_post_accumulate_grad_hook``) copies its gradient into
its bucket's staging buffer and frees ``.grad``. When every parameter of a bucket has
arrived, the bucket is reduce-scattered at once, overlapping the rest of backward; buckets
are launched in one order shared by all ranks (reverse layout order: backward produces the
last layers' gradients first), and a bucket waits for the ones before it. When a reduction
lands, this rank's chunk is added to its gradient shard and the staging buffer is reused.
At the end of backward (an autograd callback) whatever is left is flushed, so gradients of
unused parameters count as zero. Gradient memory per rank: the shard plus ~2 buckets.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..zero_layout import Segment
from .collectives import Collectives, wait

if TYPE_CHECKING:
    from .optimizer import FlatClass

Key = tuple[int, int]  # (class index, bucket index)


class GradientBucketer:
    # Staging buffers are reused across backward passes: fresh bucket-sized allocations
    # cost page faults on every step (measured: +80 ms a step for 21M parameters on CPU).
    # At most POOL per class are kept, so gradient memory stays ~ shard + 2 buckets.
    POOL = 2

    def __init__(
        self, classes: list[FlatClass], params: list[Tensor], collectives: Collectives
    ) -> None:
        self.classes, self.params, self.comm = classes, params, collectives
        self._where: dict[int, tuple[int, int, Segment]] = {}
        self._param_index = {id(p): i for i, p in enumerate(params)}
        self._hooks: list[Any] = []
        for ci, c in enumerate(classes):
            for bi, b in enumerate(c.buckets):
                for seg in b.segments:
                    self._where[seg.index] = (ci, bi, seg)
                    p = params[seg.index]
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        self._order = [(ci, bi) for ci, c in enumerate(classes) for bi in range(len(c.buckets))]
        self._order.reverse()
        self._expected = {
            (ci, bi): len(b.segments)
            for ci, c in enumerate(classes)
            for bi, b in enumerate(c.buckets)
        }
        self._gaps = {  # padding, relative to the bucket's start
            (ci, bi): [(lo - b.start, hi - b.start) for lo, hi in b.gaps()]
            for ci, c in enumerate(classes)
            for bi, b in enumerate(c.buckets)
        }
        self._free: list[list[Tensor]] = [[] for _ in classes]
        self._owned_buffers = [0] * len(classes)
        self.restart()
        self._reset_backward()

    def restart(self) -> None:
        """After a step (or zero_grad): no reduction has landed in any gradient shard."""
        self._fresh = [[True] * len(c.buckets) for c in self.classes]

    def _reset_backward(self) -> None:
        self._remaining = dict(self._expected)
        self._staging: dict[Key, Tensor] = {}  # buckets being filled
        self._arrived: dict[Key, set[int]] = {}
        self._pending: deque[tuple[Key, list[Any], Tensor, Tensor]] = deque()
        self._next = 0
        self._in_backward = False

    def gradients(self) -> list[Tensor]:
        """The summed gradient shards, every class and bucket in layout order, once backward
        is over (shards no backward reached since the last step are zero)."""
        if self._in_backward:  # backward ran without reaching its end callback
            self._end_backward()
        for c, fresh in zip(self.classes, self._fresh, strict=True):
            for g, untouched in zip(c.grad_shards, fresh, strict=True):
                if untouched:
                    g.zero_()
        return [g for c in self.classes for g in c.grad_shards]

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ------------------------------------------------------------ during backward
    def _take_buffer(self, ci: int) -> Tensor:
        c = self.classes[ci]
        free = self._free[ci]
        while not free and self._pending and self._owned_buffers[ci] >= self.POOL:
            self._retire_oldest()
        if free:
            return free.pop()
        self._owned_buffers[ci] += 1
        largest = max(b.numel for b in c.buckets)
        return torch.empty(largest, dtype=c.dtype, device=c.device)

    def _retire_oldest(self) -> None:
        """Wait for the oldest reduction, add it to the gradient shard, free its buffer."""
        (ci, bi), works, out, buffer = self._pending.popleft()
        wait(works)
        with torch.no_grad():
            if self._fresh[ci][bi]:  # the first micro-batch since step(): no zeros to add to
                self.classes[ci].grad_shards[bi].copy_(out)
                self._fresh[ci][bi] = False
            else:
                self.classes[ci].grad_shards[bi].add_(out)
        if self._owned_buffers[ci] <= self.POOL:
            self._free[ci].append(buffer if buffer._base is None else buffer._base)
        else:  # an extra buffer made while the pool was exhausted: let it go
            self._owned_buffers[ci] -= 1

    def _grad_ready(self, p: Tensor) -> None:
        """Copy the gradient into its bucket and free it; send every bucket that is
        complete, in the one order all ranks share."""
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        ci, bi, seg = self._where[self._param_index[id(p)]]
        key = (ci, bi)
        bucket = self.classes[ci].buckets[bi]
        if key not in self._staging:
            # Gradients will overwrite every segment: only the padding needs zeros now
            # (after the last parameter, and between parameters in an aligned layout).
            staging = self._take_buffer(ci)[: bucket.numel]
            for lo, hi in self._gaps[key]:
                staging[lo:hi].zero_()
            self._staging[key] = staging
            self._arrived[key] = set()
        at = seg.offset - bucket.start
        with torch.no_grad():
            self._staging[key][at : at + seg.numel].copy_(p.grad.reshape(-1))
        p.grad = None
        self._arrived[key].add(seg.index)
        self._remaining[key] -= 1
        self._launch(flush=False)

    def _launch(self, flush: bool) -> None:
        while self._next < len(self._order):
            key = self._order[self._next]
            if self._remaining[key] and not flush:
                return
            bucket = self.classes[key[0]].buckets[key[1]]
            staging = self._staging.pop(key, None)
            if staging is None:  # no gradient reached this bucket (unused parameters)
                staging = self._take_buffer(key[0])[: bucket.numel].zero_()
            elif self._remaining[key]:  # some parameters got no gradient: they count as 0
                for seg in bucket.segments:
                    if seg.index not in self._arrived[key]:
                        at = seg.offset - bucket.start
                        staging[at : at + seg.numel].zero_()
            works, out = self.comm.reduce_scatter(staging)
            self._pending.append((key, works, out, staging))
            self._next += 1

    def _end_backward(self) -> None:
        self._launch(flush=True)
        while self._pending:
            self._retire_oldest()
        self._reset_backward()
