"""What each Ray Train worker runs: one detectron2 :class:`~eqlv2.engine.EQLv2Trainer`, DDP over
the process group Ray Train created, detectron2's ``comm`` set up from Ray's ranks. Reports and
checkpoints go through :class:`~eqlv2.raytrain.report_hook.RayReportHook` (in place of
detectron2's ``PeriodicCheckpointer``); the latest checkpoint is restored on a restart or a
second ``fit()``. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import ray.train
import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from eqlv2.engine import EQLv2Trainer, setup_cfg

from .checkpoints import restore_checkpoint
from .distributed import WorkerPlacement, ddp_device_ids_fix, setup_detectron2_comm
from .report_hook import RayReportHook

logger = logging.getLogger(__name__)

#: ``(cfg, trainer) -> HookBase | None``; must be picklable (Ray ships it to the workers).
HookFactory = Callable[[CfgNode, EQLv2Trainer], HookBase | None]


class RayEQLv2Trainer(EQLv2Trainer):
    """:class:`EQLv2Trainer` for a Ray Train worker: a :class:`RayReportHook` last, in place of
    ``PeriodicCheckpointer``; before it the hooks of ``all_rank_hooks`` and, on rank 0, ``extra_hooks``."""

    def __init__(
        self, cfg: CfgNode, extra_hooks: Sequence[HookFactory] = (), all_rank_hooks: Sequence[HookFactory] = ()
    ) -> None:
        self._factories = list(all_rank_hooks) + (list(extra_hooks) if comm.is_main_process() else [])
        with ddp_device_ids_fix():
            super().__init__(cfg)

    def build_hooks(self) -> list[HookBase]:
        hook_list = [hook for hook in super().build_hooks() if not isinstance(hook, hooks.PeriodicCheckpointer)]
        hook_list += [hook for hook in (factory(self.cfg, self) for factory in self._factories) if hook is not None]
        return [*hook_list, RayReportHook(self.cfg)]


def _worker_cfg(config_yaml: str) -> CfgNode:
    """The driver's full config, through :func:`setup_cfg` (which registers the datasets)."""
    with tempfile.TemporaryDirectory(prefix="eqlv2-config-") as directory:
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            f.write(config_yaml)
        return setup_cfg(path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Trains on one Ray Train worker; ``config`` is built by
    :func:`~eqlv2.raytrain.launch.build_torch_trainer` (the full config as YAML, hook factories)."""
    threads = max(1, int(config.get("cpus_per_worker", 1)))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    placement = WorkerPlacement.from_ray_context()
    setup_detectron2_comm(placement)
    cfg = _worker_cfg(config["config_yaml"])
    rank = comm.get_rank()
    if rank == 0:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    for name, abbrev in (("fvcore", None), ("eqlv2", None), ("detectron2", "d2")):  # only rank 0 logs, to the console and log.txt
        setup_logger(cfg.OUTPUT_DIR if rank == 0 else None, distributed_rank=rank, name=name, abbrev_name=abbrev)
    logger.info(
        "Worker %d/%d (node %d, local rank %d), %d thread(s), output %s",
        rank, comm.get_world_size(), placement.node_rank, placement.local_rank, threads, cfg.OUTPUT_DIR,
    )  # fmt: skip
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    trainer = RayEQLv2Trainer(cfg, config.get("extra_hooks") or (), config.get("all_rank_hooks") or ())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS, if any
    else:
        metadata = restore_checkpoint(trainer, checkpoint)
        if trainer.start_iter >= trainer.max_iter:
            logger.info("The run finished already (iteration %d); reporting its final metrics", trainer.start_iter)
            ray.train.report(metadata.get("metrics", {}) if rank == 0 else {"iteration": metadata.get("iteration")})
            return
    trainer.train()
