"""ZeroOptimizer: ZeRO-1/2 sharded optimizer state over torch.distributed.

Stage 0 is plain data parallelism (gradients all-reduced, a full optimizer on every rank).
Stage 1 keeps the optimizer state (and fp32 master weights of bf16/fp16 parameters) only for
the slice of parameters a rank owns: gradients accumulate locally and are reduce-scattered at
``step()``; the updated slices are all-gathered back into the parameters. Stage 2 also shards
the gradients: each bucket is reduce-scattered during backward as soon as its gradients are
ready, and only the owned slice is kept. Layout arithmetic lives in ``zero_layout``.

Per rank, with N ranks, P parameters, S bytes of optimizer state per parameter and
B bytes per parameter element (the parameter dtype):

| stage | communication per step | gradient memory | state memory |
| --- | --- | --- | --- |
| 0 | all-reduce (2 P B) | P B | P S |
| 1 | reduce-scatter + all-gather (2 P B) | P B | P S / N |
| 2 | reduce-scatter per micro-batch + all-gather | ~ (P / N + 2 buckets) B | P S / N |
"""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .lamb import LAMB
from .lookahead import Lookahead
from .registry import OptimizerSpec, create_optimizer, param_groups_weight_decay
from .zero_layout import Bucket, Segment, plan_buckets

_CHECKPOINT_VERSION = 1


@dataclass
class _FlatClass:
    """Parameters of one (dtype, device, param group): their flat buffers and this rank's
    shards, one shard per bucket."""

    group: int
    dtype: torch.dtype
    device: torch.device
    indices: list[int]
    buckets: list[Bucket]
    flat_param: Tensor
    flat_grad: Tensor | None = None  # stages 0 and 1: p.grad are views into it
    shards: list[Tensor] = field(default_factory=list)  # what the inner optimizer steps
    grad_shards: list[Tensor] = field(default_factory=list)  # their (reduced) gradients
    seg_ids: list[Tensor] = field(default_factory=list)  # per shard element: param index


