"""Fixtures of the search tests: a real local Ray cluster, shut down afterwards.

Import the fixtures into a test module (``from search_fixtures import ray_local``); the lead's
``conftest.py`` is left alone.
"""

from __future__ import annotations

import os
import socket

import pytest


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray cluster of 2 CPUs for one test module, its dashboard on a free loopback port
    (it serves the State API Ray Train's placement-group cleaner needs, as in a search)."""
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Ray workers unpickle functions defined in test modules by module name: make tests/ importable
    # for them (they inherit this environment).
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if tests_dir not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([tests_dir, *[p for p in paths if p]])
    if ray.is_initialized():
        ray.shutdown()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(
        address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
        log_to_driver=False, configure_logging=False,
    )  # fmt: skip
    try:
        yield ray
    finally:
        ray.shutdown()
