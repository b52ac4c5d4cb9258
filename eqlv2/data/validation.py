"""Input checks shared by the dataset loaders, with errors that name the file and the record.

Conventions (the same for LVIS JSON and OpenImages CSV files):

* A file that cannot be parsed, a missing key or column, an unknown category, a box with negative
  size or lying outside its image, an invalid polygon: :class:`DatasetFormatError` (a
  ``ValueError``) whose message starts with the file name and names the record, e.g.
  ``lvis_v1_train.json: annotation id 17 (image 4): bbox [3.0, 4.0, 0.0, 5.0] ...``.
* A missing image file: ``FileNotFoundError`` naming the image file and its record.
* A box of zero width or height: skipped, with one warning per file giving the count (detectron2
  drops empty boxes during training the same way).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetFormatError",
    "BOX_TOLERANCE",
    "read_json",
    "require_keys",
    "check_csv_header",
    "is_number",
    "check_xywh_box",
    "warn_skipped",
]

#: How far (in pixels) a box may stick out of its image before it is an error. Annotation tools
#: often round the far edge up by a fraction of a pixel.
BOX_TOLERANCE = 1.0


class DatasetFormatError(ValueError):
    """A dataset file is malformed; the message names the file and the offending record."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{os.path.basename(self.path)}: {message} (file {self.path})")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file.

    Raises:
        FileNotFoundError: the file does not exist.
        DatasetFormatError: it is not valid JSON (the message gives the line and column).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(path, f"not valid JSON: {error}") from None
        except UnicodeDecodeError as error:
            raise DatasetFormatError(path, f"not UTF-8 text: {error}") from None


def require_keys(path: str | os.PathLike, record: Any, keys: Iterable[str], where: str) -> None:
    """Check that ``record`` is a dict with all ``keys``; ``where`` names it in the error."""
    if not isinstance(record, dict):
        raise DatasetFormatError(path, f"{where}: expected an object, got {type(record).__name__}")
    missing = [key for key in keys if key not in record]
    if missing:
        raise DatasetFormatError(path, f"{where}: missing key(s) {missing}")


def check_csv_header(
    path: str | os.PathLike, header: Sequence[str] | None, required: Sequence[str]
) -> dict[str, int]:
    """Column index of each ``required`` column in a CSV ``header`` row.

    Raises:
        DatasetFormatError: the file is empty or some required columns are missing.
    """
    if not header:
        raise DatasetFormatError(
            path, f"empty file, expected a header with columns {list(required)}"
        )
    columns = [name.strip().lstrip("\ufeff") for name in header]
    missing = [name for name in required if name not in columns]
    if missing:
        raise DatasetFormatError(
            path, f"missing column(s) {missing} in header {columns}; expected {list(required)}"
        )
    return {name: columns.index(name) for name in required}


def is_number(value: Any) -> bool:
    """True for a finite int or float (bools are not numbers here)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_xywh_box(
    path: str | os.PathLike, bbox: Any, width: float, height: float, where: str
) -> bool:
    """Check an ``[x, y, w, h]`` box against its image size.

    Returns:
        False when the box has zero width or height (the caller skips it), True otherwise.

    Raises:
        DatasetFormatError: not 4 finite numbers, negative size, or outside the image by more
            than :data:`BOX_TOLERANCE` pixels.
    """
    if not isinstance(bbox, list | tuple) or len(bbox) != 4 or not all(map(is_number, bbox)):
        raise DatasetFormatError(
            path, f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]"
        )
    x, y, w, h = (float(value) for value in bbox)
    if w < 0 or h < 0:
        raise DatasetFormatError(path, f"{where}: bbox {bbox!r} has negative width or height")
    if w == 0 or h == 0:
        return False
    tol = BOX_TOLERANCE
    if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
        raise DatasetFormatError(
            path,
            f"{where}: bbox {bbox!r} (x, y, w, h) lies outside the {width:g}x{height:g} image",
        )
    return True


def warn_skipped(path: str | os.PathLike, count: int, what: str) -> None:
    """One warning for ``count`` records of ``path`` skipped because of ``what``."""
    if count:
        logger.warning(
            "%s: skipped %d %s (file %s)", os.path.basename(os.fspath(path)), count, what, path
        )
