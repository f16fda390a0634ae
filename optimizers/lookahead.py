"""Lookahead (Zhang et al. 2019, https://arxiv.org/abs/1907.08610) around any optimizer."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from . import lowbit
from ._common import state_dtype

_SLOW = "slow_param"


class Lookahead(Optimizer):
    r"""Algorithm 1 of the Lookahead paper.

    .. math::
        \begin{aligned}
        & \phi_0 = \theta_0 \quad\text{(slow weights copied at construction)} \\
        & \text{every } k \text{ steps of the base optimizer:}\quad
          \phi \leftarrow \phi + \alpha(\theta - \phi), \quad \theta \leftarrow \phi
        \end{aligned}

    It shares ``param_groups`` with the base optimizer, so torch's LR schedulers drive both.
    The inner optimizer's state is kept across synchronisations (the paper's default).
    ``state_dict()`` is an ordinary optimizer state dict: each parameter's entry holds the
    base optimizer's state plus ``slow_param``; it loads into a fresh model and optimizer.
    When the base optimizer keeps its state in bf16 or int8 (``state_precision``), the slow
    weights are kept in bf16, rounded stochastically; the weights a synchronisation sets
    are the exact fp32 average, only the stored copy is rounded.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=5, alpha=0.5)
    """

    def __init__(self, base_optimizer: Optimizer, k: int = 5, alpha: float = 0.5) -> None:
        if not isinstance(base_optimizer, Optimizer):
            raise TypeError(f"Invalid base_optimizer: {base_optimizer!r} (expected an Optimizer)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (must be an integer >= 1)")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r} (must be in (0, 1])")
        self.base_optimizer = base_optimizer
        # Optimizer.__init__ appends the given group dicts themselves, so the groups are
        # shared with the base optimizer, not copied.
        self._sharing_groups = True
        super().__init__(base_optimizer.param_groups, dict(lookahead_k=k, lookahead_alpha=alpha))
        self._sharing_groups = False
        self.param_groups = base_optimizer.param_groups
        self.defaults = {**base_optimizer.defaults, **self.defaults}
        self.lookahead_step = 0
        self._copy_slow_weights(self.param_groups)

    @property
    def k(self) -> int:
        return self.param_groups[0]["lookahead_k"]

    @property
    def alpha(self) -> float:
        return self.param_groups[0]["lookahead_alpha"]

    @staticmethod
    def _slow_dtype(group: dict[str, Any], p: torch.Tensor) -> torch.dtype:
        low = group.get("state_precision", "fp32") != "fp32"
        return torch.bfloat16 if low else state_dtype(p)

    @torch.no_grad()
    def _copy_slow_weights(self, groups: list[dict[str, Any]]) -> None:
        for group in groups:
            for p in group["params"]:
                dtype = self._slow_dtype(group, p)
                slow = p.detach().to(state_dtype(p), copy=True)
                if dtype == torch.bfloat16:
                    slow = lowbit.to_bf16(slow.float(), 0)
                self.state[p][_SLOW] = slow

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_sharing_groups", False):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        group = self.base_optimizer.param_groups[-1]
        for key in ("lookahead_k", "lookahead_alpha"):
            group.setdefault(key, self.defaults[key])
        self._copy_slow_weights([group])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One base optimizer step; every k-th also pulls the weights toward the slow weights."""
        loss = self.base_optimizer.step(closure)
        self.lookahead_step += 1
        for group in self.param_groups:
            if self.lookahead_step % group["lookahead_k"] != 0:
                continue
            for p in group["params"]:
                slow = self.state[p][_SLOW]
                if slow.dtype == torch.bfloat16:  # phi in fp32, stored rounded
                    phi = slow.float()
                    phi.add_(p.float() - phi, alpha=group["lookahead_alpha"])
                    slow.copy_(lowbit.to_bf16(phi, self.lookahead_step))
                    p.copy_(phi)  # theta := phi
                    continue
                slow.add_(p.to(slow.dtype) - slow, alpha=group["lookahead_alpha"])  # phi
                p.copy_(slow)  # theta := phi
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        base = self.base_optimizer.state_dict()
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        state: dict[int, dict[str, Any]] = {i: dict(s) for i, s in base["state"].items()}
        for p, entry in self.state.items():
            state.setdefault(index[id(p)], {})[_SLOW] = entry[_SLOW]
        out = {**base, "state": state}
        out["lookahead_step"] = self.lookahead_step
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        base_state, slow = {}, {}
        for i, entry in state_dict["state"].items():
            entry = dict(entry)
            if _SLOW in entry:
                slow[int(i)] = entry.pop(_SLOW)
            if entry:
                base_state[i] = entry
        if len(slow) != len(params):
            raise ValueError(
                f"Invalid Lookahead state_dict: {len(slow)} slow weights for {len(params)} params"
            )
        self.base_optimizer.load_state_dict({**state_dict, "state": base_state})
        self.state = defaultdict(dict)
        dtypes = {id(p): self._slow_dtype(g, p) for g in self.param_groups for p in g["params"]}
        for i, p in enumerate(params):
            if slow[i].shape != p.shape:
                raise ValueError(
                    f"Invalid Lookahead state_dict: slow weight {i} has shape "
                    f"{tuple(slow[i].shape)}, parameter has {tuple(p.shape)}"
                )
            dtype = dtypes[id(p)]
            value = slow[i].to(device=p.device, copy=True)
            if dtype == torch.bfloat16 and value.dtype != dtype:
                value = lowbit.to_bf16(value.float(), int(state_dict.get("lookahead_step", 0)))
            self.state[p][_SLOW] = value.to(dtype)
        self.lookahead_step = int(state_dict.get("lookahead_step", 0))
        # The base optimizer's load replaced the shared group dicts: share the new ones.
        self.param_groups = self.base_optimizer.param_groups
