"""AdamW (Loshchilov & Hutter 2019) and its AMSGrad variant (Reddi et al. 2018)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import NestorOptimizer
from ._common import adam_scalars, choose_impl
from ._fused import FlatViews, FusedKernel, hyperparams, split_for_fused
from ._lowbit_kernels import EncodedKernel, run_encoded


class AdamW(NestorOptimizer):
    r"""AdamW with decoupled weight decay; ``amsgrad=True`` gives AMSGrad.

    .. math::
        \begin{aligned}
        & \theta_{t-1} \leftarrow (1 - \text{lr}\,\lambda)\,\theta_{t-1} \\
        & m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
          v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        & \hat v_t = \max(\hat v_{t-1}, v_t) \text{ (amsgrad) else } v_t \\
        & \theta_t = \theta_{t-1} - \frac{\text{lr}}{1-\beta_1^t}\,
          \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}
        \end{aligned}

    Numerically the same as ``torch.optim.AdamW`` (the max is over the raw second moment, as
    torch does; its state dicts load here), plus optional global gradient clipping and a
    compiled fused path.

    State per parameter: ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad),
    ``step``: 8 (12) bytes per fp32 parameter; ``state_precision="bf16"`` halves it,
    ``"int8"`` quarters it (block-wise, scales included: ``optimizers.lowbit``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        max_grad_norm: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
        state_precision: str = "fp32",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            foreach=foreach,
            fused=fused,
            state_precision=state_precision,
        )
        super().__init__(params, defaults, betas=2, max_grad_norm=max_grad_norm)

    def _step_group(
        self, index: int, group: dict[str, Any], params: list[Tensor], clip: Tensor | None
    ) -> None:
        amsgrad = group["amsgrad"]
        keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
        impl = choose_impl(params, group["foreach"], group["fused"])
        runs, buckets = self._advance(index, params, keys, fused=impl == "fused")
        low_bit = group["state_precision"] != "fp32"
        for step, buffers in runs:  # one compiled call per run of the flat buffers
            if low_bit:
                _encoded_adamw([[b] for b in buffers], step, **adam_scalars(group, step, clip))
                continue
            flat_lists = [[b] for b in buffers] + ([] if amsgrad else [None])
            _fused_adamw(*flat_lists, **adam_scalars(group, step, clip))
        for step, bucket in buckets.items():
            if low_bit:
                scalars = adam_scalars(group, step, clip)
                kernel, bucket, decoded = self._lowbit_split(bucket, keys, impl == "fused")
                for same_format in kernel:
                    _encoded_adamw(self._encoded_lists(same_format, keys), step, **scalars)
                self._step_decoded(decoded, keys, step, _decoded_adamw, **scalars)
                if not bucket:  # the rest keeps fp32 state: the fp32 paths below
                    continue
            states = [self.state[p] for p in bucket]
            _adamw(
                impl,
                bucket,
                [p.grad for p in bucket],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["max_exp_avg_sq"] for s in states] if amsgrad else None,
                views=self._flat_views,
                **adam_scalars(group, step, clip),
            )


def _decoded_adamw(param: Tensor, states: list[Tensor], **scalars: Any) -> None:
    """One tensor's update over its decoded (fp32) state: the reference path's math."""
    maxes = [states[2]] if len(states) == 3 else None
    _single_tensor_adamw([param], [param.grad], [states[0]], [states[1]], maxes, **scalars)


def _adamw(
    impl: str,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    views: FlatViews,
    **kwargs: Any,
) -> None:
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs else [])

    def pick(idx: list[int]) -> list[list[Tensor] | None]:
        sub = [[lst[i] for i in idx] for lst in lists]
        return [*sub[:4], sub[4] if max_exp_avg_sqs else None]

    if impl == "fused":
        big, small = split_for_fused(*lists)
        if big:
            _fused_adamw(*pick(big), views=views, **kwargs)
        if small:
            _multi_tensor_adamw(*pick(small), **kwargs)
    elif impl == "foreach":
        _multi_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **kwargs)
    else:
        _single_tensor_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, **kwargs)


def _single_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    *,
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    clip: Tensor | None,
) -> None:
    """The readable reference, operation for operation as torch.optim.AdamW."""
    for i, param in enumerate(params):
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        grad = grads[i].to(exp_avg.dtype)
        if clip is not None:
            grad = grad * clip
        weight = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)

        weight.mul_(1 - lr * weight_decay)  # decoupled weight decay
        exp_avg.lerp_(grad, 1 - beta1)  # m_t
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
        if max_exp_avg_sqs is not None:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])  # max v_t
            second = max_exp_avg_sqs[i]
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / bias_correction2**0.5).add_(eps)
        weight.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        if weight is not param:
            param.copy_(weight)


