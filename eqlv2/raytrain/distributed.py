"""detectron2's distributed helpers inside a Ray Train worker (detectron2's ``launch()`` unused).

When the training function starts, the run's backend (:mod:`eqlv2.raytrain.process_group`) has
set up ``torch.distributed``, so :mod:`detectron2.utils.comm` sees the right world size and rank.
It lacks the *local* (per-node) process group, which detectron2's
``comm.create_local_process_group`` builds assuming equally many workers per node with contiguous
ranks; a Ray placement group gives no such guarantee, so :func:`setup_detectron2_comm` builds one
group per node from Ray's node and local ranks. :func:`ddp_device_ids_fix` works around
detectron2's ``create_ddp_model``, whose ``device_ids=[local_rank]`` breaks every CPU model.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import detectron2.engine.defaults as defaults
import torch
import torch.distributed as dist
from detectron2.utils import comm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerPlacement:
    """Where one worker runs, as Ray's train context tells it (local: among its node's workers)."""

    world_rank: int
    local_rank: int
    node_rank: int
    world_size: int
    local_world_size: int

    @classmethod
    def from_ray_context(cls) -> WorkerPlacement:
        import ray.train  # lazily: this module also serves plain torch.distributed processes

        context = ray.train.get_context()
        return cls(**{name: getattr(context, f"get_{name}")() for name in ("world_rank", "local_rank", "node_rank", "world_size", "local_world_size")})


def _ranks_per_node(placements: list[WorkerPlacement]) -> dict[int, list[int]]:
    """node rank -> world ranks on it, ordered by local rank; checks the ranks are consistent."""
    nodes: dict[int, list[WorkerPlacement]] = {}
    for placement in placements:
        nodes.setdefault(placement.node_rank, []).append(placement)
    ranks: dict[int, list[int]] = {}
    for node, members in sorted(nodes.items()):
        members.sort(key=lambda p: p.local_rank)
        local_ranks = [p.local_rank for p in members]
        if local_ranks != list(range(len(members))):
            raise RuntimeError(f"node {node}: local ranks {local_ranks} are not 0..{len(members) - 1}")
        world_ranks = [p.world_rank for p in members]
        if world_ranks != sorted(world_ranks):
            # torch orders a group by world rank; the group rank must equal Ray's local rank.
            raise RuntimeError(
                f"node {node}: local ranks do not follow world ranks ({world_ranks}); "
                "detectron2's comm.get_local_rank() would disagree with Ray's"
            )
        ranks[node] = world_ranks
    return ranks


def setup_detectron2_comm(placement: WorkerPlacement | None = None) -> dict[int, list[int]]:
    """Creates detectron2's local process group from Ray's node and local ranks, so that
    ``comm``'s ranks and sizes agree with Ray's; returns node rank -> its world ranks.

    Every worker must call it (collectives) after ``torch.distributed`` is initialised; a
    disagreement with Ray's context raises RuntimeError.
    """
    placement = placement or WorkerPlacement.from_ray_context()
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: run this inside a ray.train.torch.TorchTrainer")
    if dist.get_world_size() != placement.world_size or dist.get_rank() != placement.world_rank:
        raise RuntimeError(
            f"torch.distributed has rank {dist.get_rank()}/{dist.get_world_size()}, Ray's context "
            f"{placement.world_rank}/{placement.world_size}"
        )
    gathered: list[WorkerPlacement | None] = [None] * placement.world_size
    dist.all_gather_object(gathered, placement)
    nodes = _ranks_per_node([p for p in gathered if p is not None])
    local_group = None
    for node, ranks in nodes.items():
        # Every process creates every group, in the same order, as torch requires.
        group = dist.new_group(ranks)
        if node == placement.node_rank:
            local_group = group
    # Private detectron2 API: detectron2 keeps the group in this module global and has no public
    # setter; its create_local_process_group() assumes equally many workers per node with
    # contiguous ranks, which Ray does not guarantee. Guarded by
    # tests/test_ray_train.py::test_detectron2_local_group_global_exists.
    comm._LOCAL_PROCESS_GROUP = local_group
    if comm.get_local_rank() != placement.local_rank or comm.get_local_size() != placement.local_world_size:
        raise RuntimeError(
            f"detectron2 local rank {comm.get_local_rank()}/{comm.get_local_size()} differs from "
            f"Ray's {placement.local_rank}/{placement.local_world_size}"
        )
    logger.info(
        "detectron2 comm: rank %d/%d, node %d, local rank %d/%d (nodes: %s)",
        comm.get_rank(), comm.get_world_size(), placement.node_rank,
        comm.get_local_rank(), comm.get_local_size(), nodes,
    )
    return nodes


def ddp_device_ids(model: torch.nn.Module) -> list[int] | None:
    """The ``device_ids`` DistributedDataParallel needs for ``model``: None unless it is on a GPU."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return None
    index = parameter.device.index
    return [torch.cuda.current_device() if index is None else index]


@contextlib.contextmanager
def ddp_device_ids_fix() -> Iterator[None]:
    """Within the block, detectron2's ``create_ddp_model`` gets :func:`ddp_device_ids` instead of
    ``[comm.get_local_rank()]``, wrong for CPU models and for GPUs Ray exposes under other indices."""
    original = defaults.create_ddp_model

    def create_ddp_model(model: torch.nn.Module, *, fp16_compression: bool = False, **kwargs):
        kwargs.setdefault("device_ids", ddp_device_ids(model))
        return original(model, fp16_compression=fp16_compression, **kwargs)

    defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        defaults.create_ddp_model = original
