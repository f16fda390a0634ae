"""A model factory for the tier's training runs that says where it trained: on its first
training forward pass each process writes ``{record}/{pid}.json`` with the device of its
inputs and parameters, the process group's backend and the dtype autocast gave its output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from workers.contract import Data
from workers.models import digits_mlp


class Probe(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, record: str) -> None:
        super().__init__()
        self.inner = inner
        self.record = record
        self.seen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        if self.training and not self.seen:
            self.seen = True
            Path(self.record).mkdir(parents=True, exist_ok=True)
            seen = {
                "rank": dist.get_rank() if dist.is_initialized() else None,
                "backend": dist.get_backend() if dist.is_initialized() else None,
                "inputs": str(x.device),
                "parameters": sorted({str(p.device) for p in self.parameters()}),
                "output_dtype": str(out.dtype),
            }
            (Path(self.record) / f"{os.getpid()}.json").write_text(json.dumps(seen))
        return out


def probe_mlp(data: Data, record: str, hidden: int = 64) -> torch.nn.Module:
    """The built-in digits MLP, recording where it trains into the directory ``record``."""
    return Probe(digits_mlp(data, hidden), record)
