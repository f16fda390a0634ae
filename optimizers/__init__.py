"""Nestor's optimizer library: exact, fast Adan, AdamW/AMSGrad, LAMB and Lookahead.

Pure PyTorch: every optimizer is a ``torch.optim.Optimizer``, so LR schedulers and
``state_dict()`` work as usual.

    >>> from optimizers import Adan
    >>> opt = Adan(model.parameters(), lr=1e-2, weight_decay=0.02)
"""

from .adamw import AdamW
from .adan import Adan
from .lamb import LAMB
from .lookahead import Lookahead
from .registry import (
    LookaheadSpec,
    OptimizerSpec,
    create_optimizer,
    list_optimizers,
    param_groups_weight_decay,
)
from .zero import ZeroOptimizer

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
