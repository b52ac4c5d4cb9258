"""The URLs of a search's stores (Optuna study, MLflow tracking), made absolute in one place.

Ray workers run in other folders, so every local path is made absolute here. Every store URL a
user gives passes through :func:`store_url`, the one place to redact or check URLs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_local_uri", "sqlite_url", "store_url"]

_SQLITE = "sqlite:///"


def sqlite_url(path: str | os.PathLike) -> str:
    """``sqlite:////abs/path`` of a database file (its folder created)."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE}{path}"


def store_url(value: str | None, default_file: str | os.PathLike, bare_path_is_sqlite: bool = True) -> str:
    """The URL of a store.

    Args:
        value: a URL (``sqlite:///relative.db`` is made absolute, others are kept), a file path
            (a SQLite database when ``bare_path_is_sqlite``, else kept), or None.
        default_file: the SQLite database used when ``value`` is None.
        bare_path_is_sqlite: False for MLflow, which reads a bare path as a file store.
    """
    if not value:
        return sqlite_url(default_file)
    if value.startswith(_SQLITE) and not value.startswith(_SQLITE + "/"):
        return sqlite_url(value[len(_SQLITE) :])
    if "://" in value or not bare_path_is_sqlite:
        return value
    return sqlite_url(value)


def is_local_uri(uri: str) -> bool:
    """Whether ``uri`` is a store on this machine's file system (SQLite or a folder)."""
    return uri.startswith("sqlite") or uri.startswith("file:") or "://" not in uri
