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
from optimizers._fused import _owns

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


def test_ownership_is_asked_of_the_device_not_of_is_shared(monkeypatch):
    # Tensor.is_shared() is True for every CUDA tensor: an ownership rule built on it kept
    # every GPU model off the flat buffers. Shared memory (Hogwild) is a CPU notion.
    meta = torch.nn.Parameter(torch.empty(64, device="meta"))
    hogwild = torch.nn.Parameter(torch.randn(64))
    hogwild.share_memory_()
    monkeypatch.setattr(torch.Tensor, "is_shared", lambda self: True)  # as CUDA answers
    assert _owns(meta), "a plain parameter off the CPU owns its storage"
    assert not _owns(meta[:32]), "a view does not"
    monkeypatch.undo()
    assert not _owns(hogwild), "a CPU parameter in shared memory stays where it is"
    assert _owns(torch.nn.Parameter(torch.randn(64)))


def test_hogwild_parameters_stay_in_shared_memory():
    a, b, fused, single = pair(Adan)
    a[2].share_memory_()
    for step in range(2):
        feed(step, a, b)
        fused.step()
        single.step()
    assert a[2].is_shared() and storage_of(a[2]) != storage_of(a[0])
    assert len({storage_of(p) for i, p in enumerate(a) if i != 2}) == 1
    assert max_diff(a, b) <= 1e-6


def _ops_per_step(cls, tensors: int, fresh_grads: bool) -> list[str]:
    """The tensor operations (aten calls seen by the profiler) of one steady-state step."""
    params = make_params(shapes=[(4100,)] * tensors)
    opt = cls(params, fused=True, **KW)
    grads = [torch.randn(p.shape) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    for _ in range(4):  # the first steps move tensors and compile: not steady state
        if fresh_grads:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    return sorted(e.name for e in prof.events() if e.name.startswith("aten::"))


@pytest.mark.parametrize("cls", [Adan, AdamW])
def test_steady_state_step_does_no_per_parameter_tensor_work(cls):
    # One step count per run of the flat buffers, not one per parameter: 4 or 40 tensors,
    # the same operations. Fresh gradients (zero_grad(), backward) cost one multi-tensor copy.
    for fresh in (False, True):
        few, many = _ops_per_step(cls, 4, fresh), _ops_per_step(cls, 40, fresh)
        assert few == many, f"fresh_grads={fresh}: {len(few)} ops for 4 tensors, {len(many)}"
        assert len(many) < 40


def test_every_parameter_keeps_its_step_in_the_state_dict():
    a, b, fused, single = pair(Adan)
    for step in range(3):
        feed(step, a, b, skip={5} if step == 1 else ())
        fused.step()
        single.step()
    steps = {i: s["step"].item() for i, s in fused.state_dict()["state"].items()}
    assert steps == {i: 2.0 if i == 5 else 3.0 for i in range(len(a))}
    assert all(s["step"].device.type == "cpu" for s in fused.state.values())
    # Loaded into a fresh optimizer, each parameter's count is its own again, then shared
    # anew in the buffers: the next steps match the readable path.
    clone = [torch.nn.Parameter(p.detach().clone()) for p in a]
    restored = Adan(clone, fused=True, **KW)
    restored.load_state_dict(fused.state_dict())
    for step in range(3, 5):
        feed(step, b, clone)
        single.step()
        restored.step()
    assert restored.state[clone[0]]["step"].item() == 5.0
    assert restored.state[clone[5]]["step"].item() == 4.0
    assert max_diff(clone, b) <= 1e-6
