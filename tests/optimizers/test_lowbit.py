"""Low-bit optimizer state (optimizers/lowbit.py): the codes against a NumPy transcription,
bit for bit; the rounding; each optimizer's bf16/int8 step against its fp32 math on the
decoded state; bytes per parameter measured from the tensors; state dicts and conversions."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from optimizers import LAMB, AdamW, Adan, Lookahead, OptimizerSpec, create_optimizer, lowbit

# ------------------------------------------------------------ the NumPy transcription
M32 = np.uint64(0xFFFFFFFF)


def np_dither(x: np.ndarray, step: int, bits: int) -> np.ndarray:
    h = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    h ^= (np.uint64(step) * np.uint64(0x9E3779B1)) & M32
    for _ in range(2):
        h = ((h ^ (h >> np.uint64(16))) * np.uint64(0x45D9F3B)) & M32
    h ^= h >> np.uint64(16)
    return h & np.uint64((1 << bits) - 1)


def np_blocks(x: np.ndarray) -> np.ndarray:
    flat = x.reshape(-1)
    flat = np.concatenate([flat, np.zeros(-flat.size % lowbit.BLOCK, flat.dtype)])
    return flat.reshape(-1, lowbit.BLOCK)


def np_power(r: np.ndarray, power: int) -> np.ndarray:
    if power == 1:
        return r
    if power == 2:
        return r * np.abs(r)
    r2 = r * r
    r4 = r2 * r2
    return (r4 if power == 4 else r4 * r4) * np.sign(r)


def np_code_value(level: np.ndarray, power: int, top: int) -> np.ndarray:
    return np_power(level * np.float32(1.0 / top), power)


def np_quantize(x: np.ndarray, step: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    power = lowbit.SIGNED_POWER if signed else lowbit.UNSIGNED_POWER
    top = lowbit.SIGNED_MAX if signed else lowbit.UNSIGNED_MAX
    blocks = np_blocks(x.astype(np.float32))
    absmax = np.abs(blocks).max(axis=1)
    safe = np.where(absmax > 0, absmax, np.float32(1))
    ratio = np.abs(blocks) / safe[:, None]
    # The lower of the two codes around each value: any guess within one code, settled by
    # comparing code values (NumPy's float32 root need not round as torch's does).
    lo = np.clip(np.floor(ratio ** np.float32(1.0 / power) * np.float32(top)), 0, top - 1)
    lo = lo.astype(np.float32)
    lo -= np_code_value(lo, power, top) > ratio
    lo = np.clip(lo + (np_code_value(lo + 1, power, top) <= ratio), 0, top - 1).astype(np.float32)
    v_lo = np_code_value(lo, power, top)
    frac = (ratio - v_lo) / (np_code_value(lo + 1, power, top) - v_lo)
    u = np_dither(blocks, step, 24).astype(np.float32) * np.float32(2.0**-24)
    level = lo + (u < frac)
    if signed:
        codes = np.where(blocks < 0, -level, level).astype(np.int8)
    else:
        level = np.where(blocks > 0, np.maximum(level, np.float32(1)), level)
        codes = level.astype(np.uint8)
    return codes.reshape(-1)[: x.size].reshape(x.shape), absmax


def np_dequantize(codes: np.ndarray, absmax: np.ndarray) -> np.ndarray:
    signed = codes.dtype == np.int8
    power = lowbit.SIGNED_POWER if signed else lowbit.UNSIGNED_POWER
    top = lowbit.SIGNED_MAX if signed else lowbit.UNSIGNED_MAX
    r = np_blocks(codes).astype(np.float32) * np.float32(1.0 / top)
    value = np_power(r, power) * absmax[:, None]
    return value.reshape(-1)[: codes.size].reshape(codes.shape)


def np_to_bf16_bits(x: np.ndarray, step: int) -> np.ndarray:
    bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + np_dither(x, step, 16)) & M32
    return (bits >> np.uint64(16)).astype(np.uint16)


def sample(n: int, seed: int) -> torch.Tensor:
    """Values over many decades and both signs, zeros and a whole zero block included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 4)
    x[::17] = 0.0
    if n > 2 * lowbit.BLOCK:
        x[lowbit.BLOCK : 2 * lowbit.BLOCK] = 0.0
    return x


# ----------------------------------------------------------------------- the codes
@pytest.mark.parametrize("n", [1, 255, 256, 1000, 4096, 70_001])
@pytest.mark.parametrize("step", [1, 7, 123_456])
def test_quantize_dequantize_equal_the_numpy_transcription(n: int, step: int) -> None:
    x = sample(n, seed=n + step)
    for signed, values in ((True, x), (False, x.abs())):
        codes, absmax = lowbit.quantize(values, step, signed=signed)
        want_codes, want_absmax = np_quantize(values.numpy(), step, signed)
        assert codes.dtype == (torch.int8 if signed else torch.uint8)
        np.testing.assert_array_equal(codes.numpy(), want_codes)
        np.testing.assert_array_equal(absmax.numpy(), want_absmax)
        got = lowbit.dequantize(codes, absmax)
        want = np_dequantize(want_codes, want_absmax)
        assert got.numpy().tobytes() == want.tobytes()  # bit for bit, -0.0 included


