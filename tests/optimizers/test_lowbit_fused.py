"""The compiled low-bit path (optimizers/_lowbit_kernels.py, FlatStore's low-bit buffers)
against the readable one (NestorOptimizer._step_decoded): the same update, state a
readable optimizer loads, the memory it should take.

Tolerances. The kernels compute the fp32 update as the fp32 fused kernels do, which round
differently from the eager reference (``1 - beta`` in fp32 rather than in Python floats,
``p - lr * m / d`` rather than ``addcdiv``): values differ by an ulp or so. The rounding
bits are a hash of the fp32 value, so an ulp's difference draws new bits, and a code then
differs by one level with probability up to 1/2. Hence: one step from the same state gives
codes within one level (bf16: one ulp) and scales within 1e-5; identical codes only where
the value came out identical (most of the second moment and all of -g_prev; a bare
majority of the first moments); over several steps the two runs are two independent
stochastic roundings of the same trajectory, and parameters agree to a fraction of a
learning rate per step.

Compiles: one per kernel (Adan int8, Adan bf16, AdamW int8, AMSGrad bf16); AdamW bf16
and AMSGrad int8 run the same ``run_encoded`` body with another fp32 kernel.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from optimizers import AdamW, Adan, lowbit

SHAPES = [(64, 96), (96,), (130, 50), (10,), (300, 41)]  # whole blocks, small, odd-sized
LR = 1e-2
CASES = {
    "adan-int8": (Adan, dict(weight_decay=0.02, max_grad_norm=1.0), "int8"),
    "adan-noprox-int8": (Adan, dict(weight_decay=0.02, no_prox=True), "int8"),
    "adan-bf16": (Adan, dict(weight_decay=0.02, max_grad_norm=1.0), "bf16"),
    "adan-noprox-bf16": (Adan, dict(weight_decay=0.02, no_prox=True), "bf16"),
    "adamw-int8": (AdamW, dict(weight_decay=0.01), "int8"),
    "amsgrad-bf16": (AdamW, dict(amsgrad=True), "bf16"),
}


def params(seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    return [torch.randn(s, requires_grad=True) for s in SHAPES]


def set_grads(*groups: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    for group in groups:
        for p, grad in zip(group, grads, strict=True):
            p.grad = grad.clone()


def level(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.int32) if codes.dtype != torch.bfloat16 else codes.view(torch.int16)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_low_bit_steps_follow_the_readable_path(case: str) -> None:
    cls, kw, precision = CASES[case]
    a, b = params(), params()
    fused = cls(a, lr=LR, fused=True, state_precision=precision, **kw)
    ref = cls(b, lr=LR, fused=False, foreach=False, state_precision=precision, **kw)
    steps = 4
    for t in range(1, steps + 1):
        set_grads(a, b, seed=t)
        fused.step()
        ref.step()
    # The large tensors live in the flat buffers (the odd-sized one padded to whole blocks).
    flat = fused._flat._flats[0]
    assert [tuple(p.shape) for p in flat.members] == (
        [(64, 96), (130, 50), (300, 41)] if precision == "int8" else SHAPES
    )
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0.1 * LR * steps)

    # One step from the same state and parameters: the readable optimizer's state loads
    # into the fused one (and the fused one's into a readable one, below).
    with torch.no_grad():
        for p, q in zip(a, b, strict=True):
            p.copy_(q)
    fused.load_state_dict(ref.state_dict())
    set_grads(a, b, seed=steps + 1)
    fused.step()
    ref.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    same = total = 0
    for p, q in zip(a, b, strict=True):
        for key, want in ref.state[q].items():
            got = fused.state[p][key]
            if key == "step":
                assert float(got) == float(want) == steps + 1
            elif lowbit.is_scale(key):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
            elif got.dtype == torch.float32:  # small tensors under int8: fp32 state
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            else:  # within one code (one bf16 ulp)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert int((level(got) - level(want)).abs().max()) <= 1, key
                same += int((got == want).sum())
                total += got.numel()
    assert same / total >= 0.6  # the rest: an ulp's difference drew other rounding bits

    # The fused optimizer's state loads into a readable one, bit for bit.
    c = [p.detach().clone().requires_grad_() for p in a]
    again = cls(c, lr=LR, fused=False, state_precision=precision, **kw)
    again.load_state_dict(fused.state_dict())
    for p, r in zip(a, c, strict=True):
        for key, value in fused.state[p].items():
            assert torch.equal(again.state[r][key], value), key


def storage_bytes(opt: torch.optim.Optimizer) -> int:
    """Optimizer-state bytes as allocated: each storage under the state counted once."""
    seen = {}
    for entry in opt.state.values():
        for key, v in entry.items():
            if isinstance(v, torch.Tensor) and key != "step":
                storage = v.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize(
    "precision,entries,limit", [("int8", 4 + 4 * 4 / 256, 4.5), ("bf16", 8.0, 8.5)]
)
def test_flat_low_bit_buffers_hold_codes_as_views(
    precision: str, entries: float, limit: float
) -> None:
    """Each member's state entries are views of the group's buffers with the readable
    path's keys, dtypes and shapes; the memory is the codes', not fp32's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(300, 1000), torch.nn.GELU(), torch.nn.Linear(1000, 300)
    )
    opt = Adan(model.parameters(), lr=LR, fused=True, state_precision=precision)
    model(torch.randn(4, 300)).sum().backward()
    opt.step()
    readable = Adan(
        [p.detach().clone().requires_grad_() for p in model.parameters()],
        fused=False,
        state_precision=precision,
    )
    for p, q in zip(model.parameters(), readable.param_groups[0]["params"], strict=True):
        q.grad = p.grad.clone()
    readable.step()
    flat = opt._flat._flats[0]
    for p, q in zip(model.parameters(), readable.param_groups[0]["params"], strict=True):
        entry, want = opt.state[p], readable.state[q]
        assert entry.keys() == want.keys()
        for key in entry:
            assert entry[key].dtype == want[key].dtype and entry[key].shape == want[key].shape
        if any(p is m for m in flat.members):  # a view of the group's codes buffer
            for key in ("exp_avg", "exp_avg_sq_scale" if precision == "int8" else "exp_avg_sq"):
                storage = flat.buffers[2 + flat.keys.index(key)].untyped_storage()
                assert entry[key].untyped_storage().data_ptr() == storage.data_ptr()
    big = [p for p in model.parameters() if p.numel() >= lowbit.MIN_QUANT_NUMEL]
    small = [p for p in model.parameters() if p.numel() < lowbit.MIN_QUANT_NUMEL]
    numel = sum(p.numel() for p in model.parameters())
    view_bytes = sum(v.nbytes for e in opt.state.values() for k, v in e.items() if k != "step")
    if precision == "int8":  # biases keep fp32 state (16 bytes an element) outside
        assert view_bytes == pytest.approx(
            entries * sum(p.numel() for p in big) + 16 * sum(p.numel() for p in small), rel=1e-3
        )
    else:
        assert view_bytes == entries * numel
    # As allocated: the buffers' staggering and block padding cost little beside the codes.
    assert storage_bytes(opt) / numel <= limit


