"""Box-head classification losses: EQL v2 and its baselines (pure PyTorch, no detectron2).

Every loss is a :class:`ClassificationLoss` taking detectron2's layout: ``logits`` (N, C+1) with
column C for background and ``labels`` (N,) in [0, C]; ``scores`` gives (N, C) test-time
probabilities.
"""

from .base import ClassificationLoss
from .baselines import EQLv1Loss, FederatedSigmoidLoss, SigmoidBCELoss, SoftmaxCELoss
from .build import LOSS_NAMES, build_classification_loss
from .eqlv2 import GRADIENT_RATIO_EPS, EQLv2Loss
from .functional import one_hot_weighted_bce, sigmoid_bias_init

__all__ = [
    "GRADIENT_RATIO_EPS",
    "LOSS_NAMES",
    "ClassificationLoss",
    "EQLv1Loss",
    "EQLv2Loss",
    "FederatedSigmoidLoss",
    "SigmoidBCELoss",
    "SoftmaxCELoss",
    "build_classification_loss",
    "one_hot_weighted_bce",
    "sigmoid_bias_init",
]
