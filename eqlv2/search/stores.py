"""Where a search's results go: its folders checked, its stores' URLs made absolute, in one place.

Ray workers run in other folders, so every local path is made absolute here. Every store URL a
user gives passes through :func:`store_url`; every folder through :func:`prepare_writable_dir`,
which creates it and proves it writable by writing a file (``os.access`` says yes to root even on
an immutable folder).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .options import SearchInputError

__all__ = ["is_local_uri", "local_path", "prepare_writable_dir", "sqlite_url", "store_url"]

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


def local_path(path: str | os.PathLike) -> Path | None:
    """The local folder ``path`` names, or None for a remote URI (``s3://``, ``gs://``, ...)."""
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        return None
    return Path(text).expanduser()


def prepare_writable_dir(path: str | os.PathLike, flag: str) -> Path | None:
    """Creates the folder ``path`` (and its parents) and proves it writable by writing a file.

    Args:
        path: a local folder or ``file://`` URI; remote URIs (``s3://...``) are left to their
            file system and return None.
        flag: the option that gave it (``--results-dir``), named in the error.

    Returns:
        The absolute folder, or None for a remote URI.

    Raises:
        SearchInputError: one line naming the flag and the path: a file is in the way, the
            folder cannot be created, or a file cannot be written in it.
    """
    local = local_path(path)
    if local is None:
        return None
    folder = local.resolve()
    for part in (folder, *folder.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == folder else f"cannot be created: {part} is a file"
            raise SearchInputError(f"{flag} {folder} {what}; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".eqlv2-write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise SearchInputError(
            f"{flag} {folder} is not writable ({reason}); give a folder you can write to"
        ) from None
    return folder
