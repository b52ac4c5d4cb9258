"""A detectron2 box predictor whose classification loss is EQL v2 or one of its baselines."""

from __future__ import annotations

from typing import Any

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec, cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers, _log_classification_stats
from detectron2.structures import Instances
from torch import nn

from eqlv2.losses import ClassificationLoss, SoftmaxCELoss

from .loss_from_config import build_classification_loss_from_cfg

__all__ = ["EQLv2FastRCNNOutputLayers"]


class EQLv2FastRCNNOutputLayers(FastRCNNOutputLayers):
    """:class:`FastRCNNOutputLayers` with a pluggable classification loss.

    The classifier outputs ``(R, K)`` logits with ``K = classification_loss.num_logits``: C+1
    for every loss but the 2C-softmax one (C category columns and one last column that is the
    background class for softmax and the category-agnostic (objectness) task for EQL v2), and
    2(C+1) for the 2C-softmax classifier (a positive block then an "others" block, see
    :mod:`eqlv2.losses.two_class_softmax`). Box regression and its loss are detectron2's. The
    loss module is a child of this module, so its state (the accumulated gradient statistics)
    is part of the model's ``state_dict`` and thereby of every detectron2 checkpoint.
    """

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        classification_loss: ClassificationLoss,
        prior_prob: float | None = None,
        background_prior_prob: float | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            input_shape: shape of the per-region features.
            classification_loss: maps ``(R, K)`` logits and ``(R,)`` labels to a scalar loss and
                ``(R, K)`` logits to ``(R, C)`` test-time probabilities; the classifier gets
                ``K = classification_loss.num_logits`` outputs.
            prior_prob: if given, the classification biases start so that every category's
                probability is ``p`` (``-log((1-p)/p)`` for a sigmoid classifier).
            background_prior_prob: with ``prior_prob``, the start probability of the background
                column C (the agnostic task's); None: ``prior_prob``.
            kwargs: the arguments of :class:`FastRCNNOutputLayers`.
        """
        # The classification loss goes through ``sigmoid_cross_entropy_loss`` (overridden below to
        # call ``classification_loss``); detectron2's own federated loss stays off.
        kwargs.update(use_sigmoid_ce=True, use_fed_loss=False)
        super().__init__(input_shape, **kwargs)
        if classification_loss.num_classes != self.num_classes:
            raise ValueError(
                f"classification_loss has num_classes={classification_loss.num_classes}, "
                f"the box predictor {self.num_classes}"
            )
        self.classification_loss = classification_loss
        if classification_loss.num_logits != self.cls_score.out_features:
            self.cls_score = nn.Linear(self.cls_score.in_features, classification_loss.num_logits)
            nn.init.normal_(self.cls_score.weight, std=0.01)  # as detectron2 initialises it
            nn.init.constant_(self.cls_score.bias, 0.0)
        if prior_prob is not None:
            with torch.no_grad():
                self.cls_score.bias.copy_(classification_loss.initial_bias(prior_prob, background_prior_prob))

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec, **overrides: Any) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret.pop("get_fed_loss_cls_weights", None)
        loss = build_classification_loss_from_cfg(cfg)
        ret["classification_loss"] = loss
        ret["prior_prob"] = None if isinstance(loss, SoftmaxCELoss) else cfg.MODEL.EQLV2.PRIOR_PROB
        ret["background_prior_prob"] = cfg.MODEL.EQLV2.BACKGROUND_PRIOR_PROB
        ret.update(overrides)
        return ret

    def losses(
        self, predictions: tuple[torch.Tensor, torch.Tensor], proposals: list[Instances]
    ) -> dict[str, torch.Tensor]:
        """detectron2's box-head losses with the classification loss of this predictor.

        As :meth:`FastRCNNOutputLayers.losses`, except that the classification statistics
        (``fast_rcnn/cls_accuracy`` ...) are computed on the loss's ``(R, C+1)`` decision
        logits, which for the 2C-softmax classifier are the log-odds of each pair.
        """
        logits, proposal_deltas = predictions
        gt_classes = cat([p.gt_classes for p in proposals]) if proposals else torch.empty(0)
        _log_classification_stats(self.classification_loss.decision_logits(logits.detach()), gt_classes)
        if proposals:
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals])
            # Proposals without a matched box only enter the regression loss as background.
            gt_boxes = cat([(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals])
        else:
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=proposal_deltas.device)
        losses = {
            "loss_cls": self.sigmoid_cross_entropy_loss(logits, gt_classes),
            "loss_box_reg": self.box_reg_loss(proposal_boxes, gt_boxes, proposal_deltas, gt_classes),
        }
        return {name: value * self.loss_weight.get(name, 1.0) for name, value in losses.items()}

    def category_weight_norms(self) -> torch.Tensor:
        """(C,) L2 norm of each category's classifier weight (the paper's Figure 3).

        Row j of ``cls_score.weight``; for the 2C-softmax classifier the difference of the
        positive and the "others" rows, the weight of the equivalent C-sigmoid classifier.
        """
        weight = self.cls_score.weight.detach()
        return self.classification_loss.category_weight_rows(weight).norm(dim=1)

    def sigmoid_cross_entropy_loss(
        self, pred_class_logits: torch.Tensor, gt_classes: torch.Tensor
    ) -> torch.Tensor:
        """Classification loss of ``(R, K)`` logits against ``(R,)`` labels in ``[0, C]``."""
        if pred_class_logits.numel() == 0:
            return pred_class_logits.new_zeros(())
        return self.classification_loss(pred_class_logits, gt_classes)

    def predict_probs(
        self, predictions: tuple[torch.Tensor, torch.Tensor], proposals: list[Instances]
    ) -> list[torch.Tensor]:
        """Per-image ``(R_i, C+1)`` probabilities; the last (background) column is zero.

        For EQL v2 the category columns are eq. 10: ``sigmoid(z_j) * (1 - sigmoid(z_bg))``; for
        the 2C-softmax classifier each category's pair-softmax probability (times the
        objectness). See ``classification_loss.scores``.
        """
        logits, _ = predictions
        probs = self.classification_loss.scores(logits)
        probs = torch.cat([probs, probs.new_zeros((probs.shape[0], 1))], dim=1)
        return probs.split([len(p) for p in proposals], dim=0)
