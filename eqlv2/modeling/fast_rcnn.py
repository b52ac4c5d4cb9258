"""A detectron2 box predictor whose classification loss is EQL v2 or one of its baselines."""

from __future__ import annotations

from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from torch import nn

from eqlv2.losses import ClassificationLoss, SoftmaxCELoss, sigmoid_bias_init

from .loss_from_config import build_classification_loss_from_cfg

__all__ = ["EQLv2FastRCNNOutputLayers"]


class EQLv2FastRCNNOutputLayers(FastRCNNOutputLayers):
    """:class:`FastRCNNOutputLayers` with a pluggable classification loss.

    The classifier still outputs ``(R, C+1)`` logits: C category columns and one last column that
    is the background class for softmax and the category-agnostic (objectness) task for EQL v2.
    Box regression and its loss are detectron2's. The loss module is a child of this module, so
    its state (EQL v2's accumulated gradient statistics) is part of the model's ``state_dict`` and
    thereby of every detectron2 checkpoint.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        classification_loss: ClassificationLoss,
        prior_prob: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            input_shape: shape of the per-region features.
            classification_loss: maps ``(R, C+1)`` logits and ``(R,)`` labels to a scalar loss and
                ``(R, C+1)`` logits to ``(R, C)`` test-time probabilities.
            prior_prob: if given, every classification bias starts at ``-log((1-p)/p)``.
            kwargs: the arguments of :class:`FastRCNNOutputLayers`.
        """
        # The parent routes its classification loss through ``sigmoid_cross_entropy_loss`` when
        # ``use_sigmoid_ce``; that method is overridden below to call ``classification_loss``.
        kwargs.update(use_sigmoid_ce=True, use_fed_loss=False)
        super().__init__(input_shape, **kwargs)
        if classification_loss.num_classes != self.num_classes:
            raise ValueError(
                f"classification_loss has num_classes={classification_loss.num_classes}, "
                f"the box predictor {self.num_classes}"
            )
        self.classification_loss = classification_loss
        if prior_prob is not None:
            nn.init.constant_(self.cls_score.bias, sigmoid_bias_init(prior_prob))

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec, **overrides: Any) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret.pop("get_fed_loss_cls_weights", None)
        loss = build_classification_loss_from_cfg(cfg)
        ret["classification_loss"] = loss
        ret["prior_prob"] = None if isinstance(loss, SoftmaxCELoss) else cfg.MODEL.EQLV2.PRIOR_PROB
        ret.update(overrides)
        return ret

    def sigmoid_cross_entropy_loss(
        self, pred_class_logits: torch.Tensor, gt_classes: torch.Tensor
    ) -> torch.Tensor:
        """Classification loss of ``(R, C+1)`` logits against ``(R,)`` labels in ``[0, C]``."""
        if pred_class_logits.numel() == 0:
            return pred_class_logits.new_zeros(())
        return self.classification_loss(pred_class_logits, gt_classes)

    def predict_probs(
        self, predictions: tuple[torch.Tensor, torch.Tensor], proposals: list[Instances]
    ) -> list[torch.Tensor]:
        """Per-image ``(R_i, C+1)`` probabilities; the last (background) column is zero.

        For EQL v2 the category columns are eq. 10: ``sigmoid(z_j) * (1 - sigmoid(z_bg))``.
        """
        logits, _ = predictions
        probs = self.classification_loss.scores(logits)
        probs = torch.cat([probs, probs.new_zeros((probs.shape[0], 1))], dim=1)
        return probs.split([len(p) for p in proposals], dim=0)
