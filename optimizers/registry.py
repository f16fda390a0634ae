"""The optimizer registry: names -> optimizers, and ``create_optimizer(params, spec)``.

Variants are data: ``adanw`` is Adan with ``no_prox=True``, ``amsgrad`` is AdamW with
``amsgrad=True``. Names compose: ``lookahead_adan`` wraps Adan in Lookahead, the same as
``{"name": "adan", "lookahead": {}}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor
from torch.optim import Optimizer

from .adamw import AdamW
from .adan import Adan
from .lamb import LAMB
from .lookahead import Lookahead

_LOOKAHEAD_PREFIX = "lookahead_"


@dataclass(frozen=True)
class OptimizerEntry:
    """One registry row: the class, fixed keyword arguments, and what its state costs."""

    cls: type[Optimizer]
    fixed: dict[str, Any] = field(default_factory=dict)
    num_betas: int = 2
    state_bytes_per_param: int = 8  # fp32 state, for sizing and the docs
    description: str = ""


_REGISTRY: dict[str, OptimizerEntry] = {
    "adan": OptimizerEntry(Adan, {}, 3, 16, "Adan with proximal weight decay (paper default)"),
    "adanw": OptimizerEntry(Adan, {"no_prox": True}, 3, 16, "Adan with AdamW-style decay"),
    "adamw": OptimizerEntry(AdamW, {}, 2, 8, "AdamW, equal to torch.optim.AdamW"),
    "amsgrad": OptimizerEntry(AdamW, {"amsgrad": True}, 2, 12, "AdamW with AMSGrad's max"),
    "lamb": OptimizerEntry(LAMB, {}, 2, 8, "LAMB, layer-wise trust ratios"),
}


def list_optimizers() -> list[str]:
    """Registered names, base names first, then their ``lookahead_`` compositions."""
    return sorted(_REGISTRY) + [_LOOKAHEAD_PREFIX + n for n in sorted(_REGISTRY)]


def _entry(name: str) -> OptimizerEntry:
    if name not in _REGISTRY:
        known = ", ".join(list_optimizers())
        raise ValueError(f"Unknown optimizer name: {name!r} (known: {known})")
    return _REGISTRY[name]


class LookaheadSpec(BaseModel):
    """Lookahead's two hyperparameters."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    k: int = Field(5, ge=1, le=100_000, description="base optimizer steps between syncs")
    alpha: float = Field(0.5, gt=0.0, le=1.0, description="slow-weight step size")


class OptimizerSpec(BaseModel):
    """A JSON-able optimizer description, e.g.
    ``{"name": "adan", "lr": 0.01, "weight_decay": 0.02, "lookahead": {"k": 5, "alpha": 0.5}}``.

    Fields left as None take the optimizer's own default (Adan's betas are 3 values,
    AdamW's and LAMB's 2).
    """

    # Numbers are finite and bounded well beyond any sensible setting, so a typo (lr 1e6, or
    # 1e999, which JSON parsers read as infinity) is an error naming the field.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field("adan", description="a registered name, see list_optimizers()")
    lr: float = Field(1e-3, ge=0.0, le=10.0, description="learning rate (before any schedule)")
    betas: list[float] | None = Field(
        None, max_length=3, description="moment coefficients, each in [0, 1)"
    )
    eps: float | None = Field(None, ge=0.0, le=1.0, description="denominator term")
    weight_decay: float | None = Field(None, ge=0.0, le=10.0, description="decoupled weight decay")
    no_decay_1d: bool = Field(
        True, description="exempt biases and norm weights (1-D parameters) from weight decay"
    )
    max_grad_norm: float = Field(
        0.0, ge=0.0, le=1e6, description="global gradient clipping; 0 = off"
    )
    lookahead: LookaheadSpec | None = Field(None, description="wrap in Lookahead")
    fused: bool | None = Field(None, description="compiled kernels; None = best available")

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        _entry(name.removeprefix(_LOOKAHEAD_PREFIX))
        return name

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: list[float] | None) -> list[float] | None:
        for i, beta in enumerate(betas or []):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"betas[{i}] = {beta!r} must be in [0, 1)")
        return betas

    @model_validator(mode="after")
    def _betas_count(self) -> OptimizerSpec:
        n = _entry(self.base_name).num_betas
        if self.betas is not None and len(self.betas) != n:
            raise ValueError(f"betas = {self.betas!r}: {self.base_name} takes {n} values")
        return self

    @property
    def base_name(self) -> str:
        """The registry name without a ``lookahead_`` prefix."""
        return self.name.removeprefix(_LOOKAHEAD_PREFIX)

    @property
    def lookahead_spec(self) -> LookaheadSpec | None:
        """Lookahead settings from the field or from a ``lookahead_`` name."""
        if self.lookahead is not None:
            return self.lookahead
        return LookaheadSpec() if self.name.startswith(_LOOKAHEAD_PREFIX) else None

    def state_bytes_per_param(self) -> int:
        """fp32 bytes of optimizer state per parameter (Lookahead adds a slow copy)."""
        extra = 4 if self.lookahead_spec else 0
        return _entry(self.base_name).state_bytes_per_param + extra

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the base optimizer class, fixed variants included."""
        entry = _entry(self.base_name)
        kwargs: dict[str, Any] = {"lr": self.lr, **entry.fixed}
        if self.betas is not None:
            kwargs["betas"] = tuple(self.betas)
        if self.eps is not None:
            kwargs["eps"] = self.eps
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        if self.max_grad_norm:
            kwargs["max_grad_norm"] = self.max_grad_norm
        if self.fused is not None and "fused" in _init_params(entry.cls):
            kwargs["fused"] = self.fused
        return kwargs


def _init_params(cls: type) -> set[str]:
    import inspect

    return set(inspect.signature(cls.__init__).parameters)


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
    entry = _entry(spec.base_name)
    optimizer = entry.cls(params, **spec.optimizer_kwargs())
    la = spec.lookahead_spec
    if la is not None:
        optimizer = Lookahead(optimizer, k=la.k, alpha=la.alpha)
    return optimizer


__all__ = [
    "LookaheadSpec",
    "OptimizerEntry",
    "OptimizerSpec",
    "create_optimizer",
    "list_optimizers",
    "param_groups_weight_decay",
]
