"""One default search trial, as ``tune/search.py`` trains it, for the benchmark scripts.

The tiny config of a dataset with the default search space's ``trial_overrides``
(``configs/search/default.yaml``), a loss and a seed, trained by Ray Train
(``build_torch_trainer`` (:mod:`eqlv2.raytrain`), 1 worker x 1 CPU: what the search gives
each of its two trials at a time on a 2-core machine, ``--concurrency 2``). Used by ``benchmarks/trial_time.py`` and
``benchmarks/calibration.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "lvis": ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml",
    "openimages": ROOT / "configs/tiny/faster_rcnn_tiny_synthetic_openimages.yaml",
}
SPACE = ROOT / "configs/search/default.yaml"
#: The paper's point (gamma, mu, alpha) as config overrides.
PAPER_POINT = ("MODEL.EQLV2.LOSS", "eqlv2", "MODEL.EQLV2.GAMMA", "12.0", "MODEL.EQLV2.MU", "0.8", "MODEL.EQLV2.ALPHA", "4.0")
SIGMOID = ("MODEL.EQLV2.LOSS", "sigmoid")
#: Ray Train workers of a default trial on a 2-core machine (2 CPUs / ``--concurrency 2``).
NUM_WORKERS = 1


def trial_overrides(space_file: Path = SPACE) -> list[str]:
    """The ``trial_overrides`` of a search-space file as ``KEY VALUE`` strings."""
    overrides = yaml.safe_load(space_file.read_text()).get("trial_overrides") or {}
    return [str(item) for key, value in overrides.items() for item in (key, value)]


def trial_opts(loss: Sequence[str], seed: int) -> list[str]:
    """Overrides of one default trial with the loss overrides ``loss`` and ``seed``."""
    return [*trial_overrides(), *loss, "SEED", str(seed)]


def use_project_benchmark() -> None:
    """The offline benchmark where the project keeps it (unless ``EQLV2_SYNTHETIC_ROOT`` is set)."""
    os.environ.setdefault("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets" / "eqlv2_synthetic"))


def prepare(config_file: str, opts: Sequence[str]) -> float:
    """What a search does once before its trials: the data and the base checkpoint (both cached).
    Returns its seconds."""
    from detectron2.data import DatasetCatalog

    from eqlv2.engine import setup_cfg
    from eqlv2.engine.base_checkpoint import ensure_base_checkpoint

    start = time.perf_counter()
    cfg = setup_cfg(config_file, list(opts))
    for name in [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]:
        DatasetCatalog.get(name)
    ensure_base_checkpoint(cfg)
    return time.perf_counter() - start


def fit_trial(config_file: str, opts: Sequence[str], output_dir: str, extra_hooks: Sequence = ()) -> dict[str, Any]:
    """Trains and evaluates one trial on the running Ray instance; returns its final metrics.

    Raises:
        RuntimeError: the training failed.
    """
    from eqlv2.raytrain.launch import build_torch_trainer

    trainer = build_torch_trainer(
        config_file,
        [*opts, "OUTPUT_DIR", output_dir],
        num_workers=NUM_WORKERS,
        storage_path=os.path.join(output_dir, "ray_train"),
        name="trial",
        extra_hooks=list(extra_hooks),
        cpus_per_worker=1,
        checkpoints_to_keep=1,
    )
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise RuntimeError(f"the trial failed: {result.error}") from result.error
    return {k: v for k, v in result.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def train_local(config_file: str, opts: Sequence[str], output_dir: str, threads: int = 1) -> subprocess.Popen:
    """Starts one trial as ``train/train_net.py`` in a child process (one process, ``threads``
    torch threads, the same total batch as the Ray trial); read its result with :func:`local_metrics`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    os.makedirs(output_dir, exist_ok=True)
    log = open(os.path.join(output_dir, "stdout.txt"), "w")  # noqa: SIM115  (closed with the process)
    command = [sys.executable, str(ROOT / "train/train_net.py"), "--config-file", config_file,
               *opts, "OUTPUT_DIR", output_dir]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def local_metrics(output_dir: str) -> dict[str, Any]:
    """The final evaluation of a :func:`train_local` run (detectron2's ``metrics.json``).

    Raises:
        RuntimeError: the run wrote no evaluation.
    """
    path = Path(output_dir, "metrics.json")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    for row in reversed(rows):
        if "bbox/AP" in row:
            return row
    raise RuntimeError(f"no evaluation in {path}; see {Path(output_dir, 'stdout.txt')}")
