"""Input checks on the driver that fail within seconds where Ray would wait forever: unregistered
datasets, a ``RAY_ADDRESS`` that does not answer, workers the cluster can never place.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

import ray
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog

logger = logging.getLogger(__name__)


class UnknownDatasetError(ValueError):
    """A config names a dataset that is not registered in detectron2's ``DatasetCatalog``."""


class InsufficientResourcesError(ValueError):
    """The Ray cluster cannot place the requested workers."""


class ClusterConnectionError(ConnectionError):
    """The Ray cluster at ``RAY_ADDRESS`` cannot be reached."""


def check_datasets(cfg: CfgNode) -> None:
    """Raises :class:`UnknownDatasetError` naming each dataset of ``cfg`` not in the catalog."""
    known = list(DatasetCatalog.keys())
    problems = []
    for key in ("TRAIN", "TEST"):
        for name in getattr(cfg.DATASETS, key):
            if name in known:
                continue
            close = difflib.get_close_matches(name, known, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"DATASETS.{key} names {name!r}, which is not registered{hint}")
    if not cfg.DATASETS.TRAIN:
        problems.append("DATASETS.TRAIN is empty: nothing to train on")
    if problems:
        raise UnknownDatasetError(
            "; ".join(problems)
            + f". Registered datasets: {', '.join(sorted(known)) or 'none'}. A user's LVIS-format "
            "dataset is registered through the DATASETS.EQLV2.CUSTOM_* keys."
        )


def check_ray_address(address: str | None = None, timeout_s: float = 5.0) -> None:
    """Raises :class:`ClusterConnectionError` if ``address`` (default ``$RAY_ADDRESS``; ``auto``
    and ``local`` are not checked) does not accept a TCP connection."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address or address in ("auto", "local"):
        return
    parts = urlsplit(address if "://" in address else f"gcs://{address}")  # host:6379 or ray://host:10001
    try:
        target = (parts.hostname, parts.port)
    except ValueError:  # a port that is not a number: left to Ray
        return
    if None in target:
        return
    try:
        socket.create_connection(target, timeout=timeout_s).close()
    except OSError as error:
        raise ClusterConnectionError(
            f"cannot reach the Ray cluster at {address!r} ({error}). Check RAY_ADDRESS, or unset it to start a local Ray instance."
        ) from error


def connect_ray() -> None:
    """``ray.init`` after :func:`check_ray_address`, unless Ray is initialised."""
    if not ray.is_initialized():
        check_ray_address()
        ray.init()


def check_cluster_resources(
    num_workers: int,
    cpus_per_worker: float = 1,
    use_gpu: bool = False,
    placement_strategy: str = "PACK",
    nodes: Iterable[dict[str, float]] | None = None,
) -> None:
    """Raises :class:`InsufficientResourcesError` if the workers can never be placed on the
    cluster's total resources (not what is free now: other jobs end); ``nodes`` are the resources
    of each alive node (default from ``ray.nodes()``)."""
    node_list = list(nodes) if nodes is not None else [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    demand = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}

    # how many workers each node can hold
    per_node = [int(min(node.get(k, 0.0) // amount if amount else num_workers for k, amount in demand.items())) for node in node_list]
    totals = {key: sum(node.get(key, 0.0) for node in node_list) for key in demand}
    wanted = ", ".join(f"{amount:g} {key}" for key, amount in demand.items())
    have = ", ".join(f"{totals[key]:g} {key}" for key in demand)
    summary = f"{num_workers} worker(s) of {wanted} each, {placement_strategy}; the cluster has {len(node_list)} node(s) with {have}"
    strategy = placement_strategy.upper()
    # workers the cluster can place: one per node, all on one node, or anywhere
    possible = {"STRICT_SPREAD": sum(count >= 1 for count in per_node), "STRICT_PACK": max(per_node, default=0)}.get(strategy, sum(per_node))
    if possible < num_workers:
        if use_gpu and totals.get("GPU", 0.0) < num_workers:
            advice = "use fewer workers, or drop --use-gpu"
        elif strategy == "STRICT_SPREAD":
            advice = "use at most one worker per node, or another placement strategy"
        else:
            advice = "use fewer workers or fewer CPUs per worker, or add nodes"
        raise InsufficientResourcesError(f"cannot place {summary}: {advice}")
    logger.info("Resources OK: %s", summary)
