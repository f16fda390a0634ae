"""The fused path's flat buffers: one compiled call per parameter group, same results.

Each scenario steps a fused optimizer (parameters, gradients and state moved into flat
buffers) beside the readable single-tensor path on the same gradients, and checks both
the numbers and where the tensors live.
"""

from __future__ import annotations

import io

import pytest
import torch

from optimizers import AdamW, Adan

from .helpers import SHAPES, make_params, max_diff

pytestmark = pytest.mark.compile

KW = dict(lr=0.01, weight_decay=0.02)


def pair(cls, params_a=None, params_b=None, **kw):
    a = params_a if params_a is not None else make_params()
    b = params_b if params_b is not None else make_params()
    return a, b, cls(a, fused=True, **KW, **kw), cls(b, foreach=False, fused=False, **KW, **kw)


def feed(seed: int, *param_lists, skip=()):
    gen = torch.Generator().manual_seed(seed)
    for i, ps in enumerate(zip(*param_lists, strict=True)):
        g = torch.randn(ps[0].shape, generator=gen)
        for p in ps:
            p.grad = None if i in skip else g.to(p.dtype)


def storage_of(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("cls", [Adan, AdamW])
def test_parameters_gradients_and_state_live_in_one_buffer_each(cls):
    a, b, fused, single = pair(cls)
    shapes = [p.shape for p in a]
    for step in range(3):
        feed(step, a, b)
        fused.step()
        single.step()
    assert max_diff(a, b) <= 1e-6
    assert [p.shape for p in a] == shapes
    assert len({storage_of(p) for p in a}) == 1
    assert len({storage_of(p.grad) for p in a}) == 1
    for key in fused.state[a[0]]:
        if key != "step":
            assert len({storage_of(fused.state[p][key]) for p in a}) == 1
            assert fused.state[a[0]][key].shape == a[0].shape


def test_fresh_gradients_after_zero_grad_are_copied_in():
    a, b, fused, single = pair(Adan, max_grad_norm=5.0)
    for step in range(4):
        fused.zero_grad()  # set_to_none: backward makes new gradient tensors
        single.zero_grad()
        feed(step, a, b)
        fused.step()
        single.step()
        assert max_diff(a, b) <= 1e-6


def test_backward_accumulates_into_the_buffer_with_set_to_none_false():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.Tanh(), torch.nn.Linear(80, 3))
    twin.load_state_dict(model.state_dict())
    fused = Adan(model.parameters(), fused=True, **KW)
    single = Adan(twin.parameters(), foreach=False, fused=False, **KW)
    x = torch.randn(16, 64)
    grad_buffer = None
    for _ in range(4):
        for m, opt in ((model, fused), (twin, single)):
            opt.zero_grad(set_to_none=False)
            for _ in range(2):  # two micro-batches accumulate
                m(x).square().mean().backward()
            opt.step()
        buffers = {storage_of(p.grad) for p in model.parameters()}
        assert len(buffers) == 1
        grad_buffer = grad_buffer or buffers.pop()
        assert storage_of(next(model.parameters()).grad) == grad_buffer, "grads were re-copied"
    assert max_diff(list(model.parameters()), list(twin.parameters())) <= 1e-6


def test_a_parameter_without_gradient_leaves_and_rejoins():
    a, b, fused, single = pair(Adan)
    feed(0, a, b)
    fused.step()
    single.step()
    feed(1, a, b, skip={3})  # parameter 3 gets no gradient: it leaves the buffers
    fused.step()
    single.step()
    for t in (a[3], fused.state[a[3]]["exp_avg"], fused.state[a[3]]["neg_pre_grad"]):
        assert t.untyped_storage().nbytes() == a[3].numel() * 4, "left with its own storage"
    # Back in, it has stepped once less than the others: its own step count, its own call.
    for step in range(2, 4):
        feed(step, a, b)
        fused.step()
        single.step()
    assert fused.state[a[3]]["step"].item() == 3 and fused.state[a[0]]["step"].item() == 4
    assert len({storage_of(p) for p in a}) == 1, "it rejoined the buffers"
    assert max_diff(a, b) <= 1e-6


