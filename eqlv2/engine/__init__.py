"""Training machinery shared by ``train/train_net.py`` and ``train/ray_train.py``."""

from .setup import setup_cfg
from .trainer import EQLv2Trainer

__all__ = ["EQLv2Trainer", "setup_cfg"]
