"""ROI heads that use :class:`EQLv2FastRCNNOutputLayers` as their box predictor(s)."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.modeling.roi_heads import (
    ROI_HEADS_REGISTRY,
    CascadeROIHeads,
    StandardROIHeads,
)
from torch import nn

from .fast_rcnn import EQLv2FastRCNNOutputLayers

__all__ = ["EQLv2StandardROIHeads", "EQLv2CascadeROIHeads"]


@ROI_HEADS_REGISTRY.register()
class EQLv2StandardROIHeads(StandardROIHeads):
    """detectron2's ``StandardROIHeads`` (Faster / Mask R-CNN) with the EQL v2 box predictor."""

    @classmethod
    def _init_box_head(cls, cfg: CfgNode, input_shape) -> dict:
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = EQLv2FastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        return ret


@ROI_HEADS_REGISTRY.register()
class EQLv2CascadeROIHeads(CascadeROIHeads):
    """detectron2's ``CascadeROIHeads`` with an EQL v2 box predictor at every stage.

    Each stage has its own classification loss and therefore its own gradient statistics.
    """

    @classmethod
    def _init_box_head(cls, cfg: CfgNode, input_shape) -> dict:
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictors"] = [
            EQLv2FastRCNNOutputLayers(
                cfg, head.output_shape, box2box_transform=predictor.box2box_transform
            )
            for head, predictor in zip(ret["box_heads"], ret["box_predictors"], strict=True)
        ]
        return ret


def classification_losses(model: nn.Module) -> list[nn.Module]:
    """The classification loss modules inside ``model`` (one per box predictor), in order."""
    return [
        m.classification_loss for m in model.modules() if isinstance(m, EQLv2FastRCNNOutputLayers)
    ]
