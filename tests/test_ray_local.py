"""A Ray instance started by ``init_local_ray`` listens on loopback only: every listening TCP
socket of this session's processes (driver, GCS, raylet, agents, workers) is read from
``/proc`` and must be 127.0.0.1 or ::1 (or ::ffff:127.0.0.1, loopback on a dual-stack socket)."""

from __future__ import annotations

import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from eqlv2.search.ray_local import init_local_ray, local_ray

sys_proc = Path("/proc")
pytestmark = pytest.mark.skipif(not (sys_proc / "net" / "tcp").exists(), reason="needs Linux /proc")


def _listening_inodes() -> dict[str, tuple[str, int]]:
    """``{socket inode: (ip, port)}`` of every listening TCP socket of the machine."""
    out = {}
    for name, width in (("tcp", 8), ("tcp6", 32)):
        for line in (sys_proc / "net" / name).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = local.split(":")
            raw = bytes.fromhex(hex_ip)
            # /proc prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, width // 2, 4))
            out[inode] = (str(ipaddress.ip_address(words)), int(hex_port, 16))
    return out


def _processes() -> dict[int, tuple[int, str]]:
    """``{pid: (parent pid, command line)}`` of every process."""
    out = {}
    for entry in sys_proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(entry.name)] = (parent, cmdline)
    return out


def _session_pids(temp_dir: str) -> dict[int, str]:
    """This process, its descendants and every process naming ``temp_dir``, with command lines."""
    procs = _processes()
    chosen = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd} | {os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in procs.items() if parent in chosen} - chosen
        chosen |= children
        grew = bool(children)
    return {pid: procs[pid][1] for pid in chosen if pid in procs}


def _listening_sockets(pids: dict[int, str]) -> list[tuple[int, str, str, int]]:
    """``(pid, command, ip, port)`` of every listening TCP socket of ``pids``."""
    listening = _listening_inodes()
    found = []
    for pid, cmd in pids.items():
        try:
            links = [os.readlink(fd) for fd in (sys_proc / str(pid) / "fd").iterdir()]
        except OSError:
            continue
        for link in links:
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, cmd[:120], *listening[inode]))
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


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
        def worker_pid() -> int:
            return os.getpid()

        worker = ray.get(worker_pid.remote())
        sockets = _listening_sockets(_session_pids(short_temp_dir))
        owners = " ".join(cmd for _, cmd, _, _ in sockets)
        assert worker in {pid for pid, *_ in sockets}, "the worker's gRPC server was not found"
        for name in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent"):
            assert name in owners, f"no listening socket of {name} found: {sockets}"
        exposed = [s for s in sockets if not _is_loopback(s[2])]
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") is None


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
