"""Low-bit optimizer state (bf16, block-wise int8) on the GPU: the codes are the CPU's bit for
bit, the fused kernels (Triton here) follow the readable path on the device, a state dict
moves between the GPU and the CPU unchanged, and the bytes per parameter, measured from the
device's tensors, stay within the limits.

Tolerances are those of tests/optimizers/test_lowbit_fused.py (the reasons are there): the
fused and readable paths round the fp32 update differently by an ulp, which draws other
stochastic-rounding bits, so codes agree within one level.
"""

from __future__ import annotations

import pytest
import torch

from optimizers import AdamW, Adan, lowbit

pytestmark = pytest.mark.cuda

SHAPES = [(64, 96), (96,), (130, 50), (10,), (300, 41)]  # whole blocks, small, odd-sized
LR = 1e-2
CASES = {
    "adan-int8": (Adan, dict(weight_decay=0.02, max_grad_norm=1.0), "int8"),
    "adan-bf16": (Adan, dict(weight_decay=0.02), "bf16"),
    "adamw-int8": (AdamW, dict(weight_decay=0.01), "int8"),
}


def values(n: int, seed: int) -> torch.Tensor:
    """Values over many orders of magnitude, with exact zeros, as optimizer state has."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    x[::97] = 0.0
    return x


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_codes_and_their_values_are_the_cpus_bit_for_bit(signed, device):
    """A checkpoint written on one device resumes on another: quantizing on the device gives
    the CPU's codes and scales, and decoding them gives the CPU's fp32 bits."""
    x = values(10 * lowbit.BLOCK + 77, seed=1)
    x = x if signed else x.abs()
    for step in (1, 2, 1000):
        codes, scale = lowbit.quantize(x, step, signed=signed)
        dcodes, dscale = lowbit.quantize(x.to(device), step, signed=signed)
        assert dcodes.device.type == device.type
        assert torch.equal(dcodes.cpu(), codes) and torch.equal(dscale.cpu(), scale)
        got = lowbit.dequantize(dcodes, dscale).cpu()
        assert got.numpy().tobytes() == lowbit.dequantize(codes, scale).numpy().tobytes()
    bits = lowbit.to_bf16(x.to(device), 7).cpu().view(torch.int16)
    assert torch.equal(bits, lowbit.to_bf16(x, 7).view(torch.int16))


def make_params(device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in SHAPES]


def set_grads(groups: list[list[torch.Tensor]], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(s, generator=g) for s in SHAPES]
    for group in groups:
        for p, grad in zip(group, grads, strict=True):
            p.grad = grad.to(p.device)


def level(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.int32) if t.dtype != torch.bfloat16 else t.view(torch.int16).to(torch.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_low_bit_steps_follow_the_readable_path_on_the_device(case, device):
    cls, kw, precision = CASES[case]
    a, b = make_params(device), make_params(device)
    fused = cls(a, lr=LR, fused=True, state_precision=precision, **kw)
    ref = cls(b, lr=LR, fused=False, foreach=False, state_precision=precision, **kw)
    steps = 4
    for t in range(1, steps + 1):
        set_grads([a, b], seed=t)
        fused.step()
        ref.step()
    assert fused._flat._flats, "nothing went through the fused kernels"
    for p, q in zip(a, b, strict=True):
        assert p.device.type == device.type
        torch.testing.assert_close(p, q, rtol=0, atol=0.1 * LR * steps)

    # One step from the same state: codes within one level, scales within 1e-5.
    with torch.no_grad():
        for p, q in zip(a, b, strict=True):
            p.copy_(q)
    fused.load_state_dict(ref.state_dict())
    set_grads([a, b], seed=steps + 1)
    fused.step()
    ref.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        for key, want in ref.state[q].items():
            got = fused.state[p][key]
            assert got.device.type == device.type, key
            if key == "step":
                continue
            if lowbit.is_scale(key):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
            elif got.dtype == torch.float32:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            else:
                assert got.dtype == want.dtype
                assert int((level(got) - level(want)).abs().max()) <= 1, key


@pytest.mark.parametrize("precision,limit", [("int8", 4.5), ("bf16", 8.5)])
def test_state_moves_between_the_device_and_the_cpu_unchanged(precision, limit, device):
    """The device's state dict loads into a CPU optimizer bit for bit, and the bytes per
    parameter measured from the device's tensors stay within the limit."""
    a = make_params(device)
    fused = Adan(a, lr=LR, fused=True, state_precision=precision)
    for t in range(1, 3):
        set_grads([a], seed=t)
        fused.step()
    cpu = [p.detach().cpu().requires_grad_() for p in a]
    readable = Adan(cpu, lr=LR, fused=False, state_precision=precision)
    readable.load_state_dict(fused.state_dict())
    for p, q in zip(a, cpu, strict=True):
        for key, value in fused.state[p].items():
            assert torch.equal(readable.state[q][key], value.cpu()), key

    big = [p for p in a if p.numel() >= lowbit.MIN_QUANT_NUMEL]
    state_bytes = sum(v.nbytes for p in big for k, v in fused.state[p].items() if k != "step")
    assert state_bytes / sum(p.numel() for p in big) <= limit