class ZeroOptimizer(Optimizer):
    """Shards any registry optimizer's state (and, at stage 2, the gradients) over ranks.

    Args:
        named_params: ``model.named_parameters()``; the same names and shapes on every rank.
        spec: an ``OptimizerSpec`` or its dict (Adan, AdamW, AMSGrad, LAMB, Lookahead(...)).
        stage: 0 (plain data parallel), 1 (state sharded) or 2 (state and gradients sharded).
        process_group: the data-parallel group (default: the whole world).
        bucket_mb: size of a communication bucket in MiB of parameter elements.

    It averages gradients over ranks itself (no DDP wrapper), clips by the global gradient
    norm from ``spec.max_grad_norm``, and its ``param_groups`` are the inner optimizer's, so
    torch's LR schedulers drive it. Construction is a collective: call it on all ranks.

    At stages 0 and 1 the parameters' ``.grad`` are views of one flat buffer, kept across
    ``zero_grad()``; at stage 2 ``.grad`` is consumed during backward and stays None.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, Tensor]],
        spec: OptimizerSpec | Mapping[str, Any],
        *,
        stage: int = 1,
        process_group: dist.ProcessGroup | None = None,
        bucket_mb: float = 25.0,
    ) -> None:
        if stage not in (0, 1, 2):
            raise ValueError(f"Invalid stage: {stage!r} (must be 0, 1 or 2)")
        if not bucket_mb > 0:
            raise ValueError(f"Invalid bucket_mb: {bucket_mb!r} (must be > 0)")
        if not isinstance(spec, OptimizerSpec):
            spec = OptimizerSpec.model_validate(dict(spec))
        if not dist.is_initialized():
            raise RuntimeError("ZeroOptimizer needs torch.distributed to be initialised")
        self.spec = spec
        self.stage = stage
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        # gloo's reduce-scatter and all-gather are several times slower than its reduce and
        # broadcast (measured: bench/zero.py), so on gloo each chunk is reduced to and
        # broadcast from its owner; other backends (NCCL) use the native collectives.
        self._native = dist.get_backend(process_group) != "gloo"
        self._global_ranks = [
            dist.get_global_rank(process_group, r) if process_group is not None else r
            for r in range(self.world_size)
        ]
        # Stage 0 plans as if alone: every rank owns every bucket.
        self._plan_world = 1 if stage == 0 else self.world_size
        self._plan_rank = 0 if stage == 0 else self.rank

        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("ZeroOptimizer got no parameters that require grad")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self._check_same_everywhere(named)

        # The same grouping as create_optimizer: decayed tensors, then 1-D ones at wd=0.
        groups = (
            param_groups_weight_decay(self.params, spec.weight_decay)
            if spec.no_decay_1d
            else [{"params": self.params}]
        )
        self._group_options = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        index_of = {id(p): i for i, p in enumerate(self.params)}
        # Parameter indices per group, in the order the plain optimizer numbers them.
        self._plain_groups = [[index_of[id(p)] for p in g["params"]] for g in groups]

        bucket_bytes = int(bucket_mb * 2**20)
        self._classes: list[_FlatClass] = []
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            keys.setdefault((group_of[id(p)], p.dtype, p.device), []).append(i)
        # Classes sorted by group, so shards come in the inner optimizer's parameter order.
        for (gi, dtype, device), indices in sorted(
            keys.items(), key=lambda kv: (kv[0][0], kv[1][0])
        ):
            numels = [self.params[i].numel() for i in indices]
            per_elem = torch.empty((), dtype=dtype).element_size()
            buckets, total = plan_buckets(
                numels, indices, self._plan_world, max(1, bucket_bytes // per_elem)
            )
            flat = torch.zeros(total, dtype=dtype, device=device)
            self._classes.append(_FlatClass(gi, dtype, device, indices, buckets, flat))
        self._bind_parameters()

        inner_groups = []
        for gi, options in enumerate(self._group_options):
            shards = [s for c in self._classes if c.group == gi for s in c.shards]
            if shards:
                inner_groups.append({"params": shards, **options})
        inner_spec = spec.model_copy(update={"max_grad_norm": 0.0, "no_decay_1d": False})
        self.inner = create_optimizer(inner_groups, inner_spec)
        base = self.inner.base_optimizer if isinstance(self.inner, Lookahead) else self.inner
        if isinstance(base, LAMB):
            base.norm_fn = self._lamb_norms
        self._seg_of = {
            s.data_ptr(): ids
            for c in self._classes
            for s, ids in zip(c.shards, c.seg_ids, strict=True)
        }

        super().__init__(self.inner.param_groups, dict(self.inner.defaults))
        self.param_groups = self.inner.param_groups
        self.last_grad_norm: Tensor | None = None
        self._needs_zero_grad = False
        self._hooks: list[Any] = []
        if stage == 2:
            self._init_stage2()

    # ----------------------------------------------------------------- construction
    def _check_same_everywhere(self, named: list[tuple[str, Tensor]]) -> None:
        """Fail on every rank, rather than hang in a collective, if the ranks disagree."""
        mine = {
            "params": [[n, list(p.shape), str(p.dtype)] for n, p in named],
            "spec": self.spec.model_dump(mode="json"),
            "stage": self.stage,
        }
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.process_group)
        for r, theirs in enumerate(everyone):
            if theirs == mine:
                continue
            for what in ("stage", "spec"):
                if theirs[what] != mine[what]:
                    raise ValueError(
                        f"ZeroOptimizer: rank {r} has {what} {theirs[what]!r}, "
                        f"rank {self.rank} has {mine[what]!r}"
                    )
            ours, other = mine["params"], theirs["params"]
            for a, b in zip(ours, other, strict=False):
                if a != b:
                    raise ValueError(
                        f"ZeroOptimizer: parameters differ across ranks: rank {self.rank} has "
                        f"{a}, rank {r} has {b}"
                    )
            raise ValueError(
                f"ZeroOptimizer: rank {self.rank} has {len(ours)} parameters, "
                f"rank {r} has {len(other)}"
            )

    @torch.no_grad()
    def _bind_parameters(self) -> None:
        """Move parameters into the flat buffers (replicated from rank 0), point .grad at
        the flat gradient buffer, and make this rank's shards."""
        low_precision = (torch.float16, torch.bfloat16)
        for c in self._classes:
            for b in c.buckets:
                for seg in b.segments:
                    p = self.params[seg.index]
                    view = c.flat_param[seg.offset : seg.offset + seg.numel]
                    view.copy_(p.detach().reshape(-1))
                    p.data = view.view(p.shape)
            # Every rank starts from rank 0's parameters, as DDP does.
            src = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
            dist.broadcast(c.flat_param, src=src, group=self.process_group)
            if self.stage in (0, 1):
                c.flat_grad = torch.zeros_like(c.flat_param)
                for b in c.buckets:
                    for seg in b.segments:
                        p = self.params[seg.index]
                        p.grad = c.flat_grad[seg.offset : seg.offset + seg.numel].view(p.shape)
            state_type = torch.float32 if c.dtype in low_precision else c.dtype
            for b in c.buckets:
                lo, hi = b.owned(self._plan_rank, self._plan_world)
                own = c.flat_param[lo:hi]
                c.shards.append(own.to(state_type, copy=True) if state_type != c.dtype else own)
                c.grad_shards.append(torch.zeros(hi - lo, dtype=state_type, device=c.device))
                ids = torch.full((hi - lo,), len(self.params), dtype=torch.int64)
                for index, at, _, length in b.pieces(self._plan_rank, self._plan_world):
                    ids[at : at + length] = index
                c.seg_ids.append(ids.to(c.device))

    # ------------------------------------------------------------------ gradients
    def _init_stage2(self) -> None:
        self._where: dict[int, tuple[int, int, Segment]] = {}
        self._param_index = {id(p): i for i, p in enumerate(self.params)}
        for ci, c in enumerate(self._classes):
            for bi, b in enumerate(c.buckets):
                for seg in b.segments:
                    self._where[seg.index] = (ci, bi, seg)
                    p = self.params[seg.index]
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_ready))
        # Launch in reverse layout order: backward produces the last layers' grads first.
        self._order = [
            (ci, bi) for ci, c in enumerate(self._classes) for bi in range(len(c.buckets))
        ][::-1]
        self._expected = {
            (ci, bi): len(b.segments)
            for ci, c in enumerate(self._classes)
            for bi, b in enumerate(c.buckets)
        }
        self._free: list[list[Tensor]] = [[] for _ in self._classes]
        # Per bucket: no reduction has landed in its gradient shard since the last step.
        self._fresh = [[True] * len(c.buckets) for c in self._classes]
        self._owned_buffers = [0] * len(self._classes)
        self._reset_backward()

    def _reset_backward(self) -> None:
        self._remaining = dict(self._expected)
        self._staging: dict[tuple[int, int], Tensor] = {}  # buckets being filled
        self._arrived: dict[tuple[int, int], set[int]] = {}
        self._pending: deque[tuple[tuple[int, int], list[Any], Tensor, Tensor]] = deque()
        self._next = 0
        self._in_backward = False

    # Staging buffers are reused across backward passes: fresh bucket-sized allocations
    # cost page faults on every step (measured: +80 ms a step for 21M parameters on CPU).
    # At most _POOL per class are kept, so gradient memory stays ~ shard + 2 buckets.
    _POOL = 2

    def _take_buffer(self, ci: int) -> Tensor:
        c = self._classes[ci]
        free = self._free[ci]
        while not free and self._pending and self._owned_buffers[ci] >= self._POOL:
            self._retire_oldest()
        if free:
            return free.pop()
        self._owned_buffers[ci] += 1
        largest = max(b.numel for b in c.buckets)
        return torch.empty(largest, dtype=c.dtype, device=c.device)

    def _retire_oldest(self) -> None:
        """Wait for the oldest reduction, add it to the gradient shard, free its buffer."""
        (ci, bi), works, out, buffer = self._pending.popleft()
        for work in works:
            work.wait()
        with torch.no_grad():
            if self._fresh[ci][bi]:  # the first micro-batch since step(): no zeros to add to
                self._classes[ci].grad_shards[bi].copy_(out)
                self._fresh[ci][bi] = False
            else:
                self._classes[ci].grad_shards[bi].add_(out)
        if self._owned_buffers[ci] <= self._POOL:
            self._free[ci].append(buffer if buffer._base is None else buffer._base)
        else:  # an extra buffer made while the pool was exhausted: let it go
            self._owned_buffers[ci] -= 1

    def _grad_ready(self, p: Tensor) -> None:
        """Stage 2, during backward: copy the gradient into its bucket and free it; send
        every bucket that is complete, in the one order all ranks share."""
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        ci, bi, seg = self._where[self._param_index[id(p)]]
        key = (ci, bi)
        bucket = self._classes[ci].buckets[bi]
        if key not in self._staging:
            # Gradients will overwrite every segment: only the padding needs zeros now.
            staging = self._take_buffer(ci)[: bucket.numel]
            last = bucket.segments[-1]
            staging[last.offset + last.numel - bucket.start :].zero_()
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
            bucket = self._classes[key[0]].buckets[key[1]]
            staging = self._staging.pop(key, None)
            if staging is None:  # no gradient reached this bucket (unused parameters)
                staging = self._take_buffer(key[0])[: bucket.numel].zero_()
            elif self._remaining[key]:  # some parameters got no gradient: they count as 0
                for seg in bucket.segments:
                    if seg.index not in self._arrived[key]:
                        at = seg.offset - bucket.start
                        staging[at : at + seg.numel].zero_()
            works, out = self._reduce_scatter(staging)
            self._pending.append((key, works, out, staging))
            self._next += 1

    def _end_backward(self) -> None:
        self._launch(flush=True)
        while self._pending:
            self._retire_oldest()
        self._reset_backward()

    def _reduce_scatter(self, region: Tensor) -> tuple[list[Any], Tensor]:
        """Start summing ``region`` (one bucket: world_size chunks) over ranks into this
        rank's chunk; ``region`` may be overwritten. Returns the works to wait for and the
        tensor that then holds the result. A collective."""
        if self._native:
            out = torch.empty(
                region.numel() // self.world_size, dtype=region.dtype, device=region.device
            )
            return [
                dist.reduce_scatter_single(out, region, group=self.process_group, async_op=True)
            ], out
        chunks = region.chunk(self.world_size)
        works = [
            dist.reduce(chunk, dst=self._global_ranks[r], group=self.process_group, async_op=True)
            for r, chunk in enumerate(chunks)
        ]
        return works, chunks[self.rank]

    def _all_gather(self, region: Tensor) -> list[Any]:
        """Start filling every rank's chunk of ``region`` from its owner (this rank's chunk
        already holds its values). A collective."""
        chunks = region.chunk(self.world_size)
        if self._native:
            return [
                dist.all_gather_single(
                    region, chunks[self.rank].clone(), group=self.process_group, async_op=True
                )
            ]
        return [
            dist.broadcast(
                chunk, src=self._global_ranks[r], group=self.process_group, async_op=True
            )
            for r, chunk in enumerate(chunks)
        ]

    @torch.no_grad()
    def _reduce_gradients(self) -> list[Tensor]:
        """Stages 0 and 1: sum the locally accumulated gradients over ranks. Returns each
        shard's summed gradient (a view of the flat gradient buffer where dtypes allow)."""
        if self._needs_zero_grad:
            raise RuntimeError(
                "ZeroOptimizer: call zero_grad() between step() calls (at stages 0 and 1 the "
                "reduction overwrites the local gradient sums)"
            )
        grads: list[Tensor] = []
        for c in self._classes:
            assert c.flat_grad is not None
            for b in c.buckets:
                for seg in b.segments:  # .grad replaced by the user (set_to_none): copy it in
                    p = self.params[seg.index]
                    view = c.flat_grad[seg.offset : seg.offset + seg.numel]
                    if p.grad is None:
                        view.zero_()
                    elif p.grad.data_ptr() != view.data_ptr():
                        view.copy_(p.grad.reshape(-1))
                    p.grad = view.view(p.shape)
            pending = []
            for bi, b in enumerate(c.buckets):
                region = c.flat_grad[b.start : b.start + b.numel]
                if self.stage == 0:
                    work = dist.all_reduce(region, group=self.process_group, async_op=True)
                    pending.append((bi, [work], region))
                else:
                    pending.append((bi, *self._reduce_scatter(region)))
            for bi, works, out in pending:
                for work in works:
                    work.wait()
                shard_grad = c.grad_shards[bi]
                grads.append(out if out.dtype == shard_grad.dtype else shard_grad.copy_(out))
        return grads

    # ----------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Average gradients, clip globally, step this rank's shards, all-gather the
        parameters. A collective: call it on all ranks."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.stage == 2:
            if self._in_backward:  # backward ran without reaching its end callback
                self._end_backward()
            for c, fresh in zip(self._classes, self._fresh, strict=True):
                for g, untouched in zip(c.grad_shards, fresh, strict=True):
                    if untouched:  # no backward since the last step: a zero gradient
                        g.zero_()
            grads = [g for c in self._classes for g in c.grad_shards]
        else:
            grads = self._reduce_gradients()
        shards = [s for c in self._classes for s in c.shards]

        # Global norm of the mean gradient: squares of every shard, summed across ranks.
        sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        if self.stage != 0:
            dist.all_reduce(sq, group=self.process_group)
        self.last_grad_norm = sq.sqrt() / self.world_size
        # One pass over the gradients: the mean over ranks and the clipping together.
        scale = torch.full_like(self.last_grad_norm, 1.0 / self.world_size)
        if self.spec.max_grad_norm > 0:
            eps = self.inner.defaults["eps"]
            scale = scale * torch.clamp(
                self.spec.max_grad_norm / (self.last_grad_norm + eps), max=1.0
            )
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))

        for s, g in zip(shards, grads, strict=True):
            s.grad = g
        self.inner.step()
        for s in shards:
            s.grad = None
        # step() consumes the gradients: stage 2 starts its shards afresh, stages 0 and 1
        # need zero_grad() (the reduction may have overwritten the local sums).
        if self.stage == 2:
            self._fresh = [[True] * len(c.buckets) for c in self._classes]
        else:
            self._needs_zero_grad = True
        self._gather_parameters()
        return loss

    @torch.no_grad()
    def _gather_parameters(self) -> None:
        works = []
        for c in self._classes:
            for b, shard in zip(c.buckets, c.shards, strict=True):
                lo, hi = b.owned(self._plan_rank, self._plan_world)
                own = c.flat_param[lo:hi]
                if shard.data_ptr() != own.data_ptr():
                    own.copy_(shard)  # fp32 master -> bf16/fp16 parameters
                if self.stage == 0:
                    continue
                works += self._all_gather(c.flat_param[b.start : b.start + b.numel])
        for work in works:
            work.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. At stages 0 and 1 the flat gradient buffer is zeroed in place
        (the .grad views stay, whatever ``set_to_none`` says)."""
        for c in self._classes:
            if c.flat_grad is not None:
                c.flat_grad.zero_()
        self._needs_zero_grad = False
        if self.stage == 2:
            self._fresh = [[True] * len(c.buckets) for c in self._classes]

    # ---------------------------------------------------------------- LAMB norms
    def _lamb_norms(
        self, weights: list[Tensor], updates: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-element ||w|| and ||u|| of the parameter each element belongs to: partial
        sums of squares per parameter, summed across ranks, so LAMB equals unsharded LAMB."""
        n = len(self.params) + 1  # the last slot collects padding
        sums = torch.zeros(2, n, dtype=weights[0].dtype, device=weights[0].device)
        ids = [self._seg_of[w.data_ptr()] for w in weights]
        for w, u, seg in zip(weights, updates, ids, strict=True):
            sums[0].index_add_(0, seg, w * w)
            sums[1].index_add_(0, seg, u * u)
        if self.stage != 0:
            dist.all_reduce(sums, group=self.process_group)
        norms = sums.sqrt()
        return [norms[0][seg] for seg in ids], [norms[1][seg] for seg in ids]

    # ----------------------------------------------------------------- state access
    def _states(self) -> list[dict[Tensor, dict[str, Any]]]:
        if isinstance(self.inner, Lookahead):
            return [self.inner.base_optimizer.state, self.inner.state]
        return [self.inner.state]

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (fp32 master weights not included)."""
        return sum(
            v.nbytes
            for state in self._states()
            for entry in state.values()
            for v in entry.values()
            if isinstance(v, Tensor) and v.ndim > 0
        )

    def master_nbytes(self) -> int:
        """Bytes of fp32 master weights this rank holds (bf16/fp16 parameters only)."""
        return sum(s.nbytes for c in self._classes for s in c.shards if s.dtype != c.dtype)

    def _shard_entries(self) -> list[tuple[_FlatClass, int, Tensor]]:
        return [(c, bi, s) for c in self._classes for bi, s in enumerate(c.shards)]

    def _merged_state(self, shard: Tensor) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for state in self._states():
            merged.update(state.get(shard, {}))
        return merged

    # ----------------------------------------------------------------- checkpoints
    def _index(self) -> dict[str, Any]:
        return {
            "version": _CHECKPOINT_VERSION,
            "world_size": self._plan_world,
            "stage": self.stage,
            "spec": self.spec.model_dump(mode="json"),
            "params": [
                {"name": n, "shape": list(p.shape), "dtype": str(p.dtype)}
                for n, p in zip(self.names, self.params, strict=True)
            ],
            "classes": [
                {
                    "buckets": [
                        {
                            "start": b.start,
                            "numel": b.numel,
                            "segments": [[s.index, s.offset, s.numel] for s in b.segments],
                        }
                        for b in c.buckets
                    ]
                }
                for c in self._classes
            ],
        }

    @torch.no_grad()
    def save_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Write this rank's parameter and state slices to ``directory/rank{r}.pt`` and,
        on rank 0, ``index.json`` (names, shapes, layout). A collective: call on all ranks."""
        os.makedirs(directory, exist_ok=True)
        entries = self._shard_entries()
        payload = {
            "shards": [s.detach().clone() for _, _, s in entries],
            "state": [
                {
                    k: v.detach().clone() if isinstance(v, Tensor) else v
                    for k, v in self._merged_state(s).items()
                }
                for _, _, s in entries
            ],
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.inner.param_groups
            ],
            "lookahead_step": getattr(self.inner, "lookahead_step", None),
        }
        if self._plan_world > 1 or self.rank == 0:  # at stage 0 rank 0's copy is enough
            torch.save(payload, os.path.join(directory, f"rank{self._plan_rank}.pt"))
        if self.rank == 0:
            tmp = os.path.join(directory, "index.json.tmp")
            with open(tmp, "w") as f:
                json.dump(self._index(), f, indent=1)
            os.replace(tmp, os.path.join(directory, "index.json"))
        dist.barrier(group=self.process_group)

    @staticmethod
    def _read_full(
        directory: str | os.PathLike[str],
    ) -> tuple[dict, list[dict[str, Tensor]], dict[str, Any], dict]:
        """Reassemble full per-parameter tensors from a checkpoint written at any world size:
        (index, per-parameter {"param": ..., state key: ...}, scalar state, rank 0 payload)."""
        with open(os.path.join(directory, "index.json")) as f:
            index = json.load(f)
        if index.get("version") != _CHECKPOINT_VERSION:
            raise ValueError(f"Unsupported checkpoint version: {index.get('version')!r}")
        world = index["world_size"]
        shapes = [tuple(p["shape"]) for p in index["params"]]
        full: list[dict[str, Tensor]] = [{} for _ in shapes]
        scalars: dict[str, Any] = {}
        first: dict = {}
        for r in range(world):
            payload = torch.load(
                os.path.join(directory, f"rank{r}.pt"), weights_only=True, map_location="cpu"
            )
            if r == 0:
                first = payload
            k = 0
            for cls in index["classes"]:
                for b in cls["buckets"]:
                    chunk = b["numel"] // world
                    lo = b["start"] + r * chunk
                    shard, state = payload["shards"][k], payload["state"][k]
                    k += 1
                    values = {
                        "param": shard,
                        **{
                            key: v
                            for key, v in state.items()
                            if isinstance(v, Tensor) and v.ndim == 1 and v.numel() == chunk
                        },
                    }
                    for key, v in state.items():
                        if key not in values:
                            scalars.setdefault(key, v)
                    for i, off, numel in b["segments"]:
                        a, e = max(lo, off), min(lo + chunk, off + numel)
                        if a >= e:
                            continue
                        for key, v in values.items():
                            dest = full[i].setdefault(
                                key, torch.zeros(math.prod(shapes[i]), dtype=v.dtype)
                            )
                            dest[a - off : e - off] = v[a - lo : e - lo]
        return index, full, scalars, first

    @torch.no_grad()
    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Restore parameters and optimizer state saved by ``save_checkpoint`` at the same or
        a different world size, so that training continues exactly. A collective."""
        index, full, scalars, first = self._read_full(directory)
        ours = self._index()["params"]
        if index["params"] != ours:
            theirs = {(p["name"], tuple(p["shape"]), p["dtype"]) for p in index["params"]}
            mine = {(p["name"], tuple(p["shape"]), p["dtype"]) for p in ours}
            diff = sorted(theirs ^ mine)[:3]
            raise ValueError(
                f"Checkpoint {os.fspath(directory)!r} is from another model "
                f"(parameters that differ: {diff})"
            )
        if index["spec"]["name"] != self.spec.name:
            raise ValueError(
                f"Checkpoint {os.fspath(directory)!r} holds optimizer {index['spec']['name']!r}, "
                f"this job uses {self.spec.name!r}"
            )
        state_keys = sorted({k for f in full for k in f if k != "param"})
        new_state: dict[int, dict[str, Any]] = {}
        for k, (c, bi, shard) in enumerate(self._shard_entries()):
            b = c.buckets[bi]
            pieces = b.pieces(self._plan_rank, self._plan_world)
            for key in ["param", *state_keys]:
                dest = shard if key == "param" else torch.zeros_like(shard)
                for i, at, start, length in pieces:
                    src = full[i][key][start : start + length]
                    dest[at : at + length] = src.to(dest.dtype)
                if key != "param":
                    new_state.setdefault(k, {})[key] = dest
            new_state.setdefault(k, {}).update(
                {key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()}
            )
        # Parameters: the owned slices are restored above; rebuild the rest everywhere.
        for c in self._classes:
            for b in c.buckets:
                for seg in b.segments:
                    c.flat_param[seg.offset : seg.offset + seg.numel] = full[seg.index]["param"].to(
                        c.dtype
                    )
        self._load_inner(new_state, first["param_groups"], first.get("lookahead_step"))

    def _load_inner(
        self,
        state: dict[int, dict[str, Any]],
        groups: list[dict[str, Any]],
        lookahead_step: int | None,
    ) -> None:
        inner_sd = self.inner.state_dict()
        param_groups = [
            {**saved, "params": g["params"]}
            for saved, g in zip(groups, inner_sd["param_groups"], strict=True)
        ]
        sd = {"state": state, "param_groups": param_groups, "max_grad_norm": 0.0}
        if lookahead_step is not None:
            sd["lookahead_step"] = lookahead_step
        self.inner.load_state_dict(sd)
        self.param_groups = self.inner.param_groups
        base = self.inner.base_optimizer if isinstance(self.inner, Lookahead) else self.inner
        if isinstance(base, LAMB):
            base.norm_fn = self._lamb_norms

    @torch.no_grad()
    def consolidated_state_dict(self) -> dict[str, Any] | None:
        """On rank 0, the state dict of the plain optimizer that ``create_optimizer(
        model.named_parameters(), spec)`` builds; None on other ranks. A collective."""
        keys = sorted(
            {
                k
                for s in self._shard_entries()
                for k, v in self._merged_state(s[2]).items()
                if isinstance(v, Tensor) and v.ndim == 1
            }
        )
        full: dict[int, dict[str, Tensor]] = {}
        scalars: dict[str, Any] = {}
        for c, bi, shard in self._shard_entries():
            b = c.buckets[bi]
            entry = self._merged_state(shard)
            for key, v in entry.items():
                if key not in keys:
                    scalars.setdefault(key, v)
            for key in keys:
                local = entry[key]
                if self.stage == 0:
                    gathered = local
                else:
                    gathered = torch.empty(b.numel, dtype=local.dtype, device=local.device)
                    gathered.chunk(self.world_size)[self.rank].copy_(local)
                    for work in self._all_gather(gathered):
                        work.wait()
                if self.rank != 0:  # only rank 0 keeps the whole state
                    continue
                for seg in b.segments:
                    p = self.params[seg.index]
                    start = seg.offset - b.start
                    full.setdefault(seg.index, {})[key] = (
                        gathered[start : start + seg.numel].view(p.shape).to(p.device).clone()
                    )
        if self.rank != 0:
            return None
        order = [i for group in self._plain_groups for i in group]
        state = {}
        for position, i in enumerate(order):
            state[position] = {
                **{k: v.clone() if isinstance(v, Tensor) else v for k, v in scalars.items()},
                **full.get(i, {}),
            }
        param_groups, start = [], 0
        for group, options, inner_group in zip(
            self._plain_groups, self._group_options, self.inner.param_groups, strict=True
        ):
            hyper = {k: v for k, v in inner_group.items() if k != "params"}
            positions = list(range(start, start + len(group)))
            param_groups.append({**hyper, **options, "params": positions})
            start += len(group)
        out: dict[str, Any] = {
            "state": state,
            "param_groups": param_groups,
            "max_grad_norm": self.spec.max_grad_norm,
        }
        if isinstance(self.inner, Lookahead):
            out["lookahead_step"] = self.inner.lookahead_step
        return out

    @torch.no_grad()
    def load_consolidated_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a plain optimizer's state dict (``consolidated_state_dict()``, or the plain
        optimizer's own ``state_dict()`` over the same parameters), each rank taking the
        slices of its shards, at any world size and stage. The per-parameter state and step
        counts are loaded; the hyperparameters stay this optimizer's. Not a collective."""
        groups = state_dict.get("param_groups")
        saved = state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(saved, Mapping):
            raise ValueError("not an optimizer state dict (it has no 'state' and 'param_groups')")
        order = [i for group in self._plain_groups for i in group]
        positions = [pos for g in groups for pos in g.get("params", [])]
        if len(positions) != len(order):
            raise ValueError(
                f"the optimizer state holds {len(positions)} parameters, this model has "
                f"{len(order)}"
            )
        pairs = zip(order, positions, strict=True)
        by_index = {i: saved.get(pos, saved.get(str(pos), {})) for i, pos in pairs}
        scalars: dict[str, Any] = {}
        for i, entry in by_index.items():
            p = self.params[i]
            for key, v in entry.items():
                if isinstance(v, Tensor) and v.ndim > 0:
                    if v.numel() != p.numel():
                        raise ValueError(
                            f"optimizer state {key!r} of parameter {self.names[i]!r} has shape "
                            f"{tuple(v.shape)}, the parameter has {tuple(p.shape)}"
                        )
                else:
                    scalars.setdefault(key, v)
        tensor_keys = sorted(
            {k for e in by_index.values() for k, v in e.items() if isinstance(v, Tensor) and v.ndim}
        )
        new_state: dict[int, dict[str, Any]] = {}
        for k, (c, bi, shard) in enumerate(self._shard_entries()):
            entry: dict[str, Any] = {
                key: v.clone() if isinstance(v, Tensor) else v for key, v in scalars.items()
            }
            entry.update({key: torch.zeros_like(shard) for key in tensor_keys})  # padding: 0
            pieces = c.buckets[bi].pieces(self._plan_rank, self._plan_world)
            for i, at, start, length in pieces:
                for key in tensor_keys:
                    if key not in by_index[i]:
                        raise ValueError(f"parameter {self.names[i]!r} has no {key!r} state")
                    src = by_index[i][key].reshape(-1)[start : start + length]
                    entry[key][at : at + length] = src.to(device=shard.device, dtype=shard.dtype)
            new_state[k] = entry
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in self.inner.param_groups]
        lookahead_step = state_dict.get("lookahead_step")
        self._load_inner(new_state, hyper, lookahead_step if lookahead_step is not None else None)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state over this rank's shards (rank-local; use
        ``save_checkpoint`` or ``consolidated_state_dict`` to move between world sizes)."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what ``state_dict()`` returned on this rank at the same world size."""
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups

    def close(self) -> None:
        """Remove the stage-2 gradient hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
