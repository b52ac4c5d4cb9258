"""A private PostgreSQL and MLflow server for one test session or one benchmark run.

Both are started by ``configs/cluster/head_services.sh`` (the script a cluster's head runs), on
free 127.0.0.1 ports, in a temporary folder that is removed afterwards, failure or not. The
database role's password is random and reaches libpq only through ``PGPASSWORD`` in the
environment :func:`services_env` yields: the URLs of :func:`database_url` and :func:`mlflow_uri`
carry none. Used by ``tests/pg_fixtures.py`` and ``benchmarks/search_scale.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DB_USER", "HEAD_SERVICES", "database_url", "mlflow_uri", "run_head_services", "services_env"]

ROOT = Path(__file__).resolve().parents[1]
HEAD_SERVICES = ROOT / "configs/cluster/head_services.sh"
#: The database role owning the ``optuna`` and ``mlflow`` databases.
DB_USER = "eqlv2"


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_head_services(env: dict[str, str], *args: str, timeout: float = 420) -> None:
    """``head_services.sh ARGS`` with ``env``.

    Raises:
        RuntimeError: the script failed; the message holds its output.
    """
    proc = subprocess.run(
        ["bash", str(HEAD_SERVICES), *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise RuntimeError(f"head_services.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def services_env(prefix: str = "eqlv2-services-") -> Iterator[dict[str, str]]:
    """The environment of ``head_services.sh`` for a private instance (nothing started yet): a new
    folder, free loopback ports, a random ``PGPASSWORD``. On exit every service is stopped and the
    folder removed."""
    # Not under a private temporary folder: as root, the script runs PostgreSQL as user postgres.
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    folder.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PGPASSWORD": secrets.token_urlsafe(16),
        "EQLV2_SERVICES_DIR": str(folder),
        "EQLV2_PG_PORT": str(_free_port()),
        "EQLV2_MLFLOW_PORT": str(_free_port()),
        "EQLV2_DB_USER": DB_USER,
    }
    try:
        yield env
    finally:
        try:
            run_head_services(env, "stop", "all")
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def database_url(env: dict[str, str], database: str) -> str:
    """SQLAlchemy URL of ``database`` (optuna or mlflow) of the instance of ``env``, without password."""
    return f"postgresql://{DB_USER}@127.0.0.1:{env['EQLV2_PG_PORT']}/{database}"


def mlflow_uri(env: dict[str, str]) -> str:
    """The tracking URI of the MLflow server of the instance of ``env``."""
    return f"http://127.0.0.1:{env['EQLV2_MLFLOW_PORT']}"
