"""Ray Train for the project: multi-worker, multi-node detectron2 EQL v2 training (``cluster`` extra).

The driver runs :mod:`~eqlv2.raytrain.launch` (:func:`build_torch_trainer`) and
:mod:`~eqlv2.raytrain.checks`; every worker runs :mod:`~eqlv2.raytrain.worker`. Example::

    trainer = build_torch_trainer("configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml", ["SOLVER.MAX_ITER", "100"],
                                  num_workers=2, storage_path="ray_results")
    result = trainer.fit()   # result.metrics: the final report; result.checkpoint: the last one
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ClusterConnectionError": "checks",
    "InsufficientResourcesError": "checks",
    "UnknownDatasetError": "checks",
    "connect_ray": "checks",
    "build_torch_trainer": "launch",
    "default_run_name": "launch",
    "run_exists": "launch",
    "train_loop_per_worker": "worker",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    # Lazy: importing a submodule (e.g. ``distributed``) must not import Ray Train.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
