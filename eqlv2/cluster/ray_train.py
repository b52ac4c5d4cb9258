"""detectron2 EQL v2 training on Ray Train: one detectron2 trainer per worker, DDP over Ray.

:func:`build_torch_trainer` checks the inputs on the driver and returns a
``ray.train.torch.TorchTrainer`` whose workers each run :func:`train_loop_per_worker`: the same
:class:`eqlv2.engine.EQLv2Trainer` training as ``train/train_net.py``, with

* DDP over the process group Ray Train creates (gloo on CPU, nccl on GPU), detectron2's
  ``comm`` helpers (world size, rank, a local process group per node from Ray's node and local
  ranks) set up by :func:`eqlv2.cluster.distributed.setup_detectron2_comm`, and ``device_ids``
  fixed for CPU models (:func:`eqlv2.cluster.distributed.ddp_device_ids_fix`);
* detectron2's distributed ``TrainingSampler`` and evaluation gathered on rank 0;
* the EQL v2 statistics summed over all workers at every step (``EQLv2Loss`` all-reduces when
  ``torch.distributed`` is initialised), so every worker applies the same weights;
* reports and checkpoints through ``ray.train.report`` (:class:`RayReportHook`), and the latest
  checkpoint restored on a restart (``FailureConfig(max_failures)``) or on a second ``fit()``
  with the same run name and storage.

Only rank 0 writes files: the detectron2 output folder (log, ``metrics.json``, TensorBoard
events, evaluation outputs, ``config.yaml``) and the checkpoints. Ray checkpoints replace
detectron2's ``PeriodicCheckpointer``.

Reported metrics (rank 0's report; the other ranks report ``{"iteration": n}``). All values are
floats except ``iteration``:

* ``iteration``: completed iterations (``SOLVER.MAX_ITER`` in the final report).
* Training, in every report: every scalar detectron2's ``EventStorage`` holds, averaged over the
  workers that have it, smoothed like detectron2's writers (median of the last 20 iterations
  for losses): ``total_loss``, ``loss_cls``, ``loss_box_reg``, ``loss_mask`` (Mask R-CNN),
  ``loss_rpn_cls``, ``loss_rpn_loc``, ``lr``, ``time`` (after detectron2's timer warm-up),
  ``data_time``, ``rank_data_time``, ``eta_seconds`` (when known), ``fast_rcnn/cls_accuracy``,
  ``fast_rcnn/fg_cls_accuracy``, ``fast_rcnn/false_negative``, ``mask_rcnn/accuracy``, ``mask_rcnn/false_positive``,
  ``mask_rcnn/false_negative``, ``roi_head/num_fg_samples``, ``roi_head/num_bg_samples``,
  ``rpn/num_pos_anchors``, ``rpn/num_neg_anchors``, and the EQL v2 summaries of
  :class:`eqlv2.hooks.GradientStatisticsHook`: ``eqlv2/ratio_mean``, ``eqlv2/q_mean``,
  ``eqlv2/r_mean`` and per frequency group ``eqlv2/ratio_mean_r`` ... ``eqlv2/r_mean_f``
  (``eqlv2/stage{k}/...`` for cascade heads).
* Evaluation, in the reports that follow an evaluation (every ``TEST.EVAL_PERIOD`` iterations
  and the final one): detectron2's nested results flattened with ``/`` (``bbox/AP``,
  ``bbox/AP50``, ``bbox/APr``, ``bbox/APc``, ``bbox/APf``, ``segm/AP``, ...; prefixed by the
  dataset name when ``DATASETS.TEST`` has several) and the paper's columns
  (:func:`eqlv2.cluster.reporting.paper_columns`): ``AP``, ``APr``, ``APc``, ``APf``, ``APb``
  for LVIS (``eqlv2.evaluation.summary``: AP and its groups are mask AP for Mask R-CNN, ``APb``
  the box AP) or ``AP``, ``AP1`` .. ``AP5`` for OpenImages (``AP`` and ``APb`` for COCO-style
  results).

When reports are made:

* every ``MODEL.EQLV2.LOG_PERIOD`` iterations: training metrics, no checkpoint;
* every ``TEST.EVAL_PERIOD`` and every ``SOLVER.CHECKPOINT_PERIOD`` iterations: metrics (with
  the evaluation if one ran) and a checkpoint;
* at the end: final evaluation and final checkpoint. A second ``fit()`` of a finished run
  reports the final checkpoint's metrics again, without training.

Checkpoints: ``<storage_path>/<name>/checkpoint_<iteration:07d>/`` holding ``model.pth``,
``metadata.json`` and ``config.yaml`` (see :mod:`eqlv2.cluster.reporting`). Ray may restart a
failed run from the checkpoint before the newest one (registration is asynchronous).

With Ray Tune (a function trainable calling ``fit()`` with ``TuneReportCallback``): the training
reports carry no evaluation keys, and Tune's strict metric check rejects a result without the
searched metric; set ``TUNE_DISABLE_STRICT_METRIC_CHECKING=1`` (Tune's schedulers skip results
without their metric), or report at evaluations only: ``MODEL.EQLV2.LOG_PERIOD 0`` (which also
turns off the EQL v2 summaries) and ``SOLVER.CHECKPOINT_PERIOD`` a multiple of
``TEST.EVAL_PERIOD``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from eqlv2.engine import EQLv2Trainer, setup_cfg

from .checks import check_cluster_resources, check_datasets, connect_ray
from .distributed import WorkerPlacement, ddp_device_ids_fix, setup_detectron2_comm
from .reporting import RayReportHook, restore_checkpoint

__all__ = [
    "HookFactory",
    "RayEQLv2Trainer",
    "build_torch_trainer",
    "default_run_name",
    "resolve_storage_path",
    "run_exists",
    "train_loop_per_worker",
]

logger = logging.getLogger(__name__)

#: ``(cfg, trainer) -> HookBase | None``; must be picklable (Ray ships it to the workers).
HookFactory = Callable[[CfgNode, EQLv2Trainer], HookBase | None]

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

#: Config keys holding local paths that must not depend on a worker's working directory.
_PATH_KEYS = (
    "DATASETS.EQLV2.SYNTHETIC_ROOT",
    "DATASETS.EQLV2.CUSTOM_TRAIN_JSON",
    "DATASETS.EQLV2.CUSTOM_TRAIN_IMAGES",
    "DATASETS.EQLV2.CUSTOM_VAL_JSON",
    "DATASETS.EQLV2.CUSTOM_VAL_IMAGES",
)

#: Environment variables naming data folders, passed to the workers as absolute paths.
_PATH_ENV_VARS = {"DETECTRON2_DATASETS": "datasets", "EQLV2_SYNTHETIC_ROOT": None}


# --------------------------------------------------------------------------- worker side
class RayEQLv2Trainer(EQLv2Trainer):
    """:class:`EQLv2Trainer` for a Ray Train worker.

    DDP gets correct ``device_ids`` for CPU models, detectron2's ``PeriodicCheckpointer`` is
    replaced by ``report_hook`` (last), and hooks from factories are added before it:
    ``all_rank_hooks`` on every worker, ``extra_hooks`` on rank 0 only.
    """

    def __init__(
        self,
        cfg: CfgNode,
        report_hook: RayReportHook,
        extra_hooks: Sequence[HookFactory] = (),
        all_rank_hooks: Sequence[HookFactory] = (),
    ) -> None:
        self._report_hook = report_hook
        self._extra_hook_factories = list(extra_hooks)
        self._all_rank_hook_factories = list(all_rank_hooks)
        with ddp_device_ids_fix():
            super().__init__(cfg)

    @property
    def report_hook(self) -> RayReportHook:
        """The hook that reports to Ray Train."""
        return self._report_hook

    def build_hooks(self) -> list[HookBase]:
        hook_list = [
            hook for hook in super().build_hooks() if not isinstance(hook, hooks.PeriodicCheckpointer)
        ]
        factories = list(self._all_rank_hook_factories)
        if comm.is_main_process():
            factories += self._extra_hook_factories
        for factory in factories:
            hook = factory(self.cfg, self)
            if hook is not None:
                hook_list.append(hook)
        hook_list.append(self._report_hook)
        return hook_list


def _set_threads(cpus_per_worker: float) -> int:
    threads = max(1, int(cpus_per_worker))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    return threads


def _setup_logging(output_dir: str, rank: int) -> None:
    """detectron2-style loggers; only rank 0 logs to the console and to ``output_dir/log.txt``."""
    output = output_dir if rank == 0 else None
    setup_logger(output, distributed_rank=rank, name="fvcore")
    setup_logger(output, distributed_rank=rank, name="eqlv2")
    setup_logger(output, distributed_rank=rank, name="detectron2", abbrev_name="d2")


def _worker_cfg(config_yaml: str) -> CfgNode:
    """The driver's full config, through :func:`setup_cfg` (which registers the datasets)."""
    with tempfile.TemporaryDirectory(prefix="eqlv2-config-") as directory:
        path = os.path.join(directory, "config.yaml")
        with open(path, "w") as f:
            f.write(config_yaml)
        return setup_cfg(path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train on one Ray Train worker (the function given to ``TorchTrainer``).

    Args:
        config: built by :func:`build_torch_trainer`: ``config_yaml`` (the full config, paths
            absolute, ``OUTPUT_DIR`` and ``MODEL.DEVICE`` set), ``cpus_per_worker``,
            ``extra_hooks`` (factories, rank 0 only) and ``all_rank_hooks`` (every rank).
    """
    threads = _set_threads(config.get("cpus_per_worker", 1))
    placement = WorkerPlacement.from_ray_context()
    setup_detectron2_comm(placement)
    cfg = _worker_cfg(config["config_yaml"])
    rank = comm.get_rank()
    if rank == 0:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    _setup_logging(cfg.OUTPUT_DIR, rank)
    logger.info(
        "Worker %d/%d (node %d, local rank %d), %d thread(s), output %s",
        rank, comm.get_world_size(), placement.node_rank, placement.local_rank, threads, cfg.OUTPUT_DIR,
    )
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)

    report_hook = RayReportHook(
        report_period=cfg.MODEL.EQLV2.LOG_PERIOD,
        eval_period=cfg.TEST.EVAL_PERIOD,
        checkpoint_period=cfg.SOLVER.CHECKPOINT_PERIOD,
        config_yaml=cfg.dump(),
    )
    trainer = RayEQLv2Trainer(
        cfg,
        report_hook,
        extra_hooks=config.get("extra_hooks") or (),
        all_rank_hooks=config.get("all_rank_hooks") or (),
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS, if any
    else:
        metadata = restore_checkpoint(trainer, checkpoint)
        if trainer.start_iter >= trainer.max_iter:
            logger.info("The run finished already (iteration %d); reporting its final metrics", trainer.start_iter)
            final = metadata.get("metrics", {}) if rank == 0 else {"iteration": metadata.get("iteration")}
            ray.train.report(final)
            return
    trainer.train()


# --------------------------------------------------------------------------- driver side
def default_run_name(config_file: str, opts: Sequence[str] = ()) -> str:
    """A deterministic run name: the config's file stem, plus a hash of the overrides if any."""
    stem = Path(config_file).stem
    if not opts:
        return stem
    digest = hashlib.sha1("\0".join(map(str, opts)).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def resolve_storage_path(storage_path: str | None) -> str:
    """``storage_path`` as Ray Train will use it: absolute for local folders, default ``~/ray_results``."""
    if storage_path is None:
        from ray.train.constants import DEFAULT_STORAGE_PATH

        storage_path = DEFAULT_STORAGE_PATH
    storage_path = os.fspath(storage_path)
    if "://" in storage_path:
        return storage_path
    return os.path.abspath(os.path.expanduser(storage_path))


def run_exists(storage_path: str | None, name: str) -> bool:
    """Whether ``<storage_path>/<name>`` holds a Ray Train run (its checkpoint-manager snapshot)."""
    import pyarrow.fs
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    storage = resolve_storage_path(storage_path)
    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    info = filesystem.get_file_info(f"{root.rstrip('/')}/{name}/{CHECKPOINT_MANAGER_SNAPSHOT_FILENAME}")
    return info.type != pyarrow.fs.FileType.NotFound


def _option_keys(opts: Sequence[str]) -> set[str]:
    return {str(key) for key in list(opts)[::2]}


def _worker_config_yaml(cfg: CfgNode, opts: Sequence[str], output_dir: str, use_gpu: bool) -> str:
    """The driver's config as the workers get it: local paths absolute, output and device set."""
    cfg = cfg.clone()
    cfg.defrost()
    for key in _PATH_KEYS:
        node, _, leaf = key.rpartition(".")
        parent = cfg
        for part in node.split("."):
            parent = parent[part]
        value = parent[leaf]
        if value and "://" not in value and not os.path.isabs(value):
            parent[leaf] = os.path.abspath(value)
    if not cfg.DATASETS.EQLV2.SYNTHETIC_ROOT:
        from eqlv2.data import synthetic_root

        # Resolved here: the default depends on the working directory, which Ray changes.
        cfg.DATASETS.EQLV2.SYNTHETIC_ROOT = str(synthetic_root(cfg))
    weights = cfg.MODEL.WEIGHTS
    if weights and "://" not in weights and not os.path.isabs(weights) and os.path.exists(weights):
        cfg.MODEL.WEIGHTS = os.path.abspath(weights)
    cfg.OUTPUT_DIR = output_dir
    device = "cuda" if use_gpu else "cpu"
    if cfg.MODEL.DEVICE != device:
        logger.info("MODEL.DEVICE %s -> %s (use_gpu=%s)", cfg.MODEL.DEVICE, device, use_gpu)
        cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg.dump()


def _output_dir(cfg: CfgNode, opts: Sequence[str], storage_path: str, name: str) -> str:
    """detectron2's output folder: an explicit ``OUTPUT_DIR`` override, else inside the run folder."""
    if "OUTPUT_DIR" in _option_keys(opts) or "://" in storage_path:
        base = os.path.abspath(cfg.OUTPUT_DIR)
        return base if "OUTPUT_DIR" in _option_keys(opts) else os.path.join(base, name)
    return os.path.join(storage_path, name, "detectron2")


def _worker_env() -> dict[str, str]:
    env = {}
    for variable, default in _PATH_ENV_VARS.items():
        value = os.environ.get(variable, default)
        if value:
            value = os.path.expanduser(value)
            env[variable] = value if "://" in value else os.path.abspath(value)
    return env


def _check_arguments(num_workers: int, cpus_per_worker: float, max_failures: int, placement_strategy: str) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if not isinstance(cpus_per_worker, (int, float)) or cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < -1:
        raise ValueError(f"max_failures must be an integer >= -1 (-1: unlimited), got {max_failures!r}")
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {placement_strategy!r}")


def build_torch_trainer(
    config_file: str,
    opts: Sequence[str],
    num_workers: int,
    use_gpu: bool = False,
    storage_path: str | None = None,
    name: str | None = None,
    max_failures: int = 0,
    callbacks: list | None = None,
    extra_hooks: list | None = None,
    cpus_per_worker: int = 1,
    placement_strategy: str = "PACK",
    *,
    all_rank_hooks: list | None = None,
    checkpoints_to_keep: int | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` running the detectron2 training of ``config_file`` on ``num_workers``.

    Checks, in this order and before anything is scheduled: the arguments, the config file and
    overrides, the dataset names, the Ray address (``ray.init`` is called if Ray is not
    initialised: ``$RAY_ADDRESS`` or a local instance), and that the cluster can place the
    workers.

    Args:
        config_file: detectron2 YAML config.
        opts: ``KEY VALUE`` overrides.
        num_workers: Ray Train workers (DDP processes).
        use_gpu: one GPU per worker, nccl and ``MODEL.DEVICE cuda``; else gloo and the CPU.
        storage_path: where runs and checkpoints go (default ``~/ray_results``; shared storage
            for multi-node runs).
        name: run name; default :func:`default_run_name` (deterministic, so a second ``fit()``
            with the same config, overrides and storage resumes the run).
        max_failures: worker-group failures to recover from (restarting from the latest
            registered checkpoint); -1 for unlimited.
        callbacks: ``ray.train.UserCallback`` instances (e.g. Tune's ``TuneReportCallback``).
        extra_hooks: picklable ``(cfg, trainer) -> HookBase`` factories, added on rank 0 only.
        cpus_per_worker: CPUs each worker reserves; also its torch thread count.
        placement_strategy: ``PACK``, ``SPREAD``, ``STRICT_PACK`` or ``STRICT_SPREAD``.
        all_rank_hooks: hook factories added on every worker.
        checkpoints_to_keep: keep only the newest this many checkpoints (default: all).

    Raises:
        FileNotFoundError: the config file does not exist.
        ValueError: bad arguments or overrides;
            :class:`eqlv2.cluster.checks.UnknownDatasetError` for unregistered datasets;
            :class:`eqlv2.cluster.checks.InsufficientResourcesError` when the cluster is too small.
        ConnectionError: :class:`eqlv2.cluster.checks.ClusterConnectionError`, ``RAY_ADDRESS``
            does not answer.
    """
    _check_arguments(num_workers, cpus_per_worker, max_failures, placement_strategy)
    opts = [str(option) for option in opts]
    cfg = setup_cfg(config_file, opts)
    check_datasets(cfg)
    if not cfg.SOLVER.REFERENCE_WORLD_SIZE and cfg.SOLVER.IMS_PER_BATCH % num_workers:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} (the batch of all workers together) "
            f"is not divisible by num_workers={num_workers}"
        )
    connect_ray()
    check_cluster_resources(num_workers, cpus_per_worker, use_gpu, placement_strategy)

    storage = resolve_storage_path(storage_path)
    name = name or default_run_name(config_file, opts)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"run name must be a non-empty folder name without '/', got {name!r}")
    output_dir = _output_dir(cfg, opts, storage, name)
    train_loop_config = {
        "config_file": os.path.abspath(config_file),
        "config_yaml": _worker_config_yaml(cfg, opts, output_dir, use_gpu),
        "cpus_per_worker": cpus_per_worker,
        "extra_hooks": list(extra_hooks or []),
        "all_rank_hooks": list(all_rank_hooks or []),
    }
    resources = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    worker_env = _worker_env()
    run_config = RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
        callbacks=list(callbacks or []),
        worker_runtime_env={"env_vars": worker_env} if worker_env else None,
    )
    logger.info(
        "Ray Train run %r in %s: %d worker(s) x %s CPU%s, %s, detectron2 output %s",
        name, storage, num_workers, cpus_per_worker, " + 1 GPU" if use_gpu else "",
        placement_strategy, output_dir,
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_loop_config,
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=run_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
