"""Builds the box head's classification loss from the ``MODEL.EQLV2`` config keys."""

from __future__ import annotations

import logging

import torch
from detectron2.config import CfgNode

from eqlv2.losses import LOSS_NAMES, ClassificationLoss, build_classification_loss

logger = logging.getLogger(__name__)

__all__ = ["build_classification_loss_from_cfg", "loss_arguments_from_cfg"]

#: The losses that take EQL v2's hyper-parameters and switches.
_EQLV2_LOSSES = ("eqlv2", "eqlv2_2c_softmax")

#: Constructor argument -> the config key it comes from, for error messages.
_ARGUMENT_KEYS = {
    "gamma": "MODEL.EQLV2.GAMMA",
    "mu": "MODEL.EQLV2.MU",
    "alpha": "MODEL.EQLV2.ALPHA",
    "use_agnostic": "MODEL.EQLV2.USE_AGNOSTIC_TASK",
    "neg_down_weight": "MODEL.EQLV2.NEG_DOWN_WEIGHT",
    "pos_up_weight": "MODEL.EQLV2.POS_UP_WEIGHT",
    "lambda_": "MODEL.EQLV2.EQLV1_LAMBDA",
    "num_sampled_classes": "MODEL.EQLV2.FED_LOSS_NUM_CLASSES",
    "num_classes": "MODEL.ROI_HEADS.NUM_CLASSES",
}


def _training_category_statistics(cfg: CfgNode):
    """Per-category statistics of the first training dataset (needed by EQL v1 and federated)."""
    from eqlv2.data import category_statistics

    if not cfg.DATASETS.TRAIN:
        raise ValueError(
            f"MODEL.EQLV2.LOSS={cfg.MODEL.EQLV2.LOSS!r} needs per-category training counts, "
            "but DATASETS.TRAIN is empty"
        )
    return category_statistics(cfg.DATASETS.TRAIN[0])


def loss_arguments_from_cfg(cfg: CfgNode) -> dict:
    """The constructor arguments of the loss ``cfg.MODEL.EQLV2.LOSS``, read from ``cfg``.

    Raises:
        ValueError: the loss name is unknown; the message names ``MODEL.EQLV2.LOSS``, the value
            and the allowed values.
    """
    eql = cfg.MODEL.EQLV2
    name = eql.LOSS
    if name not in LOSS_NAMES:
        raise ValueError(f"MODEL.EQLV2.LOSS={name!r} is not a loss; allowed values: {', '.join(LOSS_NAMES)}")
    if name in _EQLV2_LOSSES:
        return dict(
            gamma=eql.GAMMA,
            mu=eql.MU,
            alpha=eql.ALPHA,
            use_agnostic=eql.USE_AGNOSTIC_TASK,
            neg_down_weight=eql.NEG_DOWN_WEIGHT,
            pos_up_weight=eql.POS_UP_WEIGHT,
        )
    if name == "eqlv1":
        stats = _training_category_statistics(cfg)
        counts = torch.as_tensor(stats.image_counts, dtype=torch.float64)
        return dict(image_frequencies=counts / max(stats.num_images, 1), lambda_=eql.EQLV1_LAMBDA)
    if name == "federated":
        stats = _training_category_statistics(cfg)
        counts = torch.as_tensor(stats.image_counts, dtype=torch.float64)
        return dict(
            class_weights=counts.clamp(min=1) ** eql.FED_LOSS_FREQ_WEIGHT_POWER,
            num_sampled_classes=eql.FED_LOSS_NUM_CLASSES,
        )
    return {}


def build_classification_loss_from_cfg(cfg: CfgNode) -> ClassificationLoss:
    """The classification loss selected by ``cfg.MODEL.EQLV2.LOSS``, configured from ``cfg``.

    Called when the model is built, so a bad value stops the run before training.

    Raises:
        ValueError: an unknown loss or an invalid hyper-parameter; the message names the
            config key(s) and value(s).
    """
    kwargs = loss_arguments_from_cfg(cfg)
    name, num_classes = cfg.MODEL.EQLV2.LOSS, cfg.MODEL.ROI_HEADS.NUM_CLASSES
    try:
        loss = build_classification_loss(name, num_classes, **kwargs)
    except ValueError as error:
        values = {**kwargs, "num_classes": num_classes}
        named = [
            f"{_ARGUMENT_KEYS[arg]}={values[arg]!r}" for arg in _ARGUMENT_KEYS
            if arg in values and str(error).startswith(arg)
        ]
        keys = "; ".join(named) or f"MODEL.EQLV2.LOSS={name!r}"
        raise ValueError(f"invalid config ({keys}): {error}") from error
    logger.info("Box classification loss: %s", loss)
    return loss
