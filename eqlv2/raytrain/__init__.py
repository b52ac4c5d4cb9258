"""Ray Train for the project: multi-worker, multi-node detectron2 EQL v2 training.

Needs the ``cluster`` extra (Ray). Modules, by the process that runs them:

* driver: :mod:`~eqlv2.raytrain.launch` (:func:`build_torch_trainer`, run names, dataset roots)
  and :mod:`~eqlv2.raytrain.checks` (inputs that would make Ray wait forever fail fast);
* every worker: :mod:`~eqlv2.raytrain.worker` (the training loop),
  :mod:`~eqlv2.raytrain.distributed` (detectron2's ``comm`` from Ray's ranks),
  :mod:`~eqlv2.raytrain.report_hook` (metrics to ``ray.train.report``) and
  :mod:`~eqlv2.raytrain.checkpoints` (written by rank 0, restored by all).

Example::

    from eqlv2.raytrain import build_torch_trainer

    trainer = build_torch_trainer(
        "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml", ["SOLVER.MAX_ITER", "100"],
        num_workers=2, storage_path="ray_results",
    )
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
    # Lazy, so that importing a submodule (e.g. ``eqlv2.raytrain.distributed`` in a plain
    # torch.distributed process) does not import Ray Train and detectron2's engine.
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
