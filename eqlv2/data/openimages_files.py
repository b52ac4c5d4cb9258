"""Readers of the official OpenImages Challenge 2019 files: one per format, shared by the dataset
loader (:mod:`eqlv2.data.openimages`) and the evaluator (:mod:`eqlv2.evaluation.openimages`).

The files, all in one folder ``root``::

    challenge-2019-classes-description-500.csv            LabelName,DisplayName (no header)
    challenge-2019-label500-hierarchy.json                {"LabelName": "/m/0bl9f", "Subcategory": [...]}
    challenge-2019-{train,validation}-detection-bbox.csv  ImageID,Source,LabelName,Confidence,
                                                          XMin,XMax,YMin,YMax,IsOccluded,IsTruncated,
                                                          IsGroupOf,IsDepiction,IsInside
    challenge-2019-{train,validation}-detection-human-imagelabels.csv
                                                          ImageID,Source,LabelName,Confidence
    images/{train,validation}/<ImageID>.jpg

Every reader raises :class:`~eqlv2.data.validation.DatasetFormatError` naming the file and the line
for a malformed record, and ``FileNotFoundError`` for a missing file.

The class hierarchy follows the Challenge's rule (``oid_hierarchical_labels_expansion.py``): only
``Subcategory`` edges make a class the parent of another; ``Part`` lists (a wheel is part of a car,
not a kind of car) are not followed. The top node ("Entity", ``/m/0bl9f``) is nobody's ancestor.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

from .validation import DatasetFormatError, check_csv_header, read_json, warn_skipped

__all__ = [
    "BBOX_COLUMNS",
    "CLASSES_CSV",
    "FLAG_KEYS",
    "HIERARCHY_JSON",
    "IMAGE_LABEL_COLUMNS",
    "NORM_TOLERANCE",
    "ROOT_LABEL",
    "SPLITS",
    "BoxRow",
    "ClassHierarchy",
    "OpenImagesFiles",
    "read_boxes",
    "read_classes",
    "read_hierarchy",
    "read_image_labels",
]

CLASSES_CSV = "challenge-2019-classes-description-500.csv"
HIERARCHY_JSON = "challenge-2019-label500-hierarchy.json"
#: LabelName of the root of the hierarchy ("Entity").
ROOT_LABEL = "/m/0bl9f"
BBOX_COLUMNS = (
    "ImageID", "Source", "LabelName", "Confidence", "XMin", "XMax", "YMin", "YMax",
    "IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside",
)  # fmt: skip
IMAGE_LABEL_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence")
#: Columns a bbox CSV must have; the other flag columns are optional (absent: False).
_REQUIRED_BBOX_COLUMNS = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
#: Box flags in the order of :data:`BoxRow` ``flags``, and their columns.
FLAG_KEYS = ("is_occluded", "is_truncated", "is_group_of", "is_depiction", "is_inside")
_FLAG_COLUMNS = ("IsOccluded", "IsTruncated", "IsGroupOf", "IsDepiction", "IsInside")
#: Normalized coordinates may leave [0, 1] by this much (rounding in the official files).
NORM_TOLERANCE = 1e-3
#: Official split names; "val" is accepted for "validation".
SPLITS = {"train": "train", "validation": "validation", "val": "validation"}

#: One box of a bbox CSV: (category index, xmin, ymin, xmax, ymax, flags in FLAG_KEYS order),
#: coordinates normalized to [0, 1].
BoxRow = tuple[int, float, float, float, float, tuple[bool, ...]]


@dataclass(frozen=True)
class OpenImagesFiles:
    """Paths of the official files of one split under ``root``."""

    root: str
    split: str
    classes_csv: str
    hierarchy_json: str
    bbox_csv: str
    image_labels_csv: str
    image_root: str

    @classmethod
    def at(cls, root: str | os.PathLike, split: str) -> OpenImagesFiles:
        """The files of ``split`` ("train", "validation" or "val") in ``root``."""
        if split not in SPLITS:
            raise ValueError(
                f"unknown OpenImages split {split!r}; expected one of {sorted(SPLITS)}"
            )
        split = SPLITS[split]
        root = os.fspath(root)
        return cls(
            root=root,
            split=split,
            classes_csv=os.path.join(root, CLASSES_CSV),
            hierarchy_json=os.path.join(root, HIERARCHY_JSON),
            bbox_csv=os.path.join(root, f"challenge-2019-{split}-detection-bbox.csv"),
            image_labels_csv=os.path.join(
                root, f"challenge-2019-{split}-detection-human-imagelabels.csv"
            ),
            image_root=os.path.join(root, "images", split),
        )

    def metadata(self) -> dict[str, str]:
        """The file metadata keys of a registered split (read by the OpenImages evaluator)."""
        return {
            "classes_csv": self.classes_csv,
            "bbox_csv": self.bbox_csv,
            "image_labels_csv": self.image_labels_csv,
            "hierarchy_json": self.hierarchy_json,
            "image_root": self.image_root,
        }


@contextlib.contextmanager
def _open_csv(path: str) -> Iterator[TextIO]:
    """Open a CSV file; undecodable bytes or NUL characters become a :class:`DatasetFormatError`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"OpenImages file not found: {path}")
    with open(path, newline="", encoding="utf-8") as handle:
        try:
            yield handle
        except (UnicodeDecodeError, csv.Error) as error:
            raise DatasetFormatError(path, f"not a readable UTF-8 CSV file: {error}") from None


