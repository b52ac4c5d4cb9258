"""Shared interface of the classification losses and the validation of their arguments.

Every loss takes detectron2's box-head layout: ``logits`` of shape (N, K) -- K = C+1 whose last
column is background, or K = 2(C+1) for the 2C-softmax classifier -- and ``labels`` of shape (N,)
in [0, C] where C means background.

Every loss also accumulates, in training mode, the per-category gradient statistics of the
paper's eq. 3-4 and 9 (see :class:`ClassificationLoss`), so that the positive-to-negative
gradient ratio of Figures 1-2 can be compared between EQL v2 and its baselines.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .functional import sigmoid_bias_init

__all__ = [
    "GRADIENT_RATIO_EPS",
    "ClassificationLoss",
    "check_finite",
    "check_num_classes",
    "check_per_class_tensor",
    "column_sums",
]

#: Added to the accumulated negative gradient in eq. 9, as in the authors' code.
GRADIENT_RATIO_EPS = 1e-10

_STATISTICS_DTYPE = torch.float64
_STATISTICS_BUFFERS = ("pos_grad", "neg_grad")


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


def column_sums(labels: Tensor, values: Tensor, width: int) -> Tensor:
    """(width,) float64: ``values[i]`` (N,) summed into column ``labels[i]`` (N,)."""
    sums = torch.zeros(width, dtype=_STATISTICS_DTYPE, device=labels.device)
    return sums.index_add_(0, labels.long(), values.detach().to(_STATISTICS_DTYPE))


def _distributed_sum(values: Tensor) -> Tensor:
    """Sum ``values`` over all workers in place when torch.distributed is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class ClassificationLoss(nn.Module, ABC):
    """Base class of the box-head classification losses, with their gradient statistics.

    Subclasses implement :meth:`forward` (training loss) and :meth:`scores` (test-time
    per-category probabilities), call :meth:`check_inputs` / :meth:`check_logits`, and in
    training mode report each batch's gradient magnitudes with :meth:`_accumulate_statistics`.

    Gradient statistics (eq. 3, 4 and 9 of the paper, for every loss): write the batch loss as
    ``L = sum_i l_i / N`` over its N rows. For each category column j < C,

    - ``pos_grad[j]`` = sum over training steps and rows i with label j of ``|d l_i / d z_ij|``;
    - ``neg_grad[j]`` = the same sum over the rows whose label is not j,

    i.e. N times the magnitude of the gradient of the batch loss w.r.t. the logit z_ij, split by
    the row's label, with the loss's own weights included (EQL v2's reweighed gradients of eq.
    7-8; EQL v1's and the federated loss's zero weights). The sums are float64 (they stay
    float64 under ``.half()``), summed over workers when torch.distributed is initialised, and
    not updated in eval mode. They never change the loss or its gradient.

    Args:
        num_classes: number of foreground categories C.

    Buffers:
        pos_grad, neg_grad: (C,) float64 accumulated gradient magnitudes.
        num_updates: () int64, the number of statistics updates (training batches) so far.
    """

    pos_grad: Tensor
    neg_grad: Tensor
    num_updates: Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.register_buffer("pos_grad", torch.zeros(num_classes, dtype=_STATISTICS_DTYPE))
        self.register_buffer("neg_grad", torch.zeros(num_classes, dtype=_STATISTICS_DTYPE))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.int64))

    @property
    def background_label(self) -> int:
        """The label of background proposals, C."""
        return self.num_classes

    @property
    def num_logits(self) -> int:
        """K, the number of classifier outputs per proposal: C+1 (2(C+1) for the 2C-softmax)."""
        return self.num_classes + 1

    def decision_logits(self, logits: Tensor) -> Tensor:
        """(N, C+1) logits whose argmax is the predicted class (column C: background).

        The classifier's own logits for every loss with C+1 outputs.
        """
        return logits

    def category_weight_rows(self, weight: Tensor) -> Tensor:
        """(C, D) the classifier weight of each category from the (K, D) ``cls_score`` weight.

        Row j of the weight for every loss with C+1 outputs (the paper's Figure 3).
        """
        return weight[: self.num_classes]

    def initial_bias(self, prior_prob: float, background_prior_prob: float | None = None) -> Tensor:
        """(K,) float64 classifier bias: every category has probability ``prior_prob`` at the start,
        the background column C (if the classifier has one) ``background_prior_prob`` (default the same)."""
        bias = torch.full((self.num_logits,), sigmoid_bias_init(prior_prob), dtype=torch.float64)
        if background_prior_prob is not None and self.num_logits > self.num_classes:
            bias[self.num_classes] = sigmoid_bias_init(background_prior_prob)
        return bias

    # ----------------------------------------------------------------------------- statistics
    def gradient_ratio(self) -> Tensor:
        """g: (C,) float64 accumulated positive / negative gradient ratio (eq. 9)."""
        return self.pos_grad / (self.neg_grad + GRADIENT_RATIO_EPS)

    @torch.no_grad()
    def _accumulate_statistics(self, positive_sums: Tensor, negative_sums: Tensor) -> None:
        """Add one batch's per-column gradient magnitudes (see the class docstring).

        Args:
            positive_sums: (>= C,) per column, ``sum |d l_i / d z_ij|`` over the rows labelled j.
            negative_sums: (>= C,) per column, the same over the other rows.

        Only the first C entries (the categories) are kept; the batch is summed over workers.
        """
        num_classes = self.num_classes
        step = torch.cat([positive_sums[:num_classes], negative_sums[:num_classes]])
        step = _distributed_sum(step.to(_STATISTICS_DTYPE)).to(self.pos_grad.device)
        self.pos_grad += step[:num_classes]
        self.neg_grad += step[num_classes:]
        self.num_updates += 1

    def _accumulate_from_residuals(self, labels: Tensor, positive_residuals: Tensor, negative_sums: Tensor) -> None:
        """:meth:`_accumulate_statistics` from what the fused losses of :mod:`.functional` return.

        Args:
            labels: (N,) the positive column of each row.
            positive_residuals: (N,) ``w (p - 1)`` of each row's positive entry (N times its gradient).
            negative_sums: (C+1,) per column, the summed (weighted) gradients times N of the negatives.
        """
        positive_sums = column_sums(labels, positive_residuals.neg(), self.num_classes + 1)
        self._accumulate_statistics(positive_sums, negative_sums)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ClassificationLoss:
        """Move buffers like any module but keep the gradient statistics in float64."""
        before = {name: getattr(self, name) for name in _STATISTICS_BUFFERS}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new.dtype != _STATISTICS_DTYPE:
                setattr(self, name, old.to(device=new.device))
        return self

    @abstractmethod
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss of a batch: ``logits`` (N, K), ``labels`` (N,) in [0, C] -> scalar tensor."""

    @abstractmethod
    def scores(self, logits: Tensor) -> Tensor:
        """Test-time probabilities: ``logits`` (N, K) -> (N, C), one score per category."""

    def check_logits(self, logits: Tensor) -> None:
        """Raise ``ValueError`` unless ``logits`` is a floating tensor of shape (N, K)."""
        width = self.num_logits
        if not isinstance(logits, Tensor):
            raise ValueError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[1] != width:
            expected = "C+1" if width == self.num_classes + 1 else "2(C+1)"
            raise ValueError(
                f"logits must have shape (N, {expected}) = (N, {width}), got {tuple(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")

    def check_inputs(self, logits: Tensor, labels: Tensor) -> None:
        """Raise ``ValueError`` unless ``logits`` is (N, K) and ``labels`` is (N,) in [0, C]."""
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
