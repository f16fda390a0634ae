"""Models by registry name. Adding one is one function and one registry entry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import Dataset


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[[Dataset], nn.Module]
    datasets: tuple[str, ...]
    description: str


def _mlp(d_in: int, hidden: int, depth: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(hidden, d_out))


class Mnist1dCNN(nn.Module):
    """Three 1-D convolutions over the 40-sample signal, then a linear classifier."""

    def __init__(self, length: int = 40, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv1d(1, channels, 5, padding=2),
            nn.GELU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.GELU(),
        )
        self.head = nn.Linear(channels * ((length + 3) // 4), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 40)
        h = self.convs(x.unsqueeze(1))  # (B, C, 10)
        return self.head(h.flatten(1))  # (B, classes)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and an MLP."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, C/H)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small GPT over bytes: token and position embeddings, blocks, a tied head."""

    def __init__(
        self, vocab: int, seq_len: int, d: int = 128, layers: int = 2, heads: int = 4
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # idx: (B, T)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T  # (B, T, vocab)


MODELS: dict[str, ModelEntry] = {
    "mnist1d-mlp": ModelEntry(
        lambda d: _mlp(d.input_shape[0], 256, 2, d.num_classes),
        ("mnist1d",),
        "2-hidden-layer MLP (77k params)",
    ),
    "mnist1d-cnn": ModelEntry(
        lambda d: Mnist1dCNN(d.input_shape[0], 32, d.num_classes),
        ("mnist1d",),
        "3-layer 1-D CNN (9k params)",
    ),
    "digits-mlp": ModelEntry(
        lambda d: _mlp(d.input_shape[0], 128, 1, d.num_classes), ("digits",), "1-hidden-layer MLP"
    ),
    "char-transformer": ModelEntry(
        lambda d: CharTransformer(d.num_classes, d.input_shape[0]),
        ("pystdlib-chars",),
        "2-layer byte-level GPT (d=128)",
    ),
}


def build_model(name: str, data: Dataset, seed: int) -> nn.Module:
    """The registered model ``name`` for ``data``, initialised from ``seed``."""
    torch.manual_seed(seed)
    return MODELS[name].build(data)
