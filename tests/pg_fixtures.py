"""A real PostgreSQL server and a real MLflow tracking server backed by it, for one test session.

Both are started by ``configs/cluster/head_services.sh`` (the script a cluster's head runs), on
free loopback ports, in a private temporary folder that is removed afterwards, test failure or
not (``benchmarks/local_services.py``, which ``benchmarks/search_scale.py`` uses too).
PostgreSQL's binaries refuse to run as root: as root (CI), the script runs them as the system
user ``postgres`` that Debian's package creates.

The password of the database role is random and reaches libpq only through ``PGPASSWORD`` in
the environment of whoever connects (:attr:`PostgresServer.env`): the URLs carry none.
Import the fixtures into a test module: ``from pg_fixtures import mlflow_server, postgres``.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from local_services import (  # noqa: E402
    DB_USER,
    HEAD_SERVICES,
    database_url,
    mlflow_uri,
    run_head_services,
    services_env,
)

__all__ = ["HEAD_SERVICES", "PostgresServer", "mlflow_server", "postgres", "run_head_services"]


@dataclass(frozen=True)
class PostgresServer:
    """Where the test server listens; ``env`` holds the settings of head_services.sh and PGPASSWORD."""

    port: int
    user: str
    folder: Path
    env: dict[str, str]

    def url(self, database: str) -> str:
        """SQLAlchemy URL of ``database`` (optuna or mlflow), without password."""
        return database_url(self.env, database)


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
    with services_env("eqlv2-pg-") as env:
        run_head_services(env, "start", "postgres")
        yield PostgresServer(int(env["EQLV2_PG_PORT"]), DB_USER, Path(env["EQLV2_SERVICES_DIR"]), env)


@pytest.fixture(scope="session")
def mlflow_server(postgres: PostgresServer) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 (backend: the ``mlflow`` database, artifacts: a folder);
    yields its tracking URI."""
    try:
        run_head_services(postgres.env, "start", "mlflow")
        yield mlflow_uri(postgres.env)
    finally:
        run_head_services(postgres.env, "stop", "mlflow")
