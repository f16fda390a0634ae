"""How fast a training job is in FLOPs: the FLOPs of one training step, the device's dense
peak, and the rates and model FLOPs utilization (MFU) they give.

How the numbers are defined:

- **FLOPs of a micro-batch**: counted by torch's ``FlopCounterMode``
  (``torch.utils.flop_counter``) while the loop runs its first micro-batch, forward and
  backward (``FlopCounter``). Only the operations torch has formulas for count: matrix
  multiplies (``mm``, ``addmm``, ``bmm``, ``baddbmm``), convolutions and their backward, and
  scaled-dot-product attention (CUDA's flash / memory-efficient / cuDNN kernels, and here
  the CPU kernel as well, with torch's own formula). A multiply-add is 2 FLOPs. Elementwise
  work, norms, a softmax outside SDPA, the loss and the optimizer step count nothing.
  Attention is counted as if it were not causal, as torch counts it; a recomputed forward
  (activation checkpointing) is counted as it runs. The loop's micro-batches all have the
  spec's shape, so the first one stands for every one.
- **FLOPs of a step** (what ``throughput_metrics`` takes): one global optimizer step summed
  over all workers, i.e. micro-batch FLOPs x accumulation steps x world size.
- **tflops**: achieved TFLOP/s of the whole job, step FLOPs x steps / seconds / 1e12;
  **tflops_per_worker**: that / world size.
- **mfu**: tflops_per_worker / the device's dense peak for the job's precision
  (``peak_tflops``), a fraction (0.41 is 41 %). The peak is the vendor's dense figure, never
  the 2:4-sparsity one: bf16 is the bf16 tensor-core peak with FP32 accumulate; fp32 is the
  TF32 tensor-core peak when torch lets matmuls use TF32
  (``torch.backends.cuda.matmul.allow_tf32``, which ``torch.set_float32_matmul_precision``
  ("high" or "medium") turns on), else the plain FP32 (CUDA-core) peak. cuDNN convolutions
  use TF32 by default whatever the matmul setting, so a convolution-heavy fp32 job measured
  against the plain FP32 peak can read high. On the CPU, on a GPU not in ``PEAK_TFLOPS``
  or on a MIG slice, there is no peak and no MFU (the rates are still reported), unless
  ``NESTOR_PEAK_TFLOPS`` gives one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

from .settings import WorkerSettings

PEAK_ENV = "NESTOR_PEAK_TFLOPS"
PRECISIONS = ("bf16", "fp32")


# ------------------------------------------------------------------------------- counting
def _cpu_sdpa_flop(query, key, value, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flop(
    grad_out, query, key, value, *args: Any, out_shape=None, **kwargs: Any
) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# torch counts CUDA's attention kernels but not the CPU's (same (B, H, T, E) layout, same
# formula): without these a transformer's FLOPs would depend on the device it ran on.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


class FlopCounter:
    """Counts the FLOPs of the work run inside it (torch's ``FlopCounterMode``, nothing
    printed); ``total`` holds them once the block ends. The work itself is unchanged (the
    same kernels on the same inputs, results bit for bit the same), so the loop counts its
    real first micro-batch::

        with FlopCounter() as counter:
            loss = objective(model(x), y)
            loss.backward()
        counter.total  # FLOPs of one micro-batch's forward and backward passes

    Not reentrant; counting costs host time per operation, so count one micro-batch, not
    every step.
    """

    def __init__(self) -> None:
        self.total: int | None = None
        self._mode: FlopCounterMode | None = None

    def __enter__(self) -> FlopCounter:
        self._mode = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        mode, self._mode = self._mode, None
        if mode is None:
            raise RuntimeError("FlopCounter exited without being entered")
        mode.__exit__(*exc)
        self.total = mode.get_total_flops()


# ---------------------------------------------------------------------------------- peaks
@dataclass(frozen=True)
class Peak:
    """A device's dense peaks in TFLOP/s: bf16 tensor cores (FP32 accumulate), TF32 tensor
    cores, plain FP32. None: the device has no such units."""

    bf16: float | None
    tf32: float | None
    fp32: float


# Matched against torch.cuda.get_device_name() in this order, first match wins (so "L40S"
# before "L40" before "L4", "H100 PCIe" before "H100"). Dense figures: the vendor's
# datasheet figure without sparsity (its "with sparsity" figure halved where only that is
# printed). NVIDIA datasheets: H100/H200 (Hopper), A100, L40S, L40, L4, A10, V100, and the Ada
# architecture whitepaper (appendix, GeForce RTX 4090: FP32-accumulate tensor rate).
PEAK_TFLOPS: dict[str, Peak] = {
    # H200 SXM (and GH200, same compute): 1,979 / 989 sparse -> 989.5 / 494.5; FP32 67.
    r"\bH200 NVL\b": Peak(bf16=835.5, tf32=417.5, fp32=60.0),  # 1,671 / 835 sparse
    r"\bG?H200\b": Peak(bf16=989.5, tf32=494.5, fp32=67.0),
    r"\bH100 PCIe\b": Peak(bf16=756.5, tf32=378.0, fp32=51.0),  # 1,513 / 756 sparse
    r"\bH100 NVL\b": Peak(bf16=835.5, tf32=417.5, fp32=60.0),  # 1,671 / 835 sparse
    r"\bH100\b": Peak(bf16=989.5, tf32=494.5, fp32=67.0),  # SXM5 ("H100 80GB HBM3")
    r"\bA100\b": Peak(bf16=312.0, tf32=156.0, fp32=19.5),  # SXM4 and PCIe, 40 and 80 GB
    r"\bL40S\b": Peak(bf16=362.05, tf32=183.0, fp32=91.6),  # 733 / 366 sparse
    r"\bL40\b": Peak(bf16=181.05, tf32=90.5, fp32=90.5),  # 362.1 / 181 sparse
    r"\bL4\b": Peak(bf16=121.0, tf32=60.0, fp32=30.3),  # 242 / 120 sparse
    # A10G (AWS's GA102 variant): neither NVIDIA nor AWS prints its tensor peaks. Derived,
    # not vendor figures: 80 SMs at 1.71 GHz at the GeForce rate (FP32 accumulate at half
    # rate, as the RTX 3090's 71 on 82 SMs at 1.695 GHz), as third-party comparisons give.
    r"\bA10G\b": Peak(bf16=70.0, tf32=35.0, fp32=35.0),
    r"\bA10\b": Peak(bf16=125.0, tf32=62.5, fp32=31.2),  # 250 / 125 sparse
    r"\bRTX 4090\b(?! D)": Peak(bf16=165.2, tf32=82.6, fp32=82.6),  # 330.3 / 165.2 sparse
    # Volta: FP16 tensor cores only (125 / 112 / 130 TFLOP/s); no bf16 or TF32 units.
    r"\bV100S\b": Peak(bf16=None, tf32=None, fp32=16.4),
    r"\bV100-PCIE\b": Peak(bf16=None, tf32=None, fp32=14.0),
    r"\bV100\b": Peak(bf16=None, tf32=None, fp32=15.7),  # SXM2
}


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"Invalid precision: {precision!r} (expected one of {PRECISIONS})")


def peak_tflops_for_name(name: str, precision: str, *, tf32: bool = False) -> float | None:
    """The dense peak of the device called ``name`` (as ``torch.cuda.get_device_name``
    spells it) for ``precision`` ("bf16" or "fp32"; fp32 is the TF32 peak when ``tf32``
    and the device has TF32 units), or None when the device is not in ``PEAK_TFLOPS`` or
    has no units for that precision (bf16 on a V100). A MIG slice ("... MIG 1g.10gb") has
    a part of the GPU's peak that its name does not give exactly: None."""
    _check_precision(precision)
    if re.search(r"\bMIG\b", name):
        return None
    for pattern, peak in PEAK_TFLOPS.items():
        if re.search(pattern, name, flags=re.IGNORECASE):
            if precision == "bf16":
                return peak.bf16
            return peak.tf32 if tf32 and peak.tf32 is not None else peak.fp32
    return None


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """This device's dense peak TFLOP/s for a job of ``precision`` ("bf16" or "fp32"), the
    denominator of MFU. ``NESTOR_PEAK_TFLOPS`` (a positive number) overrides it on any
    device; otherwise a CUDA device is looked up by name in ``PEAK_TFLOPS`` (fp32: the TF32
    peak if torch allows TF32 matmuls now, see the module docstring). The CPU, a GPU not in
    the table or a MIG slice: None, and the job reports no MFU (its TFLOP/s still)."""
    _check_precision(precision)
    override = WorkerSettings.from_env().peak_tflops
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return peak_tflops_for_name(name, precision, tf32=torch.backends.cuda.matmul.allow_tf32)


