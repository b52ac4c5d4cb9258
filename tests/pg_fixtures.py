"""A real PostgreSQL server and a real MLflow tracking server backed by it, for one test session.

Both are started by ``configs/cluster/head_services.sh`` (the script a cluster's head runs), on
free loopback ports, in a private temporary folder that is removed afterwards, test failure or
not. PostgreSQL's binaries refuse to run as root: as root (CI), the script runs them as the
system user ``postgres`` that Debian's package creates.

The password of the database role is random and reaches libpq only through ``PGPASSWORD`` in
the environment of whoever connects (:attr:`PostgresServer.env`): the URLs carry none.
Import the fixtures into a test module: ``from pg_fixtures import mlflow_server, postgres``.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cluster_fixtures import free_port

ROOT = Path(__file__).resolve().parents[1]
HEAD_SERVICES = ROOT / "configs/cluster/head_services.sh"


@dataclass(frozen=True)
class PostgresServer:
    """Where the test server listens; ``env`` holds the settings of head_services.sh and PGPASSWORD."""

    port: int
    user: str
    folder: Path
    env: dict[str, str]

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` (optuna or mlflow), without password."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"


def run_head_services(env: dict[str, str], *args: str, timeout: float = 420) -> None:
    """``head_services.sh ARGS`` with ``env``; fails the test with the script's output."""
    proc = subprocess.run(
        ["bash", str(HEAD_SERVICES), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"head_services.sh {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"


def _postgres_missing() -> str | None:
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb") and not shutil.which("initdb"):
        return "PostgreSQL is not installed: run scripts/setup.sh as root (it installs Debian's postgresql)"
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        return "no system user postgres to run PostgreSQL as (Debian's postgresql package creates it)"
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server on 127.0.0.1 with databases ``optuna`` and ``mlflow``."""
    reason = _postgres_missing()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp_path: its parents are private to root, and the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="eqlv2-pg-"))
    folder.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PGPASSWORD": secrets.token_urlsafe(16),
        "EQLV2_SERVICES_DIR": str(folder),
        "EQLV2_PG_PORT": str(free_port()),
        "EQLV2_MLFLOW_PORT": str(free_port()),
        "EQLV2_DB_USER": "eqlv2",
    }
    try:
        run_head_services(env, "start", "postgres")
        yield PostgresServer(int(env["EQLV2_PG_PORT"]), "eqlv2", folder, env)
    finally:
        try:
            run_head_services(env, "stop", "all")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres: PostgresServer) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (backend: the ``mlflow`` database, artifacts: a folder);
    yields its tracking URI."""
    try:
        run_head_services(postgres.env, "start", "mlflow")
        yield f"http://127.0.0.1:{postgres.env['EQLV2_MLFLOW_PORT']}"
    finally:
        run_head_services(postgres.env, "stop", "mlflow")
