"""Fused sigmoid and softmax cross-entropies that also return gradient statistics, and helpers.

The losses of this package all compute, for ``logits`` z of shape (N, K) and integer ``labels``
of shape (N,) (one positive entry per row, at column ``labels[i]``)::

    loss = sum_ij w_ij * BCEWithLogits(z_ij, y_ij) / N,   y = one_hot(labels, K)
    w_ij = positive_weights[j] if y_ij == 1 else negative_weights[j]

:func:`one_hot_weighted_bce` does it without building y or w: the negative part is a column
sum of softplus(z) with the N positive entries zeroed, dotted with the negative weights; the
positive part is softplus(-z) on the N gathered positive entries. The backward pass is the
analytic gradient ``w * (sigmoid(z) - y) / N`` built from the probabilities saved in forward.

:func:`softmax_cross_entropy` is ``F.cross_entropy`` (mean over rows) built the same way, so that
the gradient magnitudes of the positive and negative entries come out of the forward pass at no
extra cost: its backward is ``(softmax(z) - y) / N`` from the probabilities saved in forward.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compute_dtype",
    "one_hot_weighted_bce",
    "sigmoid_bias_init",
    "softmax_cross_entropy",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in: float16/bfloat16 are promoted to float32."""
    return torch.promote_types(dtype, torch.float32)


def _softplus_threshold(dtype: torch.dtype) -> float:
    """Above this input, softplus(x) == x to the precision of ``dtype`` (and exp(x) may overflow)."""
    return 50.0 if dtype == torch.float64 else 20.0


class _OneHotCrossEntropy(torch.autograd.Function):
    """What the fused losses share: the end of the forward pass and the backward pass.

    A subclass's forward computes the loss, the (N,) positive residuals ``w (p - 1)`` and the
    (N, K) probabilities with the positive entries zeroed, then returns :meth:`_finish`. The
    gradient is ``negative_weights * p / N`` on negative entries and ``residual / N`` on positive
    ones (negative weights 1 for softmax).
    """

    @staticmethod
    def _finish(
        ctx,
        loss: Tensor,
        negative_probs: Tensor,
        positive_index: Tensor,
        positive_residuals: Tensor,
        negative_weights: Tensor,
        with_negative_prob_sums: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        if with_negative_prob_sums:
            negative_prob_sums = negative_probs.sum(dim=0)  # (K,)
        else:
            negative_prob_sums = negative_probs.new_empty(0)
        ctx.save_for_backward(negative_probs, positive_index, positive_residuals, negative_weights)
        ctx.normalizer = max(negative_probs.shape[0], 1)
        ctx.mark_non_differentiable(positive_residuals, negative_prob_sums)
        return loss, positive_residuals, negative_prob_sums

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx, grad_loss: Tensor, _grad_residuals: Tensor, _grad_negative_sums: Tensor
    ) -> tuple[Tensor | None, ...]:
        negative_probs, positive_index, positive_residuals, negative_weights = ctx.saved_tensors
        scale = grad_loss / ctx.normalizer
        # Negatives: r_j * (p_ij - 0) / N; positives (zero so far) are then set to q (p - 1) / N.
        grad_logits = negative_probs * (negative_weights * scale)
        grad_logits.scatter_(1, positive_index, (positive_residuals * scale).unsqueeze(1))
        return (grad_logits, *[None] * (len(ctx.needs_input_grad) - 1))


