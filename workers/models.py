"""Nestor's built-in models: ordinary model factories (``workers.contract``), named in a spec
by alias (``"mnist1d-mlp"`` is ``{"factory": "workers.models:mnist1d_mlp"}``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .contract import Data


def mlp(d_in: int, hidden: int, depth: int, d_out: int) -> nn.Sequential:
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


def _classes(data: Data) -> int:
    if data.num_classes is None:
        raise ValueError("this model needs Data.num_classes (the number of classes)")
    return data.num_classes


def mnist1d_mlp(data: Data, hidden: int = 256, depth: int = 2) -> nn.Module:
    """2-hidden-layer MLP (77k parameters on MNIST-1D)."""
    return mlp(data.input_shape[0], hidden, depth, _classes(data))


def mnist1d_cnn(data: Data, channels: int = 32) -> nn.Module:
    """3-layer 1-D CNN (9k parameters on MNIST-1D)."""
    return Mnist1dCNN(data.input_shape[0], channels, _classes(data))


def digits_mlp(data: Data, hidden: int = 128) -> nn.Module:
    """1-hidden-layer MLP."""
    return mlp(data.input_shape[0], hidden, 1, _classes(data))


def char_transformer(data: Data, d: int = 128, layers: int = 2, heads: int = 4) -> nn.Module:
    """2-layer byte-level GPT (d=128)."""
    return CharTransformer(_classes(data), data.input_shape[0], d, layers, heads)
