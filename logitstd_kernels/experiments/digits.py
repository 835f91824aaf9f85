"""scikit-learn's handwritten digits (1797 8x8 images, shipped inside scikit-learn: no download)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deps import require

__all__ = ["Digits", "load_digits", "NUM_FEATURES", "NUM_CLASSES"]

NUM_FEATURES = 64
NUM_CLASSES = 10


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
