"""Builds the box head's classification loss from the ``MODEL.EQLV2`` config keys."""

from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode

from eqlv2.losses import ClassificationLoss, build_classification_loss

logger = logging.getLogger(__name__)


def _training_category_statistics(cfg: CfgNode):
    """Per-category statistics of the first training dataset (needed by EQL v1 and federated)."""
    from eqlv2.data import category_statistics

    if not cfg.DATASETS.TRAIN:
        raise ValueError(
            f"MODEL.EQLV2.LOSS={cfg.MODEL.EQLV2.LOSS!r} needs per-category training counts, "
            "but DATASETS.TRAIN is empty"
        )
    return category_statistics(cfg.DATASETS.TRAIN[0])


def build_classification_loss_from_cfg(cfg: CfgNode) -> ClassificationLoss:
    """The classification loss selected by ``cfg.MODEL.EQLV2.LOSS``, configured from ``cfg``."""
    eql = cfg.MODEL.EQLV2
    name = eql.LOSS
    num_classes = cfg.MODEL.ROI_HEADS.NUM_CLASSES
    kwargs: dict = {}
    if name == "eqlv2":
        kwargs = dict(
            gamma=eql.GAMMA,
            mu=eql.MU,
            alpha=eql.ALPHA,
            use_agnostic=eql.USE_AGNOSTIC_TASK,
            neg_down_weight=eql.NEG_DOWN_WEIGHT,
            pos_up_weight=eql.POS_UP_WEIGHT,
        )
    elif name == "eqlv1":
        stats = _training_category_statistics(cfg)
        counts = torch.as_tensor(stats.image_counts, dtype=torch.float64)
        kwargs = dict(image_frequencies=counts / max(stats.num_images, 1), lambda_=eql.EQLV1_LAMBDA)
    elif name == "federated":
        stats = _training_category_statistics(cfg)
        counts = torch.as_tensor(stats.image_counts, dtype=torch.float64)
        kwargs = dict(
            class_weights=counts.clamp(min=1) ** eql.FED_LOSS_FREQ_WEIGHT_POWER,
            num_sampled_classes=eql.FED_LOSS_NUM_CLASSES,
        )
    loss = build_classification_loss(name, num_classes, **kwargs)
    logger.info("Box classification loss: %s", loss)
    return loss
