"""Box-head classification losses: EQL v2 and its baselines (pure PyTorch, no detectron2).

Every loss is a :class:`ClassificationLoss` taking detectron2's layout: ``logits`` (N, C+1) with
column C for background (N, 2(C+1) for the 2C-softmax classifier) and ``labels`` (N,) in [0, C];
``scores`` gives (N, C) test-time probabilities. Every loss accumulates the per-category
positive and negative gradient magnitudes of the paper's eq. 3-4 in training mode.
"""

from .base import GRADIENT_RATIO_EPS, ClassificationLoss
from .baselines import EQLv1Loss, FederatedSigmoidLoss, SigmoidBCELoss, SoftmaxCELoss
from .build import LOSS_NAMES, build_classification_loss
from .eqlv2 import EQLv2Loss
from .functional import one_hot_weighted_bce, sigmoid_bias_init, softmax_cross_entropy
from .two_class_softmax import EQLv2TwoClassSoftmaxLoss

__all__ = [
    "GRADIENT_RATIO_EPS",
    "LOSS_NAMES",
    "ClassificationLoss",
    "EQLv1Loss",
    "EQLv2Loss",
    "EQLv2TwoClassSoftmaxLoss",
    "FederatedSigmoidLoss",
    "SigmoidBCELoss",
    "SoftmaxCELoss",
    "build_classification_loss",
    "one_hot_weighted_bce",
    "sigmoid_bias_init",
    "softmax_cross_entropy",
]
