"""Adan: Adaptive Nesterov Momentum (Xie et al. 2022, https://arxiv.org/abs/2208.06677)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import NestorOptimizer
from ._common import choose_impl
from ._fused import FlatViews, FusedKernel, hyperparams, split_for_fused
from ._lowbit_kernels import EncodedKernel, run_encoded

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad")


class Adan(NestorOptimizer):
    r"""Adan, Algorithm 1 of the paper with the bias correction of the authors' code.

    .. math::
        \begin{aligned}
        & g_t \leftarrow c\,\nabla f(\theta_{t-1}),\quad
          c = \min(1, \text{max\_grad\_norm} / (\lVert g \rVert_2 + \epsilon))
          \text{ (when clipping)}, \quad g_0 := g_1 \\
        & m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        & v_t = \beta_2 v_{t-1} + (1-\beta_2)(g_t - g_{t-1}) \\
        & n_t = \beta_3 n_{t-1} + (1-\beta_3)\,[g_t + \beta_2 (g_t - g_{t-1})]^2 \\
        & \eta_t = \text{lr} / (\sqrt{n_t / (1-\beta_3^t)} + \epsilon) \\
        & \theta_t = \big(\theta_{t-1} - \eta_t \odot (m_t/(1-\beta_1^t)
          + \beta_2 v_t/(1-\beta_2^t))\big) / (1 + \text{lr}\,\lambda)
          \quad\text{(proximal weight decay; no\_prox: }
          \theta_{t-1} \leftarrow (1-\text{lr}\,\lambda)\theta_{t-1}\text{ first)}
        \end{aligned}

    The paper's betas are "1 - beta" here, as in the reference implementation
    (github.com/sail-sg/Adan): defaults (0.98, 0.92, 0.99).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        betas: (beta1, beta2, beta3) for the gradient, gradient-difference and squared moments.
        eps: added to the denominator.
        weight_decay: decoupled weight decay lambda.
        no_prox: multiply by (1 - lr * wd) before the update instead of the proximal division.
        max_grad_norm: clip all gradients by their global L2 norm (0 turns it off).
        foreach: use the multi-tensor (torch._foreach_*) path.
        fused: use compiled kernels (torch.compile). None picks the best available.
        state_precision: "fp32", "bf16" (8 bytes per parameter) or "int8" (block-wise,
            about 4.06 bytes per parameter with its scales); see ``optimizers.lowbit``.

    State per parameter (fp32 for bf16/fp16 parameters): ``exp_avg`` (m), ``exp_avg_diff`` (v),
    ``exp_avg_sq`` (n), ``neg_pre_grad`` (-g_{t-1}) and ``step``: 16 bytes per fp32 parameter.

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = Adan(model.parameters(), lr=1e-2, weight_decay=0.02)
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        no_prox: bool = False,
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
            no_prox=no_prox,
            foreach=foreach,
            fused=fused,
            state_precision=state_precision,
        )
        super().__init__(params, defaults, betas=3, max_grad_norm=max_grad_norm)

    @torch.no_grad()
    def restart(self) -> None:
        """The paper's restart: zero the moments and start the step count (and bias
        correction) again; the next step treats its gradient as the first."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                        state[key].zero_()
                    state["step"].zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by this class or by the reference implementation
        (sail-sg/Adan keeps ``step`` in each param group rather than per parameter)."""
        state = {k: dict(entry) for k, entry in state_dict["state"].items()}
        groups = []
        for saved in state_dict["param_groups"]:
            saved = dict(saved)
            step = saved.pop("step", None)
            if step is not None:
                for idx in saved["params"]:
                    entry = state.get(idx)
                    if entry is not None and "step" not in entry:
                        entry["step"] = torch.tensor(float(step))
            saved.setdefault("no_prox", False)
            groups.append(saved)
        super().load_state_dict({**state_dict, "state": state, "param_groups": groups})

    def _step_group(
        self, index: int, group: dict[str, Any], params: list[Tensor], clip: Tensor | None
    ) -> None:
        impl = choose_impl(params, group["foreach"], group["fused"])
        runs, buckets = self._advance(index, params, _STATE_KEYS, fused=impl == "fused")
        low_bit = group["state_precision"] != "fp32"
        for step, buffers in runs:  # one compiled call per run of the flat buffers
            param, grad, *states = buffers
            if low_bit:
                _encoded_adan([[b] for b in buffers], step, **_hyper(group, step, clip))
                continue
            if step == 1:
                _first_gradient([states[3]], [grad], clip)
            _fused_adan([param], [grad], *([s] for s in states), **_hyper(group, step, clip))
        for step, bucket in buckets.items():
            if low_bit:
                hyper = _hyper(group, step, clip)
                kernel, bucket, decoded = self._lowbit_split(bucket, _STATE_KEYS, impl == "fused")
                for same_format in kernel:
                    _encoded_adan(self._encoded_lists(same_format, _STATE_KEYS), step, **hyper)
                self._step_decoded(
                    decoded, _STATE_KEYS, step, _decoded_adan, first=step == 1, **hyper
                )
                if not bucket:  # the rest keeps fp32 state: the fp32 paths below
                    continue
            states = [self.state[p] for p in bucket]
            grads = [p.grad for p in bucket]
            neg_pre_grads = [s["neg_pre_grad"] for s in states]
            if step == 1:
                _first_gradient(neg_pre_grads, grads, clip)
            _adan(
                impl,
                bucket,
                grads,
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                [s["exp_avg_diff"] for s in states],
                neg_pre_grads,
                views=self._flat_views,
                **_hyper(group, step, clip),
            )