# ------------------------------------------------------------------------------ the rates
def throughput_metrics(
    step_flops: int,
    world_size: int,
    steps: int,
    seconds: float,
    samples_per_step: int,
    tokens_per_step: int | None,
    peak: float | None,
) -> dict[str, float]:
    """Rates over ``steps`` optimizer steps that took ``seconds`` of wall time.

    ``step_flops`` is one global step's FLOPs summed over all ``world_size`` workers (the
    first micro-batch's count x accumulation steps x world size); ``samples_per_step`` and
    ``tokens_per_step`` are the global batch's. Returns ``step_time`` (s),
    ``samples_per_s``, ``tokens_per_s`` (only given ``tokens_per_step``), ``tflops`` (the
    whole job's achieved TFLOP/s) and ``tflops_per_worker`` (only when FLOPs were counted,
    ``step_flops`` > 0), and ``mfu`` = tflops_per_worker / ``peak`` (a fraction; only with
    both). All rates are of the whole job, not of one worker, except the last two.
    """
    if steps < 1:
        raise ValueError(f"Invalid steps: {steps} (at least 1)")
    if not seconds > 0:
        raise ValueError(f"Invalid seconds: {seconds} (must be > 0)")
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size} (at least 1)")
    if step_flops < 0:
        raise ValueError(f"Invalid step_flops: {step_flops} (must be >= 0)")
    if peak is not None and not peak > 0:
        raise ValueError(f"Invalid peak: {peak} (TFLOP/s, > 0, or None)")
    rates = {
        "step_time": seconds / steps,
        "samples_per_s": samples_per_step * steps / seconds,
    }
    if tokens_per_step is not None:
        rates["tokens_per_s"] = tokens_per_step * steps / seconds
    if step_flops > 0:
        tflops = step_flops * steps / seconds / 1e12
        rates["tflops"] = tflops
        rates["tflops_per_worker"] = tflops / world_size
        if peak is not None:
            rates["mfu"] = rates["tflops_per_worker"] / peak
    return rates
