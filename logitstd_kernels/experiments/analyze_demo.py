"""Logits for ``analyze --demo``: a synthetic generator (no extra needed) and real digits models.

``synthetic``: CIFAR-100-sized splits (50000 train / 10000 test rows, 100 classes). For each row,
with ``g``, ``n_a``, ``n_b`` independent standard normal vectors and ``e_y`` the one-hot label::

    teacher   = 2 * g + 6 * e_y                 # right about 2/3 of the time
    student_a = c * (teacher + n_a)             # c ~ U(0.5, 2) per row: its own logit scale
    student_b = teacher + n_b                   # the teacher's scale (what plain KD pushes towards)

Both students are equally noisy copies of the teacher; they differ only in scale. So every
difference between their plain KL and their standardized KL comes from the scale, which is what
logit standardization removes. The numbers this gives are a property of the generator, not of
real networks.

``digits``: a teacher MLP and two student MLPs trained on scikit-learn's digits by the ``distill``
code: student A with cross-entropy only, student B with CE + plain KD (T=4, weight 0.9); logits of
the train and test splits. Needs the ``examples`` extra.
"""

from __future__ import annotations

import numpy as np
import torch

from ..analysis import LogitSet
from .deps import progress

__all__ = ["synthetic_logits", "digits_logits"]


def synthetic_logits(n_train: int = 50000, n_test: int = 10000, num_classes: int = 100,
                     seed: int = 0) -> dict[str, LogitSet]:
    """The ``synthetic`` demo splits (see the module docstring), float32 numpy arrays."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, num_classes, n)
        teacher = 2.0 * rng.standard_normal((n, num_classes), dtype=np.float32)
        teacher[np.arange(n), labels] += 6.0
        scale = rng.uniform(0.5, 2.0, (n, 1)).astype(np.float32)
        student_a = scale * (teacher + rng.standard_normal((n, num_classes), dtype=np.float32))
        student_b = teacher + rng.standard_normal((n, num_classes), dtype=np.float32)
        splits[split] = LogitSet(teacher, student_a, student_b, labels.astype(np.int64))
    return splits


def digits_logits(seed: int = 0, *, show_progress: bool = True) -> dict[str, LogitSet]:
    """The ``digits`` demo splits: logits of a teacher, a CE-only student (A) and a KD student (B)."""
    from .digits import NUM_CLASSES, NUM_FEATURES, load_digits
    from .distill import DistillConfig, train_student
    from .mlp import make_mlp
    from .training import train_teacher

    config = DistillConfig(seeds=(seed,))
    data = load_digits(config.test_fraction, config.split_seed)
    models: dict[str, torch.nn.Module] = {}
    for role in progress(("teacher", "student_a", "student_b"), total=3, desc="training the digits models",
                         enable=show_progress):
        if role == "teacher":
            teacher = make_mlp((NUM_FEATURES, *config.teacher_hidden, NUM_CLASSES), config.teacher_seed)
            models[role] = train_teacher(teacher, data, epochs=config.teacher_epochs, batch_size=config.batch_size,
                                         lr=config.lr, seed=config.teacher_seed)
            with torch.inference_mode():
                teacher_train_logits = models[role](data.x_train)
        else:
            models[role] = train_student(data, teacher_train_logits, method="ce" if role == "student_a" else "kd",
                                         kd_weight=0.9, temperature=config.kd_temperature, config=config, seed=seed)
    splits = {}
    with torch.inference_mode():
        for split, x, y in (("train", data.x_train, data.y_train), ("test", data.x_test, data.y_test)):
            splits[split] = LogitSet(*(models[r](x).numpy() for r in ("teacher", "student_a", "student_b")), y.numpy())
    return splits
