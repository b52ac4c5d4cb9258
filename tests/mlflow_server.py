"""A real ``mlflow server`` subprocess on a free loopback port, that a test can stop and restart.

The server keeps its SQLite database and artifacts in the folder given, so a restart finds
everything logged before it. Its job executor (GenAI jobs, a pool of extra processes) is switched
off: the tests need the tracking API and the UI only, and starting it costs seconds on 2 cores.

Importing this module switches MLflow's telemetry off (``MLFLOW_DISABLE_TELEMETRY``) for this
process and the servers it starts: there is no internet here, and MLflow 3.17's telemetry thread
pops ``_MLFLOW_TELEMETRY_SESSION_ID`` from ``os.environ`` while requests iterates the environment,
which made a client call fail with ``KeyError: '_MLFLOW_TELEMETRY_SESSION_ID'``. Import it before
``mlflow`` (MLflow starts telemetry at import).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow server`` with a SQLite store and served artifacts in ``folder``.

    Args:
        folder: holds ``mlflow.db``, ``artifacts/`` and the server's log ``server.log``.
        start_timeout: seconds to wait for ``/health`` (the 2-core CI machine is slow).
    """

    def __init__(self, folder: Path, start_timeout: float = 600.0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        """Starts the server and waits until it answers."""
        command = [
            MLFLOW, "server",
            "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}",
            "--artifacts-destination", str(self.folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        log = open(self.folder / "server.log", "ab")
        self._process = subprocess.Popen(
            command, stdout=log, stderr=log, env=env, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server not up after {self.start_timeout} s: {self.log_tail()}")

    def healthy(self) -> bool:
        """Whether ``/health`` answers."""
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stops the server and its children (SIGTERM, then SIGKILL) and waits for the port."""
        if self._process is None:
            return
        try:
            os.killpg(self._process.pid, signal.SIGTERM)
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=20)
        except ProcessLookupError:
            pass
        try:  # children left in the group
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process = None
        assert not self.healthy(), "the mlflow server still answers after stop()"

    def log_tail(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""
