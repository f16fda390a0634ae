"""LAMB against an independent NumPy transcription of the update rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optimizers import LAMB

from .helpers import SHAPES, make_params, max_diff, run


def lamb_numpy(p0, grads, lr, b1, b2, eps, wd):
    p = p0.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * p
        wn, un = np.linalg.norm(p), np.linalg.norm(u)
        r = wn / un if wn > 0 and un > 0 else 1.0
        p = p - lr * r * u
    return p


@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_matches_numpy_lamb(impl):
    rng = np.random.default_rng(0)
    params = make_params(torch.float64, SHAPES[:4])
    starts = [p.detach().numpy().copy() for p in params]
    grads = [[rng.standard_normal(p.shape) for p in params] for _ in range(6)]
    opt = LAMB(
        params, lr=0.02, betas=(0.9, 0.99), eps=1e-6, weight_decay=0.1, foreach=impl == "foreach"
    )
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = torch.from_numpy(g)
        opt.step()
    for i, p in enumerate(params):
        expected = lamb_numpy(starts[i], [g[i] for g in grads], 0.02, 0.9, 0.99, 1e-6, 0.1)
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-13)


def test_trust_ratio_is_one_for_zero_weights():
    # A zero-initialised tensor (||p|| = 0) takes a plain Adam-direction step.
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    opt = LAMB([p], lr=0.1, weight_decay=0.0, eps=0.0)
    p.grad = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(p.grad))


def test_update_norm_is_lr_times_weight_norm():
    # ||p_t - p_{t-1}|| = lr * ||p_{t-1}|| whenever both norms are non-zero.
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0], dtype=torch.float64))
    opt = LAMB([p], lr=0.01, weight_decay=0.0)
    p.grad = torch.tensor([1.0, 0.5], dtype=torch.float64)
    opt.step()
    moved = (p.detach() - torch.tensor([3.0, 4.0], dtype=torch.float64)).norm().item()
    assert abs(moved - 0.01 * 5.0) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_foreach_equals_single(dtype):
    kw = dict(lr=0.01, weight_decay=0.02, max_grad_norm=20.0)
    single = run(lambda ps: LAMB(ps, foreach=False, **kw), dtype)
    foreach = run(lambda ps: LAMB(ps, foreach=True, **kw), dtype)
    assert max_diff(single, foreach) <= (1e-6 if dtype == torch.float32 else 2e-2)
