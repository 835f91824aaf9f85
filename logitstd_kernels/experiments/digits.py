"""scikit-learn's handwritten digits (1797 8x8 images, shipped inside scikit-learn: no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deps import require

__all__ = ["Digits", "load_digits", "NUM_FEATURES", "NUM_CLASSES", "BACKGROUND", "weak_view", "strong_view"]

NUM_FEATURES = 64
NUM_CLASSES = 10
BACKGROUND = -1.0  # a blank pixel after scaling


@dataclass(frozen=True)
class Digits:
    """A stratified train/test split; pixels scaled from 0..16 to [-1, 1], labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(test_fraction: float = 0.4, split_seed: int = 0) -> Digits:
    """Load the digits and split them (stratified by class) with ``split_seed``.

    Equivalent code::

        X, y = sklearn.datasets.load_digits(return_X_y=True)
        X_tr, X_te, y_tr, y_te = train_test_split(X / 8 - 1, y, test_size=test_fraction,
                                                  stratify=y, random_state=split_seed)
    """
    datasets = require("sklearn.datasets", "the digits data")
    model_selection = require("sklearn.model_selection", "the digits data")
    features, labels = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        features / 8.0 - 1.0, labels, test_size=test_fraction, stratify=labels, random_state=split_seed)
    return Digits(
        x_train=torch.as_tensor(x_tr, dtype=torch.float32), y_train=torch.as_tensor(y_tr, dtype=torch.int64),
        x_test=torch.as_tensor(x_te, dtype=torch.float32), y_test=torch.as_tensor(y_te, dtype=torch.int64),
    )



def weak_view(x: torch.Tensor, generator: torch.Generator, noise: float = 0.1) -> torch.Tensor:
    """MLKD's weak augmentation on digits: Gaussian pixel noise of standard deviation ``noise`` (of the
    [-1, 1] pixel range), clamped to that range. (A one-pixel shift, CIFAR's crop scaled down, leaves
    the MLP teacher, trained on unshifted digits, at about 40% test accuracy.)"""
    return (x + noise * torch.randn(x.shape, generator=generator)).clamp(BACKGROUND, 1.0)


def strong_view(x: torch.Tensor, generator: torch.Generator, noise: float = 0.3, erase: float = 0.1) -> torch.Tensor:
    """MLKD's strong augmentation on digits: Gaussian pixel noise of standard deviation ``noise``, then
    each pixel blanked with probability ``erase``. Equivalent code::

        noisy = (x + noise * randn_like(x)).clamp(-1, 1)
        noisy.masked_fill(rand_like(x) < erase, -1)
    """
    noisy = (x + noise * torch.randn(x.shape, generator=generator)).clamp(BACKGROUND, 1.0)
    return noisy.masked_fill(torch.rand(x.shape, generator=generator) < erase, BACKGROUND)
