"""Deterministic toy problems for comparing optimizers step by step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.optim import Optimizer

# Uneven shapes: 1-D and 2-D, tiny and large enough for the fused path (>= 4096 elements),
# and five large ones.
SHAPES = [(3,), (10, 10), (64, 65), (4100,), (70, 70), (5000,), (4097,), (17, 5)]


def make_params(dtype: torch.dtype = torch.float32, shapes=SHAPES, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in shapes
    ]


def run(
    make_opt: Callable[[list[torch.nn.Parameter]], Optimizer],
    dtype: torch.dtype = torch.float32,
    steps: int = 5,
    shapes=SHAPES,
    grad_scale: float = 1.0,
) -> list[torch.Tensor]:
    """Step ``make_opt(params)`` on a fixed gradient sequence; return the final params."""
    params = make_params(dtype, shapes)
    opt = make_opt(params)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = (grad_scale * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(
                dtype
            )
        opt.step()
    return [p.detach().clone() for p in params]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b, strict=True))
