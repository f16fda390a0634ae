"""AdamW and AMSGrad against torch.optim.AdamW, and their three paths against each other."""

from __future__ import annotations

import pytest
import torch

from optimizers import AdamW

from .helpers import make_params, max_diff, run

KW = dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("impl", ["single", "foreach"])
def test_equals_torch_adamw(amsgrad, impl):
    def make(cls, **extra):
        return lambda ps: cls(ps, amsgrad=amsgrad, **KW, **extra)

    ours = run(make(AdamW, foreach=impl == "foreach", fused=False), torch.float64, steps=10)
    torch_ = run(make(torch.optim.AdamW, foreach=False), torch.float64, steps=10)
    assert max_diff(ours, torch_) <= 1e-15


def test_amsgrad_keeps_the_running_max_of_the_raw_second_moment():
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = AdamW([p], lr=0.1, betas=(0.0, 0.5), weight_decay=0.0, amsgrad=True)
    for g in (4.0, 0.0, 0.0):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    # v: 8, 4, 2 (beta2 = 0.5) -> the max stays 8.
    assert opt.state[p]["exp_avg_sq"].item() == 2.0
    assert opt.state[p]["max_exp_avg_sq"].item() == 8.0


@pytest.mark.compile
@pytest.mark.parametrize("amsgrad", [False, True])
def test_fused_equals_single(amsgrad):
    kw = dict(KW, amsgrad=amsgrad, max_grad_norm=50.0)
    single = run(lambda ps: AdamW(ps, foreach=False, fused=False, **kw), torch.float32)
    fused = run(lambda ps: AdamW(ps, fused=True, **kw), torch.float32)
    assert max_diff(single, fused) <= 1e-6


def test_loads_torch_adamw_state_dict_and_continues_identically():
    params = make_params(torch.float64)
    reference = torch.optim.AdamW(params, foreach=False, **KW)
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        reference.step()
    clone = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ours = AdamW(clone, foreach=False)
    ours.load_state_dict(reference.state_dict())
    assert ours.param_groups[0]["weight_decay"] == 0.05
    for p, q in zip(params, clone, strict=True):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        p.grad, q.grad = g, g.clone()
    reference.step()
    ours.step()
    assert max_diff(params, clone) <= 1e-15


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -0.1}, "lr"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (-0.1, 0.9)}, r"betas\[0\]"),
        ({"eps": -1.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        AdamW([torch.nn.Parameter(torch.ones(1))], **kwargs)
