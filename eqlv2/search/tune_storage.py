"""Where the search's Tune experiments live: a local folder or a remote URI (``s3://``, ``gs://``).

Ray Tune takes either as its ``storage_path``; the driver reads and writes its own few files
there (the search's state file, the name of the latest search, the ranked reports) through the
same pyarrow file system, so a head node that restarts finds the search in shared storage.
Credentials never go into the URI: pyarrow reads them from the environment (``AWS_*`` for S3,
including ``AWS_ENDPOINT_URL`` for an S3-compatible server).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs

from .options import SearchInputError

__all__ = ["TuneStorage"]

logger = logging.getLogger(__name__)

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class TuneStorage:
    """The folder of the Tune experiments.

    Attributes:
        location: an absolute local path, or a remote URI as given (what Tune gets).
    """

    location: str

    @classmethod
    def parse(cls, value: str | os.PathLike) -> TuneStorage:
        """A local path (made absolute; ``file://`` accepted) or a remote URI, kept as given."""
        text = os.fspath(value)
        if text.startswith("file://"):
            text = text[len("file://") :]
        if _URI.match(text):
            return cls(text.rstrip("/"))
        return cls(str(Path(text).expanduser().resolve()))

    @property
    def is_remote(self) -> bool:
        return bool(_URI.match(self.location))

    def join(self, *parts: str) -> str:
        """``location/part/...``: a path or URI."""
        return "/".join([self.location, *parts])

    def _resolve(self, *parts: str) -> tuple[pyarrow.fs.FileSystem, str]:
        if not self.is_remote:
            return pyarrow.fs.LocalFileSystem(), self.join(*parts)
        filesystem, root = pyarrow.fs.FileSystem.from_uri(self.location)
        return filesystem, "/".join([root, *parts])

    def check_writable(self, flag: str) -> None:
        """Creates the folder and writes a probe file.

        Raises:
            SearchInputError: naming ``flag`` and the location, when either fails.
        """
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
        """Writes ``data`` at ``parts``: atomically on a local disk (a reader never sees half a
        file), as one object upload on a remote store."""
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

    def upload(self, files: list[Path], *parts: str) -> list[str]:
        """Copies local ``files`` into the folder ``parts`` of a remote store; returns where they
        went (a local store: nothing to do, the files' own paths)."""
        if not self.is_remote:
            return [str(f) for f in files]
        filesystem, folder = self._resolve(*parts)
        filesystem.create_dir(folder, recursive=True)
        targets = []
        for file in files:
            pyarrow.fs.copy_files(str(file), f"{folder}/{file.name}", destination_filesystem=filesystem)
            targets.append(self.join(*parts, file.name))
        logger.info("Copied %d report file(s) to %s", len(files), self.join(*parts))
        return targets
