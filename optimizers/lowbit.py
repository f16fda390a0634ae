"""Optimizer state below fp32: ``bf16`` and block-wise ``int8``, the readable definition.

Every state buffer is read into fp32, updated by the optimizer's fp32 math, and written
back (``decode`` / ``encode``); the fused kernels do the same inside one compiled pass, and
are tested against these functions.

``bf16``: the buffer is a bf16 tensor of the parameter's shape.

``int8`` (Dettmers et al. 2022, block-wise quantization): the buffer is a tensor of codes of
the parameter's shape and ``<key>_scale``, one fp32 absmax per block of ``BLOCK``
consecutive elements (of the tensor laid flat; the last block may be short). Signed buffers
(the first moment, Adan's gradient-difference moment and previous gradient) have int8 codes
``c`` in [-127, 127] standing for ``sign(c) (|c|/127)^4 * absmax``; non-negative buffers
(second moments) uint8 codes in [0, 255] for ``(c/255)^8 * absmax``, and a positive value
never becomes code 0 (a zero second moment would turn the step into m / eps). The powers
give small values the codes a linear map spends near the absmax: an element whose moment is
1e-6 of its block's largest still has a code, and the update m / sqrt(n) of such an element
is what a coarse code ruins. bench/state_codes.py measured, on the state of the byte-level
transformer after 200 steps of Adan, the error of Adan's update with one buffer quantized:
first moment 1.03 (linear), 0.45 (power 2), 0.032 (3), 0.022 (4); second moment 0.21
(linear), 0.086 (2), 0.033 (4), 0.012 (8), stochastic rounding in every case. A code's
value is a product of products, so codes decode alike on every device.
Tensors of fewer than ``MIN_QUANT_NUMEL`` elements keep fp32 state, as bitsandbytes and
torchao do: they cost little and hold biases and norm scales.

Rounding is stochastic, so that updates smaller than half a step of the format are not
lost (round-to-nearest turns beta2 = 0.999's ``0.001 g^2`` into nothing once the second
moment is 2^9 times larger, and the moment stops moving). The random bits are a hash of
the value being rounded and the step count, not a generator's: a run resumed from a
checkpoint, or restored at another world size, rounds exactly as the run it continues, and
no generator state has to be saved or sharded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

PRECISIONS = ("fp32", "bf16", "int8")
BLOCK = 256  # elements per int8 block: one fp32 scale each (1/64 byte per element)
MIN_QUANT_NUMEL = 4096  # smaller tensors keep fp32 state under int8
SCALE_SUFFIX = "_scale"
# State buffers that are never negative: unsigned codes, a code for their dynamic range.
NON_NEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq"})

SIGNED_MAX = 127
UNSIGNED_MAX = 255
SIGNED_POWER = 4  # value = sign(c) (|c| / 127) ** 4 * absmax
UNSIGNED_POWER = 8  # value = (c / 255) ** 8 * absmax


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"Invalid state_precision: {precision!r} (must be one of {', '.join(PRECISIONS)})"
        )
    return precision


def tensor_format(precision: str, numel: int) -> str:
    """The format of a tensor's state under ``precision``: int8 only from MIN_QUANT_NUMEL."""
    if precision == "int8" and numel < MIN_QUANT_NUMEL:
        return "fp32"
    return precision


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def zeros(like: Tensor, key: str, fmt: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Zeroed state ``key`` for a parameter ``like`` in format ``fmt`` (its entries: the
    buffer, and for int8 its scales). ``dtype`` is the fp32-format dtype."""
    if fmt == "fp32":
        return {key: torch.zeros_like(like, dtype=dtype)}
    if fmt == "bf16":
        return {key: torch.zeros_like(like, dtype=torch.bfloat16)}
    codes = torch.uint8 if key in NON_NEGATIVE else torch.int8
    return {
        key: torch.zeros_like(like, dtype=codes),
        key + SCALE_SUFFIX: torch.zeros(num_blocks(like.numel()), device=like.device),
    }


def is_scale(key: str) -> bool:
    return key.endswith(SCALE_SUFFIX)


# ----------------------------------------------------------------------------- rounding
def dither(x: Tensor, step: Tensor | int, bits: int) -> Tensor:
    """``bits`` pseudo-random bits per element (an int64 tensor in [0, 2**bits)), a hash of
    ``x``'s fp32 bit pattern and ``step``: the same value at the same step always gets the
    same bits, on any device and in any shard."""
    h = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    if isinstance(step, Tensor):
        step = step.to(torch.int64)
    h = h ^ ((step * 0x9E3779B1) & 0xFFFFFFFF)
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return h & ((1 << bits) - 1)


def to_bf16(x: Tensor, step: Tensor | int) -> Tensor:
    """fp32 -> bf16, rounded stochastically: 16 random bits are added below bf16's last
    mantissa bit and the 16 low bits dropped (the result is exact in bf16)."""
    bits = x.view(torch.int32) + dither(x, step, 16).to(torch.int32)
    return (bits & -65536).view(torch.float32).to(torch.bfloat16)


def _blocks(x: Tensor) -> Tensor:
    """``x`` laid flat as (blocks, BLOCK), the short last block padded with zeros."""
    flat = x.reshape(-1)
    pad = -flat.numel() % BLOCK
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, BLOCK)


def _root(r: Tensor, power: int) -> Tensor:
    """r ** (1 / power), by square roots where they serve (exact in IEEE arithmetic)."""
    if power == 1:
        return r
    if power == 2:
        return r.sqrt()
    if power == 4:
        return r.sqrt().sqrt()
    if power == 8:
        return r.sqrt().sqrt().sqrt()
    return r.pow(1.0 / power)


def _power(r: Tensor, power: int) -> Tensor:
    """r ** power by multiplications (sign kept for odd use: r * |r| for power 2)."""
    if power == 1:
        return r
    if power == 2:
        return r * r.abs()
    if power == 4:
        r2 = r * r
        return r2 * r2 * r.sign()
    if power == 8:
        r2 = r * r
        r4 = r2 * r2
        return r4 * r4 * r.sign()
    return r.sign() * r.abs().pow(power)


def _code_value(level: Tensor, power: int, top: int) -> Tensor:
    """The magnitude, as a fraction of the block's absmax, that code ``level`` stands for:
    the same operations as ``dequantize``'s, so the two agree bit for bit."""
    return _power(level * (1.0 / top), power)


def quantize(
    x: Tensor, step: Tensor | int, signed: bool, power: int | None = None, stochastic: bool = True
) -> tuple[Tensor, Tensor]:
    """fp32 ``x`` -> (codes of x's shape, fp32 absmax per block).

    Each magnitude |x|/absmax lies between the values of two neighbouring codes; it takes the
    upper one with probability proportional to its distance from the lower (stochastic
    rounding, unbiased in value), or the nearer one. The root only guesses the lower code;
    comparisons against the codes' own values settle it, so the codes do not depend on how
    a device rounds a square root. ``power`` and ``stochastic`` exist for
    bench/state_codes.py's comparison; the state uses the defaults."""
    if power is None:
        power = SIGNED_POWER if signed else UNSIGNED_POWER
    top = SIGNED_MAX if signed else UNSIGNED_MAX
    blocks = _blocks(x)  # (n_blocks, BLOCK)
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    ratio = blocks.abs() / safe[:, None]  # in [0, 1]
    lo = torch.floor(_root(ratio, power) * top).clamp(0, top - 1)
    lo = lo - (_code_value(lo, power, top) > ratio).to(lo.dtype)
    lo = (lo + (_code_value(lo + 1, power, top) <= ratio).to(lo.dtype)).clamp(0, top - 1)
    v_lo = _code_value(lo, power, top)
    frac = (ratio - v_lo) / (_code_value(lo + 1, power, top) - v_lo)  # in [0, 1]
    if stochastic:
        u = dither(blocks, step, 24).to(torch.float32) * (1.0 / (1 << 24))  # in [0, 1)
        level = lo + (u < frac).to(lo.dtype)
    else:
        level = lo + (frac >= 0.5).to(lo.dtype)
    if signed:
        codes = torch.where(blocks < 0, -level, level).to(torch.int8)
    else:
        level = torch.where(blocks > 0, level.clamp(min=1.0), level)  # > 0 stays > 0
        codes = level.to(torch.uint8)
    return codes.view(-1)[: x.numel()].view(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, power: int | None = None) -> Tensor:
    """codes (int8: signed, uint8: non-negative) and their per-block absmax -> fp32."""
    signed = codes.dtype == torch.int8
    if power is None:
        power = SIGNED_POWER if signed else UNSIGNED_POWER
    blocks = _blocks(codes).to(torch.float32)
    r = blocks * (1.0 / (SIGNED_MAX if signed else UNSIGNED_MAX))
    value = _power(r, power) * absmax[:, None]
    return value.view(-1)[: codes.numel()].view(codes.shape)


# ---------------------------------------------------------------------- state entries
def decode(entry: dict[str, Any], key: str, dtype: torch.dtype = torch.float32) -> Tensor:
    """State ``key`` of ``entry`` in ``dtype`` (the fp32-format dtype) to work on: the tensor
    itself when it is kept in that dtype (updated in place), else a fresh copy to ``encode``
    back."""
    t = entry[key]
    if t.dtype in (torch.int8, torch.uint8):
        return dequantize(t, entry[key + SCALE_SUFFIX]).to(dtype)
    return t if t.dtype == dtype else t.to(dtype)


def encode(entry: dict[str, Any], key: str, value: Tensor, step: Tensor | int) -> None:
    """Write fp32 ``value`` back into state ``key`` of ``entry`` (no-op for fp32 state)."""
    t = entry[key]
    if value is t:
        return
    value = value.to(torch.float32)
    if t.dtype in (torch.int8, torch.uint8):
        codes, absmax = quantize(value, step, signed=t.dtype == torch.int8)
        t.copy_(codes)
        entry[key + SCALE_SUFFIX].copy_(absmax)
    elif t.dtype == torch.bfloat16:
        t.copy_(to_bf16(value, step))
    else:
        t.copy_(value)


def state_format(entry: dict[str, Any], key: str) -> str:
    """The format ``entry`` keeps ``key`` in: "int8", "bf16" or "fp32"."""
    dtype = entry[key].dtype
    if dtype in (torch.int8, torch.uint8):
        return "int8"
    return "bf16" if dtype == torch.bfloat16 else "fp32"