def _hyper(group: dict[str, Any], step: int, clip: Tensor | None) -> dict[str, Any]:
    """The update's scalars for ``group`` at ``step`` (bias corrections included)."""
    beta1, beta2, beta3 = group["betas"]
    return dict(
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        bias_correction1=1 - beta1**step,
        bias_correction2=1 - beta2**step,
        bias_correction3=1 - beta3**step,
        lr=group["lr"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
        no_prox=group["no_prox"],
        clip=clip,
    )


def _decoded_adan(param: Tensor, states: list[Tensor], *, first: bool, **hyper: Any) -> None:
    """One tensor's update over its decoded (fp32) state: the reference path's math."""
    if first:
        _first_gradient([states[3]], [param.grad], hyper["clip"])
    _single_tensor_adan([param], [param.grad], *([s] for s in states), **hyper)


def _first_gradient(neg_pre_grads: list[Tensor], grads: list[Tensor], clip: Tensor | None) -> None:
    """g_0 := g_1, so the first gradient difference is zero."""
    for npg, grad in zip(neg_pre_grads, grads, strict=True):
        npg.copy_(grad).neg_()
        if clip is not None:
            npg.mul_(clip)


def _adan(impl: str, *tensor_lists: list[Tensor], views: FlatViews, **kwargs: Any) -> None:
    if impl == "fused":
        big, small = split_for_fused(*tensor_lists)
        if big:
            _fused_adan(*([lst[i] for i in big] for lst in tensor_lists), views=views, **kwargs)
        if small:
            _multi_tensor_adan(*([lst[i] for i in small] for lst in tensor_lists), **kwargs)
    elif impl == "foreach":
        _multi_tensor_adan(*tensor_lists, **kwargs)
    else:
        _single_tensor_adan(*tensor_lists, **kwargs)


def _single_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    neg_pre_grads: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    beta3: float,
    bias_correction1: float,
    bias_correction2: float,
    bias_correction3: float,
    lr: float,
    weight_decay: float,
    eps: float,
    no_prox: bool,
    clip: Tensor | None,
) -> None:
    """The readable reference: one parameter at a time, one line per symbol of the paper."""
    for i, param in enumerate(params):
        exp_avg, exp_avg_sq, exp_avg_diff = exp_avgs[i], exp_avg_sqs[i], exp_avg_diffs[i]
        neg_pre_grad = neg_pre_grads[i]
        grad = grads[i].to(exp_avg.dtype)
        if clip is not None:
            grad = grad * clip
        # Low-precision parameters are updated in fp32 and rounded once at the end.
        weight = param if param.dtype == exp_avg.dtype else param.to(exp_avg.dtype)

        diff = grad + neg_pre_grad  # g_t - g_{t-1}
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)  # m_t
        exp_avg_diff.mul_(beta2).add_(diff, alpha=1 - beta2)  # v_t
        nesterov = grad.add(diff, alpha=beta2)  # g_t + beta2 (g_t - g_{t-1})
        exp_avg_sq.mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)  # n_t

        denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction3)).add_(eps)
        if no_prox:
            weight.mul_(1 - lr * weight_decay)
        weight.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
        weight.addcdiv_(exp_avg_diff, denom, value=-lr * beta2 / bias_correction2)
        if not no_prox:
            weight.div_(1 + lr * weight_decay)  # proximal weight decay
        neg_pre_grad.copy_(grad).neg_()
        if weight is not param:
            param.copy_(weight)


