"""A laptop Ray instance that listens on the loopback interface only.

What Ray 2.60 does (read in its sources and checked with the sockets of a running instance, see
``tests/test_ray_local.py``):

* ``ray.init(_node_ip_address="127.0.0.1")`` does not help: ``ray.init`` passes the address
  through ``services.resolve_ip_for_localhost``, which replaces a loopback address with the
  machine's network address. With that node address the GCS, raylet and core-worker gRPC servers
  listen on all interfaces (``*``), the dashboard agent on ``0.0.0.0`` and the runtime-env agent
  on the network address.
* Each server binds to loopback when the node address *is* loopback: the C++ servers then listen
  on 127.0.0.1 only, the dashboard agent's gRPC and HTTP servers use ``get_localhost_ip()`` when
  ``is_localhost(node_ip)``, the runtime-env agent binds the node address, and the dashboard
  binds ``dashboard_host`` (loopback by default).
* The node address is loopback when ``services.get_node_ip_address()`` returns
  ``get_localhost_ip()``, which it does when ``ray_constants.ENABLE_RAY_CLUSTER`` is false. That
  constant is read once, at import, from the environment variable
  ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (default: false on macOS and Windows, where Ray runs
  single-node for exactly this reason, true on Linux). Setting it to ``0`` is the mechanism Ray
  itself uses for laptops, and the only one in this version: no ``RAY_*`` system-config flag or
  ``ray.init`` argument chooses the bind address (the C++ binaries hold none).

So :func:`init_local_ray` sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` in the environment that
every Ray process (GCS, raylet, agents, workers) inherits, and, if ``ray`` was imported before
(the variable was then read already), sets the module constant in this process as well — a
private attribute, named here because the environment variable alone cannot reach a process
that imported Ray already. A cluster (``--ray-address``) is unaffected: it is joined, not
started, and its nodes bind their own addresses (put them behind a network policy or a VPN).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray._private import ray_constants  # private: see the module docstring and _set_local_only

logger = logging.getLogger(__name__)

__all__ = ["LOCAL_ONLY_ENV", "init_local_ray", "local_ray"]

#: Environment of every process of a loopback-only Ray instance: Ray's servers on loopback, and
#: torch.distributed's gloo connections of Ray Train workers on the loopback interface (else gloo
#: listens on ``::``). One listener stays on ``::``: the TCPStore server of rank 0 of each Ray
#: Train run, for which torch 2.14 offers no bind address (tested in tests/test_search_smoke.py).
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def _check_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    address = kwargs.setdefault("address", "local")
    if address != "local":
        raise ValueError(
            f"init_local_ray starts a new local instance; it cannot join address={address!r} "
            "(use ray.init for a cluster)"
        )
    for key in ("dashboard_host", "_node_ip_address"):
        host = kwargs.get(key)
        if host is not None and str(host) not in _LOOPBACK_HOSTS:
            raise ValueError(
                f"init_local_ray binds loopback only: {key}={host!r} is not a loopback address"
            )
    kwargs.pop("_node_ip_address", None)  # Ray would turn a loopback one into the network address
    return kwargs


def _set_local_only() -> dict[str, str | None]:
    """Sets :data:`LOCAL_ONLY_ENV` here and for Ray's child processes; returns the old values."""
    saved = {key: os.environ.get(key) for key in LOCAL_ONLY_ENV}
    os.environ.update(LOCAL_ONLY_ENV)
    saved["_constant"] = "1" if ray_constants.ENABLE_RAY_CLUSTER else "0"
    # Private: read once at Ray's import; set it for this process if Ray was imported earlier.
    ray_constants.ENABLE_RAY_CLUSTER = False
    return saved


def init_local_ray(**kwargs: Any):
    """``ray.init`` of a new local instance whose every server listens on loopback only.

    Args:
        kwargs: ``ray.init`` arguments (``num_cpus``, ``include_dashboard``, ``dashboard_port``,
            ``_temp_dir``, ...). ``address`` defaults to ``"local"``, the only value accepted;
            ``dashboard_host`` and ``_node_ip_address`` must be loopback if given.

    Returns:
        What ``ray.init`` returns.

    Raises:
        ValueError: an argument asks for a cluster or a non-loopback address.
    """
    kwargs = _check_arguments(dict(kwargs))
    _set_local_only()
    context = ray.init(**kwargs)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in _LOOPBACK_HOSTS:
        ray.shutdown()
        raise RuntimeError(f"Ray chose the node address {node_ip}, not loopback; it was shut down")
    logger.info("Local Ray instance on %s (loopback only)", node_ip)
    return context


@contextmanager
def local_ray(**kwargs: Any) -> Iterator[Any]:
    """:func:`init_local_ray` for a block: shuts Ray down and restores the environment after."""
    kwargs = _check_arguments(dict(kwargs))
    saved = _set_local_only()
    try:
        yield init_local_ray(**kwargs)
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved.pop("_constant") == "1"
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
