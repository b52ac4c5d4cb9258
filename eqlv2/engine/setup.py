"""Builds a frozen detectron2 config with the project's keys, from a file and overrides."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from detectron2.config import CfgNode, get_cfg

from eqlv2.config import add_eqlv2_config

logger = logging.getLogger(__name__)


def setup_cfg(config_file: str, opts: Sequence[str] = (), freeze: bool = True) -> CfgNode:
    """Config of ``config_file`` (a detectron2 YAML, ``_BASE_`` resolved) with ``opts`` applied.

    Also registers the datasets the config needs that are not built in (the offline benchmark is
    registered on import of :mod:`eqlv2.data`; a user's LVIS JSON through the
    ``DATASETS.EQLV2.CUSTOM_*`` keys; the benchmark's pretraining images, which base checkpoints
    train on, as ``synthetic_lvis_pretrain``) and imports :mod:`eqlv2.modeling` so the project's ROI heads
    are in detectron2's registry.

    Raises:
        FileNotFoundError: ``config_file`` does not exist.
        ValueError: an override is not a ``KEY VALUE`` pair or names an unknown key.
    """
    import eqlv2.modeling  # noqa: F401  (registers the ROI heads)
    from eqlv2.data import register_from_config, synthetic_root
    from eqlv2.data.synthetic import register_synthetic_pretrain

    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    if len(opts) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.merge_from_file(config_file)
    try:
        cfg.merge_from_list(list(opts))
    except (KeyError, AssertionError, ValueError) as error:
        raise ValueError(f"bad override in {list(opts)}: {error}") from error
    register_from_config(cfg)
    register_synthetic_pretrain(synthetic_root(cfg))
    if freeze:
        cfg.freeze()
    return cfg
