"""The optimizer registry: names -> optimizers, and ``create_optimizer(params, spec)``.

The names and the spec are torch-free data in ``spec``; here each name's class gets built,
and each class declares what a sharded optimizer (``ZeroOptimizer``) needs of it beyond
``step()``: LAMB's per-parameter norms must be summed across shards, Lookahead keeps slow
weights beside its base optimizer's state and a step counter of its own. ``shard_hooks``
reads those declarations, so ``ZeroOptimizer`` never asks what class it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from .adamw import AdamW
from .adan import Adan
from .lamb import LAMB, NormFn
from .lookahead import Lookahead
from .spec import LookaheadSpec, OptimizerSpec, list_optimizers, name_entry


def _lamb_norms(optimizer: Optimizer, norms: NormFn) -> None:
    optimizer.norm_fn = norms  # type: ignore[attr-defined]


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer class and what it needs when its parameters are shards."""

    cls: type[Optimizer]
    # Called with a function giving per-element norms of whole parameters (summed across
    # shards); for optimizers whose update depends on per-parameter norms (LAMB).
    bind_norms: Callable[[Optimizer, NormFn], None] | None = None


@dataclass(frozen=True)
class WrapperEntry:
    """An optimizer around another one (Lookahead): how to reach the one inside, and the
    counters of its own that a checkpoint keeps."""

    cls: type[Optimizer]
    base: Callable[[Optimizer], Optimizer]
    counters: tuple[str, ...] = ()


CLASSES: dict[str, OptimizerEntry] = {
    "Adan": OptimizerEntry(Adan),
    "AdamW": OptimizerEntry(AdamW),
    "LAMB": OptimizerEntry(LAMB, bind_norms=_lamb_norms),
}
WRAPPERS: dict[type[Optimizer], WrapperEntry] = {
    Lookahead: WrapperEntry(Lookahead, lambda o: o.base_optimizer, ("lookahead_step",)),
}
_BY_CLASS = {e.cls: e for e in CLASSES.values()}


def _nearest(table: dict[type, Any], cls: type) -> Any:
    """The entry of ``cls`` or of its nearest registered base class: a user's subclass of
    LAMB (or Lookahead) keeps the hooks its base declares."""
    return next((table[c] for c in cls.__mro__ if c in table), None)


@dataclass(frozen=True)
class ShardHooks:
    """What ``ZeroOptimizer`` needs of an optimizer that ``create_optimizer`` built over its
    shards: every per-parameter state dict (a wrapper's and its base's), the counters to
    checkpoint, and where to plug in cross-shard norms."""

    optimizer: Optimizer
    base: Optimizer
    wrapper: WrapperEntry | None

    @property
    def states(self) -> list[dict[Tensor, dict[str, Any]]]:
        if self.wrapper is None:
            return [self.optimizer.state]
        return [self.base.state, self.optimizer.state]

    @property
    def counter_names(self) -> tuple[str, ...]:
        return self.wrapper.counters if self.wrapper else ()

    def counters(self) -> dict[str, Any]:
        return {n: getattr(self.optimizer, n) for n in self.counter_names}

    def bind_norms(self, norms: NormFn) -> None:
        entry = _nearest(_BY_CLASS, type(self.base))
        if entry is not None and entry.bind_norms is not None:
            entry.bind_norms(self.base, norms)


def shard_hooks(optimizer: Optimizer) -> ShardHooks:
    wrapper = _nearest(WRAPPERS, type(optimizer))
    base = wrapper.base(optimizer) if wrapper else optimizer
    return ShardHooks(optimizer, base, wrapper)


def param_groups_weight_decay(
    params: Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Split parameters into a decayed group and a ``weight_decay=0`` group holding the
    1-D ones (biases, norm scales), as is standard for large-batch training.

    ``weight_decay=None`` leaves the decayed group on the optimizer's default.
    Accepts ``model.parameters()`` or ``model.named_parameters()``.
    """
    decay, no_decay = [], []
    for item in params:
        p = item[1] if isinstance(item, tuple) else item
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append(
            {"params": decay}
            if weight_decay is None
            else {"params": decay, "weight_decay": weight_decay}
        )
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def create_optimizer(
    params: Iterable[Tensor] | Iterable[tuple[str, Tensor]] | Iterable[dict[str, Any]],
    spec: OptimizerSpec | Mapping[str, Any],
) -> Optimizer:
    """Build the optimizer that ``spec`` describes.

    Examples:
        >>> model = torch.nn.Linear(4, 2)
        >>> create_optimizer(model.parameters(), {"name": "adan", "lr": 0.01})
        >>> create_optimizer(model.parameters(), {"name": "lamb", "weight_decay": 0.01})
        >>> create_optimizer(model.parameters(), {"name": "lookahead_adamw"})
        >>> create_optimizer(model.parameters(),
        ...                  {"name": "adan", "lookahead": {"k": 6, "alpha": 0.5}})
    """
    if not isinstance(spec, OptimizerSpec):
        spec = OptimizerSpec.model_validate(dict(spec))
    params = list(params)
    if params and isinstance(params[0], tuple):
        params = [p for _, p in params]
    if spec.no_decay_1d and params and isinstance(params[0], Tensor):
        params = param_groups_weight_decay(params)
    cls = CLASSES[name_entry(spec.base_name).cls].cls
    optimizer = cls(params, **spec.optimizer_kwargs())
    la = spec.lookahead_spec
    if la is not None:
        optimizer = Lookahead(optimizer, k=la.k, alpha=la.alpha)
    return optimizer


__all__ = [
    "CLASSES",
    "WRAPPERS",
    "LookaheadSpec",
    "OptimizerEntry",
    "OptimizerSpec",
    "ShardHooks",
    "WrapperEntry",
    "create_optimizer",
    "list_optimizers",
    "param_groups_weight_decay",
    "shard_hooks",
]