def read_classes(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """LabelNames (MIDs) and display names of the classes CSV, in file order.

    Raises:
        DatasetFormatError: a row is not ``LabelName,DisplayName``, or a LabelName repeats.
    """
    path = os.fspath(path)
    mids: list[str] = []
    names: list[str] = []
    with _open_csv(path) as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            if len(row) != 2 or not row[0].startswith("/"):
                raise DatasetFormatError(
                    path, f"line {line}: expected 'LabelName,DisplayName', got {row}"
                )
            if row[0] in mids:
                raise DatasetFormatError(path, f"line {line}: duplicate LabelName {row[0]}")
            mids.append(row[0])
            names.append(row[1])
    if not mids:
        raise DatasetFormatError(path, "no classes")
    return mids, names


@dataclass(frozen=True)
class ClassHierarchy:
    """All ancestors and all descendants of each label of an OpenImages hierarchy JSON.

    Only ``Subcategory`` edges count (the Challenge's rule). A label may sit under several
    parents; its ancestors are the union over its places. The top node ("Entity") is nobody's
    ancestor or descendant and has no entry.
    """

    ancestors: Mapping[str, frozenset[str]]
    descendants: Mapping[str, frozenset[str]]

    @classmethod
    def from_dict(cls, tree: Any, path: str = "hierarchy") -> ClassHierarchy:
        """From a parsed hierarchy JSON; ``path`` names it in errors.

        Raises:
            DatasetFormatError: a node without a ``LabelName`` or a ``Subcategory`` that is not a
                list.
        """
        ancestors: dict[str, set[str]] = {}
        descendants: dict[str, set[str]] = {}

        def visit(node: Any, parents: tuple[str, ...], where: str) -> None:
            label = _node_label(path, node, where)
            ancestors.setdefault(label, set()).update(parents)
            descendants.setdefault(label, set())
            for parent in parents:
                descendants[parent].add(label)
            for index, child in enumerate(_subcategories(path, node, where)):
                visit(child, (*parents, label), f"{label}.Subcategory[{index}]")

        top = _node_label(path, tree, "root")
        for index, child in enumerate(_subcategories(path, tree, "root")):
            visit(child, (), f"{top}.Subcategory[{index}]")
        return cls(
            {k: frozenset(v) for k, v in ancestors.items()},
            {k: frozenset(v) for k, v in descendants.items()},
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassHierarchy:
        """Read a hierarchy JSON file (see :meth:`from_dict`)."""
        path = os.fspath(path)
        return cls.from_dict(read_json(path), path)

    @property
    def labels(self) -> frozenset[str]:
        """Every label of the hierarchy except the top node."""
        return frozenset(self.ancestors)

    def up(self, label: str) -> frozenset[str]:
        """``label`` and its ancestors."""
        return self.ancestors.get(label, frozenset()) | {label}

    def down(self, label: str) -> frozenset[str]:
        """``label`` and its descendants."""
        return self.descendants.get(label, frozenset()) | {label}


def _node_label(path: str, node: Any, where: str) -> str:
    if not isinstance(node, dict) or not isinstance(node.get("LabelName"), str):
        raise DatasetFormatError(
            path, f"{where}: hierarchy node without a 'LabelName': {str(node)[:80]}"
        )
    return node["LabelName"]


def _subcategories(path: str, node: dict, where: str) -> list:
    children = node.get("Subcategory", [])
    if not isinstance(children, list):
        raise DatasetFormatError(path, f"{where} {node['LabelName']}: 'Subcategory' must be a list")
    return children


def read_hierarchy(path: str | os.PathLike) -> Mapping[str, frozenset[str]]:
    """Ancestors of every node of the hierarchy JSON (``Subcategory`` edges), the root excluded."""
    return ClassHierarchy.load(path).ancestors


def _row_error(path: str, line: int, row: list[str], message: str) -> DatasetFormatError:
    image = f" (ImageID {row[0]})" if row else ""
    return DatasetFormatError(path, f"line {line}{image}: {message}")


def _box_of_row(
    path: str, line: int, row: list[str], col: dict[str, int]
) -> tuple[float, float, float, float]:
    """``(xmin, ymin, xmax, ymax)`` of a bbox CSV row, checked to be normalized and not inverted."""
    try:
        x0, x1 = float(row[col["XMin"]]), float(row[col["XMax"]])
        y0, y1 = float(row[col["YMin"]]), float(row[col["YMax"]])
    except ValueError:
        coords = [row[col[name]] for name in ("XMin", "XMax", "YMin", "YMax")]
        raise _row_error(path, line, row, f"non-numeric coordinates {coords}") from None
    low, high = -NORM_TOLERANCE, 1 + NORM_TOLERANCE
    if not all(low <= value <= high for value in (x0, x1, y0, y1)):
        raise _row_error(
            path,
            line,
            row,
            f"box XMin={x0} XMax={x1} YMin={y0} YMax={y1} lies outside the image "
            "(normalized coordinates must be in [0, 1])",
        )
    if x1 < x0 or y1 < y0:
        raise _row_error(path, line, row, f"inverted box XMin={x0} XMax={x1} YMin={y0} YMax={y1}")
    return x0, y0, x1, y1


def read_boxes(
    path: str | os.PathLike, index_of: Mapping[str, int], drop_empty: bool = True
) -> dict[str, list[BoxRow]]:
    """Boxes of a bbox CSV per ImageID, in file order (see :data:`BoxRow`).

    Args:
        index_of: LabelName -> category index; every LabelName of the file must be in it.
        drop_empty: skip boxes of zero width or height (one warning with their count), as the
            training loader needs; the evaluator keeps them, as the official metric counts them.

    Raises:
        DatasetFormatError: missing columns, a short row, a non-numeric coordinate, an unknown
            LabelName, inverted or out-of-image coordinates.
    """
    path = os.fspath(path)
    boxes: dict[str, list[BoxRow]] = defaultdict(list)
    empty = 0
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        col = check_csv_header(path, header, _REQUIRED_BBOX_COLUMNS)
        present = [name.strip().lstrip("\ufeff") for name in header]
        flag_cols = [present.index(c) if c in present else None for c in _FLAG_COLUMNS]
        width = len(header)
        for line, row in enumerate(reader, start=2):
            if len(row) != width:
                if not row:
                    continue
                raise _row_error(path, line, row, f"{len(row)} fields, the header has {width}")
            label = row[col["LabelName"]]
            if label not in index_of:
                raise _row_error(path, line, row, f"unknown LabelName {label!r}")
            x0, y0, x1, y1 = _box_of_row(path, line, row, col)
            if drop_empty and (x1 == x0 or y1 == y0):
                empty += 1
                continue
            flags = tuple(i is not None and row[i].strip() in ("1", "1.0") for i in flag_cols)
            boxes[row[col["ImageID"]]].append((index_of[label], x0, y0, x1, y1, flags))
    warn_skipped(path, empty, "boxes of zero width or height")
    return dict(boxes)


def read_image_labels(
    path: str | os.PathLike, index_of: Mapping[str, int]
) -> dict[str, tuple[set[int], set[int]]]:
    """Verified image-level labels per ImageID: (present categories, absent categories).

    Raises:
        DatasetFormatError: missing columns, an unknown LabelName, or a Confidence other than
            0 or 1.
    """
    path = os.fspath(path)
    labels: dict[str, tuple[set[int], set[int]]] = {}
    with _open_csv(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        col = check_csv_header(path, header, ("ImageID", "LabelName", "Confidence"))
        i_image, i_label, i_conf = col["ImageID"], col["LabelName"], col["Confidence"]
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                image_id, label, confidence = row[i_image], row[i_label], row[i_conf]
            except IndexError:
                raise _row_error(
                    path, line, row, f"{len(row)} fields, the header has {len(header)}"
                ) from None
            if label not in index_of:
                raise _row_error(path, line, row, f"unknown LabelName {label!r}")
            if confidence not in ("0", "1", "0.0", "1.0"):
                raise _row_error(path, line, row, f"Confidence {confidence!r} is not 0 or 1")
            pos, neg = labels.setdefault(image_id, (set(), set()))
            (pos if confidence.startswith("1") else neg).add(index_of[label])
    return labels
