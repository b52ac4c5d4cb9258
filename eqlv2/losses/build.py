"""Factory of the classification losses by name."""

from __future__ import annotations

import inspect
from typing import Any

from .base import ClassificationLoss
from .baselines import EQLv1Loss, FederatedSigmoidLoss, SigmoidBCELoss, SoftmaxCELoss
from .eqlv2 import EQLv2Loss
from .two_class_softmax import EQLv2TwoClassSoftmaxLoss

__all__ = ["LOSS_NAMES", "LOSS_REGISTRY", "build_classification_loss"]

#: Loss name -> class; every class takes ``num_classes`` first.
LOSS_REGISTRY: dict[str, type[ClassificationLoss]] = {
    "eqlv2": EQLv2Loss,
    "softmax": SoftmaxCELoss,
    "sigmoid": SigmoidBCELoss,
    "eqlv1": EQLv1Loss,
    "federated": FederatedSigmoidLoss,
    "eqlv2_2c_softmax": EQLv2TwoClassSoftmaxLoss,
}

#: The names :func:`build_classification_loss` accepts.
LOSS_NAMES: tuple[str, ...] = tuple(LOSS_REGISTRY)


def _constructor_arguments(loss_class: type[ClassificationLoss]) -> dict[str, inspect.Parameter]:
    """The constructor's keyword arguments other than ``self`` and ``num_classes``."""
    parameters = inspect.signature(loss_class.__init__).parameters
    return {name: p for name, p in parameters.items() if name not in ("self", "num_classes")}


def build_classification_loss(name: str, num_classes: int, **kwargs: Any) -> ClassificationLoss:
    """Build the loss called ``name`` (one of :data:`LOSS_NAMES`) for C = ``num_classes``.

    ``kwargs`` go to the loss's constructor, e.g. ``gamma=12.0`` for "eqlv2" and
    "eqlv2_2c_softmax",
    ``image_frequencies=...`` (required) for "eqlv1", ``class_weights=...`` (required) for
    "federated".

    Raises:
        ValueError: unknown ``name`` (the message lists the valid ones), a required argument
            missing or an argument the loss does not take (both named), or any invalid value.
    """
    if name not in LOSS_REGISTRY:
        raise ValueError(f"name must be one of {', '.join(LOSS_NAMES)}; got {name!r}")
    loss_class = LOSS_REGISTRY[name]
    accepted = _constructor_arguments(loss_class)
    unexpected = sorted(set(kwargs) - set(accepted))
    if unexpected:
        raise ValueError(
            f"loss {name!r} does not take argument(s) {', '.join(unexpected)}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        )
    missing = [
        arg for arg, parameter in accepted.items()
        if parameter.default is inspect.Parameter.empty and arg not in kwargs
    ]
    if missing:
        raise ValueError(f"loss {name!r} requires argument(s) {', '.join(missing)}")
    return loss_class(num_classes, **kwargs)