def test_bf16_rounding_equals_the_numpy_transcription() -> None:
    x = sample(10_000, seed=3)
    got = lowbit.to_bf16(x, 42).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(got, np_to_bf16_bits(x.numpy(), 42))


def test_codes_keep_the_dynamic_range_and_signs() -> None:
    x = sample(70_000, seed=1)
    q = lowbit.dequantize(*lowbit.quantize(x, 5, signed=True))
    assert torch.equal(torch.sign(q)[q != 0], torch.sign(x)[q != 0])
    blocks = x.view(-1)[: 70_000 // 256 * 256].view(-1, 256)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    err = (q[: blocks.numel()].view(-1, 256) - blocks).abs() / absmax.clamp(min=1e-30)
    assert float(err.max()) <= 2 * lowbit.SIGNED_POWER / lowbit.SIGNED_MAX
    n = x.abs()
    qn = lowbit.dequantize(*lowbit.quantize(n, 5, signed=False))
    assert bool(((qn > 0) == (n > 0)).all())  # a positive second moment never becomes 0


def test_stochastic_rounding_does_not_stall_a_slow_moment() -> None:
    """beta2 = 0.999's EMA of a constant g^2 = 1 from 0.5: round-to-nearest bf16 stops where
    0.001 (1 - v) is below half a bf16 step; the stochastic rounding reaches 1 on average."""
    beta, steps = 0.999, 5000
    nearest = torch.full((4096,), 0.5, dtype=torch.bfloat16)
    ours = nearest.clone()
    exact = 0.5
    for t in range(1, steps + 1):
        nearest = (nearest.float() * beta + (1 - beta)).to(torch.bfloat16)
        ours = lowbit.to_bf16(ours.float() * beta + (1 - beta), t)
        exact = exact * beta + (1 - beta)
    assert abs(float(nearest.float().mean()) - exact) > 0.05  # stalled
    assert abs(float(ours.float().mean()) - exact) < 0.01 * exact


def test_int8_rounding_does_not_stall_either() -> None:
    x = torch.zeros(4096)
    x[0] = 1.0  # the block's absmax stays 1; the rest creeps from 0.5 towards 0.6
    x[1:] = 0.5
    codes, scale = lowbit.quantize(x, 0, signed=True)
    exact = 0.5
    for t in range(1, 3001):
        v = lowbit.dequantize(codes, scale) * 0.98 + 0.02 * torch.where(x == 1.0, 1.0, 0.6)
        codes, scale = lowbit.quantize(v, t, signed=True)
        exact = exact * 0.98 + 0.02 * 0.6
    got = lowbit.dequantize(codes, scale)[1:]
    assert abs(float(got.mean()) - exact) < 0.005


# ----------------------------------------------------- the optimizers over the codes
def model_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    shapes = [(64, 96), (96,), (130, 50), (10,)]  # big (quantized) and small (fp32) tensors
    return [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]


def set_grads(params: list[torch.Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


OPTIMIZERS = {
    "adan": (Adan, dict(lr=1e-2, weight_decay=0.02, max_grad_norm=1.0)),
    "adan-noprox": (Adan, dict(lr=1e-2, weight_decay=0.02, no_prox=True)),
    "adamw": (AdamW, dict(lr=1e-2, weight_decay=0.01)),
    "amsgrad": (AdamW, dict(lr=1e-2, amsgrad=True)),
    "lamb": (LAMB, dict(lr=1e-2, weight_decay=0.01)),
}


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_low_bit_step_is_the_fp32_step_on_the_decoded_state(name: str, precision: str) -> None:
    """The paper's math runs in fp32 on the dequantized state; its new state is then encoded
    (with the step count's rounding bits). Checked against the fp32 optimizer itself."""
    cls, kw = OPTIMIZERS[name]
    params = model_params()
    low = cls(params, state_precision=precision, foreach=False, **kw)
    for t in range(1, 4):
        set_grads(params, seed=t)
        low.step()
    # The fp32 optimizer, given the decoded state and the same parameters, takes step 4.
    twins = [p.detach().clone().requires_grad_() for p in params]
    ref = cls(twins, foreach=False, **kw)
    ref.load_state_dict(low.state_dict())  # decoded into fp32 on load
    for p, q in zip(params, twins, strict=True):
        for key in low.state[p]:
            if key != "step" and not lowbit.is_scale(key):
                assert torch.equal(ref.state[q][key], lowbit.decode(low.state[p], key))
    set_grads(params, seed=4)
    set_grads(twins, seed=4)
    low.step()
    ref.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)  # the same update, bit for bit
        for key in ref.state[q]:
            if key == "step":
                continue
            want = ref.state[q][key]
            fmt = lowbit.state_format(low.state[p], key)
            if fmt == "int8":
                codes, scale = lowbit.quantize(
                    want, 4, signed=low.state[p][key].dtype == torch.int8
                )
                assert torch.equal(low.state[p][key], codes)
                assert torch.equal(low.state[p][key + lowbit.SCALE_SUFFIX], scale)
            elif fmt == "bf16":
                assert torch.equal(low.state[p][key], lowbit.to_bf16(want, 4))
            else:
                assert p.numel() < lowbit.MIN_QUANT_NUMEL and precision == "int8"
                assert torch.equal(low.state[p][key], want)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.nbytes
        for entry in opt.state.values()
        for k, v in entry.items()
        if isinstance(v, torch.Tensor) and k != "step"
    )


@pytest.mark.parametrize(
    "name,precision,limit",
    [
        ("adan", "fp32", 16.0),
        ("adan", "bf16", 8.5),
        ("adan", "int8", 4.5),
        ("adamw", "bf16", 4.25),
        ("adamw", "int8", 2.25),
        ("amsgrad", "int8", 3.25),
    ],
)
def test_bytes_per_parameter_measured_from_the_tensors(
    name: str, precision: str, limit: float
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512)
    )
    opt = create_optimizer(
        model.parameters(), {"name": name, "state_precision": precision, "fused": False}
    )
    model(torch.randn(8, 512)).sum().backward()
    opt.step()
    per_param = state_bytes(opt) / sum(p.numel() for p in model.parameters())
    assert per_param <= limit
    if precision == "fp32":
        assert per_param == limit
    else:  # the saving is real: well under the fp32 figure
        fp32 = OptimizerSpec(name=name).state_bytes_per_param()
        assert per_param < fp32 / (1.9 if precision == "bf16" else 3.5)


