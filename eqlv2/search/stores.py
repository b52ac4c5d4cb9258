"""Where a search's results go: store URLs made absolute (Ray workers run in other folders), and
folders proven writable by writing a file (``os.access`` says yes to root even on an immutable one).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from .options import SearchInputError

_SQLITE = "sqlite:///"


def sqlite_url(path: str | os.PathLike) -> str:
    """``sqlite:////abs/path`` of a database file (its folder created)."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE}{path}"


def store_url(value: str | None, default_file: str | os.PathLike, bare_path_is_sqlite: bool = True) -> str:
    """The URL of a store: ``value`` (a relative ``sqlite:///`` made absolute), a bare path as a
    SQLite database (unless ``bare_path_is_sqlite`` is False: MLflow reads it as a file store),
    or when None the SQLite database ``default_file``."""
    if not value:
        return sqlite_url(default_file)
    if value.startswith(_SQLITE) and not value.startswith(_SQLITE + "/"):
        return sqlite_url(value[len(_SQLITE) :])
    if "://" in value or not bare_path_is_sqlite:
        return value
    return sqlite_url(value)


def is_local_uri(uri: str) -> bool:
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
    """Creates the local folder ``path`` and proves it writable by writing a file; returns it
    absolute (None for a remote URI, left to its file system). The one-line SearchInputError
    names ``flag`` and the path."""
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
        raise SearchInputError(f"{flag} {folder} is not writable ({reason}); give a folder you can write to") from None
    return folder
