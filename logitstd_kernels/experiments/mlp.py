"""The multilayer perceptron of seed 002, used as teacher and student in every digits experiment."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["MLP", "make_mlp"]


class MLP(nn.Module):
    """``Linear -> ReLU -> ... -> Linear`` through ``sizes`` (input, hidden..., output); flattens its input."""

    def __init__(self, sizes: Sequence[int]) -> None:
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"an MLP needs at least an input and an output size, got {tuple(sizes)}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(sizes, sizes[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.sizes = tuple(int(s) for s in sizes)
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1))


def make_mlp(sizes: Sequence[int], seed: int) -> MLP:
    """An :class:`MLP` whose initial weights depend only on ``seed`` (not on the global RNG state)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(sizes)
