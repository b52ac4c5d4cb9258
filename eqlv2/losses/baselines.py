"""Baseline classification losses: softmax, sigmoid, EQL v1 and the federated sigmoid loss.

All take detectron2's layout, ``logits`` (N, C+1) with column C for background and ``labels`` (N,)
in [0, C], and divide summed sigmoid losses by N like detectron2's sigmoid variant. In training
mode each also accumulates the gradient statistics of :class:`ClassificationLoss` (per category,
the summed magnitudes of its logit's gradient on positive and on negative rows), computed from
quantities its forward pass has anyway: the loss and its gradient are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import ClassificationLoss, check_finite, check_per_class_tensor, column_sums
from .functional import compute_dtype, one_hot_weighted_bce, softmax_cross_entropy

__all__ = ["EQLv1Loss", "FederatedSigmoidLoss", "SigmoidBCELoss", "SoftmaxCELoss"]


def _sigmoid_scores(logits: Tensor, num_classes: int, use_agnostic: bool) -> Tensor:
    """(N, C) sigmoid(z_j), times the objectness 1 - sigmoid(z_C) (eq. 10) if ``use_agnostic``."""
    probs = torch.sigmoid(logits[:, :num_classes])
    if use_agnostic:
        probs = probs * torch.sigmoid(-logits[:, num_classes:])
    return probs


def _weighted_bce_with_statistics(
    loss_module: ClassificationLoss, logits: Tensor, labels: Tensor, column_weights: Tensor
) -> Tensor:
    """One-hot sigmoid BCE with the same (C+1,) weight for positives and negatives of a column.

    In training mode adds, per category j, ``w_j |p_ij - 1|`` over its positive rows and
    ``w_j p_ij`` over its negative rows (p = sigmoid(z)) to ``loss_module``'s statistics.
    """
    loss, positive_residuals, negative_prob_sums = one_hot_weighted_bce(
        logits, labels, column_weights, column_weights, with_negative_prob_sums=loss_module.training
    )
    if loss_module.training:
        loss_module._accumulate_from_residuals(labels, positive_residuals, negative_prob_sums * column_weights)
    return loss


class SoftmaxCELoss(ClassificationLoss):
    """detectron2's default: softmax cross-entropy over the C+1 columns, averaged over N.

    An empty batch gives a zero loss (connected to ``logits``). Statistics: per category j,
    ``1 - p_ij`` over its positive rows and ``p_ij`` over its negative rows (background rows
    included), p = softmax(z_i) over the C+1 columns: the magnitudes of d l_i / d z_ij.
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits`` (N, C+1), ``labels`` (N,) in [0, C] -> scalar mean cross-entropy."""
        self.check_inputs(logits, labels)
        loss, positive_residuals, negative_prob_sums = softmax_cross_entropy(
            logits, labels, with_negative_prob_sums=self.training
        )
        if self.training:
            self._accumulate_from_residuals(labels, positive_residuals, negative_prob_sums)
        return loss

    def scores(self, logits: Tensor) -> Tensor:
        """(N, C): softmax over the C+1 columns, background column dropped."""
        self.check_logits(logits)
        return F.softmax(logits, dim=1)[:, : self.num_classes]


class SigmoidBCELoss(ClassificationLoss):
    """Sigmoid cross-entropy against one-hot targets, summed and divided by N.

    Without ``use_agnostic`` (detectron2's sigmoid variant) only the C category columns are
    trained (background rows have all-zero targets) and column C gets no gradient. With it,
    column C is trained as the objectness task and scored with eq. 10: EQL v2 without
    reweighing.

    Args:
        num_classes: number of foreground categories C.
        use_agnostic: also train column C (target 1 on background rows).
    """

    def __init__(self, num_classes: int, use_agnostic: bool = False) -> None:
        super().__init__(num_classes)
        self.use_agnostic = bool(use_agnostic)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits`` (N, C+1), ``labels`` (N,) in [0, C] -> scalar loss."""
        self.check_inputs(logits, labels)
        column_weights = logits.new_ones(self.num_classes + 1, dtype=compute_dtype(logits.dtype))
        if not self.use_agnostic:
            column_weights[self.num_classes] = 0.0
        return _weighted_bce_with_statistics(self, logits, labels, column_weights)

    def scores(self, logits: Tensor) -> Tensor:
        """(N, C) sigmoid probabilities (times the objectness of eq. 10 with ``use_agnostic``)."""
        self.check_logits(logits)
        return _sigmoid_scores(logits, self.num_classes, self.use_agnostic)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, use_agnostic={self.use_agnostic}"


class EQLv1Loss(ClassificationLoss):
    """Equalization Loss (Tan et al., CVPR 2020) over the C category columns.

    ``loss = sum_ij w_ij * BCE(z_ij, y_ij) / N`` with ``w_ij = 1 - E(i) T(j) (1 - y_ij)``: a
    foreground proposal (label < C, E = 1) gives no negative gradient to tail categories
    (image frequency < ``lambda_``, T = 1). Background rows and column C are as in
    :class:`SigmoidBCELoss` without the agnostic task. Statistics: ``w_ij |sigmoid(z_ij) - y_ij|``
    summed per category over its positive and negative rows.

    Args:
        num_classes: number of foreground categories C.
        image_frequencies: (C,) fraction of training images containing each category, in [0, 1].
        lambda_: frequency threshold below which a category is a tail category, in [0, 1].
    """

    image_frequencies: Tensor

    def __init__(self, num_classes: int, image_frequencies: Tensor, lambda_: float = 1.76e-3) -> None:
        super().__init__(num_classes)
        frequencies = check_per_class_tensor("image_frequencies", image_frequencies, num_classes)
        if bool((frequencies > 1).any()):
            raise ValueError(
                f"image_frequencies must lie in [0, 1], got max {frequencies.max().item()!r}"
            )
        self.lambda_ = check_finite("lambda_", lambda_)
        if not 0.0 <= self.lambda_ <= 1.0:
            raise ValueError(f"lambda_ must lie in [0, 1], got {lambda_!r}")
        self.register_buffer("image_frequencies", frequencies)

    @property
    def tail_classes(self) -> Tensor:
        """(C,) bool: True for the categories whose image frequency is below ``lambda_``."""
        return self.image_frequencies < self.lambda_

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits`` (N, C+1), ``labels`` (N,) in [0, C] -> scalar loss.

        Foreground and background rows are two one-hot BCE calls whose negative weights are
        ``1 - T(j)`` and 1; their sums are added and divided by N.
        """
        self.check_inputs(logits, labels)
        dtype, num_classes = compute_dtype(logits.dtype), self.num_classes
        column_weights = logits.new_ones(num_classes + 1, dtype=dtype)
        column_weights[num_classes] = 0.0  # column C is not trained
        tail_zeroed = column_weights.clone()
        tail_zeroed[:num_classes] -= self.tail_classes.to(device=logits.device, dtype=dtype)
        is_foreground = labels < num_classes
        total = logits.new_zeros((), dtype=dtype)
        positive_sums = negative_sums = 0.0
        for rows, negative_weights in ((is_foreground, tail_zeroed), (~is_foreground, column_weights)):
            row_labels = labels[rows]
            loss, positive_residuals, negative_prob_sums = one_hot_weighted_bce(
                logits[rows], row_labels, column_weights, negative_weights,
                with_negative_prob_sums=self.training,
            )  # fmt: skip
            total = total + loss * row_labels.numel()
            if self.training:
                positive_sums = positive_sums + column_sums(row_labels, positive_residuals.neg(), num_classes + 1)
                negative_sums = negative_sums + negative_prob_sums * negative_weights
        if self.training:
            self._accumulate_statistics(positive_sums, negative_sums)
        return total / max(logits.shape[0], 1)

    def scores(self, logits: Tensor) -> Tensor:
        """(N, C) sigmoid probabilities of the category columns."""
        self.check_logits(logits)
        return _sigmoid_scores(logits, self.num_classes, use_agnostic=False)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, lambda_={self.lambda_}, "
                f"num_tail_classes={int(self.tail_classes.sum())}")


class FederatedSigmoidLoss(ClassificationLoss):
    """Federated sigmoid loss (Zhou et al. 2021), as detectron2's ``use_fed_loss``.

    Each forward picks the classes to train: every foreground class present in ``labels``,
    plus classes drawn without replacement with probability proportional to
    ``class_weights`` from the others, ``num_sampled_classes`` in all (fewer if fewer classes
    have a non-zero weight; more if more classes are present). Sigmoid cross-entropy is taken
    on those columns only, summed and divided by N; the other columns and column C get no
    gradient. The chosen classes are kept in ``last_selected_classes`` for inspection.
    Statistics: ``|sigmoid(z_ij) - y_ij|`` of the chosen columns (0 for the others).

    Args:
        num_classes: number of foreground categories C.
        class_weights: (C,) non-negative sampling weights (detectron2: image_count ** 0.5).
        num_sampled_classes: classes trained per batch, >= 1.
        generator: optional ``torch.Generator`` for the sampling (same device as the weights).
    """

    class_weights: Tensor

    def __init__(
        self,
        num_classes: int,
        class_weights: Tensor,
        num_sampled_classes: int = 50,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(num_classes)
        weights = check_per_class_tensor("class_weights", class_weights, num_classes)
        if (
            isinstance(num_sampled_classes, bool)
            or not isinstance(num_sampled_classes, int)
            or num_sampled_classes < 1
        ):
            raise ValueError(f"num_sampled_classes must be an integer >= 1, got {num_sampled_classes!r}")
        self.num_sampled_classes = num_sampled_classes
        self.generator = generator
        self.register_buffer("class_weights", weights)
        self.last_selected_classes: Tensor | None = None

    @torch.no_grad()
    def select_classes(self, labels: Tensor) -> Tensor:
        """Classes to train on for a batch with ``labels`` (N,): a LongTensor of distinct ids < C.

        The foreground classes present come first (sorted), then the sampled ones.
        """
        present = torch.unique(labels[labels < self.num_classes]).long()
        missing = min(self.num_sampled_classes, self.num_classes) - present.numel()
        if missing <= 0:
            return present
        probabilities = self.class_weights.to(labels.device).clone()
        probabilities[present] = 0.0
        missing = min(missing, int((probabilities > 0).sum()))
        if missing == 0:
            return present
        sampled = torch.multinomial(
            probabilities, missing, replacement=False, generator=self.generator
        )
        return torch.cat([present, sampled])

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """``logits`` (N, C+1), ``labels`` (N,) in [0, C] -> scalar loss over the chosen columns."""
        self.check_inputs(logits, labels)
        selected = self.select_classes(labels)
        self.last_selected_classes = selected
        column_weights = logits.new_zeros(self.num_classes + 1, dtype=compute_dtype(logits.dtype))
        column_weights[selected.to(logits.device)] = 1.0
        return _weighted_bce_with_statistics(self, logits, labels, column_weights)

    def scores(self, logits: Tensor) -> Tensor:
        """(N, C) sigmoid probabilities of the category columns."""
        self.check_logits(logits)
        return _sigmoid_scores(logits, self.num_classes, use_agnostic=False)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, num_sampled_classes={self.num_sampled_classes}"