def test_mixed_dtypes_and_foreign_views_are_stepped_per_tensor():
    # bf16 parameters beside fp32 ones, and parameters that are views into a caller's
    # buffer (as ZeroOptimizer's shards are): only the fp32 owners move.
    def params():
        fp32 = make_params(torch.float32, SHAPES[:4])
        bf16 = make_params(torch.bfloat16, SHAPES[4:6], seed=1)
        store = torch.randn(9000, generator=torch.Generator().manual_seed(2))
        views = [store[:4500], store[4500:]]
        return fp32 + bf16 + views, store

    (a, store_a), (b, _) = params(), params()
    _, _, fused, single = pair(Adan, a, b)
    for step in range(3):
        feed(step, a, b)
        fused.step()
        single.step()
    assert len({storage_of(p) for p in a[:4]}) == 1
    assert storage_of(a[6]) == storage_of(a[7]) == storage_of(store_a), "views stayed put"
    assert torch.equal(store_a[:4500], a[6])
    assert max_diff(a[:4] + a[6:], b[:4] + b[6:]) <= 1e-6
    for x, y in zip(a[4:6], b[4:6], strict=True):  # bf16: one rounding apart at most
        ulp = y.detach().float().abs().clamp_min(1e-3) * 2**-7
        assert ((x.float() - y.float()).abs() <= ulp).all()


def test_state_dict_round_trip_and_saved_sizes():
    a, b, fused, single = pair(Adan, max_grad_norm=5.0)
    for step in range(3):
        feed(step, a, b)
        fused.step()
        single.step()
    saved = io.BytesIO()
    torch.save(fused.state_dict(), saved)
    model_file = io.BytesIO()
    torch.save({i: p.detach() for i, p in enumerate(a)}, model_file)
    numel = sum(p.numel() for p in a)
    # Views of the flat buffers save their buffer once: no gradients or other state inside.
    assert len(saved.getvalue()) < 4 * 4 * numel + 4 * (1 << 16) * 6 + 20_000
    assert len(model_file.getvalue()) < 4 * numel + 20_000

    clone = [torch.nn.Parameter(p.detach().clone()) for p in a]
    restored = Adan(clone, fused=True, lr=0.5)
    saved.seek(0)
    restored.load_state_dict(torch.load(saved, weights_only=True))
    for step in range(3, 6):
        feed(step, a, b, clone)
        fused.step()
        single.step()
        restored.step()
    assert max_diff(a, clone) == 0.0
    assert max_diff(a, b) <= 1e-6


def test_parameters_given_another_dtype_are_not_copied_back():
    # model.double() after some steps: the buffers are made again in the new dtype.
    a, b, fused, single = pair(Adan)
    for step in range(2):
        feed(step, a, b)
        fused.step()
        single.step()
    for p in a + b:
        p.data = p.data.double()
    for step in range(2, 4):
        feed(step, a, b)
        fused.step()
        single.step()
    assert all(p.dtype == torch.float64 for p in a)
    assert len({storage_of(p) for p in a}) == 1
    assert fused.state[a[0]]["exp_avg"].dtype == torch.float64
    assert max_diff(a, b) <= 1e-6


def test_parameters_sharing_storage_stay_tied():
    def params():
        ps = make_params()
        ps.append(torch.nn.Parameter(ps[3].data))  # b.data = a.data: one storage, two params
        return ps

    a, b, fused, single = pair(Adan, params(), params())
    for step in range(3):
        feed(step, a, b)
        fused.step()
        single.step()
    assert storage_of(a[3]) == storage_of(a[-1]) != storage_of(a[0])
    assert max_diff(a, b) <= 1e-6