def test_tensors_that_cannot_move_take_the_per_tensor_kernel() -> None:
    """Views into another owner's buffer (as ZeroOptimizer's shards are) are stepped in
    place by the compiled kernel when they hold whole blocks, by the readable path when
    not; both as the readable optimizer steps them."""
    base = torch.randn(2 * 8192 + 1000)
    shards = [base[:8192], base[8192 : 2 * 8192], base[2 * 8192 :]]  # the last: 1000
    a = [s.requires_grad_() for s in (t.detach() for t in shards)]
    b = [t.detach().clone().requires_grad_() for t in a]
    fused = Adan(a, lr=LR, fused=True, state_precision="int8")
    ref = Adan(b, lr=LR, fused=False, state_precision="int8")
    fused.pin_state_format(a, "int8")
    ref.pin_state_format(b, "int8")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        grads = [torch.randn(t.shape, generator=g) for t in a]
        for p, q, grad in zip(a, b, grads, strict=True):
            p.grad, q.grad = grad.clone(), grad.clone()
        with mock.patch.object(fused, "_step_decoded", wraps=fused._step_decoded) as readable:
            fused.step()
        ref.step()
        (bucket, *_), _ = readable.call_args
        assert [t.numel() for t in bucket] == [1000]  # not whole blocks
    assert not fused._flat._flats  # nothing moved
    assert a[0].data_ptr() == base.data_ptr()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0.1 * LR * 2)
        assert p.dtype == q.dtype
        assert fused.state[p]["exp_avg"].dtype == torch.int8
