"""Long-tailed evaluation: balanced accuracy overall and per shot group.

As in the long-tailed literature (docs/rebalancing.md, "Long-tailed accuracy"):

* per-class accuracy ``acc[c] = #{i : y_i = c, pred_i = c} / #{i : y_i = c}``;
* ``overall`` = balanced accuracy = mean of ``acc[c]`` over the classes present in the
  evaluation set (on the usual balanced test sets this equals plain top-1 accuracy);
* ``many`` / ``medium`` / ``few``: the same mean over the present classes with more than 100,
  20 to 100, and fewer than 20 training samples.

Classes absent from the evaluation set are left out of every mean (not counted as 0): their
``per_class`` entry is NaN. A group with no present class is NaN.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence, Union

import torch

# Shot groups by training-set size: many > 100, medium 20..100, few < 20.
MANY_SHOT_MIN = 100  # exclusive
FEW_SHOT_MAX = 20  # exclusive

ClassCounts = Union[torch.Tensor, Sequence[int]]


def _as_long_vector(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {t.dtype}")
    return t.to(device="cpu", dtype=torch.int64)


def per_class_accuracy(correct_per_class: torch.Tensor, samples_per_class: torch.Tensor) -> torch.Tensor:
    """``correct / samples`` in float64, NaN where a class has no sample."""
    correct = correct_per_class.to(torch.float64)
    samples = samples_per_class.to(torch.float64)
    return torch.where(samples > 0, correct / samples.clamp_min(1), torch.full_like(correct, math.nan))


def mean_over_present(per_class: torch.Tensor, select: torch.Tensor = None) -> float:
    """Mean of the non-NaN entries of ``per_class`` (restricted to ``select``); NaN if none."""
    values = per_class if select is None else per_class[select]
    values = values[~torch.isnan(values)]
    return float(values.mean()) if values.numel() > 0 else math.nan


def class_correct_counts(preds: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """``(correct_per_class, samples_per_class)``, both int64 ``(num_classes,)``."""
    samples = torch.bincount(labels, minlength=num_classes)
    correct = torch.bincount(labels[preds == labels], minlength=num_classes)
    return correct, samples


def lt_accuracy(
    preds: torch.Tensor, labels: torch.Tensor, train_class_counts: ClassCounts
) -> Dict[str, Union[float, torch.Tensor]]:
    """Balanced accuracy overall and for the many / medium / few shot groups.

    Args:
        preds: ``(M,)`` predicted class indices (e.g. ``PredictionRebalancer.predict(logits)``).
        labels: ``(M,)`` true classes, each in ``[0, C)``.
        train_class_counts: ``(C,)`` training samples per class (a tensor, list or array); it
            fixes ``C`` and the shot groups: many > 100, medium 20..100, few < 20.

    Returns:
        ``{"overall", "many", "medium", "few"}`` as Python floats in [0, 1] (NaN for a group
        with no class present in the evaluation set) and ``"per_class"``, a float64 CPU tensor
        ``(C,)`` with NaN for classes absent from the evaluation set. Absent classes are left
        out of every mean.
    """
    preds = _as_long_vector(preds, "preds")
    labels = _as_long_vector(labels, "labels")
    train_counts = _as_long_vector(train_class_counts, "train_class_counts")
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels must have the same shape, got {tuple(preds.shape)} and "
                         f"{tuple(labels.shape)}")
    num_classes = train_counts.numel()
    if num_classes == 0:
        raise ValueError("train_class_counts must have one entry per class, got an empty vector")
    if labels.numel() > 0 and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)][0].item()
        raise ValueError(f"labels must be in [0, {num_classes}) (C = len(train_class_counts)), found {bad}")

    correct, samples = class_correct_counts(preds, labels, num_classes)
    per_class = per_class_accuracy(correct, samples)
    many = train_counts > MANY_SHOT_MIN
    few = train_counts < FEW_SHOT_MAX
    return {
        "overall": mean_over_present(per_class),
        "many": mean_over_present(per_class, many),
        "medium": mean_over_present(per_class, ~many & ~few),
        "few": mean_over_present(per_class, few),
        "per_class": per_class,
    }
