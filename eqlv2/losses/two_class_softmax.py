"""EQL v2 with the 2C-softmax classifier of section 4.8 (Table 9) of the paper.

Each task k (the C categories and, at k = C, the category-agnostic task) has two logits: a
"positive" one ``a_k`` and an "others" one ``b_k``. The classifier's (N, 2(C+1)) output holds
them in two blocks, ``logits[:, k] = a_k`` and ``logits[:, C+1+k] = b_k``, so that the first C+1
columns line up with the C-sigmoid classifier's.

Probability of task k for row i, a softmax over its pair::

    p_ik = exp(a_ik) / (exp(a_ik) + exp(b_ik)) = sigmoid(a_ik - b_ik)

Loss: ``sum_ik w_ik CE_ik / N`` with ``CE_ik = -y_ik log p_ik - (1 - y_ik) log(1 - p_ik)``, the
one-hot targets y and weights w of EQL v2 (positive weight q_j, negative weight r_j, eq. 5;
weight 1 for the agnostic task, which is the background pair and has target 1 on background
rows).

The gradient that is accumulated. Differentiating one entry, with ``d p / d a = p (1 - p)`` and
``d p / d b = -p (1 - p)``::

    d (w CE) / d a_ik = w (p_ik - y_ik),      d (w CE) / d b_ik = -w (p_ik - y_ik)

so the pair's positive logit gets exactly the gradient a sigmoid logit would get with
probability p, and the others logit its negative. The statistics (eq. 3-4, 7-9) accumulate the
magnitude of the gradient w.r.t. the positive logit ``a_j`` of each category j < C, times N:
``q_j (1 - p_ij)`` summed over the rows labelled j and ``r_j p_ij`` over the other rows. The
others logit's gradient has the same magnitude, so the ratio g_j would be the same with it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .eqlv2 import EQLv2Loss
from .functional import compute_dtype

__all__ = ["EQLv2TwoClassSoftmaxLoss"]


class EQLv2TwoClassSoftmaxLoss(EQLv2Loss):
    """EQL v2's gradient-guided reweighing on a 2C-softmax classifier (section 4.8).

    Takes (N, 2(C+1)) logits laid out as in the module docstring, and the same arguments,
    switches and statistics buffers as :class:`EQLv2Loss` (``use_agnostic``: train the
    background pair as the category-agnostic task and score with eq. 10).
    """

    @property
    def num_logits(self) -> int:
        """2(C+1): a positive and an "others" logit for each category and the agnostic task."""
        return 2 * (self.num_classes + 1)

    def decision_logits(self, logits: Tensor) -> Tensor:
        """(N, C+1) ``a_k - b_k``: the log-odds of each task's pair softmax."""
        width = self.num_classes + 1
        dtype = compute_dtype(logits.dtype)
        return logits[:, :width].to(dtype) - logits[:, width:].to(dtype)

    def category_weight_rows(self, weight: Tensor) -> Tensor:
        """(C, D) ``w(a_j) - w(b_j)``: the weight of the equivalent C-sigmoid classifier."""
        width = self.num_classes + 1
        return weight[: self.num_classes] - weight[width : width + self.num_classes]

    def initial_bias(self, prior_prob: float, background_prior_prob: float | None = None) -> Tensor:
        """(2(C+1),) prior logit on the positive block and 0 on the others block: p = prior
        (``background_prior_prob`` for the background pair)."""
        bias = super().initial_bias(prior_prob, background_prior_prob)
        bias[self.num_classes + 1 :] = 0.0
        return bias

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """2C-softmax EQL v2 loss; in training mode also updates the gradient statistics.

        Args:
            logits: (N, 2(C+1)) floating tensor, positive block then others block.
            labels: (N,) integer tensor in [0, C], C meaning background.

        Returns:
            Scalar loss (see the module docstring), in the logits' dtype (float32 for
            float16/bfloat16 logits).
        """
        self.check_inputs(logits, labels)
        return self._reweighed_bce(self.decision_logits(logits), labels)

    def scores(self, logits: Tensor) -> Tensor:
        """(N, C) positive probabilities ``p_ij``, times ``1 - p_iC`` with the agnostic task."""
        self.check_logits(logits)
        log_odds = self.decision_logits(logits)
        probs = torch.sigmoid(log_odds[:, : self.num_classes])
        if self.use_agnostic:
            probs = probs * torch.sigmoid(-log_odds[:, self.num_classes :])
        return probs
