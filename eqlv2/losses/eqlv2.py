"""Equalization Loss v2 (Tan et al., CVPR 2021): sigmoid loss with gradient-guided reweighing.

Notation (section 3 of the paper): for category j < C, ``pos_grad[j]`` and ``neg_grad[j]`` hold the
accumulated magnitudes of the (already reweighed) positive and negative gradients of its logit,
``g_j = pos_grad_j / (neg_grad_j + 1e-10)`` (eq. 9), ``f(x) = 1 / (1 + exp(-gamma (x - mu)))``
(eq. 6), and a batch is trained with positive weights ``q_j = 1 + alpha (1 - f(g_j))`` and
negative weights ``r_j = f(g_j)`` (eq. 5). Column C is the category-agnostic (objectness) task,
trained as the background column with weight 1 and never reweighed (section 3.3).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GRADIENT_RATIO_EPS, ClassificationLoss, check_finite
from .functional import compute_dtype, one_hot_weighted_bce

__all__ = ["EQLv2Loss", "GRADIENT_RATIO_EPS"]

_WEIGHTS_DTYPE = torch.float64


class EQLv2Loss(ClassificationLoss):
    """Equalization Loss v2 over detectron2's (N, C+1) box-head logits.

    Training mode (the default) updates the gradient statistics after each forward; eval mode
    computes the loss with the current weights and changes nothing. The statistics are the
    float64 buffers of :class:`ClassificationLoss` (summed over workers when torch.distributed
    is initialised, so every worker holds the same weights): per category j, the sums of
    ``q_j |p_ij - 1|`` over its positive rows and ``r_j p_ij`` over its negative rows, i.e. N
    times the reweighed gradients of eq. 7-8 (the authors' code, no 1/N).

    Args:
        num_classes: number of foreground categories C.
        gamma: slope of the mapping function f (eq. 6), > 0.
        mu: centre of f, finite.
        alpha: positive up-weighting strength (eq. 5), >= 0.
        use_agnostic: train column C as the category-agnostic task and score with eq. 10;
            if False column C gets no loss and scores are plain sigmoids.
        neg_down_weight: use r = f(g) for negatives (else r = 1).
        pos_up_weight: use q = 1 + alpha (1 - f(g)) for positives (else q = 1).

    Buffers:
        pos_grad, neg_grad: (C,) float64 accumulated gradient magnitudes.
        num_updates: () int64, the number of statistics updates so far. While it is 0 every
            weight is exactly 1.
    """

    def __init__(
        self,
        num_classes: int,
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        use_agnostic: bool = True,
        neg_down_weight: bool = True,
        pos_up_weight: bool = True,
    ) -> None:
        super().__init__(num_classes)
        self.gamma = check_finite("gamma", gamma)
        if self.gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        self.mu = check_finite("mu", mu)
        self.alpha = check_finite("alpha", alpha)
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        self.use_agnostic = bool(use_agnostic)
        self.neg_down_weight = bool(neg_down_weight)
        self.pos_up_weight = bool(pos_up_weight)

    # ----------------------------------------------------------------------------- weights
    def mapping(self, ratio: Tensor) -> Tensor:
        """f(x) = 1 / (1 + exp(-gamma (x - mu))) (eq. 6), elementwise."""
        return torch.sigmoid(self.gamma * (ratio - self.mu))

    @torch.no_grad()
    def column_weights(self) -> Tensor:
        """(2, C+1) float64: row 0 the positive weights, row 1 the negative weights per column.

        Columns j < C hold q_j and r_j (exactly 1 before the first statistics update and when
        switched off); column C, the agnostic task, holds 1 (0 when ``use_agnostic`` is False).
        """
        num_classes = self.num_classes
        weights = torch.ones(2, num_classes + 1, dtype=_WEIGHTS_DTYPE, device=self.pos_grad.device)
        if self.pos_up_weight or self.neg_down_weight:
            f = self.mapping(self.gradient_ratio())
            started = self.num_updates > 0  # a tensor: no host-device synchronisation
            if self.pos_up_weight:
                weights[0, :num_classes] = torch.where(started, 1.0 + self.alpha * (1.0 - f), 1.0)
            if self.neg_down_weight:
                weights[1, :num_classes] = torch.where(started, f, 1.0)
        if not self.use_agnostic:
            weights[:, num_classes] = 0.0
        return weights

    def current_weights(self) -> tuple[Tensor, Tensor]:
        """(q, r): the (C,) float64 positive and negative weights the next forward will use.

        Both are exactly 1 before the first statistics update, and 1 when switched off.
        """
        weights = self.column_weights()[:, : self.num_classes]
        return weights[0].clone(), weights[1].clone()

    # ----------------------------------------------------------------------------- loss
    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """EQL v2 loss of a batch; in training mode also updates the gradient statistics.

        Args:
            logits: (N, C+1) floating tensor, column C being background / objectness.
            labels: (N,) integer tensor in [0, C], C meaning background.

        Returns:
            Scalar loss, sum of weighted BCE over all N*(C+1) entries divided by N, in the
            logits' dtype (float32 for float16/bfloat16 logits).
        """
        self.check_inputs(logits, labels)
        return self._reweighed_bce(logits, labels)

    def _reweighed_bce(self, task_logits: Tensor, labels: Tensor) -> Tensor:
        """Weighted BCE of (N, C+1) per-task logits with q / r (eq. 5); updates the statistics.

        Each entry's gradient is ``w (p - y) / N`` with ``p = sigmoid(task logit)``; the
        statistics get ``q_j |p - 1|`` of the positive and ``r_j p`` of the negative entries.
        """
        weights = self.column_weights().to(device=task_logits.device, dtype=compute_dtype(task_logits.dtype))
        loss, positive_residuals, negative_prob_sums = one_hot_weighted_bce(
            task_logits, labels, weights[0], weights[1], with_negative_prob_sums=self.training
        )
        if self.training:
            self._accumulate_from_residuals(labels, positive_residuals, negative_prob_sums * weights[1])
        return loss

    # ----------------------------------------------------------------------------- inference
    def scores(self, logits: Tensor) -> Tensor:
        """Per-category probabilities (N, C): sigmoid(z_j) * (1 - sigmoid(z_C)) (eq. 10).

        Without the agnostic task: sigmoid(z_j).
        """
        self.check_logits(logits)
        probs = torch.sigmoid(logits[:, : self.num_classes])
        if self.use_agnostic:
            probs = probs * torch.sigmoid(-logits[:, self.num_classes :])
        return probs

    # ----------------------------------------------------------------------------- module
    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, gamma={self.gamma}, mu={self.mu}, "
            f"alpha={self.alpha}, use_agnostic={self.use_agnostic}, "
            f"neg_down_weight={self.neg_down_weight}, pos_up_weight={self.pos_up_weight}"
        )
