"""torch.distributed for a Ray Train run, its store listening on the rank-0 node's address only.

Ray Train's ``TorchConfig`` lets ``init_process_group`` create the run's ``TCPStore``, whose server
listens on every interface (torch 2.14 has no bind-address option). :class:`NodeBoundTorchConfig`
swaps in a backend that does the same set-up through Ray Train's public ``Backend`` interface,
except that rank 0 binds the store's socket on its Ray node address (127.0.0.1 on a laptop) and
hands it to ``TCPStore(master_listen_fd=...)``.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import ray
import torch.distributed as dist
from ray.train.backend import Backend
from ray.train.torch import TorchConfig

logger = logging.getLogger(__name__)

_store_listener: socket.socket | None = None  # rank 0 only, until its TCPStore takes it over


def _open_store_listener() -> tuple[str, int]:
    """Rank 0: listens on its node's address, on a free port; returns ``(address, port)``."""
    global _store_listener
    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    _store_listener = socket.socket(family, socket.SOCK_STREAM)
    _store_listener.bind((address, 0))
    _store_listener.listen(128)
    return address, _store_listener.getsockname()[1]


def _set_torchrun_env_vars() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, ... as ``torchrun`` sets them, from Ray's train context."""
    context = ray.train.get_context()
    os.environ.update(
        RANK=str(context.get_world_rank()),
        LOCAL_RANK=str(context.get_local_rank()),
        NODE_RANK=str(context.get_node_rank()),
        WORLD_SIZE=str(context.get_world_size()),
        LOCAL_WORLD_SIZE=str(context.get_local_world_size()),
    )


def _join_process_group(
    backend: str, rank: int, world_size: int, address: str, port: int, timeout_s: int
) -> None:
    """Every worker: the store (served by rank 0 on its listener), then the process group."""
    global _store_listener
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank == 0:
        listen_fd, _store_listener = _store_listener.detach(), None  # the store owns the socket now
        store = dist.TCPStore(address, port, world_size, is_master=True, master_listen_fd=listen_fd, timeout=timeout)
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class NodeBoundTorchBackend(Backend):
    """Ray Train's torch set-up with the store bound to the rank-0 node's address (module doc)."""

    def on_start(self, worker_group, backend_config: NodeBoundTorchConfig) -> None:
        """Opens rank 0's listener, then starts the store and process group on every worker."""
        backend = backend_config.backend or _default_backend(worker_group)
        address, port = worker_group.execute_single(0, _open_store_listener)
        logger.info("torch.distributed (%s): store on %s:%d, %d worker(s)", backend, address, port, len(worker_group))
        worker_group.execute(_set_torchrun_env_vars)
        joins = [
            worker_group.execute_single_async(rank, _join_process_group, backend, rank, len(worker_group), address, port, backend_config.timeout_s)
            for rank in range(len(worker_group))
        ]  # fmt: skip
        ray.get(joins)

    def on_shutdown(self, worker_group, backend_config: NodeBoundTorchConfig) -> None:
        """Destroys the process group on every worker, waiting at most
        ``$TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S`` (30 s, as Ray's own backend): a run stopped
        mid-collective must not keep its workers, and their placement group, for ever."""
        timeout_s = float(os.environ.get("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "30"))
        try:
            ray.get(worker_group.execute_async(_leave_process_group), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            logger.warning("torch.distributed shutdown timed out after %g s; the workers are stopped anyway", timeout_s)


def _default_backend(worker_group) -> str:
    """nccl when the workers have GPUs, else gloo (as ``TorchConfig(backend=None)`` chooses)."""
    return "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"


@dataclass
class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig`` (``backend``, ``timeout_s``; not ``init_method``) whose store listens on the
    node's address only."""

    @property
    def backend_cls(self) -> type[Backend]:
        return NodeBoundTorchBackend
