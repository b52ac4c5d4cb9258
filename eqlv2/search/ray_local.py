"""A laptop Ray instance that listens on the loopback interface only.

In Ray 2.60 (read in its sources, checked on a running instance by ``tests/test_ray_local.py``),
``ray.init(_node_ip_address="127.0.0.1")`` does not help: Ray replaces a loopback address with the
machine's network address, and its servers then listen on all interfaces. They bind loopback when
the node address *is* loopback, which it is when ``ray_constants.ENABLE_RAY_CLUSTER`` is false:
Ray reads it once, at import, from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (false on macOS and
Windows, true on Linux), and no other flag chooses the bind address. So :func:`init_local_ray`
sets that variable for every Ray process, and the module constant in this process if Ray was
imported already (the only private attribute here). It also leaves out what only a cluster
needs (:data:`SINGLE_NODE_DEFAULTS`). A cluster (``--ray-address``) is joined, not started, and
unaffected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
from ray._private import ray_constants  # private: see the module docstring and init_local_ray

logger = logging.getLogger(__name__)

#: Environment of every process of a loopback-only Ray instance: Ray's servers on loopback, and
#: torch.distributed's gloo connections of Ray Train workers on the loopback interface (else gloo
#: listens on ``::``). One listener stays on ``::``: the TCPStore server of rank 0 of each Ray
#: Train run, for which torch 2.14 offers no bind address (tested in tests/test_search_smoke.py).
LOCAL_ONLY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo"}
#: What a single-machine instance does without, unless the user's environment says otherwise:
#: Ray Train's preemption watcher (one more actor per training run, about 3 s of CPU to start on
#: 2 cores) watches for nodes a cloud is about to reclaim, and this instance has none to lose.
SINGLE_NODE_DEFAULTS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
_LOOPBACK_HOSTS = {"127.0.0.1", "::1", "localhost"}


def init_local_ray(**kwargs: Any):
    """``ray.init(**kwargs)`` of a new local instance whose every server listens on loopback only;
    ``address`` may only be ``"local"``, ``dashboard_host`` and ``_node_ip_address`` loopback."""
    address = kwargs.setdefault("address", "local")
    if address != "local":
        raise ValueError(f"init_local_ray starts a new local instance; it cannot join address={address!r} (use ray.init for a cluster)")
    for key in ("dashboard_host", "_node_ip_address"):
        host = kwargs.get(key)
        if host is not None and str(host) not in _LOOPBACK_HOSTS:
            raise ValueError(f"init_local_ray binds loopback only: {key}={host!r} is not a loopback address")
    kwargs.pop("_node_ip_address", None)  # Ray would turn a loopback one into the network address
    os.environ.update(LOCAL_ONLY_ENV)  # for Ray's child processes
    for key, value in SINGLE_NODE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    ray_constants.ENABLE_RAY_CLUSTER = False  # private: read once at Ray's import (for this process)
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
    saved = {key: os.environ.get(key) for key in (*LOCAL_ONLY_ENV, *SINGLE_NODE_DEFAULTS)}
    constant = ray_constants.ENABLE_RAY_CLUSTER
    try:
        yield init_local_ray(**kwargs)
    finally:
        ray.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = constant
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
