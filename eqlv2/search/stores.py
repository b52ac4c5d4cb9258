"""Where a search's results go: store URLs made absolute (Ray workers run in other folders),
folders proven writable by writing a file (``os.access`` says yes to root even on an immutable
one), and the :class:`TuneStorage` of the Tune experiments, local or remote.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from .options import SearchInputError

logger = logging.getLogger(__name__)

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
    return value if "://" in value or not bare_path_is_sqlite else sqlite_url(value)


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


@dataclass(frozen=True)
class TuneStorage:
    """The folder of the Tune experiments: an absolute local path, or a remote URI (``s3://``,
    ``gs://``) as given. The driver reads and writes its own few files there through the pyarrow
    file system Tune uses, so a restarted head node finds the search in shared storage;
    credentials stay in the environment (``AWS_*``)."""

    location: str
    is_remote: bool

    @classmethod
    def parse(cls, value: str | os.PathLike) -> TuneStorage:
        local = local_path(value)
        if local is None:
            return cls(os.fspath(value).rstrip("/"), is_remote=True)
        return cls(str(local.resolve()), is_remote=False)

    def join(self, *parts: str) -> str:
        return "/".join([self.location, *parts])

    def _resolve(self, *parts: str) -> tuple[pyarrow.fs.FileSystem, str]:
        if not self.is_remote:
            return pyarrow.fs.LocalFileSystem(), self.join(*parts)
        filesystem, root = pyarrow.fs.FileSystem.from_uri(self.location)
        return filesystem, "/".join([root, *parts])

    def check_writable(self, flag: str) -> None:
        """Creates the folder and writes a probe file; a SearchInputError names ``flag``."""
        if not self.is_remote:
            prepare_writable_dir(self.location, flag)
            return
        try:
            filesystem, root = self._resolve()
            filesystem.create_dir(root, recursive=True)
            with filesystem.open_output_stream(f"{root}/.eqlv2-write-probe") as probe:
                probe.write(b"ok")
            filesystem.delete_file(f"{root}/.eqlv2-write-probe")
        except (OSError, ValueError) as error:
            raise SearchInputError(f"{flag}: cannot write to {self.location}: {error}") from error

    def read_json(self, *parts: str) -> dict:
        """The JSON object stored at ``parts``; ``{}`` when missing or unreadable."""
        filesystem, path = self._resolve(*parts)
        try:
            with filesystem.open_input_stream(path) as stream:
                data = json.loads(stream.read())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_json(self, data: dict, *parts: str) -> None:
        """Writes ``data`` at ``parts``: atomically on a local disk, as one upload on a remote store."""
        filesystem, path = self._resolve(*parts)
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        text = json.dumps(data, indent=2, default=str).encode()
        if self.is_remote:
            with filesystem.open_output_stream(path) as stream:
                stream.write(text)
            return
        partial = Path(path).with_name(f".{Path(path).name}.partial")
        partial.write_bytes(text)
        os.replace(partial, path)

    def upload(self, files: list[Path], *parts: str) -> None:
        """Copies local ``files`` into the folder ``parts`` of a remote store (local: nothing to do)."""
        if not self.is_remote:
            return
        filesystem, folder = self._resolve(*parts)
        filesystem.create_dir(folder, recursive=True)
        for file in files:
            pyarrow.fs.copy_files(str(file), f"{folder}/{file.name}", destination_filesystem=filesystem)
        logger.info("Copied %d report file(s) to %s", len(files), self.join(*parts))