class _OneHotWeightedBCE(_OneHotCrossEntropy):
    """Autograd function behind :func:`one_hot_weighted_bce` (see the module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        logits: Tensor,
        labels: Tensor,
        positive_weights: Tensor,
        negative_weights: Tensor,
        with_negative_prob_sums: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        threshold = _softplus_threshold(logits.dtype)
        positive_index = labels.unsqueeze(1)  # (N, 1): the column of each row's positive entry

        # Negative entries: softplus(z) = BCE(z, 0), summed per column with positives zeroed.
        negative_losses = F.softplus(logits, threshold=threshold)
        negative_losses.scatter_(1, positive_index, 0.0)
        negative_loss_per_column = negative_losses.sum(dim=0)  # (K,)
        del negative_losses

        # Positive entries: softplus(-z) = BCE(z, 1), on the N gathered logits only. Their
        # gradients times N, q * (p - 1) = -q * sigmoid(-z), are computed here as well.
        negated_positive_logits = logits.gather(1, positive_index).view(-1).neg_()  # (N,)
        positive_losses = F.softplus(negated_positive_logits, threshold=threshold)
        positive_row_weights = positive_weights[labels]  # (N,)
        positive_residuals = torch.sigmoid(negated_positive_logits).mul_(positive_row_weights).neg_()
        loss = torch.dot(negative_loss_per_column, negative_weights)
        loss = loss.add_(torch.dot(positive_losses, positive_row_weights)).div_(max(logits.shape[0], 1))

        # Probabilities, kept for backward with the positive entries zeroed, which also makes
        # their column sums sums over negatives.
        negative_probs = torch.sigmoid(logits)
        negative_probs.scatter_(1, positive_index, 0.0)
        return _OneHotCrossEntropy._finish(
            ctx, loss, negative_probs, positive_index, positive_residuals, negative_weights,
            with_negative_prob_sums,
        )  # fmt: skip


def one_hot_weighted_bce(
    logits: Tensor,
    labels: Tensor,
    positive_weights: Tensor,
    negative_weights: Tensor,
    with_negative_prob_sums: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted sigmoid cross-entropy against one-hot targets, summed and divided by N.

    Weights are constants: no gradient flows into them. Inputs are not validated here (the
    loss modules do it).

    Args:
        logits: (N, K) floating tensor; float16/bfloat16 are computed in float32.
        labels: (N,) integer tensor in [0, K): the positive column of each row.
        positive_weights: (K,) weight of a positive entry in each column.
        negative_weights: (K,) weight of a negative entry in each column.
        with_negative_prob_sums: also return the per-column sums of sigmoid(z) over negatives.

    Returns:
        ``(loss, positive_residuals, negative_prob_sums)``, all in the compute dtype and the
        last two without gradient:

        - ``loss``: the scalar loss;
        - ``positive_residuals``: (N,) ``positive_weights[labels[i]] * (sigmoid(z_i,labels[i]) - 1)``,
          i.e. N times the gradient of each row's positive entry;
        - ``negative_prob_sums``: (K,) per-column sums of sigmoid(z) over the negative entries
          (an empty tensor unless ``with_negative_prob_sums``).
    """
    dtype = compute_dtype(logits.dtype)
    # Under autocast the ops inside would otherwise be free to drop to float16 / bfloat16.
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _OneHotWeightedBCE.apply(
            logits.to(dtype),
            labels.long(),
            positive_weights.detach().to(device=logits.device, dtype=dtype),
            negative_weights.detach().to(device=logits.device, dtype=dtype),
            with_negative_prob_sums,
        )


class _SoftmaxCrossEntropy(_OneHotCrossEntropy):
    """Autograd function behind :func:`softmax_cross_entropy`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, logits: Tensor, labels: Tensor, with_negative_prob_sums: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        positive_index = labels.unsqueeze(1)  # (N, 1)
        probs = torch.log_softmax(logits, dim=1)
        loss = probs.gather(1, positive_index).sum().neg_().div_(max(logits.shape[0], 1))
        probs = probs.exp_()
        positive_residuals = probs.gather(1, positive_index).view(-1).sub_(1.0)  # p - 1, (N,)
        probs.scatter_(1, positive_index, 0.0)
        return _OneHotCrossEntropy._finish(
            ctx, loss, probs, positive_index, positive_residuals, logits.new_ones(()),
            with_negative_prob_sums,
        )  # fmt: skip


def softmax_cross_entropy(
    logits: Tensor, labels: Tensor, with_negative_prob_sums: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax cross-entropy averaged over the N rows (``F.cross_entropy``), with statistics.

    Inputs are not validated here (the loss modules do it).

    Args:
        logits: (N, K) floating tensor; float16/bfloat16 are computed in float32.
        labels: (N,) integer tensor in [0, K).
        with_negative_prob_sums: also return the per-column sums of softmax(z) over negatives.

    Returns:
        ``(loss, positive_residuals, negative_prob_sums)``, in the compute dtype, the last two
        without gradient:

        - ``loss``: the scalar loss (0 for N = 0);
        - ``positive_residuals``: (N,) ``softmax(z_i)[labels[i]] - 1``, i.e. N times the
          gradient of each row's positive entry;
        - ``negative_prob_sums``: (K,) per-column sums of softmax(z) over the rows not labelled
          with that column, i.e. N times the summed gradients of the negative entries (an
          empty tensor unless ``with_negative_prob_sums``).
    """
    dtype = compute_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return _SoftmaxCrossEntropy.apply(logits.to(dtype), labels.long(), with_negative_prob_sums)


def sigmoid_bias_init(prior_prob: float) -> float:
    """Bias that makes sigmoid(bias) == ``prior_prob``: ``-log((1 - p) / p)``, for 0 < p < 1."""
    if (
        isinstance(prior_prob, bool)
        or not isinstance(prior_prob, (int, float))
        or not 0.0 < prior_prob < 1.0
    ):
        raise ValueError(f"prior_prob must be a number in (0, 1), got {prior_prob!r}")
    return -math.log((1.0 - prior_prob) / prior_prob)
