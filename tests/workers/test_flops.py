"""FLOPs, peaks and MFU (workers.flops): exact counts of known layers, numerics untouched by
counting, the peak table looked up by device name, and the rates' arithmetic."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.flops import (
    PEAK_ENV,
    FlopCounter,
    peak_tflops,
    peak_tflops_for_name,
    throughput_metrics,
)
from workers.models import CharTransformer, Mnist1dCNN, mlp

# The "cuda" cases belong to the CUDA tier (marker ``cuda``): deselected where torch sees no
# CUDA device (tests/conftest.py), run by ``make test`` where it does.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def counted(run) -> int:
    with FlopCounter() as counter:
        run()
    return counter.total


# ------------------------------------------------------------------------------- counting
@pytest.mark.parametrize("device", DEVICES)
def test_a_linear_layer_counts_2_flops_per_multiply_add_forward_and_twice_that_backward(device):
    b, d_in, d_out = 8, 16, 32
    layer = nn.Linear(d_in, d_out, bias=False, device=device)
    x = torch.randn(b, d_in, device=device, requires_grad=True)
    # forward x @ W.T: 2*B*in*out; backward grad_x and grad_W: 2*B*in*out each.
    assert counted(lambda: layer(x).sum().backward()) == 6 * b * d_in * d_out
    # A model's input needs no gradient: the first layer's backward is grad_W alone.
    plain = torch.randn(b, d_in, device=device)
    assert counted(lambda: layer(plain).sum().backward()) == 4 * b * d_in * d_out


@pytest.mark.parametrize("device", DEVICES)
def test_a_convolution_counts_its_multiply_adds(device):
    b, c_in, c_out, k, length = 4, 3, 8, 5, 40
    conv = nn.Conv1d(c_in, c_out, k, padding=2, bias=False, device=device)
    x = torch.randn(b, c_in, length, device=device, requires_grad=True)
    forward = 2 * b * c_out * length * c_in * k  # output length == input length (padding 2)
    assert counted(lambda: conv(x).sum().backward()) == 3 * forward


@pytest.mark.parametrize("device", DEVICES)
def test_attention_is_counted_on_every_device(device):
    b, h, t, e = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, t, e, device=device, requires_grad=True) for _ in range(3))
    # Forward: scores q @ k.T and scores @ v, 2*B*H*T*T*E each; backward: 5 such products
    # (scores recomputed, grad_scores, grad_v, grad_q, grad_k). Causality is not discounted.
    flops = counted(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    )
    assert flops == 7 * 2 * b * h * t * t * e


def _grads_after(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, count: bool):
    model.zero_grad(set_to_none=True)
    amp = torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    counter = FlopCounter() if count else contextlib.nullcontext()
    with counter:
        with amp:
            out = model(x)
            loss = F.cross_entropy(out.flatten(0, -2).float(), y.flatten())
        loss.backward()
    flops = counter.total if count else None
    return loss.detach(), [p.grad.clone() for p in model.parameters()], flops


MODELS = {
    "mlp": lambda: (mlp(40, 64, 2, 10), torch.randn(32, 40), torch.randint(0, 10, (32,))),
    "cnn": lambda: (Mnist1dCNN(), torch.randn(32, 40), torch.randint(0, 10, (32,))),
    "transformer": lambda: (
        CharTransformer(vocab=50, seq_len=16, d=32, layers=2, heads=4),
        torch.randint(0, 50, (4, 16)),
        torch.randint(0, 50, (4, 16)),
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MODELS)
def test_counting_leaves_loss_and_gradients_bit_identical(name, bf16, device):
    torch.manual_seed(0)
    model, x, y = MODELS[name]()
    model, x, y = model.to(device), x.to(device), y.to(device)
    plain_loss, plain_grads, _ = _grads_after(model, x, y, bf16, count=False)
    loss, grads, flops = _grads_after(model, x, y, bf16, count=True)
    assert torch.equal(loss, plain_loss)
    assert all(torch.equal(g, p) for g, p in zip(grads, plain_grads, strict=True))
    assert flops > 0


def test_a_transformers_count_is_its_matmuls_and_attention():
    b, t, d, heads, vocab, layers = 4, 16, 32, 4, 50, 2
    model = CharTransformer(vocab=vocab, seq_len=t, d=d, layers=layers, heads=heads)
    idx = torch.randint(0, vocab, (b, t))
    flops = counted(lambda: model(idx).sum().backward())
    n = b * t  # tokens
    # Per block: qkv (d -> 3d), proj (d -> d), mlp (d -> 4d -> d): 12*d*d weights; each
    # weight costs 2 FLOPs per token forward and 4 backward (the block's input needs grad).
    linear = 6 * n * 12 * d * d
    attention = 7 * 2 * b * heads * t * t * (d // heads)
    head = 6 * n * d * vocab  # tied head, ln(x) @ tok.weight.T
    assert flops == layers * (linear + attention) + head


# ---------------------------------------------------------------------------------- peaks
@pytest.mark.parametrize(
    ("name", "precision", "tf32", "peak"),
    [
        ("NVIDIA H200", "bf16", False, 989.5),
        ("NVIDIA H200 NVL", "bf16", False, 835.5),
        ("NVIDIA GH200 480GB", "bf16", False, 989.5),
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.5),
        ("NVIDIA H100 80GB HBM3", "fp32", False, 67.0),
        ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5),
        ("NVIDIA H100 PCIe", "bf16", False, 756.5),
        ("NVIDIA H100 PCIe", "fp32", True, 378.0),
        ("NVIDIA H100 NVL", "bf16", False, 835.5),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
        ("NVIDIA A100-PCIE-40GB", "fp32", True, 156.0),
        ("NVIDIA A100 80GB PCIe", "fp32", False, 19.5),
        ("NVIDIA L40S", "bf16", False, 362.05),
        ("NVIDIA L40", "bf16", False, 181.05),
        ("NVIDIA L4", "bf16", False, 121.0),
        ("NVIDIA L4", "fp32", True, 60.0),
        ("NVIDIA A10", "bf16", False, 125.0),
        ("NVIDIA A10G", "bf16", False, 70.0),
        ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2),
        ("Tesla V100-SXM2-16GB", "fp32", False, 15.7),
        ("Tesla V100-SXM2-16GB", "fp32", True, 15.7),  # no TF32 units on Volta
        ("Tesla V100-PCIE-32GB", "fp32", False, 14.0),
        ("Tesla V100S-PCIE-32GB", "fp32", False, 16.4),
        ("Tesla V100-SXM2-16GB", "bf16", False, None),  # no bf16 units
        ("NVIDIA GeForce RTX 4090 D", "bf16", False, None),  # fewer SMs than a 4090
        ("NVIDIA GeForce GTX 1080", "bf16", False, None),
        ("NVIDIA A100-SXM4-40GB MIG 1g.5gb", "bf16", False, None),  # a slice of the GPU
    ],
)
def test_peaks_are_looked_up_by_the_devices_name(name, precision, tf32, peak):
    assert peak_tflops_for_name(name, precision, tf32=tf32) == peak


def test_the_cpu_has_no_peak_and_the_environment_can_give_one(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    assert peak_tflops(torch.device("cpu"), "bf16") is None
    monkeypatch.setenv(PEAK_ENV, "1.5")
    assert peak_tflops(torch.device("cpu"), "fp32") == 1.5
    for bad in ("fast", "0", "-3", "nan", "inf"):
        monkeypatch.setenv(PEAK_ENV, bad)
        with pytest.raises(ValueError, match=PEAK_ENV):
            peak_tflops(torch.device("cpu"), "bf16")


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match="'fp16'"):
        peak_tflops_for_name("NVIDIA H100 PCIe", "fp16")
    with pytest.raises(ValueError, match="'fp16'"):
        peak_tflops(torch.device("cpu"), "fp16")


@pytest.mark.cuda
def test_this_gpus_peak_follows_torchs_tf32_setting(monkeypatch):
    monkeypatch.delenv(PEAK_ENV, raising=False)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        plain = peak_tflops(device, "fp32")
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = peak_tflops(device, "fp32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert plain == peak_tflops_for_name(name, "fp32", tf32=False)
    assert tf32 == peak_tflops_for_name(name, "fp32", tf32=True)
    assert peak_tflops(device, "bf16") == peak_tflops_for_name(name, "bf16")


# ------------------------------------------------------------------------------ the rates
def test_rates_of_the_whole_job_and_per_worker():
    # 2 workers, 10 steps in 5 s, 6 TFLOP per global step: 12 TFLOP/s, 6 per worker.
    rates = throughput_metrics(
        step_flops=6 * 10**12,
        world_size=2,
        steps=10,
        seconds=5.0,
        samples_per_step=512,
        tokens_per_step=512 * 128,
        peak=60.0,
    )
    assert rates == pytest.approx(
        {
            "step_time": 0.5,
            "samples_per_s": 1024.0,
            "tokens_per_s": 1024.0 * 128,
            "tflops": 12.0,
            "tflops_per_worker": 6.0,
            "mfu": 0.1,
        }
    )


def test_without_tokens_flops_or_a_peak_those_rates_are_left_out():
    common = {"world_size": 1, "steps": 4, "seconds": 2.0, "samples_per_step": 64}
    no_peak = throughput_metrics(step_flops=10**9, tokens_per_step=None, peak=None, **common)
    assert set(no_peak) == {"step_time", "samples_per_s", "tflops", "tflops_per_worker"}
    assert math.isclose(no_peak["tflops"], 2e-3)
    uncounted = throughput_metrics(step_flops=0, tokens_per_step=None, peak=100.0, **common)
    assert set(uncounted) == {"step_time", "samples_per_s"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("seconds", 0.0), ("world_size", 0), ("step_flops", -1), ("peak", 0.0)],
)
def test_bad_inputs_are_refused_by_name(field, value):
    args = {
        "step_flops": 10**12,
        "world_size": 1,
        "steps": 1,
        "seconds": 1.0,
        "samples_per_step": 1,
        "tokens_per_step": None,
        "peak": 1.0,
    }
    with pytest.raises(ValueError, match=f"Invalid {field}"):
        throughput_metrics(**{**args, field: value})