def _multi_tensor_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    neg_pre_grads: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    beta3: float,
    bias_correction1: float,
    bias_correction2: float,
    bias_correction3: float,
    lr: float,
    weight_decay: float,
    eps: float,
    no_prox: bool,
    clip: Tensor | None,
) -> None:
    """The same update with torch._foreach_* kernels, a few launches for all tensors."""
    low_precision = [i for i, p in enumerate(params) if p.dtype != exp_avgs[i].dtype]
    if low_precision:
        weights = [p.to(exp_avgs[i].dtype) for i, p in enumerate(params)]
        grads = [g.to(exp_avgs[i].dtype) for i, g in enumerate(grads)]
    else:
        weights = params
    grads = torch._foreach_mul(grads, clip) if clip is not None else list(grads)

    diffs = torch._foreach_add(grads, neg_pre_grads)  # g_t - g_{t-1}
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)  # m_t
    torch._foreach_mul_(exp_avg_diffs, beta2)
    torch._foreach_add_(exp_avg_diffs, diffs, alpha=1 - beta2)  # v_t
    torch._foreach_mul_(diffs, beta2)
    torch._foreach_add_(diffs, grads)  # g_t + beta2 (g_t - g_{t-1})
    torch._foreach_mul_(exp_avg_sqs, beta3)
    torch._foreach_addcmul_(exp_avg_sqs, diffs, diffs, value=1 - beta3)  # n_t

    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, math.sqrt(bias_correction3))
    torch._foreach_add_(denoms, eps)
    if no_prox:
        torch._foreach_mul_(weights, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(weights, exp_avgs, denoms, value=-lr / bias_correction1)
    torch._foreach_addcdiv_(weights, exp_avg_diffs, denoms, value=-lr * beta2 / bias_correction2)
    if not no_prox:
        torch._foreach_div_(weights, 1 + lr * weight_decay)
    torch._foreach_copy_(neg_pre_grads, grads)
    torch._foreach_neg_(neg_pre_grads)
    if low_precision:
        torch._foreach_copy_(params, weights)


def _adan_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_diff: Tensor,
    neg_pre_grad: Tensor,
    hp: Tensor,
) -> None:
    """One 1-D tensor's update, written for torch.compile to fuse into a single pass."""
    beta1, beta2, beta3, step_size, step_size_diff, bc3_sqrt, eps, decay, prox, clip = hp.unbind()
    grad = grad.to(exp_avg.dtype) * clip
    diff = grad + neg_pre_grad
    exp_avg.mul_(beta1).add_((1 - beta1) * grad)  # m_t
    exp_avg_diff.mul_(beta2).add_((1 - beta2) * diff)  # v_t
    nesterov = grad + beta2 * diff
    exp_avg_sq.mul_(beta3).add_((1 - beta3) * nesterov * nesterov)  # n_t
    denom = exp_avg_sq.sqrt() / bc3_sqrt + eps
    weight = param.to(exp_avg.dtype) * decay
    weight = weight - step_size * exp_avg / denom - step_size_diff * exp_avg_diff / denom
    param.copy_(weight / prox)
    neg_pre_grad.copy_(-grad)


