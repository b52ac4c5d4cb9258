"""A Ray instance started by ``init_local_ray`` listens on loopback only: every listening TCP
socket of this session's processes (driver, GCS, raylet, agents, workers) is read from
``/proc`` and must be 127.0.0.1 or ::1 (or ::ffff:127.0.0.1, loopback on a dual-stack socket)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
from listening_sockets import descendants, is_loopback, listening_sockets, processes, sys_proc

from eqlv2.search.ray_local import SINGLE_NODE_DEFAULTS, init_local_ray, local_ray

(PREEMPTION_WATCHER_ENV,) = SINGLE_NODE_DEFAULTS

pytestmark = pytest.mark.skipif(not (sys_proc / "net" / "tcp").exists(), reason="needs Linux /proc")


def _session_pids(temp_dir: str) -> dict[int, str]:
    """This process, its descendants and every process naming ``temp_dir``, with command lines."""
    named = {pid for pid, (_, cmd) in processes().items() if temp_dir in cmd}
    return descendants(named | {os.getpid()})


@pytest.fixture
def short_temp_dir():
    """Ray's temp dir: short (Unix socket paths are limited to 107 bytes) and unique to the test."""
    folder = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_every_ray_server_listens_on_loopback_only(short_temp_dir):
    """Ray started as the search starts it (no dashboard head: under load its start times out)."""
    with local_ray(num_cpus=1, include_dashboard=False, _temp_dir=short_temp_dir, log_to_driver=False,
                   configure_logging=False):  # fmt: skip
        import ray

        @ray.remote
        def worker_pid_and_watcher() -> tuple[int, str | None]:
            return os.getpid(), os.environ.get(PREEMPTION_WATCHER_ENV)

        worker, watcher = ray.get(worker_pid_and_watcher.remote())
        assert watcher == "0", "Ray's processes would start Ray Train's preemption watcher"
        sockets = listening_sockets(_session_pids(short_temp_dir))
        owners = " ".join(cmd for _, cmd, _, _ in sockets)
        assert worker in {pid for pid, *_ in sockets}, "the worker's gRPC server was not found"
        for name in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
            assert name in owners, f"no listening socket of {name} found: {sockets}"
        exposed = [s for s in sockets if not is_loopback(s[2])]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None
    assert os.environ.get(PREEMPTION_WATCHER_ENV) is None


def test_a_preemption_watcher_the_user_asks_for_is_kept(monkeypatch):
    """``SINGLE_NODE_DEFAULTS`` are defaults: a value in the user's environment wins, and it is the
    variable Ray Train reads (fail loudly if Ray renames it)."""
    from ray.train.v2._internal import constants  # private: only to guard the variable's name

    assert constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR == PREEMPTION_WATCHER_ENV
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    with local_ray(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False):
        assert os.environ[PREEMPTION_WATCHER_ENV] == "1"
    assert os.environ[PREEMPTION_WATCHER_ENV] == "1"


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"address": "auto"}, "cannot join address='auto'"),
        ({"dashboard_host": "0.0.0.0"}, "dashboard_host='0.0.0.0' is not a loopback address"),
        (
            {"_node_ip_address": "192.0.2.7"},
            "_node_ip_address='192.0.2.7' is not a loopback address",
        ),
    ],
)
def test_non_loopback_arguments_are_refused(kwargs, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
        init_local_ray(**kwargs)


def test_the_private_ray_constant_ray_local_sets_still_exists():
    """``init_local_ray`` sets ``ray._private.ray_constants.ENABLE_RAY_CLUSTER`` (no public API
    chooses the bind address): fail loudly if Ray renames or drops it."""
    from ray._private import ray_constants, services

    assert isinstance(ray_constants.ENABLE_RAY_CLUSTER, bool)
    assert "ENABLE_RAY_CLUSTER" in Path(services.__file__).read_text()


def _listeners_of_this_worker(config: dict) -> None:
    """A Ray Train worker: one all-reduce, then its own listening sockets into ``config["out"]``."""
    import json

    import ray.train
    import torch
    import torch.distributed as dist

    total = torch.tensor([ray.train.get_context().get_world_rank() + 1.0])
    dist.all_reduce(total)
    rank = dist.get_rank()
    sockets = [(ip, port) for _, _, ip, port in listening_sockets({os.getpid(): ""})]
    Path(config["out"], f"rank{rank}.json").write_text(
        json.dumps({"sum": total.item(), "sockets": sockets})
    )
    dist.barrier()  # rank 0's store stays up until every rank has looked


@pytest.mark.parametrize(
    "node_bound", [True, False], ids=["NodeBoundTorchConfig", "ray-TorchConfig"]
)
def test_ray_train_process_group_listens_on_the_node_address_only(
    short_temp_dir, tmp_path, node_bound
):
    """The project's backend binds the TCPStore of rank 0 on the node address (loopback here);
    Ray's own ``TorchConfig`` leaves it on every interface (``::``), the reason for the backend."""
    import listening_sockets as module
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from eqlv2.raytrain.process_group import NodeBoundTorchConfig

    for shipped in (module, sys.modules[__name__]):  # to the workers by value: not importable there
        cloudpickle.register_pickle_by_value(shipped)
    config_cls = NodeBoundTorchConfig if node_bound else TorchConfig
    with local_ray(num_cpus=2, include_dashboard=False, _temp_dir=short_temp_dir, log_to_driver=False,
                   configure_logging=False):  # fmt: skip
        trainer = TorchTrainer(
            _listeners_of_this_worker,
            train_loop_config={"out": str(tmp_path)},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(name="pg", storage_path=str(tmp_path / "results")),
            torch_config=config_cls(backend="gloo"),
        )
        trainer.fit()
    import json

    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [s["sum"] for s in seen] == [3.0, 3.0]
    rank0 = [tuple(s) for s in seen[0]["sockets"]]
    assert len(rank0) >= 2, rank0  # the store's server and gloo's listener
    exposed = [s for s in rank0 if not is_loopback(s[0])]
    if node_bound:
        assert exposed == [], f"rank 0 listens beyond loopback: {rank0}"
    else:
        assert exposed, (
            "Ray's TorchConfig no longer exposes the store: NodeBoundTorchConfig may be dropped"
        )
