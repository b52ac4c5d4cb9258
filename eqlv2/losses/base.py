"""Shared interface of the classification losses and the validation of their arguments.

Every loss takes detectron2's box-head layout: ``logits`` of shape (N, C+1) whose last column is
background, and ``labels`` of shape (N,) in [0, C] where C means background.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

__all__ = [
    "ClassificationLoss",
    "check_finite",
    "check_num_classes",
    "check_per_class_tensor",
]


def check_num_classes(num_classes: int) -> int:
    """Return ``num_classes`` if it is an int >= 1, else raise ``ValueError`` naming it."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return num_classes


def check_finite(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a finite real number, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_per_class_tensor(name: str, values: Tensor, num_classes: int) -> Tensor:
    """Check a per-category tensor of shape (C,) with finite, non-negative entries.

    Returns it detached, as a float64 tensor on its device.
    """
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape ({num_classes},), got {type(values).__name__}")
    if values.shape != (num_classes,):
        raise ValueError(f"{name} must have shape ({num_classes},), got {tuple(values.shape)}")
    values = values.detach().to(torch.float64)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"{name} must be finite and non-negative, got min {values.min().item()!r}, max {values.max().item()!r}")
    return values


class ClassificationLoss(nn.Module, ABC):
    """Base class of the box-head classification losses.

    Subclasses implement :meth:`forward` (training loss) and :meth:`scores` (test-time
    per-category probabilities) and may call :meth:`check_inputs` / :meth:`check_logits`.

    Args:
        num_classes: number of foreground categories C (the logits have C+1 columns).
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)

    @property
    def background_label(self) -> int:
        """The label of background proposals, C."""
        return self.num_classes

    @abstractmethod
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss of a batch: ``logits`` (N, C+1), ``labels`` (N,) in [0, C] -> scalar tensor."""

    @abstractmethod
    def scores(self, logits: Tensor) -> Tensor:
        """Test-time probabilities: ``logits`` (N, C+1) -> (N, C), one score per category."""

    def check_logits(self, logits: Tensor) -> None:
        """Raise ``ValueError`` unless ``logits`` is a floating tensor of shape (N, C+1)."""
        width = self.num_classes + 1
        if not isinstance(logits, Tensor):
            raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[1] != width:
            raise ValueError(
                f"logits must have shape (N, C+1) = (N, {width}), got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")

    def check_inputs(self, logits: Tensor, labels: Tensor) -> None:
        """Raise ``ValueError`` unless ``logits`` is (N, C+1) and ``labels`` is (N,) in [0, C]."""
        self.check_logits(logits)
        if not isinstance(labels, Tensor):
            raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        if labels.shape != (logits.shape[0],):
            raise ValueError(
                f"labels must have shape (N,) = ({logits.shape[0]},) to match logits, "
                f"got {tuple(labels.shape)}"
            )
        if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
        if labels.numel() > 0:
            smallest, largest = torch.aminmax(labels)
            smallest, largest = int(smallest), int(largest)
            if smallest < 0 or largest > self.num_classes:
                bad = smallest if smallest < 0 else largest
                raise ValueError(
                    f"labels must lie in [0, C] = [0, {self.num_classes}], got {bad}"
                )

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
