"""The registry, OptimizerSpec validation, and convergence of every registered optimizer."""

from __future__ import annotations

import pydantic
import pytest
import torch

from optimizers import (
    LAMB,
    AdamW,
    Adan,
    Lookahead,
    OptimizerSpec,
    create_optimizer,
    list_optimizers,
    param_groups_weight_decay,
)


def test_list_optimizers_names_variants_and_compositions():
    names = list_optimizers()
    for name in ("adan", "adanw", "adamw", "amsgrad", "lamb", "lookahead_adan"):
        assert name in names


def test_spec_builds_the_described_optimizer():
    model = torch.nn.Linear(4, 3)
    opt = create_optimizer(
        model.parameters(),
        {
            "name": "adan",
            "lr": 0.01,
            "betas": [0.98, 0.92, 0.99],
            "weight_decay": 0.02,
            "lookahead": {"k": 6, "alpha": 0.6},
            "max_grad_norm": 1.0,
        },
    )
    assert isinstance(opt, Lookahead) and isinstance(opt.base_optimizer, Adan)
    assert (opt.k, opt.alpha) == (6, 0.6)
    assert opt.base_optimizer.max_grad_norm == 1.0
    decayed, exempt = opt.param_groups
    assert decayed["weight_decay"] == 0.02 and decayed["params"] == [model.weight]
    assert exempt["weight_decay"] == 0.0 and exempt["params"] == [model.bias]
    assert decayed["betas"] == (0.98, 0.92, 0.99)


@pytest.mark.parametrize(
    ("name", "cls", "attrs"),
    [
        ("adanw", Adan, {"no_prox": True}),
        ("amsgrad", AdamW, {"amsgrad": True}),
        ("lamb", LAMB, {"eps": 1e-6}),
    ],
)
def test_variants_are_data(name, cls, attrs):
    opt = create_optimizer([torch.nn.Parameter(torch.ones(2, 2))], {"name": name})
    assert type(opt) is cls
    for key, value in attrs.items():
        assert opt.param_groups[0][key] == value


def test_lookahead_prefix_composes():
    opt = create_optimizer([torch.nn.Parameter(torch.ones(2))], {"name": "lookahead_lamb"})
    assert isinstance(opt, Lookahead) and isinstance(opt.base_optimizer, LAMB)
    assert OptimizerSpec(name="lookahead_adan").state_bytes_per_param() == 20


def test_weight_decay_helper_exempts_1d_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    groups = param_groups_weight_decay(model.named_parameters(), 0.1)
    assert groups[0]["weight_decay"] == 0.1 and len(groups[0]["params"]) == 1
    assert groups[1]["weight_decay"] == 0.0 and len(groups[1]["params"]) == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "sgd"}, "Unknown optimizer name: 'sgd' \\(known: adamw, adan"),
        ({"name": "adan", "lr": -1}, "lr"),
        ({"name": "adan", "betas": [0.9, 0.9]}, "betas = \\[0.9, 0.9\\]: adan takes 3 values"),
        ({"name": "adamw", "betas": [0.9, 1.2]}, "betas\\[1\\] = 1.2 must be in \\[0, 1\\)"),
        ({"name": "adan", "eps": -1e-8}, "eps"),
        ({"name": "adan", "weight_decay": -0.1}, "weight_decay"),
        ({"name": "adan", "lookahead": {"k": 0}}, "lookahead.k"),
        ({"name": "adan", "lookahead": {"alpha": 1.5}}, "lookahead.alpha"),
        ({"name": "adan", "momentum": 0.9}, "momentum"),
    ],
)
def test_bad_specs_raise_value_error_naming_the_field(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        create_optimizer([torch.nn.Parameter(torch.ones(1))], spec)
    assert isinstance(info.value, pydantic.ValidationError)


def rosenbrock(xy: torch.Tensor) -> torch.Tensor:
    x, y = xy[0], xy[1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


@pytest.mark.parametrize("name", list_optimizers())
def test_rosenbrock_converges(name):
    # Cosine decay to zero: LAMB's step is always lr * ||p||, so it only settles as lr -> 0.
    steps = 6000 if name.startswith("lookahead_") else 3000
    xy = torch.nn.Parameter(torch.tensor([-1.5, 2.0], dtype=torch.float64))
    opt = create_optimizer(
        [xy], {"name": name, "lr": 0.05, "weight_decay": 0.0, "no_decay_1d": False}
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    start = rosenbrock(xy).item()
    for _ in range(steps):
        opt.zero_grad()
        loss = rosenbrock(xy)
        loss.backward()
        opt.step()
        schedule.step()
    assert rosenbrock(xy).item() < 1e-4 * start
    assert torch.allclose(xy.detach(), torch.ones(2, dtype=torch.float64), atol=0.02)


def test_a_subclass_keeps_the_shard_hooks_of_its_registered_base():
    """ZeroOptimizer finds LAMB's cross-shard norms and Lookahead's slow weights through the
    registry: a user's subclass of either must find them too (nearest base in the MRO)."""
    from optimizers import LAMB, Lookahead
    from optimizers.registry import shard_hooks

    class MyLAMB(LAMB):
        pass

    class MyLookahead(Lookahead):
        pass

    params = [torch.nn.Parameter(torch.ones(3))]
    hooks = shard_hooks(MyLookahead(MyLAMB(params, lr=0.1), k=2))
    assert hooks.counter_names == ("lookahead_step",)
    assert isinstance(hooks.base, MyLAMB) and len(hooks.states) == 2

    def norms(*tensors):  # a stand-in for ZeroOptimizer's all-reduced norms
        return tensors

    hooks.bind_norms(norms)
    assert hooks.base.norm_fn is norms
