"""What Nestor's optimizers share, so that each keeps only its math and its paths: argument
checks, global gradient clipping, a step that walks the parameter groups, the flat buffers
of the fused path, and state dicts that travel between processes and implementations."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._common import (
    advance_steps,
    check_betas,
    check_non_negative,
    clip_coefficient,
    host_steps,
    own_state,
)
from ._fused import FlatStore, FlatViews

Runs = list[tuple[int, list[Tensor]]]  # (step, the flat buffers' slices) per run
Buckets = dict[int, list[Tensor]]  # parameters stepped per tensor, by step count


class NestorOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose subclass writes ``_step_group``: one parameter
    group's update, given the parameters that have gradients and the global clipping
    coefficient.

    ``defaults`` holds the group hyperparameters; ``lr``, ``eps`` and ``weight_decay`` must be
    finite and >= 0 and ``betas`` must have ``betas`` values in [0, 1). ``max_grad_norm`` is
    an optimizer setting, not a group one: clipping is by the norm of every gradient of every
    group. ``state_dict()`` carries it; ``load_state_dict()`` keeps this process's choice of
    implementation (``foreach``, ``fused``), copies the state so that the saving optimizer
    shares no tensor with this one, and keeps step counts on the host.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        betas: int,
        max_grad_norm: float,
    ) -> None:
        for name in ("lr", "eps", "weight_decay"):
            check_non_negative(name, defaults[name])
        check_non_negative("max_grad_norm", max_grad_norm)
        defaults["betas"] = check_betas(defaults["betas"], betas)
        if defaults.get("foreach") and defaults.get("fused"):
            raise ValueError("Invalid options: foreach=True and fused=True cannot both be set")
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._flat = FlatStore()
        self._flat_views = FlatViews()

    def _step_group(
        self, index: int, group: dict[str, Any], params: list[Tensor], clip: Tensor | None
    ) -> None:
        """Update ``group`` (the ``index``-th), whose ``params`` have gradients."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        clip = clip_coefficient(self.param_groups, self.max_grad_norm, self.defaults["eps"])
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(index, group, params, clip)
        return loss

    def _advance(
        self, index: int, params: list[Tensor], keys: tuple[str, ...], fused: bool
    ) -> tuple[Runs, Buckets]:
        """Count this step for ``params`` and say where each is stepped: the runs of the
        group's flat buffers (fused; one step count per run) and the rest per tensor,
        bucketed by step count, with zeroed state ``keys`` made on first use."""
        flat = self._flat.bind(index, params, self.state, keys) if fused else None
        runs = flat.advance() if flat is not None else []
        rest = flat.outside if flat is not None else params
        return runs, advance_steps(self.state, rest, keys) if rest else {}

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["max_grad_norm"] = self.max_grad_norm
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = []
        for saved, current in zip(state_dict["param_groups"], self.param_groups, strict=False):
            saved = {k: v for k, v in saved.items() if k in current}
            # The implementation choice belongs to this process, not to the checkpoint.
            for key in ("foreach", "fused"):
                if key in current:
                    saved[key] = current[key]
            groups.append(saved)
        self.max_grad_norm = float(state_dict.get("max_grad_norm", self.max_grad_norm))
        super().load_state_dict({"state": own_state(state_dict["state"]), "param_groups": groups})
        host_steps(self.state)