def _multi_tensor_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    *,
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    clip: Tensor | None,
) -> None:
    """The same update with torch._foreach_* kernels."""
    low_precision = any(p.dtype != m.dtype for p, m in zip(params, exp_avgs, strict=True))
    if low_precision:
        weights = [p.to(m.dtype) for p, m in zip(params, exp_avgs, strict=True)]
        grads = [g.to(m.dtype) for g, m in zip(grads, exp_avgs, strict=True)]
    else:
        weights = params
    if clip is not None:
        grads = torch._foreach_mul(grads, clip)

    torch._foreach_mul_(weights, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m_t
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)  # v_t
    if max_exp_avg_sqs is not None:
        torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
        denoms = torch._foreach_sqrt(max_exp_avg_sqs)
    else:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2**0.5)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(weights, exp_avgs, denoms, value=-lr / bias_correction1)
    if low_precision:
        torch._foreach_copy_(params, weights)


def _adamw_kernel(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, hp: Tensor
) -> None:
    """One 1-D tensor's AdamW update, for torch.compile (28 bytes per fp32 parameter)."""
    beta1, beta2, step_size, bc2_sqrt, eps, decay, clip = hp.unbind()
    grad = grad.to(exp_avg.dtype) * clip
    exp_avg.lerp_(grad, 1 - beta1)  # m_t
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)  # v_t
    weight = param.to(exp_avg.dtype) * decay
    param.copy_(weight - step_size * exp_avg / (exp_avg_sq.sqrt() / bc2_sqrt + eps))


def _amsgrad_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor,
    hp: Tensor,
) -> None:
    """AdamW with amsgrad, for torch.compile (36 bytes per fp32 parameter)."""
    beta1, beta2, step_size, bc2_sqrt, eps, decay, clip = hp.unbind()
    grad = grad.to(exp_avg.dtype) * clip
    exp_avg.lerp_(grad, 1 - beta1)  # m_t
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)  # v_t
    max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq, exp_avg_sq))  # max v_t
    weight = param.to(exp_avg.dtype) * decay
    param.copy_(weight - step_size * exp_avg / (max_exp_avg_sq.sqrt() / bc2_sqrt + eps))


_ADAMW_FUSED = FusedKernel(_adamw_kernel)
_AMSGRAD_FUSED = FusedKernel(_amsgrad_kernel)


def _fused_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    *,
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    clip: Tensor | None,
    views: FlatViews | None = None,
) -> None:
    """The same update as compiled kernels, one pass over memory per tensor."""
    hp = hyperparams(
        _kernel_scalars(
            beta1, beta2, bias_correction1, bias_correction2, lr, weight_decay, eps, clip
        ),
        like=exp_avgs[0],
    )
    if max_exp_avg_sqs is None:
        _ADAMW_FUSED([params, grads, exp_avgs, exp_avg_sqs], hp, views)
    else:
        _AMSGRAD_FUSED([params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs], hp, views)


def _kernel_scalars(
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    clip: Tensor | None,
) -> list[float | Tensor]:
    """``_adamw_kernel``'s (and ``_amsgrad_kernel``'s) hyperparameter vector, in its order."""
    return [
        beta1,
        beta2,
        lr / bias_correction1,
        math.sqrt(bias_correction2),
        eps,
        1 - lr * weight_decay,
        1.0 if clip is None else clip,
    ]


def _encoded_adamw_kernel(param: Tensor, grad: Tensor, *buffers_and_hp: Tensor) -> None:
    """One tensor's AdamW update over bf16 or int8 state (see ``_lowbit_kernels``)."""
    *buffers, hp = buffers_and_hp
    run_encoded(_adamw_kernel, ("exp_avg", "exp_avg_sq"), param, grad, buffers, hp)


def _encoded_amsgrad_kernel(param: Tensor, grad: Tensor, *buffers_and_hp: Tensor) -> None:
    """One tensor's AMSGrad update over bf16 or int8 state."""
    *buffers, hp = buffers_and_hp
    keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    run_encoded(_amsgrad_kernel, keys, param, grad, buffers, hp)


_ADAMW_ENCODED = EncodedKernel(_encoded_adamw_kernel)
_AMSGRAD_ENCODED = EncodedKernel(_encoded_amsgrad_kernel)


def _encoded_adamw(lists: list[list[Tensor]], step: int, **scalars: Any) -> None:
    """The update over low-bit state, compiled (``lists``: params, grads, then each state
    entry; AMSGrad when there are three buffers). Int8 moves 12 bytes per fp32 parameter
    (14 with AMSGrad), bf16 16 (20), against 28 (36) with fp32 state."""
    hp = hyperparams(
        [*_kernel_scalars(**scalars), float(step)],
        like=torch.empty(0, device=lists[0][0].device, dtype=torch.float32),
    )
    n_states = len(lists) - 2
    amsgrad = n_states in (3, 6)  # bf16: one list per buffer; int8: a scale list each
    (_AMSGRAD_ENCODED if amsgrad else _ADAMW_ENCODED)(lists, hp)
