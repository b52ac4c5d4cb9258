"""Where the search's Tune experiments live: a local folder or a remote URI (``s3://``, ``gs://``).

The driver reads and writes its own few files there (state file, latest search, reports) through
the pyarrow file system Tune uses, so a restarted head node finds the search in shared storage.
Credentials never go into the URI: pyarrow reads them from the environment (``AWS_*``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from .options import SearchInputError
from .stores import local_path, prepare_writable_dir

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class TuneStorage:
    """The folder of the Tune experiments: an absolute local path or a remote URI (what Tune gets)."""

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

    def exists(self, *parts: str) -> bool:
        filesystem, path = self._resolve(*parts)
        return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound

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
