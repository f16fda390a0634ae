"""Adan against the paper's math, the reference implementation and its own paths."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_optimizer import Adan as PoAdan

from optimizers import Adan

from .helpers import SHAPES, make_params, max_diff, run


def adan_by_hand(g_seq, p0, lr, b1, b2, b3, eps, wd, no_prox):
    """Algorithm 1 with the reference bias correction, written out per step in fp64."""
    p = p0.clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    n = torch.zeros_like(p)
    g_prev = g_seq[0]
    for t, g in enumerate(g_seq, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * (g - g_prev)
        n = b3 * n + (1 - b3) * (g + b2 * (g - g_prev)) ** 2
        eta = lr / (torch.sqrt(n / (1 - b3**t)) + eps)
        if no_prox:
            p = p * (1 - lr * wd)
        p = p - eta * (m / (1 - b1**t) + b2 * v / (1 - b2**t))
        if not no_prox:
            p = p / (1 + lr * wd)
        g_prev = g
    return p


def test_first_step_values_by_hand():
    # Step 1: m = (1-b1) g, v = 0, n = (1-b3) g^2, so with bias correction the update is
    # lr * g / (|g| + eps) = lr * sign(g) for |g| >> eps.
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = Adan([p], lr=0.1, foreach=False)
    p.grad = torch.tensor([3.0, -0.5, 1e-3], dtype=torch.float64)
    opt.step()
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) - 0.1 * torch.sign(p.grad)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
    state = opt.state[p]
    torch.testing.assert_close(state["exp_avg"], 0.02 * p.grad)
    torch.testing.assert_close(state["exp_avg_diff"], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(state["exp_avg_sq"], 0.01 * p.grad**2)
    torch.testing.assert_close(state["neg_pre_grad"], -p.grad)


@pytest.mark.parametrize("no_prox", [False, True])
@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_matches_algorithm_1_by_hand(no_prox, impl):
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(50, generator=gen, dtype=torch.float64)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(6)]
    p = torch.nn.Parameter(p0.clone())
    opt = Adan(
        [p],
        lr=0.05,
        betas=(0.9, 0.8, 0.95),
        eps=1e-6,
        weight_decay=0.1,
        no_prox=no_prox,
        foreach=impl == "foreach",
        fused=False,
    )
    for g in grads:
        p.grad = g.clone()
        opt.step()
    expected = adan_by_hand(grads, p0, 0.05, 0.9, 0.8, 0.95, 1e-6, 0.1, no_prox)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("no_prox", [False, True])
@pytest.mark.parametrize("max_grad_norm", [0.0, 5.0])
def test_matches_pytorch_optimizer_adan(no_prox, max_grad_norm):
    kw = dict(lr=0.01, betas=(0.98, 0.92, 0.99), weight_decay=0.02, max_grad_norm=max_grad_norm)
    ours = run(
        lambda ps: Adan(ps, no_prox=no_prox, foreach=False, fused=False, **kw),
        torch.float64,
        steps=10,
    )
    theirs = run(
        lambda ps: PoAdan(ps, weight_decouple=no_prox, foreach=False, **kw), torch.float64, steps=10
    )
    # The reference computes the clipping norm in fp32 (Nestor in the gradient's dtype), so
    # with clipping on the two agree to fp32 rounding of that one scalar.
    assert max_diff(ours, theirs) < (1e-7 if max_grad_norm else 1e-12)


def test_clipping_scales_by_global_norm():
    # ||g|| = 5 with max_grad_norm 1: every step sees g / 5, the same as feeding g / 5.
    def grads(scale):
        p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
        return p

    p1, p2 = grads(1), grads(1)
    o1 = Adan([p1], lr=0.1, max_grad_norm=1.0, eps=0.0, foreach=False)
    o2 = Adan([p2], lr=0.1, eps=0.0, foreach=False)
    for g in ([3.0, 4.0], [0.0, 5.0], [-4.0, 3.0]):
        p1.grad = torch.tensor(g, dtype=torch.float64)
        p2.grad = torch.tensor(g, dtype=torch.float64) / 5
        o1.step()
        o2.step()
        torch.testing.assert_close(o1.state[p1]["exp_avg"], o2.state[p2]["exp_avg"])
    torch.testing.assert_close(p1.detach(), p2.detach())
    assert p1.grad.tolist() == [-4.0, 3.0], "clipping must not modify the user's gradients"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_foreach_equals_single(dtype):
    kw = dict(lr=0.01, weight_decay=0.02, max_grad_norm=50.0)
    single = run(lambda ps: Adan(ps, foreach=False, fused=False, **kw), dtype)
    foreach = run(lambda ps: Adan(ps, foreach=True, **kw), dtype)
    assert max_diff(single, foreach) <= (1e-13 if dtype == torch.float64 else 1e-6)


@pytest.mark.compile
@pytest.mark.parametrize("no_prox", [False, True])
def test_fused_equals_single(no_prox):
    kw = dict(lr=0.01, weight_decay=0.02, max_grad_norm=50.0, no_prox=no_prox)
    single = run(lambda ps: Adan(ps, foreach=False, fused=False, **kw), torch.float32)
    fused = run(lambda ps: Adan(ps, fused=True, **kw), torch.float32)
    assert max_diff(single, fused) <= 1e-6


@pytest.mark.compile
def test_bf16_params_keep_fp32_state_on_every_path():
    kw = dict(lr=0.01, weight_decay=0.02)
    results = {}
    for impl in ("single", "foreach", "fused"):
        params = make_params(torch.bfloat16)
        opt = Adan(params, foreach=impl == "foreach", fused=impl == "fused", **kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
            opt.step()
        assert all(p.dtype == torch.bfloat16 for p in params)
        for p in params:
            for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):
                assert opt.state[p][key].dtype == torch.float32
        results[impl] = params
    # bf16 rounding of the result is the only difference between paths (one ulp at most).
    for impl in ("foreach", "fused"):
        for a, b in zip(results["single"], results[impl], strict=True):
            ulp = a.detach().float().abs().clamp_min(1e-3) * 2**-7
            assert ((a.float() - b.float()).abs() <= ulp).all()


def test_state_dict_round_trip_steps_in_lockstep():
    params = make_params(torch.float64)
    opt = Adan(params, lr=0.01, weight_decay=0.02, max_grad_norm=10.0)
    gen = torch.Generator().manual_seed(3)

    def feed(ps):
        g = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ps]
        return g

    for _ in range(3):
        for p, g in zip(params, feed(params), strict=True):
            p.grad = g
        opt.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = Adan(clone, lr=0.5)  # hyperparameters come from the state dict
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == 0.01 and opt2.max_grad_norm == 10.0
    for _ in range(4):
        grads = feed(params)
        for p, q, g in zip(params, clone, grads, strict=True):
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt2.step()
        assert max_diff(params, clone) == 0.0


def test_loads_reference_implementation_state_dict():
    # The sail-sg/Adan format keeps "step" in the param group and has foreach/fused/
    # max_grad_norm group keys; its per-parameter state has the same four buffers.
    kw = dict(lr=0.01, weight_decay=0.02)
    params = make_params(torch.float64, SHAPES[:3])
    ref_opt = PoAdan([torch.nn.Parameter(p.detach().clone()) for p in params], **kw)
    ours = Adan(params, foreach=False, **kw)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, q, g in zip(params, ref_opt.param_groups[0]["params"], grads, strict=True):
            p.grad, q.grad = g, g.clone()
        ours.step()
        ref_opt.step()
    ref_sd = ref_opt.state_dict()
    reference_format = {
        "state": {
            i: {
                "exp_avg": s["exp_avg"],
                "exp_avg_sq": s["exp_avg_sq"],
                "exp_avg_diff": s["exp_avg_diff"],
                "neg_pre_grad": s["previous_grad"],  # it holds -g_prev too
            }
            for i, s in ref_sd["state"].items()
        },
        "param_groups": [
            {**g, "foreach": True, "fused": False, "max_grad_norm": 0.0, "no_prox": False}
            for g in ref_sd["param_groups"]
        ],
    }
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    loaded = Adan(fresh, foreach=False, **kw)
    loaded.load_state_dict(reference_format)
    assert loaded.param_groups[0]["foreach"] is False  # ours, not the checkpoint's
    for p, q in zip(params, fresh, strict=True):
        assert loaded.state[q]["step"].item() == 3
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g, g.clone()
    ours.step()
    loaded.step()
    assert max_diff(params, fresh) < 1e-14


def test_restart_resets_moments_and_step():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = Adan([p], lr=0.1)
    for _ in range(3):
        p.grad = torch.randn(4, dtype=torch.float64)
        opt.step()
    opt.restart()
    assert opt.state[p]["step"].item() == 0
    assert all(opt.state[p][k].abs().sum() == 0 for k in ("exp_avg", "exp_avg_sq", "exp_avg_diff"))
    # After a restart the next step is a first step again: update = lr * sign(g).
    before = p.detach().clone()
    p.grad = torch.tensor([2.0, -1.0, 3.0, -4.0], dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), before - 0.1 * torch.sign(p.grad), atol=1e-6, rtol=0)


def test_lr_scheduler_drives_adan():
    p = torch.nn.Parameter(torch.ones(3))
    opt = Adan([p], lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert math.isclose(opt.param_groups[0]["lr"], 0.125)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"eps": -1e-8}, "eps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"betas": (0.9, 0.9)}, "betas"),
        ({"betas": (0.9, 1.0, 0.9)}, r"betas\[1\]"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"lr": float("nan")}, "lr"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        Adan([torch.nn.Parameter(torch.ones(1))], **kwargs)
