"""Lookahead against Algorithm 1 of the paper, with every base optimizer."""

from __future__ import annotations

import copy

import pytest
import torch

from optimizers import LAMB, AdamW, Adan, Lookahead, create_optimizer


def test_matches_algorithm_1_around_sgd():
    # With SGD inside, Algorithm 1 can be written out in full.
    k, alpha, lr = 3, 0.5, 0.1
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0], dtype=torch.float64))
    opt = Lookahead(torch.optim.SGD([p], lr=lr), k=k, alpha=alpha)
    grads = [torch.tensor([0.1 * t, -0.2 * t], dtype=torch.float64) for t in range(1, 8)]
    slow = torch.tensor([1.0, -1.0], dtype=torch.float64)  # phi_0 = theta_0
    fast = slow.clone()
    for t, g in enumerate(grads, start=1):
        p.grad = g
        opt.step()
        fast = fast - lr * g
        if t % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
        torch.testing.assert_close(p.detach(), fast, rtol=0, atol=1e-15)
    torch.testing.assert_close(opt.state[p]["slow_param"], slow, rtol=0, atol=1e-15)


def test_slow_weights_are_copied_at_construction():
    p = torch.nn.Parameter(torch.tensor([2.0, 3.0]))
    opt = Lookahead(AdamW([p]), k=2)
    torch.testing.assert_close(opt.state[p]["slow_param"], torch.tensor([2.0, 3.0]))
    assert opt.state[p]["slow_param"].data_ptr() != p.data_ptr()


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", ["adan", "adamw", "amsgrad", "lamb"])
def test_state_dict_round_trip_into_a_fresh_model(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    spec = {"name": name, "lr": 0.01, "lookahead": {"k": 3, "alpha": 0.5}}
    opt = create_optimizer(model.parameters(), spec)
    _train(model, opt, 4, seed=1)  # stop mid-cycle (4 % 3 != 0)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())

    fresh = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    fresh.load_state_dict(saved_model)
    fresh_opt = create_optimizer(fresh.parameters(), spec)
    fresh_opt.load_state_dict(saved_opt)

    _train(model, opt, 5, seed=2)
    _train(fresh, fresh_opt, 5, seed=2)
    for a, b in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("base", [Adan, AdamW, LAMB])
def test_lr_scheduler_drives_the_base_optimizer(base):
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lookahead(base([p], lr=1.0), k=2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.125
    assert opt.param_groups is opt.base_optimizer.param_groups


def test_add_param_group_reaches_base_and_copies_slow_weights():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.full((2,), 3.0))
    opt = Lookahead(AdamW([a]), k=2)
    opt.add_param_group({"params": [b], "lr": 0.5})
    assert len(opt.base_optimizer.param_groups) == 2
    assert opt.param_groups[1]["lookahead_k"] == 2
    torch.testing.assert_close(opt.state[b]["slow_param"], torch.full((2,), 3.0))


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"k": 0}, "k"), ({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha")]
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    p = torch.nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        Lookahead(AdamW([p]), **kwargs)
