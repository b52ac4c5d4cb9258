"""The driver side of a Ray Train run: checks, then a ``TorchTrainer`` whose workers run
:func:`eqlv2.raytrain.worker.train_loop_per_worker`. Runs are named deterministically
(:func:`default_run_name`), so a second ``fit()`` of the same config, overrides and storage
resumes the run from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow.fs
from detectron2.config import CfgNode
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from eqlv2.data import synthetic_root
from eqlv2.engine import setup_cfg

from .checks import check_cluster_resources, check_datasets, connect_ray
from .process_group import NodeBoundTorchConfig
from .worker import train_loop_per_worker

logger = logging.getLogger(__name__)

PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

#: Keys of ``DATASETS.EQLV2`` holding local paths that must not depend on a worker's working directory.
_PATH_KEYS = ("SYNTHETIC_ROOT", "CUSTOM_TRAIN_JSON", "CUSTOM_TRAIN_IMAGES", "CUSTOM_VAL_JSON", "CUSTOM_VAL_IMAGES")


def _absolute(value: str) -> str:
    """A local path made absolute (URLs as they are)."""
    value = os.path.expanduser(value)
    return value if "://" in value else os.path.abspath(value)


def pin_dataset_roots() -> dict[str, str]:
    """Makes this process's dataset roots absolute in its environment (which a local Ray cluster's
    workers inherit) and returns them for the runtime environment of workers elsewhere."""
    os.environ["DETECTRON2_DATASETS"] = _absolute(os.environ.get("DETECTRON2_DATASETS") or "datasets")
    os.environ["EQLV2_SYNTHETIC_ROOT"] = _absolute(os.environ.get("EQLV2_SYNTHETIC_ROOT") or str(synthetic_root()))
    return {name: os.environ[name] for name in ("DETECTRON2_DATASETS", "EQLV2_SYNTHETIC_ROOT")}


def default_run_name(config_file: str, opts: Sequence[str] = ()) -> str:
    """A deterministic run name: the config's file stem, plus a hash of the overrides if any."""
    stem = Path(config_file).stem
    if not opts:
        return stem
    digest = hashlib.sha1("\0".join(map(str, opts)).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def resolve_storage_path(storage_path: str | None) -> str:
    """``storage_path`` absolute for local folders, default ``~/ray_results``."""
    return _absolute(os.fspath(storage_path or "~/ray_results"))


def run_exists(storage_path: str | None, name: str) -> bool:
    filesystem, root = pyarrow.fs.FileSystem.from_uri(resolve_storage_path(storage_path))
    return filesystem.get_file_info(f"{root.rstrip('/')}/{name}").type != pyarrow.fs.FileType.NotFound


def _worker_config_yaml(cfg: CfgNode, output_dir: str, use_gpu: bool) -> str:
    """The driver's config as the workers get it: local paths absolute, output and device set."""
    cfg = cfg.clone()
    cfg.defrost()
    for key in _PATH_KEYS:
        if cfg.DATASETS.EQLV2[key]:
            cfg.DATASETS.EQLV2[key] = _absolute(cfg.DATASETS.EQLV2[key])
    # Resolved here: the default depends on the working directory, which Ray changes.
    cfg.DATASETS.EQLV2.SYNTHETIC_ROOT = str(synthetic_root(cfg))
    if cfg.MODEL.WEIGHTS and os.path.exists(cfg.MODEL.WEIGHTS):
        cfg.MODEL.WEIGHTS = _absolute(cfg.MODEL.WEIGHTS)
    cfg.OUTPUT_DIR = output_dir
    device = "cuda" if use_gpu else "cpu"
    if cfg.MODEL.DEVICE != device:
        logger.info("MODEL.DEVICE %s -> %s (use_gpu=%s)", cfg.MODEL.DEVICE, device, use_gpu)
        cfg.MODEL.DEVICE = device
    cfg.freeze()
    return cfg.dump()


def _output_dir(cfg: CfgNode, opts: Sequence[str], storage_path: str, name: str) -> str:
    """detectron2's output folder: an explicit ``OUTPUT_DIR`` override, else inside the run folder."""
    if "OUTPUT_DIR" in list(opts)[::2]:
        return os.path.abspath(cfg.OUTPUT_DIR)
    if "://" in storage_path:
        return os.path.join(os.path.abspath(cfg.OUTPUT_DIR), name)
    return os.path.join(storage_path, name, "detectron2")


def _check_arguments(num_workers: int, cpus_per_worker: float, max_failures: int, placement_strategy: str) -> None:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    if not isinstance(cpus_per_worker, int | float) or cpus_per_worker <= 0:
        raise ValueError(f"cpus_per_worker must be > 0, got {cpus_per_worker!r}")
    if isinstance(max_failures, bool) or not isinstance(max_failures, int) or max_failures < -1:
        raise ValueError(f"max_failures must be an integer >= -1 (-1: unlimited), got {max_failures!r}")
    if placement_strategy not in PLACEMENT_STRATEGIES:
        raise ValueError(f"placement_strategy must be one of {PLACEMENT_STRATEGIES}, got {placement_strategy!r}")


def _checked_cfg(config_file: str, opts: list[str], num_workers: int) -> CfgNode:
    cfg = setup_cfg(config_file, opts)
    check_datasets(cfg)
    if not cfg.SOLVER.REFERENCE_WORLD_SIZE and cfg.SOLVER.IMS_PER_BATCH % num_workers:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} (the batch of all workers together) "
            f"is not divisible by num_workers={num_workers}"
        )
    return cfg


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

    Checks first: the arguments, the config, the datasets, the Ray address (``ray.init`` if
    needed), the cluster's resources. ``max_failures`` worker-group failures (-1: any) restart
    from the latest checkpoint. ``extra_hooks`` (rank 0) and ``all_rank_hooks`` (every worker) are
    picklable ``(cfg, trainer) -> HookBase`` factories.
    """
    _check_arguments(num_workers, cpus_per_worker, max_failures, placement_strategy)
    opts = [str(option) for option in opts]
    cfg = _checked_cfg(config_file, opts, num_workers)
    name = name or default_run_name(config_file, opts)
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"run name must be a non-empty folder name without '/', got {name!r}")
    connect_ray()
    check_cluster_resources(num_workers, cpus_per_worker, use_gpu, placement_strategy)
    storage = resolve_storage_path(storage_path)
    output_dir = _output_dir(cfg, opts, storage, name)
    logger.info(
        "Ray Train run %r in %s: %d worker(s) x %s CPU%s, %s, detectron2 output %s",
        name, storage, num_workers, cpus_per_worker, " + 1 GPU" if use_gpu else "", placement_strategy, output_dir,
    )  # fmt: skip
    run_config = RunConfig(
        name=name,
        storage_path=storage,
        failure_config=FailureConfig(max_failures=max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=checkpoints_to_keep),
        callbacks=list(callbacks or []),
        worker_runtime_env={"env_vars": pin_dataset_roots()},
    )
    loop_config = {
        "config_yaml": _worker_config_yaml(cfg, output_dir, use_gpu),
        "cpus_per_worker": cpus_per_worker,
        "extra_hooks": list(extra_hooks or []),
        "all_rank_hooks": list(all_rank_hooks or []),
    }
    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    scaling = ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources, placement_strategy=placement_strategy)
    backend = NodeBoundTorchConfig(backend="nccl" if use_gpu else "gloo")
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling, run_config=run_config, torch_config=backend)
