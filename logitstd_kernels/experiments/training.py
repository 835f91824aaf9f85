"""The training loop shared by ``distill``, ``ghost`` and the digits demo of ``analyze``."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .digits import NUM_CLASSES, Digits

__all__ = ["shuffled_batches", "train_epochs", "fit", "train_teacher", "accuracy", "set_threads"]

Batch = TypeVar("Batch")


def set_threads(threads: int) -> None:
    """Use ``threads`` intra-op CPU threads (small MLPs run fastest on 1)."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index tensors of one epoch over ``range(n)`` in a random order (the last batch may be short)."""
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_epochs(
    model: nn.Module,
    epochs: int,
    batches: Callable[[], Iterable[Batch]],
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    *,
    lr: float,
) -> Iterator[int]:
    """Adam on ``loss_fn(model, batch)`` over ``batches()`` once per epoch; yields each finished epoch (1-based).

    A generator, so that callers can evaluate between epochs and wrap it in a progress bar::

        for epoch in train_epochs(model, 10, batches, loss_fn, lr=1e-3):
            history.append(accuracy(model, x_test, y_test))
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in batches():
            loss = loss_fn(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        model.eval()
        yield epoch


def fit(model: nn.Module, epochs: int, batches: Callable[[], Iterable[Batch]],
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor], *, lr: float) -> nn.Module:
    """Run :func:`train_epochs` to the end; returns ``model`` (in eval mode)."""
    for _ in train_epochs(model, epochs, batches, loss_fn, lr=lr):
        pass
    return model


def train_teacher(model: nn.Module, data: Digits, *, epochs: int, batch_size: int, lr: float, seed: int) -> nn.Module:
    """Train ``model`` in place with cross-entropy on its first ``NUM_CLASSES`` outputs (the batch order
    depends on ``seed``); any further outputs (ghost logits) get no direct training signal."""
    order = torch.Generator().manual_seed(seed)
    return fit(model, epochs, lambda: shuffled_batches(len(data.y_train), batch_size, order),
               lambda m, idx: F.cross_entropy(m(data.x_train[idx])[:, :NUM_CLASSES], data.y_train[idx]), lr=lr)


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: Optional[int] = None) -> float:
    """Fraction of rows whose argmax over the first ``num_classes`` outputs (default: all) equals ``y``."""
    model.eval()
    logits = model(x)
    if num_classes is not None:
        logits = logits[:, :num_classes]
    return float((logits.argmax(dim=-1) == y).float().mean()) if len(y) else 0.0
