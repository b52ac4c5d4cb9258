"""``ray up`` / ``ray submit`` / ``ray down`` with configs/cluster/local.yaml, the head being this
machine reached over SSH on the loopback interface, exactly as a user runs them.

The test starts its own ``sshd`` on 127.0.0.1 (a free port, its own host key, public-key login
only) and logs in as a user it creates for the purpose: the "head node" then runs as that user,
so the ``ray stop`` that the cluster launcher runs on the head (and ``ray down`` runs there too)
cannot stop anybody else's Ray processes on this machine. Ray's launcher has no SSH port setting;
the config reaches the port through ``auth.ssh_proxy_command`` (``nc``), as one reaches a head
behind a bastion.

The config is configs/cluster/local.yaml with only what this machine needs changed: the head's
address and user, free ports for Ray, a user-writable dataset folder, and the test's virtual
environment in place of ~/eqlv2-venv (scripts/setup.sh then finds it up to date and returns).
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cluster_fixtures import (
    RAY,
    _node_ports,
    free_port,
    kill_processes,
    kill_processes_mentioning,
    processes_where,
)

ROOT = Path(__file__).resolve().parents[1]
USER = "eqlv2-rayup"
SSHD = "/usr/sbin/sshd"


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root: creates the head node's user and runs sshd"
    for tool in (SSHD, "rsync", "nc", "ssh-keygen", "useradd", "setfacl"):
        if not shutil.which(tool):
            return f"{tool} not found: run scripts/setup.sh as root (openssh-server, rsync, netcat-openbsd, acl)"
    return None


def _run(*command: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert proc.returncode == 0, f"{' '.join(command)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _create_user(public_key: str) -> Path:
    """The head node's user (``*`` password: no password login, account not locked)."""
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        _run("useradd", "--create-home", "--shell", "/bin/bash", USER)
    _run("usermod", "-p", "*", USER)
    entry = pwd.getpwnam(USER)
    home = Path(entry.pw_dir)
    ssh = home / ".ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(public_key)
    for path in (ssh, ssh / "authorized_keys"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    (ssh / "authorized_keys").chmod(0o600)
    return home


def _grant_traverse(paths: list[Path]) -> list[tuple[Path, bool]]:
    """Lets the head node's user traverse the private folders above ``paths`` (an ACL entry for
    that user alone, search permission only: the interpreter of a pyenv build or the checkout may
    live under /root); returns (folder, had an ACL before) for :func:`_revoke_traverse`."""
    changed: list[tuple[Path, bool]] = []
    for path in paths:
        for folder in reversed(path.resolve().parents):
            if folder.stat().st_mode & 0o001 or folder in [f for f, _ in changed]:
                continue
            had_acl = bool(_run("getfacl", "--skip-base", "--absolute-names", str(folder)).stdout.strip())
            _run("setfacl", "-m", f"u:{USER}:x", str(folder))
            changed.append((folder, had_acl))
    return changed


def _revoke_traverse(changed: list[tuple[Path, bool]]) -> None:
    for folder, had_acl in changed:
        # Back to the permissions as they were: the entry alone, or every extended entry (mask).
        command = ["setfacl", "-x", f"u:{USER}"] if had_acl else ["setfacl", "-b"]
        subprocess.run([*command, str(folder)], capture_output=True)


def _kill_user_processes() -> None:
    uid = pwd.getpwnam(USER).pw_uid
    kill_processes(processes_where(lambda pid, cmdline, owner: owner == uid))


def _start_sshd(folder: Path, port: int) -> subprocess.Popen:
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key"))
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host_key'}\nPidFile {folder / 'sshd.pid'}\n"
        f"AllowUsers {USER}\nPubkeyAuthentication yes\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\nAllowTcpForwarding yes\n"
        "MaxStartups 50\nMaxSessions 50\nSubsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config)], stdout=open(folder / "sshd.log", "w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, (folder / "sshd.log").read_text()
        if subprocess.run(["nc", "-z", "127.0.0.1", str(port)]).returncode == 0:
            return proc
        time.sleep(0.5)
    raise AssertionError("sshd did not listen: " + (folder / "sshd.log").read_text())


@pytest.fixture(scope="module")
def ssh_head() -> Iterator[dict]:
    """An sshd on 127.0.0.1 that lets the test's key log in as the head node's user."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="eqlv2-up-"))
    key = folder / "id_ed25519"
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    sshd, granted = None, []
    try:
        home = _create_user((folder / "id_ed25519.pub").read_text())
        granted = _grant_traverse([Path(sys.executable).resolve(), Path(sys.prefix), ROOT])
        probe = subprocess.run(
            ["runuser", "-u", USER, "--", sys.executable, "-c", "import eqlv2, ray"],
            capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip(f"the head node's user {USER} cannot use this virtual environment ({sys.prefix}): "
                        f"a parent folder is private? {probe.stderr[-500:]}")  # fmt: skip
        port = free_port()
        sshd = _start_sshd(folder, port)
        yield {"folder": folder, "key": key, "port": port, "home": home}
    finally:
        if sshd is not None:
            sshd.terminate()
            sshd.wait(timeout=30)
        _kill_user_processes()
        _revoke_traverse(granted)
        subprocess.run(["userdel", "--remove", USER], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def launcher_config(head: dict, gcs_port: int, dashboard_port: int, token_file: Path) -> dict:
    """configs/cluster/local.yaml for a head on 127.0.0.1 (see the module docstring)."""
    config = yaml.safe_load((ROOT / "configs/cluster/local.yaml").read_text())
    venv = sys.prefix
    temp_dir = f"/tmp/eqlv2-rayup-{gcs_port}"
    config["cluster_name"] = f"eqlv2-up-{gcs_port}"
    config["provider"].update(head_ip="127.0.0.1", worker_ips=[])
    config["max_workers"] = 0
    config["auth"] = {
        "ssh_user": USER,
        "ssh_private_key": str(head["key"]),
        "ssh_proxy_command": f"nc 127.0.0.1 {head['port']}",
    }
    config["file_mounts"] = {"~/eqlv2": str(ROOT), "~/.ray/auth_token": str(token_file)}

    def local(command: str) -> str:
        return (command.replace("\\$HOME/eqlv2-venv", venv).replace("$HOME/eqlv2-venv", venv)
                .replace("/mnt/shared/datasets", f"{head['home']}/datasets"))  # fmt: skip

    config["setup_commands"] = [local(c) for c in config["setup_commands"]]
    ports = " ".join(_node_ports(head=True))
    config["head_start_ray_commands"] = [
        c.replace(
            "--port=6379",
            f"--port={gcs_port} --node-ip-address=127.0.0.1 --dashboard-port={dashboard_port} --num-cpus=2 "
            f"--temp-dir={temp_dir} --disable-usage-stats {ports}",
        )
        for c in config["head_start_ray_commands"]
    ]
    return config


@pytest.mark.slow
def test_ray_up_submit_down_on_a_loopback_head(ssh_head, tmp_path):
    from test_cluster_configs import validate_launcher_config

    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    gcs_port = free_port()
    config = launcher_config(ssh_head, gcs_port, free_port(), token_file)
    validate_launcher_config(config)
    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0")
    results = f"{ssh_head['home']}/runs"

    def ray(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run(
            [RAY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )

    try:
        up = ray("up", "-y", "--no-config-cache", "--log-style", "record", str(config_file))
        assert up.returncode == 0, up.stdout[-5000:] + up.stderr[-3000:]
        submit = ray(
            "submit", "--log-style", "record", str(config_file), "tune/search.py", "--",
            "--ray-address", f"127.0.0.1:{gcs_port}", "--smoke", "--num-trials", "1", "--baseline", "none", "--noise-seeds", "0",
            "--workers-per-trial", "1", "--results-dir", results, "--name", "ray_up",
        )  # fmt: skip
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-6000:]
        assert re.search(r"^\| 1 +\| .* \| complete", output, re.M), output[-4000:]
        assert (Path(results) / "ray_results/ray_up").is_dir()
    finally:
        down = ray("down", "-y", "--log-style", "record", str(config_file), timeout=300)
        leftovers = kill_processes_mentioning(f"/tmp/eqlv2-rayup-{gcs_port}")
        shutil.rmtree(f"/tmp/eqlv2-rayup-{gcs_port}", ignore_errors=True)
        for suffix in ("state", "lock"):  # the local provider's record of the cluster
            Path(f"/tmp/ray/cluster-{config['cluster_name']}.{suffix}").unlink(missing_ok=True)
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
    assert not leftovers, f"ray down left Ray processes running: {leftovers}"
