"""ZeroOptimizer: construction, the step, and access to its sharded state.

Gradients on their way in are the bucketer's (stage 2) or ``_reduce_gradients``'s (stages 0
and 1), the wire is ``collectives``', the files are ``checkpoint``'s; the layout arithmetic
is ``zero_layout``'s. What an inner optimizer needs beyond ``step()`` when its parameters
are shards (LAMB's whole-parameter norms, Lookahead's slow weights and counter) is declared
in the registry and reached through ``shard_hooks``.

Code outside this module (``checkpoint`` first) reads the layout and the shards through
``shard_view`` (a ``view.ShardView``) and changes them only through the public methods
here (``load_shard_state``, ``gather_parameters``), never through private attributes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from .. import lowbit
from ..registry import create_optimizer, param_groups_weight_decay, shard_hooks
from ..spec import OptimizerSpec
from ..zero_layout import Bucket, Layout, plan_buckets
from . import checkpoint
from .bucketer import GradientBucketer
from .collectives import Collectives, wait
from .view import ParamClass, ParamGroup, ParamInfo, Shard, ShardView


@dataclass
class FlatClass:
    """Parameters of one (dtype, device, param group): their flat buffers and this rank's
    shards, one shard per bucket."""

    group: int
    dtype: torch.dtype
    device: torch.device
    state_format: str  # of the inner optimizer's state buffers: "fp32", "bf16" or "int8"
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

    Attributes (read them; change the optimizer through its methods):
        spec, stage, process_group: as given (``spec`` validated).
        rank, world_size: this rank's place in the data-parallel group.
        names, params: the managed parameters (those that require grad), in model order.
        inner: the registry optimizer that steps this rank's shards.
        comm: the group's collectives (``collectives.Collectives``).
        last_grad_norm: the global gradient norm of the last step, before clipping.
        shard_view: the layout and this rank's shards (``view.ShardView``).
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
        self.comm = Collectives(process_group)
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
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
        group_options = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        group_of = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        index_of = {id(p): i for i, p in enumerate(self.params)}
        # Parameter indices per group, in the order the plain optimizer numbers them.
        plain_groups = [[index_of[id(p)] for p in g["params"]] for g in groups]

        bucket_bytes = int(bucket_mb * 2**20)
        self._classes: list[FlatClass] = []
        keys: dict[tuple, list[int]] = {}
        for i, p in enumerate(self.params):
            # Under int8 a shard must be all codes or all fp32: the parameter's size, not
            # the shard's, decides (lowbit.tensor_format), so the two go in separate classes.
            fmt = lowbit.tensor_format(spec.state_precision, p.numel())
            keys.setdefault((group_of[id(p)], p.dtype, p.device, fmt), []).append(i)
        # Classes sorted by group, so shards come in the inner optimizer's parameter order.
        for (gi, dtype, device, fmt), indices in sorted(
            keys.items(), key=lambda kv: (kv[0][0], kv[1][0])
        ):
            numels = [self.params[i].numel() for i in indices]
            per_elem = torch.empty((), dtype=dtype).element_size()
            buckets, total = plan_buckets(
                numels,
                indices,
                self._plan_world,
                max(1, bucket_bytes // per_elem),
                align=lowbit.BLOCK if fmt == "int8" else 1,  # chunks of whole blocks
            )
            flat = torch.zeros(total, dtype=dtype, device=device)
            self._classes.append(FlatClass(gi, dtype, device, fmt, indices, buckets, flat))
        self._bind_parameters()

        inner_groups = []
        for gi, options in enumerate(group_options):
            shards = [s for c in self._classes if c.group == gi for s in c.shards]
            if shards:
                inner_groups.append({"params": shards, **options})
        inner_spec = spec.model_copy(update={"max_grad_norm": 0.0, "no_decay_1d": False})
        self.inner = create_optimizer(inner_groups, inner_spec)
        self._hooks = shard_hooks(self.inner)
        self._hooks.bind_norms(self._whole_parameter_norms)
        if spec.state_precision == "int8":  # a shard's size says nothing of its parameters'
            for c in self._classes:
                self._hooks.base.pin_state_format(c.shards, c.state_format)
        self._seg_of = {
            s.data_ptr(): ids
            for c in self._classes
            for s, ids in zip(c.shards, c.seg_ids, strict=True)
        }

        super().__init__(self.inner.param_groups, dict(self.inner.defaults))
        self.param_groups = self.inner.param_groups
        self.last_grad_norm: Tensor | None = None
        self._needs_zero_grad = False
        self._bucketer = (
            GradientBucketer(self._classes, self.params, self.comm) if stage == 2 else None
        )
        # The parameter all-gather of the last step, per bucket, while it is in flight
        # (``overlap_with``): the works, and for each parameter its bucket's key.
        self._gathering: dict[tuple[int, int], list[Any]] = {}
        self._bucket_of = {
            seg.index: (ci, bi)
            for ci, c in enumerate(self._classes)
            for bi, b in enumerate(c.buckets)
            for seg in b.segments
        }
        self._overlap_hooks: list[Any] = []
        self._view = self._make_view(plain_groups, group_options)

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

    def _make_view(
        self, plain_groups: list[list[int]], group_options: list[dict[str, Any]]
    ) -> ShardView:
        """The public view; built once, since the shards are never replaced (loading state
        replaces the inner optimizer's state dicts, which the view reads when asked)."""
        layout = Layout(self._plan_world, tuple(tuple(c.buckets) for c in self._classes))
        shards: list[Shard] = []
        for ci, c in enumerate(self._classes):
            for b, s in zip(c.buckets, c.shards, strict=True):
                pieces = tuple(b.pieces(self._plan_rank, self._plan_world))
                shards.append(Shard(len(shards), ci, b, s, pieces))
        return ShardView(
            rank=self.rank,
            world_size=self.world_size,
            stage=self.stage,
            layout=layout,
            layout_rank=self._plan_rank,
            params=tuple(
                ParamInfo(n, p.shape, p.dtype, p.device)
                for n, p in zip(self.names, self.params, strict=True)
            ),
            groups=tuple(
                ParamGroup(tuple(indices), options)
                for indices, options in zip(plain_groups, group_options, strict=True)
            ),
            classes=tuple(
                ParamClass(c.group, c.dtype, c.device, c.state_format, tuple(c.indices))
                for c in self._classes
            ),
            shards=tuple(shards),
            inner=self.inner,
            hooks=self._hooks,
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
            self.comm.broadcast_from_first(c.flat_param)  # every rank starts from rank 0's
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
                    pending.append((bi, [self.comm.all_reduce(region, async_op=True)], region))
                else:
                    pending.append((bi, *self.comm.reduce_scatter(region)))
            for bi, works, out in pending:
                wait(works)
                shard_grad = c.grad_shards[bi]
                grads.append(out if out.dtype == shard_grad.dtype else shard_grad.copy_(out))
        return grads

    # ----------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Average gradients, clip globally, step this rank's shards, all-gather the
        parameters. A collective: call it on all ranks."""
        loss = None
        self.wait_parameters()  # this rank's chunks are about to change
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._bucketer is not None:
            grads = self._bucketer.gradients()
        else:
            grads = self._reduce_gradients()
        shards = [s for c in self._classes for s in c.shards]

        # Global norm of the mean gradient: squares of every shard, summed across ranks.
        sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum()
        if self.stage != 0:
            self.comm.all_reduce(sq)
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
        if self._bucketer is not None:
            self._bucketer.restart()
        else:
            self._needs_zero_grad = True
        self.gather_parameters()
        return loss

    @torch.no_grad()
    def gather_parameters(self) -> None:
        """Owned slices from the (fp32 master) shards into the parameters, then every
        rank's slices to every rank: waited for here, or, with ``overlap_with``, by the
        first module that uses a bucket's parameters in the next forward pass. ``step()``
        ends with it; call it after writing into ``shard_view``'s shard tensors. A
        collective at stages 1 and 2: call it on all ranks."""
        for ci, c in enumerate(self._classes):
            for bi, (b, shard) in enumerate(zip(c.buckets, c.shards, strict=True)):
                lo, hi = b.owned(self._plan_rank, self._plan_world)
                own = c.flat_param[lo:hi]
                if shard.data_ptr() != own.data_ptr():
                    own.copy_(shard)  # fp32 master -> bf16/fp16 parameters
                if self.stage == 0:
                    continue
                region = c.flat_param[b.start : b.start + b.numel]
                self._gathering[(ci, bi)] = self.comm.all_gather(region)
        if not self._overlap_hooks:
            self.wait_parameters()

    @property
    def gathers_in_flight(self) -> int:
        """Buckets whose parameter all-gather ``overlap_with`` has left running (not yet
        waited for on this rank)."""
        return len(self._gathering)

    def wait_parameters(self) -> None:
        """Wait until every parameter holds the last step's values on this rank (a no-op
        unless ``overlap_with`` left the all-gather running)."""
        while self._gathering:
            wait(self._gathering.popitem()[1])

    def _wait_buckets(self, keys: list[tuple[int, int]], *_: Any) -> None:
        for key in keys:
            works = self._gathering.pop(key, None)
            if works is not None:
                wait(works)

    def overlap_with(self, model: torch.nn.Module) -> None:
        """Overlap the parameter all-gather (stages 1 and 2) with the next forward pass:
        ``step()`` returns once the all-gather is started, and a forward pre-hook on each
        module of ``model`` that holds parameters waits for their buckets only, so the
        first layers compute while the last buckets are still on the wire. Parameters read
        outside a forward pass (saving, evaluating without hooks, digests) need
        ``wait_parameters()`` first; this optimizer's own methods call it."""
        if self.stage == 0 or self._overlap_hooks:
            return
        index = {id(p): i for i, p in enumerate(self.params)}
        for module in model.modules():
            keys = sorted(
                {
                    self._bucket_of[index[id(p)]]
                    for p in module.parameters(recurse=False)
                    if id(p) in index
                }
            )
            if keys:
                hook = functools.partial(self._wait_buckets, keys)
                self._overlap_hooks.append(module.register_forward_pre_hook(hook))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. At stages 0 and 1 the flat gradient buffer is zeroed in place
        (the .grad views stay, whatever ``set_to_none`` says)."""
        for c in self._classes:
            if c.flat_grad is not None:
                c.flat_grad.zero_()
        self._needs_zero_grad = False
        if self._bucketer is not None:
            self._bucketer.restart()

    # ------------------------------------------------------- whole-parameter norms
    def _whole_parameter_norms(
        self, weights: list[Tensor], updates: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Per-element ||w|| and ||u|| of the parameter each element belongs to: partial
        sums of squares per parameter, summed across ranks, so that an optimizer with
        per-parameter norms (LAMB) equals its unsharded self."""
        n = len(self.params) + 1  # the last slot collects padding
        sums = torch.zeros(2, n, dtype=weights[0].dtype, device=weights[0].device)
        ids = [self._seg_of[w.data_ptr()] for w in weights]
        for w, u, seg in zip(weights, updates, ids, strict=True):
            sums[0].index_add_(0, seg, w * w)
            sums[1].index_add_(0, seg, u * u)
        if self.stage != 0:
            self.comm.all_reduce(sums)
        norms = sums.sqrt()
        return [norms[0][seg] for seg in ids], [norms[1][seg] for seg in ids]

    # ----------------------------------------------------------------- state access
    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (fp32 master weights not included)."""
        return sum(
            v.nbytes
            for state in self._hooks.states
            for entry in state.values()
            for v in entry.values()
            if isinstance(v, Tensor) and v.ndim > 0
        )

    def master_nbytes(self) -> int:
        """Bytes of fp32 master weights this rank holds (bf16/fp16 parameters only)."""
        return sum(s.nbytes for c in self._classes for s in c.shards if s.dtype != c.dtype)

    @property
    def shard_view(self) -> ShardView:
        """This rank's layout and shards, read-only (``optimizers.zero.view``). Reading it is
        not a collective; its shard tensors and state tensors are the optimizer's own."""
        return self._view

    def load_shard_state(
        self,
        state: Mapping[int, dict[str, Any]],
        hyperparameters: list[dict[str, Any]],
        counters: Mapping[str, Any],
    ) -> None:
        """Replace the inner optimizer's state: ``state[k]`` is that of
        ``shard_view.shards[k]`` (a wrapper's and its base's keys together), one dict of
        ``hyperparameters`` per inner param group (as ``ShardView.hyperparameters()``), and
        ``counters`` by ``ShardView.counter_names``. The inner optimizer copies what it is
        given, so ``ShardView.state`` returns new tensors afterwards. Not a collective."""
        inner_sd = self.inner.state_dict()
        param_groups = [
            {**saved, "params": g["params"]}
            for saved, g in zip(hyperparameters, inner_sd["param_groups"], strict=True)
        ]
        sd = {"state": state, "param_groups": param_groups, "max_grad_norm": 0.0, **counters}
        self.inner.load_state_dict(sd)
        self.param_groups = self.inner.param_groups
        self._hooks.bind_norms(self._whole_parameter_norms)

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Write this rank's parameter and state slices to ``directory/rank{r}.pt`` and,
        on rank 0, ``index.json`` (names, shapes, layout). A collective: call on all ranks."""
        self.wait_parameters()
        checkpoint.save(self, directory)

    def load_checkpoint(self, directory: str | os.PathLike[str]) -> None:
        """Restore parameters and optimizer state saved by ``save_checkpoint`` at the same or
        a different world size, so that training continues exactly; each rank reads only
        the pieces it owns. A collective."""
        self.wait_parameters()
        checkpoint.load(self, directory)

    def consolidated_state_dict(self) -> dict[str, Any] | None:
        """On rank 0, the state dict of the plain optimizer that ``create_optimizer(
        model.named_parameters(), spec)`` builds; None on other ranks. A collective."""
        self.wait_parameters()
        return checkpoint.consolidated_state_dict(self)

    def load_consolidated_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a plain optimizer's state dict (``consolidated_state_dict()``, or the plain
        optimizer's own ``state_dict()`` over the same parameters), each rank taking the
        slices of its shards, at any world size and stage. The per-parameter state and step
        counts are loaded; the hyperparameters stay this optimizer's. Not a collective."""
        self.wait_parameters()
        checkpoint.load_consolidated_state_dict(self, state_dict)

    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state over this rank's shards (rank-local; use
        ``save_checkpoint`` or ``consolidated_state_dict`` to move between world sizes)."""
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what ``state_dict()`` returned on this rank at the same world size."""
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups

    def close(self) -> None:
        """Finish the all-gather in flight; remove the stage-2 gradient hooks and the
        forward pre-hooks of ``overlap_with``."""
        self.wait_parameters()
        for hook in self._overlap_hooks:
            hook.remove()
        self._overlap_hooks.clear()
        if self._bucketer is not None:
            self._bucketer.close()
