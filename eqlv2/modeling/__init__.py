"""detectron2 integration: the EQL v2 box predictor and the ROI heads that use it.

Importing this package registers ``EQLv2StandardROIHeads`` and ``EQLv2CascadeROIHeads`` in
detectron2's ``ROI_HEADS_REGISTRY``; pick one with ``MODEL.ROI_HEADS.NAME``.
"""

from .fast_rcnn import EQLv2FastRCNNOutputLayers
from .loss_from_config import build_classification_loss_from_cfg
from .roi_heads import EQLv2CascadeROIHeads, EQLv2StandardROIHeads

__all__ = [
    "EQLv2FastRCNNOutputLayers",
    "EQLv2StandardROIHeads",
    "EQLv2CascadeROIHeads",
    "build_classification_loss_from_cfg",
]