_ADAN_FUSED = FusedKernel(_adan_kernel)


def _fused_adan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    exp_avg_diffs: list[Tensor],
    neg_pre_grads: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    beta3: float,
    bias_correction1: float,
    bias_correction2: float,
    bias_correction3: float,
    lr: float,
    weight_decay: float,
    eps: float,
    no_prox: bool,
    clip: Tensor | None,
    views: FlatViews | None = None,
) -> None:
    """The same update as compiled kernels: one pass over memory per tensor (44 bytes per
    fp32 parameter: read p, g, m, v, n, -g_prev; write p, m, v, n, -g_prev)."""
    scalars = _kernel_scalars(
        beta1=beta1,
        beta2=beta2,
        beta3=beta3,
        bias_correction1=bias_correction1,
        bias_correction2=bias_correction2,
        bias_correction3=bias_correction3,
        lr=lr,
        weight_decay=weight_decay,
        eps=eps,
        no_prox=no_prox,
        clip=clip,
    )
    hp = hyperparams(scalars, like=exp_avgs[0])
    _ADAN_FUSED([params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads], hp, views)


def _kernel_scalars(
    beta1: float,
    beta2: float,
    beta3: float,
    bias_correction1: float,
    bias_correction2: float,
    bias_correction3: float,
    lr: float,
    weight_decay: float,
    eps: float,
    no_prox: bool,
    clip: Tensor | None,
) -> list[float | Tensor]:
    """``_adan_kernel``'s hyperparameter vector, in its order."""
    wd = lr * weight_decay
    return [
        beta1,
        beta2,
        beta3,
        lr / bias_correction1,
        lr * beta2 / bias_correction2,
        math.sqrt(bias_correction3),
        eps,
        1 - wd if no_prox else 1.0,
        1.0 if no_prox else 1 + wd,
        1.0 if clip is None else clip,
    ]


def _adan_first_kernel(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    exp_avg_diff: Tensor,
    neg_pre_grad: Tensor,
    hp: Tensor,
) -> None:
    """``_adan_kernel`` with g_0 := g_1 inside: hp is its ten values and ``first`` (1 at
    step 1), so that a low-bit first step does not round -g_1 through the codes."""
    clip, first = hp[9], hp[10]
    grad0 = -(grad.to(neg_pre_grad.dtype) * clip)
    neg_pre_grad.copy_(torch.where(first > 0, grad0, neg_pre_grad))
    _adan_kernel(param, grad, exp_avg, exp_avg_sq, exp_avg_diff, neg_pre_grad, hp[:10])


def _encoded_adan_kernel(param: Tensor, grad: Tensor, *buffers_and_hp: Tensor) -> None:
    """One tensor's update over bf16 or int8 state (see ``_lowbit_kernels``)."""
    *buffers, hp = buffers_and_hp
    run_encoded(_adan_first_kernel, _STATE_KEYS, param, grad, buffers, hp)


_ADAN_ENCODED = EncodedKernel(_encoded_adan_kernel)


def _encoded_adan(lists: list[list[Tensor]], step: int, **hyper: Any) -> None:
    """The update over low-bit state, compiled (``lists``: params, grads, then each state
    entry). It moves 2 bytes per element for each int8 buffer read and written (bf16: 4),
    plus the parameters and gradients: 20 bytes per fp32 parameter under int8, 28 under
    bf16, against 44 with fp32 state."""
    values = [*_kernel_scalars(**hyper), 1.0 if step == 1 else 0.0, float(step)]
    like = torch.empty(0, device=lists[0][0].device, dtype=torch.float32)
    _ADAN_ENCODED(lists, hyperparams(values, like=like))
