"""The listening TCP sockets of a set of processes, read from Linux's ``/proc`` (no psutil in
the project's environment): which addresses a search's processes (driver, Ray's GCS, raylet,
agents, workers) listen on."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

sys_proc = Path("/proc")


def listening_inodes() -> dict[str, tuple[str, int]]:
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


def processes() -> dict[int, tuple[int, str]]:
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


def descendants(pids: set[int]) -> dict[int, str]:
    """``pids`` and all their descendants, with command lines."""
    procs = processes()
    chosen = set(pids)
    grew = True
    while grew:
        children = {pid for pid, (parent, _) in procs.items() if parent in chosen} - chosen
        chosen |= children
        grew = bool(children)
    return {pid: procs[pid][1] for pid in chosen if pid in procs}


def listening_sockets(pids: dict[int, str]) -> list[tuple[int, str, str, int]]:
    """``(pid, command, ip, port)`` of every listening TCP socket of ``pids``."""
    listening = listening_inodes()
    found = []
    for pid, cmd in pids.items():
        for link in _fd_links(pid):
            inode = link[len("socket:[") : -1] if link.startswith("socket:[") else None
            if inode in listening:
                found.append((pid, cmd[:120], *listening[inode]))
    return found


def _fd_links(pid: int) -> list[str]:
    """What the open file descriptors of ``pid`` point to; those closed meanwhile are skipped
    (for the calling process, the descriptor that lists its folder is one of them)."""
    links = []
    try:
        fds = list((sys_proc / str(pid) / "fd").iterdir())
    except OSError:
        return links
    for fd in fds:
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return links


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
