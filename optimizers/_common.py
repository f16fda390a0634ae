"""Shared pieces of Nestor's optimizers: argument checks, gradient clipping, path selection."""

from __future__ import annotations

import functools
import math
import shutil
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# Parameters with fewer elements than this in total are stepped eagerly by default:
# the one-off compile of the fused path (seconds) only pays for itself on large models.
FUSED_DEFAULT_MIN_NUMEL = 1 << 20


def check_non_negative(name: str, value: float) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite number >= 0."""
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def check_betas(betas: Sequence[float], count: int) -> tuple[float, ...]:
    """Validate ``betas``: exactly ``count`` values, each in [0, 1)."""
    try:
        betas = tuple(float(b) for b in betas)
    except TypeError:
        raise ValueError(f"Invalid betas: {betas!r} (expected {count} numbers)") from None
    if len(betas) != count:
        raise ValueError(f"Invalid betas: {betas!r} (expected {count} values, got {len(betas)})")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid betas[{i}]: {beta!r} (must be in [0, 1))")
    return betas


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state is kept in fp32 for low-precision parameters, else in their dtype."""
    return torch.float32 if param.dtype in (torch.float16, torch.bfloat16) else param.dtype


def clip_coefficient(groups: list[dict[str, Any]], max_norm: float, eps: float) -> Tensor | None:
    """min(1, max_norm / (||grads||_2 + eps)) as a tensor (no host sync), or None if off.

    The norm is global: one L2 norm over every gradient of every group, as in the Adan
    reference code. With clipping off, no gradient is looked at.
    """
    if max_norm <= 0:
        return None
    grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
    if not grads:
        return None
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return torch.clamp(max_norm / (total + eps), max=1.0)


def fused_available(device: torch.device) -> bool:
    """Whether torch.compile can build kernels for ``device`` (Triton on GPU, C++ on CPU)."""
    return _fused_available(device.type)


@functools.cache
def _fused_available(device_type: str) -> bool:  # asked every step: look once
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    if device_type == "cpu":
        return shutil.which("g++") is not None or shutil.which("c++") is not None
    return False


def choose_impl(params: list[Tensor], foreach: bool | None, fused: bool | None) -> str:
    """Pick "single", "foreach" or "fused" for a step, honouring explicit user choices.

    With both left as None: the compiled fused path when it can be built and the model is
    large enough to repay its compile; otherwise foreach on accelerators and the single-tensor
    path on CPU, where torch's foreach kernels are slower than a plain loop.
    """
    if fused and foreach:
        raise ValueError("Invalid options: foreach=True and fused=True cannot both be set")
    if not params:
        return "single"
    device = params[0].device
    if fused:
        if not fused_available(device):
            raise RuntimeError(f"fused=True needs torch.compile support for {device}")
        return "fused"
    if fused is None and foreach is None:
        numel = sum(p.numel() for p in params)
        if numel >= FUSED_DEFAULT_MIN_NUMEL and fused_available(device):
            return "fused"
    if foreach is None:
        foreach = device.type != "cpu"
    return "foreach" if foreach else "single"


def advance_steps(
    state: dict[Tensor, dict[str, Any]], params: list[Tensor], state_keys: Sequence[str]
) -> dict[int, list[Tensor]]:
    """Create each parameter's zeroed state on first use, count the step, and bucket the
    parameters by step count (they differ only when a parameter skipped steps, and then
    need their own bias correction)."""
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("Nestor optimizers do not support sparse gradients")
        entry = state[p]
        if len(entry) == 0:
            entry["step"] = torch.tensor(0.0)
            for key in state_keys:
                entry[key] = torch.zeros_like(p, dtype=state_dtype(p))
    steps = [state[p]["step"] for p in params]
    torch._foreach_add_(steps, 1.0)  # one call, not one per parameter
    buckets: dict[int, list[Tensor]] = {}
    for p, step in zip(params, torch.stack(steps).tolist(), strict=True):
        buckets.setdefault(int(step), []).append(p)
    return buckets


def adam_scalars(group: dict[str, Any], step: int, clip: Tensor | None) -> dict[str, Any]:
    """An Adam-style update's scalars for ``group`` at ``step`` (two betas, their bias
    corrections, lr, weight decay, eps and the clip coefficient)."""
    beta1, beta2 = group["betas"]
    return dict(
        beta1=beta1,
        beta2=beta2,
        bias_correction1=1 - beta1**step,
        bias_correction2=1 - beta2**step,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        clip=clip,
    )


def host_steps(state: dict[Any, dict[str, Any]]) -> None:
    """Keep every ``step`` count a CPU tensor after ``load_state_dict``, which moves it to
    the parameter's device for groups marked ``fused``: bias corrections are computed on
    the host, and reading a count from a GPU would stall every step."""
    for entry in state.values():
        step = entry.get("step")
        if isinstance(step, Tensor) and step.device.type != "cpu":
            entry["step"] = step.to("cpu", torch.float32)


def own_state(state: dict[Any, dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    """Copy a state dict's per-parameter entries so the loading optimizer shares no tensor
    with the saving one (torch's load_state_dict keeps ``step`` tensors as given)."""
    return {
        k: {name: v.clone() if isinstance(v, Tensor) else v for name, v in entry.items()}
        for k, entry in state.items()
    }
