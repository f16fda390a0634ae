"""The public view of a ZeroOptimizer's layout and shards: what code outside the optimizer
(the checkpoint formats, benchmarks, tests) reads instead of its private attributes.

``ZeroOptimizer.shard_view`` is one ``ShardView``: where this rank stands (rank, world size,
stage), the parameters' names and shapes, the param groups of the plain optimizer, the
layout of the flat buffers (``zero_layout.Layout``) and this rank's shards, each with the
tensor the inner optimizer steps and the pieces of parameters it holds. Reading the view is
never a collective. Its shard and state tensors are the optimizer's own, not copies (a
restore writes into them); everything else that changes the optimizer is a method of
ZeroOptimizer's (``load_shard_state``, ``gather_parameters``), and the collectives are
``ZeroOptimizer.comm``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..registry import ShardHooks
from ..zero_layout import Bucket, Layout


@dataclass(frozen=True)
class ParamInfo:
    """One parameter that the optimizer manages, the same on every rank."""

    name: str
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device

    @property
    def numel(self) -> int:
        return self.shape.numel()


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors or dicts
class ParamGroup:
    """A param group of the plain optimizer that ``create_optimizer`` builds over the whole
    model: its parameters (indices into ``ShardView.params``, in the group's order) and the
    options it sets (``weight_decay`` 0 for the 1-D group)."""

    indices: tuple[int, ...]
    options: Mapping[str, Any]


@dataclass(frozen=True)
class ParamClass:
    """Parameters of one (param group, dtype, device), laid end to end in one flat buffer."""

    group: int  # index into ShardView.groups
    dtype: torch.dtype
    device: torch.device
    # Of the base optimizer's state buffers: "fp32", "bf16", or "int8" (then the layout is
    # aligned to lowbit.BLOCK: a shard's blocks are its parameters' own).
    state_format: str
    indices: tuple[int, ...]  # into ShardView.params, in buffer order


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors or dicts
class Shard:
    """This rank's chunk of one bucket: one parameter of the inner optimizer."""

    number: int  # its position among the inner optimizer's parameters (state_dict's key)
    cls: int  # index into ShardView.classes
    bucket: Bucket
    # The tensor itself, not a copy: the fp32 master values where the parameters are
    # bf16/fp16, else a view of the flat parameter buffer. Values written into it reach the
    # parameters at the next ``ZeroOptimizer.gather_parameters()``.
    tensor: Tensor
    # (parameter index, start in this shard, start in the parameter, length) of each piece
    # of a parameter that it holds; the rest is padding.
    pieces: tuple[tuple[int, int, int, int], ...]


@dataclass(frozen=True, eq=False)  # compared by identity: it holds tensors or dicts
class ShardView:
    """A ZeroOptimizer's layout and this rank's shards, read-only.

    At stage 0 every rank holds every bucket whole: the layout is planned over one rank
    (``layout.world_size`` 1, ``layout_rank`` 0) whatever ``world_size`` is.
    """

    rank: int  # in the data-parallel group
    world_size: int
    stage: int
    layout: Layout
    layout_rank: int  # the chunk of every bucket that this rank owns
    params: tuple[ParamInfo, ...]
    groups: tuple[ParamGroup, ...]
    classes: tuple[ParamClass, ...]  # in layout order: classes[c] has layout.classes[c]
    shards: tuple[Shard, ...]  # in the inner optimizer's parameter order
    inner: Optimizer  # the registry optimizer over ``shards``' tensors
    hooks: ShardHooks  # its per-parameter state dicts and counters

    def state(self, shard: Shard) -> dict[str, Any]:
        """The inner optimizer's state of ``shard``, a wrapper's (Lookahead's slow weights)
        and its base optimizer's merged; the tensors are the optimizer's own, not copies."""
        merged: dict[str, Any] = {}
        for state in self.hooks.states:
            merged.update(state.get(shard.tensor, {}))
        return merged

    def hyperparameters(self) -> list[dict[str, Any]]:
        """The inner optimizer's param groups without their parameters (the learning rate
        as the schedulers left it, betas, weight decay, ...), one per non-empty group."""
        return [{k: v for k, v in g.items() if k != "params"} for g in self.inner.param_groups]

    @property
    def counter_names(self) -> tuple[str, ...]:
        """Counters of the inner optimizer's own that a checkpoint keeps (Lookahead's step)."""
        return self.hooks.counter_names

    def counters(self) -> dict[str, Any]:
        return self.hooks.counters()

    def plain_order(self) -> list[int]:
        """Parameter indices in the order the plain optimizer numbers its parameters."""
        return [i for g in self.groups for i in g.indices]
