"""The optimizer half of the job contract: ``OptimizerSpec`` and the table of names.

Torch-free on purpose: the service validates every submitted spec with this module and must
not import torch to do it. What each name builds (the classes, their sharding hooks) is in
``registry``; this table says only what a spec may ask for.

Variants are data: ``adanw`` is Adan with ``no_prox=True``, ``amsgrad`` is AdamW with
``amsgrad=True``. Names compose: ``lookahead_adan`` wraps Adan in Lookahead, the same as
``{"name": "adan", "lookahead": {}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LOOKAHEAD_PREFIX = "lookahead_"
# Bytes per element of one state buffer in each state_precision (int8: a code, and an fp32
# scale per block of 256 elements; see optimizers.lowbit, which this must agree with).
STATE_BYTES_PER_ELEMENT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0 + 4.0 / 256}


@dataclass(frozen=True)
class NameEntry:
    """One optimizer name: its class (by name, resolved in ``registry``), fixed keyword
    arguments, and what its state costs."""

    cls: str
    fixed: dict[str, Any] = field(default_factory=dict)
    num_betas: int = 2
    state_bytes_per_param: int = 8  # fp32 state, for sizing and the docs
    fusable: bool = False  # takes ``fused=`` (compiled kernels)
    description: str = ""


NAMES: dict[str, NameEntry] = {
    "adan": NameEntry("Adan", {}, 3, 16, True, "Adan with proximal weight decay (paper default)"),
    "adanw": NameEntry("Adan", {"no_prox": True}, 3, 16, True, "Adan with AdamW-style decay"),
    "adamw": NameEntry("AdamW", {}, 2, 8, True, "AdamW, equal to torch.optim.AdamW"),
    "amsgrad": NameEntry("AdamW", {"amsgrad": True}, 2, 12, True, "AdamW with AMSGrad's max"),
    "lamb": NameEntry("LAMB", {}, 2, 8, False, "LAMB, layer-wise trust ratios"),
}


def list_optimizers() -> list[str]:
    """Registered names, base names first, then their ``lookahead_`` compositions."""
    return sorted(NAMES) + [LOOKAHEAD_PREFIX + n for n in sorted(NAMES)]


def name_entry(name: str) -> NameEntry:
    """The table row of a base name; ValueError naming the known ones otherwise."""
    if name not in NAMES:
        known = ", ".join(list_optimizers())
        raise ValueError(f"Unknown optimizer name: {name!r} (known: {known})")
    return NAMES[name]


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
    state_precision: Literal["fp32", "bf16", "int8"] = Field(
        "fp32",
        description="how the optimizer state is stored: fp32, bf16 (half the bytes) or "
        "block-wise int8 (a quarter, scales included; tensors under 4,096 elements stay fp32)",
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        name_entry(name.removeprefix(LOOKAHEAD_PREFIX))
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
        n = name_entry(self.base_name).num_betas
        if self.betas is not None and len(self.betas) != n:
            raise ValueError(f"betas = {self.betas!r}: {self.base_name} takes {n} values")
        return self

    @property
    def base_name(self) -> str:
        """The registry name without a ``lookahead_`` prefix."""
        return self.name.removeprefix(LOOKAHEAD_PREFIX)

    @property
    def lookahead_spec(self) -> LookaheadSpec | None:
        """Lookahead settings from the field or from a ``lookahead_`` name."""
        if self.lookahead is not None:
            return self.lookahead
        return LookaheadSpec() if self.name.startswith(LOOKAHEAD_PREFIX) else None

    def state_bytes_per_param(self) -> float:
        """Bytes of optimizer state per parameter at ``state_precision`` for tensors large
        enough to be quantized (Lookahead adds a slow copy, bf16 below fp32)."""
        buffers = name_entry(self.base_name).state_bytes_per_param // 4
        per_buffer = STATE_BYTES_PER_ELEMENT[self.state_precision]
        extra = 0 if not self.lookahead_spec else 4 if self.state_precision == "fp32" else 2
        return buffers * per_buffer + extra

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the base optimizer class, fixed variants included."""
        entry = name_entry(self.base_name)
        kwargs: dict[str, Any] = {"lr": self.lr, **entry.fixed}
        if self.betas is not None:
            kwargs["betas"] = tuple(self.betas)
        if self.eps is not None:
            kwargs["eps"] = self.eps
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        if self.max_grad_norm:
            kwargs["max_grad_norm"] = self.max_grad_norm
        if self.fused is not None and entry.fusable:
            kwargs["fused"] = self.fused
        if self.state_precision != "fp32":
            kwargs["state_precision"] = self.state_precision
        return kwargs


__all__ = [
    "LOOKAHEAD_PREFIX",
    "NAMES",
    "LookaheadSpec",
    "NameEntry",
    "OptimizerSpec",
    "list_optimizers",
    "name_entry",
]
