"""What Nestor's optimizers share, so that each keeps only its math and its paths: argument
checks, global gradient clipping, a step that walks the parameter groups, the flat buffers
of the fused path, and state dicts that travel between processes and implementations."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import lowbit
from ._common import (
    advance_steps,
    check_betas,
    check_non_negative,
    clip_coefficient,
    host_steps,
    own_state,
    state_dtype,
)
from ._fused import FlatStore, FlatViews
from ._lowbit_kernels import encodable, entry_keys

Runs = list[tuple[int, list[Tensor]]]  # (step, the flat buffers' slices) per run
Buckets = dict[int, list[Tensor]]  # parameters stepped per tensor, by step count


class NestorOptimizer(Optimizer):
    """A ``torch.optim.Optimizer`` whose subclass writes ``_step_group``: one parameter
    group's update, given the parameters that have gradients and the global clipping
    coefficient.

    ``defaults`` holds the group hyperparameters; ``lr``, ``eps`` and ``weight_decay`` must be
    finite and >= 0 and ``betas`` must have ``betas`` values in [0, 1). ``max_grad_norm`` is
    an optimizer setting, not a group one: clipping is by the norm of every gradient of every
    group. ``state_precision`` (a group option: "fp32", "bf16" or "int8", see ``lowbit``)
    says how the state is stored; whatever a loaded state dict holds is converted to it.
    ``state_dict()`` carries max_grad_norm; ``load_state_dict()`` keeps this process's choice of
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
        lowbit.check_precision(defaults.setdefault("state_precision", "fp32"))
        if defaults.get("foreach") and defaults.get("fused"):
            raise ValueError("Invalid options: foreach=True and fused=True cannot both be set")
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm
        self._flat = FlatStore()
        self._flat_views = FlatViews()
        # State formats fixed from outside (ZeroOptimizer: a shard holds pieces of whole
        # parameters, whose size, not the shard's, decides whether int8 applies).
        self._pinned_formats: dict[Tensor, str] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        lowbit.check_precision(self.param_groups[-1]["state_precision"])

    def pin_state_format(self, tensors: Iterable[Tensor], fmt: str) -> None:
        """Keep the state of ``tensors`` in ``fmt`` ("fp32", "bf16" or "int8") whatever
        their size; called before their first step."""
        lowbit.check_precision(fmt)
        for t in tensors:
            self._pinned_formats[t] = fmt

    def state_format(self, group: dict[str, Any], p: Tensor) -> str:
        """The format of ``p``'s state: its group's precision, fp32 under int8 for tensors
        of fewer than ``lowbit.MIN_QUANT_NUMEL`` elements, unless pinned."""
        pinned = self._pinned_formats.get(p)
        if pinned is not None:
            return pinned
        return lowbit.tensor_format(group["state_precision"], p.numel())

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
        group = self.param_groups[index]
        precision = group["state_precision"]
        if precision == "fp32":
            flat = self._flat.bind(index, params, self.state, keys) if fused else None
            runs = flat.advance() if flat is not None else []
            rest = flat.outside if flat is not None else params
            return runs, advance_steps(self.state, rest, keys) if rest else {}
        for p in params:
            entry = self.state[p]
            if len(entry) == 0:
                entry["step"] = torch.tensor(0.0)
                fmt = self.state_format(group, p)
                for key in keys:
                    entry.update(lowbit.zeros(p, key, fmt, state_dtype(p)))
        # The flat buffers hold the tensors whose state is in the group's format (under
        # int8 not the small ones, whose state stays fp32).
        candidates = [p for p in params if self.state_format(group, p) == precision]
        flat = None
        if fused and candidates:
            flat = self._flat.bind(index, candidates, self.state, keys, precision)
        runs = flat.advance() if flat is not None else []
        members = {id(p) for p in flat.members} if flat is not None else set()
        rest = [p for p in params if id(p) not in members]
        return runs, advance_steps(self.state, rest, keys) if rest else {}

    def _lowbit_split(
        self, bucket: list[Tensor], keys: tuple[str, ...], fused: bool
    ) -> tuple[list[list[Tensor]], list[Tensor], list[Tensor]]:
        """Where each tensor of a low-bit group's ``bucket`` (stepped per tensor) is
        stepped: (by the compiled encoded kernel, one list per format; by the fp32 paths
        (its state is fp32); by ``_step_decoded``). Without ``fused`` everything takes the
        readable path."""
        if not fused:
            return [], [], bucket
        kernel: dict[str, list[Tensor]] = {}
        fp32, decoded = [], []
        for p in bucket:
            entry = self.state[p]
            fmt = lowbit.state_format(entry, keys[0])
            if fmt == "fp32":
                fp32.append(p)
            elif encodable(p, [entry[k] for k in entry_keys(keys, fmt)]):
                kernel.setdefault(fmt, []).append(p)
            else:
                decoded.append(p)
        return list(kernel.values()), fp32, decoded

    def _encoded_lists(self, bucket: list[Tensor], keys: tuple[str, ...]) -> list[list[Tensor]]:
        """The tensor lists an encoded kernel takes for ``bucket`` (one format): parameters,
        gradients, then each state entry (buffers, then int8 scales)."""
        fmt = lowbit.state_format(self.state[bucket[0]], keys[0])
        states = [self.state[p] for p in bucket]
        return [bucket, [p.grad for p in bucket]] + [
            [s[k] for s in states] for k in entry_keys(keys, fmt)
        ]

    def _step_decoded(
        self,
        bucket: list[Tensor],
        keys: tuple[str, ...],
        step: int,
        update: Callable[..., None],
        **kwargs: Any,
    ) -> None:
        """The readable low-bit path: per tensor, its state ``keys`` decoded to fp32,
        ``update(param, states, **kwargs)`` (the fp32 single-tensor math) and the states
        encoded back, so at most one tensor's fp32 state exists at a time."""
        for p in bucket:
            entry = self.state[p]
            work = [lowbit.decode(entry, key, state_dtype(p)) for key in keys]
            update(p, work, **kwargs)
            for key, value in zip(keys, work, strict=True):
                lowbit.encode(entry, key, value, step)

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["max_grad_norm"] = self.max_grad_norm
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = []
        for saved, current in zip(state_dict["param_groups"], self.param_groups, strict=False):
            saved = {k: v for k, v in saved.items() if k in current}
            # The implementation choice, and the state's format, belong to this process, not
            # to the checkpoint (the state is converted to the format: _conform_state).
            for key in ("foreach", "fused", "state_precision"):
                if key in current:
                    saved[key] = current[key]
            groups.append(saved)
        self.max_grad_norm = float(state_dict.get("max_grad_norm", self.max_grad_norm))
        super().load_state_dict({"state": own_state(state_dict["state"]), "param_groups": groups})
        host_steps(self.state)
        self._conform_state(state_dict)

    @torch.no_grad()
    def _conform_state(self, state_dict: dict[str, Any]) -> None:
        """Put each loaded state tensor in this optimizer's format for it. torch's load casts
        state to the parameter's dtype (bf16 codes to fp32, fp32 state of bf16 parameters to
        bf16): the values are taken again from the saved tensors, decoded, and stored in the
        format this optimizer keeps (so fp32 state loads into an int8 optimizer, and back)."""
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(g, p) for g in self.param_groups for p in g["params"]]
        for saved_id, (group, p) in zip(saved_ids, params, strict=False):
            saved = state_dict["state"].get(saved_id)
            entry = self.state.get(p)
            if not saved or not entry:
                continue
            keys = [
                k
                for k, v in saved.items()
                if isinstance(v, Tensor)
                and v.ndim > 0
                and not lowbit.is_scale(k)
                and v.numel() == p.numel()
            ]
            fmt = self.state_format(group, p)
            step = int(entry["step"]) if "step" in entry else 0
            for key in keys:
                for k in (key, key + lowbit.SCALE_SUFFIX):
                    entry.pop(k, None)
                entry.update(lowbit.zeros(p, key, fmt, state_dtype(p)))
                if lowbit.state_format(saved, key) == fmt:  # as saved, bit for bit
                    for k in (key, key + lowbit.SCALE_SUFFIX):
                        if k in entry:
                            entry[k].copy_(saved[k])
                else:
                    value = lowbit.decode(saved, key, state_dtype(p)).to(p.device)
                    lowbit.encode(entry, key, value, step)
