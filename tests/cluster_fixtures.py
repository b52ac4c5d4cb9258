"""Ray clusters started the way a user starts them on real machines, here all on 127.0.0.1.

:func:`ray_start_cluster` runs ``ray start --head`` and ``ray start --address ...`` as
subprocesses (``--block``, each in its own session and temporary folder, every port free and on
loopback, token authentication with a token of its own). It never calls ``ray stop``: that
command stops every Ray process of the user on the machine, other people's clusters included.
Instead, each node's session is terminated and any process still naming the cluster's folder
is killed, and the test fails if one survives.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_where(predicate) -> list[int]:
    """Ids of the live processes (read from /proc) whose ``predicate(pid, cmdline, uid)`` holds."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        cmdline = _cmdline(int(entry.name))
        try:
            uid = entry.stat().st_uid
        except OSError:  # gone meanwhile
            continue
        if cmdline and predicate(int(entry.name), cmdline, uid):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _signal_and_wait(pids: list[int], sig: int, grace: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.2)


def kill_processes(pids: list[int], grace: float = 10) -> list[str]:
    """SIGTERM, then SIGKILL after ``grace`` seconds; returns the command lines of the processes
    that were still alive for the SIGKILL."""
    _signal_and_wait(pids, signal.SIGTERM, grace)
    alive = [pid for pid in pids if _alive(pid)]
    stubborn = [_cmdline(pid)[:200] for pid in alive]
    _signal_and_wait(alive, signal.SIGKILL, grace)
    return stubborn


def kill_processes_mentioning(text: str, grace: float = 10) -> list[str]:
    """:func:`kill_processes` of every process whose command line contains ``text``."""
    return kill_processes(processes_where(lambda pid, cmdline, uid: text in cmdline), grace)


@dataclass
class RayStartCluster:
    """A cluster of ``ray start`` nodes: where to reach it and with what environment."""

    folder: Path
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    logs: list[Path] = field(default_factory=list)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The ``ray`` command line against this cluster (its token in the environment)."""
        return subprocess.run([RAY, *args], env=self.env, capture_output=True, text=True, timeout=timeout)


def _node_ports(head: bool) -> list[str]:
    ports = {
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    if head:
        ports["--ray-client-server-port"] = free_port()
    return [item for key, value in ports.items() for item in (key, str(value))]


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _wait_for_nodes(cluster: RayStartCluster, count: int, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc, log in zip(procs, cluster.logs, strict=True):
            assert proc.poll() is None, f"ray start exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        listed = cluster.ray("list", "nodes", "--address", cluster.dashboard_url, "--format", "json",
                             "--filter", "state=ALIVE")  # fmt: skip
        if listed.returncode == 0 and listed.stdout.count('"node_id"') >= count:
            return
        time.sleep(2)
    raise AssertionError(f"{count} Ray nodes did not come up in {timeout:.0f} s: {listed.stderr[-2000:]}")


@contextmanager
def ray_start_cluster(num_workers: int = 1, cpus_per_node: int = 1, env: dict | None = None) -> Iterator[RayStartCluster]:
    """A head and ``num_workers`` worker nodes started with ``ray start``, stopped afterwards."""
    # Short: Ray's Unix sockets live under it, and their paths are limited to ~100 characters.
    folder = Path(tempfile.mkdtemp(prefix="eqlv2-rs-"))
    gcs_port, dashboard_port = free_port(), free_port()
    node_env = {
        **os.environ, **(env or {}),
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
    }  # fmt: skip
    node_env.pop("RAY_ADDRESS", None)
    cluster = RayStartCluster(folder, f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}", node_env)
    procs: list[subprocess.Popen] = []
    try:
        cluster.logs.append(folder / "head.log")
        procs.append(_start_node(
            ["--head", "--port", str(gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
             str(dashboard_port), "--num-cpus", str(cpus_per_node), "--temp-dir", str(folder / "head"),
             *_node_ports(head=True)],
            node_env, cluster.logs[-1],
        ))  # fmt: skip
        _wait_for_nodes(cluster, 1, procs, timeout=300)
        for index in range(num_workers):
            cluster.logs.append(folder / f"worker{index}.log")
            procs.append(_start_node(
                ["--address", cluster.gcs_address, "--num-cpus", str(cpus_per_node),
                 "--temp-dir", str(folder / f"worker{index}"), *_node_ports(head=False)],
                node_env, cluster.logs[-1],
            ))  # fmt: skip
        _wait_for_nodes(cluster, 1 + num_workers, procs, timeout=300)
        yield cluster
    finally:
        for proc in reversed(procs):  # workers first, then the head
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        survivors = kill_processes_mentioning(str(folder))
        shutil.rmtree(folder, ignore_errors=True)
        assert not survivors, f"Ray processes outlived their node's session: {survivors}"