def test_small_tensors_keep_fp32_under_int8_and_bf16_applies_to_all() -> None:
    params = model_params()
    int8 = Adan(params, state_precision="int8")
    set_grads(params, 1)
    int8.step()
    assert [lowbit.state_format(int8.state[p], "exp_avg") for p in params] == [
        "int8",
        "fp32",
        "int8",
        "fp32",
    ]
    assert int8.state[params[0]]["exp_avg_sq"].dtype == torch.uint8
    assert int8.state[params[0]]["exp_avg_sq_scale"].shape == (lowbit.num_blocks(64 * 96),)
    bf16 = AdamW(model_params(), state_precision="bf16")
    for p in bf16.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    bf16.step()
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in bf16.state.values())


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_state_dict_round_trip_keeps_the_codes_and_the_trajectory(precision: str) -> None:
    params = model_params()
    opt = Lookahead(Adan(params, lr=1e-2, state_precision=precision), k=2)
    for t in range(1, 4):
        set_grads(params, t)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twins = [p.detach().clone().requires_grad_() for p in params]
    again = Lookahead(Adan(twins, lr=1e-2, state_precision=precision), k=2)
    again.load_state_dict(saved)
    a, b = opt.state_dict(), again.state_dict()
    for i, entry in a["state"].items():
        for key, v in entry.items():
            w = b["state"][i][key]
            assert v.dtype == w.dtype and torch.equal(v, w), key
    assert a["state"][0]["slow_param"].dtype == torch.bfloat16
    for t in range(4, 8):  # and both go on exactly alike
        set_grads(params, t)
        set_grads(twins, t)
        opt.step()
        again.step()
    for p, q in zip(params, twins, strict=True):
        assert torch.equal(p, q)


def test_state_converts_between_precisions_on_load() -> None:
    params = model_params()
    fp32 = Adan(params, lr=1e-2)
    for t in range(1, 3):
        set_grads(params, t)
        fp32.step()
    int8 = Adan([p.detach().clone().requires_grad_() for p in params], state_precision="int8")
    int8.load_state_dict(fp32.state_dict())
    big = int8.param_groups[0]["params"][0]
    entry = int8.state[big]
    codes, scale = lowbit.quantize(fp32.state[params[0]]["exp_avg"], 2, signed=True)
    assert torch.equal(entry["exp_avg"], codes) and torch.equal(entry["exp_avg_scale"], scale)
    back = Adan([p.detach().clone().requires_grad_() for p in params])
    back.load_state_dict(int8.state_dict())
    got = back.state[back.param_groups[0]["params"][0]]["exp_avg"]
    assert got.dtype == torch.float32 and torch.equal(got, lowbit.dequantize(codes, scale))


def test_bf16_parameters_keep_fp32_state_through_a_load() -> None:
    params = model_params(dtype=torch.bfloat16)
    opt = AdamW(params)
    set_grads(params, 1)
    opt.step()
    again = AdamW([p.detach().clone().requires_grad_() for p in params])
    again.load_state_dict(opt.state_dict())
    assert all(s["exp_avg"].dtype == torch.float32 for s in again.state.values())


def test_bad_precision_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="state_precision: 'int4'"):
        Adan(model_params(), state_precision="int4")
    with pytest.raises(ValueError, match="state_precision"):
        OptimizerSpec.model_validate({"name": "adan", "state_precision": "fp8"})
    spec = OptimizerSpec(name="lookahead_adan", state_precision="int8")
    assert spec.state_bytes_per_param() == pytest.approx(4 * (1 + 4 / 256) + 2)
    assert (
        create_optimizer(model_params(), spec).base_optimizer.defaults["state_precision"] == "int8"
    )
