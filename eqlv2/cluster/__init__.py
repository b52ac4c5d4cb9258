"""Ray Train for the project: multi-worker, multi-node detectron2 EQL v2 training.

The only part of :mod:`eqlv2` that imports Ray. Modules:

* :mod:`eqlv2.cluster.ray_train`: :func:`build_torch_trainer` (driver) and
  :func:`train_loop_per_worker` (each worker); the reported metric keys are listed there.
* :mod:`eqlv2.cluster.distributed`: detectron2's ``comm`` (local process groups) from Ray's
  train context, and the DDP ``device_ids`` fix for CPU models.
* :mod:`eqlv2.cluster.reporting`: the hook that reports metrics and checkpoints, and the
  checkpoint layout.
* :mod:`eqlv2.cluster.checks`: input checks that fail fast (datasets, Ray address, resources).

Example::

    from eqlv2.cluster import build_torch_trainer

    trainer = build_torch_trainer(
        "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml", ["SOLVER.MAX_ITER", "100"],
        num_workers=2, storage_path="ray_results",
    )
    result = trainer.fit()   # result.metrics: the final report; result.checkpoint: the last one
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ClusterConnectionError",
    "InsufficientResourcesError",
    "UnknownDatasetError",
    "build_torch_trainer",
    "connect_ray",
    "default_run_name",
    "run_exists",
    "train_loop_per_worker",
]

_EXPORTS = {
    "ClusterConnectionError": "checks",
    "InsufficientResourcesError": "checks",
    "UnknownDatasetError": "checks",
    "connect_ray": "checks",
    "build_torch_trainer": "ray_train",
    "default_run_name": "ray_train",
    "run_exists": "ray_train",
    "train_loop_per_worker": "ray_train",
}


def __getattr__(name: str) -> Any:
    # Lazy, so that importing a submodule (e.g. ``eqlv2.cluster.distributed`` in a plain
    # torch.distributed process) does not import Ray Train and detectron2's engine.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
