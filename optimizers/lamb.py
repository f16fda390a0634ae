"""LAMB: layer-wise adaptive moments (You et al. 2020, https://arxiv.org/abs/1904.00962)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import NestorOptimizer
from ._common import adam_scalars, choose_impl

# (weights, updates) -> (||w_i||, ||u_i||) per tensor. ZeroOptimizer swaps in a version that
# sums partial squares across ranks when one parameter is split between shards.
NormFn = Callable[[list[Tensor], list[Tensor]], tuple[list[Tensor], list[Tensor]]]


def local_norms(weights: list[Tensor], updates: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """L2 norm of each weight and each update tensor."""
    return list(torch._foreach_norm(weights)), list(torch._foreach_norm(updates))


class LAMB(NestorOptimizer):
    r"""LAMB, the large-batch baseline: Adam's direction rescaled per parameter tensor.

    .. math::
        \begin{aligned}
        & m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
          v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        & u_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}
          + \lambda\theta_{t-1} \\
        & r_t = \lVert\theta_{t-1}\rVert / \lVert u_t\rVert
          \quad (r_t = 1 \text{ if either norm is } 0) \\
        & \theta_t = \theta_{t-1} - \text{lr}\; r_t\, u_t
        \end{aligned}

    State per parameter: ``exp_avg``, ``exp_avg_sq``, ``step`` (8 bytes per fp32 parameter;
    ``state_precision`` "bf16" 4, "int8" about 2: ``optimizers.lowbit``).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float = 0.0,
        foreach: bool | None = None,
        state_precision: str = "fp32",
    ) -> None:
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            foreach=foreach,
            state_precision=state_precision,
        )
        super().__init__(params, defaults, betas=2, max_grad_norm=max_grad_norm)
        self.norm_fn: NormFn = local_norms

    def _step_group(
        self, index: int, group: dict[str, Any], params: list[Tensor], clip: Tensor | None
    ) -> None:
        impl = choose_impl(params, group["foreach"], fused=False)
        kernel = _multi_tensor_lamb if impl == "foreach" else _single_tensor_lamb
        keys = ("exp_avg", "exp_avg_sq")
        _, buckets = self._advance(index, params, keys, fused=False)
        if group["state_precision"] != "fp32":
            for step, bucket in buckets.items():
                scalars = adam_scalars(group, step, clip)
                self._step_decoded(
                    bucket, keys, step, _decoded_lamb, norm_fn=self.norm_fn, **scalars
                )
            return
        for step, bucket in buckets.items():
            states = [self.state[p] for p in bucket]
            kernel(
                bucket,
                [p.grad for p in bucket],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                norm_fn=self.norm_fn,
                **adam_scalars(group, step, clip),
            )


def _decoded_lamb(param: Tensor, states: list[Tensor], **kwargs: Any) -> None:
    """One tensor's update over its decoded (fp32) state: the reference path's math."""
    _single_tensor_lamb([param], [param.grad], *([s] for s in states), **kwargs)


def _trust_ratio(weight_norm: Tensor, update_norm: Tensor) -> Tensor:
    """||w|| / ||u||, or 1 when either norm is zero (fresh zero-initialised tensors)."""
    ratio = weight_norm / update_norm
    ok = (weight_norm > 0) & (update_norm > 0)
    return torch.where(ok, ratio, torch.ones_like(ratio))


def _single_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    clip: Tensor | None,
    norm_fn: NormFn,
) -> None:
    """The readable reference."""
    weights, updates = [], []
    for i, param in enumerate(params):
        exp_avg, exp_avg_sq = exp_avgs[i], exp_avg_sqs[i]
        grad = grads[i].to(exp_avg.dtype)
        if clip is not None:
            grad = grad * clip
        weight = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m_t
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
        adam = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
        updates.append(adam.add_(weight, alpha=weight_decay))  # u_t
        weights.append(weight)
    weight_norms, update_norms = norm_fn(weights, updates)
    for param, weight, update, wn, un in zip(
        params, weights, updates, weight_norms, update_norms, strict=True
    ):
        weight.sub_(lr * _trust_ratio(wn, un) * update)  # r_t u_t
        if weight is not param:
            param.copy_(weight)


def _multi_tensor_lamb(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    bias_correction1: float,
    bias_correction2: float,
    lr: float,
    weight_decay: float,
    eps: float,
    clip: Tensor | None,
    norm_fn: NormFn,
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
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)  # m_t
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)  # v_t
    updates = torch._foreach_div(exp_avgs, bias_correction1)
    denoms = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, eps)
    torch._foreach_div_(updates, denoms)
    torch._foreach_add_(updates, weights, alpha=weight_decay)  # u_t
    weight_norms, update_norms = norm_fn(list(weights), list(updates))
    ratios = [_trust_ratio(wn, un) for wn, un in zip(weight_norms, update_norms, strict=True)]
    torch._foreach_mul_(updates, ratios)
    torch._foreach_add_(weights, updates, alpha=-lr)
    if low_precision:
        torch._foreach_copy_(params, weights)
