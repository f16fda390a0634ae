"""Nestor's optimizer library: exact, fast Adan, AdamW/AMSGrad, LAMB and Lookahead.

Pure PyTorch: every optimizer is a ``torch.optim.Optimizer``, so LR schedulers and
``state_dict()`` work as usual.

    >>> from optimizers import Adan
    >>> opt = Adan(model.parameters(), lr=1e-2, weight_decay=0.02)

The spec half (``OptimizerSpec``, ``list_optimizers``) is torch-free and imported at once;
the optimizers themselves load on first use, so that a process that only validates specs
(the service) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .spec import LookaheadSpec, OptimizerSpec, list_optimizers

_LAZY = {
    "AdamW": ".adamw",
    "Adan": ".adan",
    "LAMB": ".lamb",
    "Lookahead": ".lookahead",
    "ZeroOptimizer": ".zero",
    "create_optimizer": ".registry",
    "param_groups_weight_decay": ".registry",
}

if TYPE_CHECKING:
    from .adamw import AdamW
    from .adan import Adan
    from .lamb import LAMB
    from .lookahead import Lookahead
    from .registry import create_optimizer, param_groups_weight_decay
    from .zero import ZeroOptimizer


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "LAMB",
    "AdamW",
    "Adan",
    "Lookahead",
    "LookaheadSpec",
    "OptimizerSpec",
    "ZeroOptimizer",
    "create_optimizer",
    "list_optimizers",
    "param_groups_weight_decay",
]
