"""The hierarchy-expanded ground truth the OpenImages Challenge metric is computed on.

Expansion along the class hierarchy (as ``oid_hierarchical_labels_expansion.py`` does it):

* a box of class c is also a box of every ancestor of c (same coordinates and group-of flag);
* a verified-present image-level label (Confidence 1) of c also verifies every ancestor of c as
  present; a verified-absent label (Confidence 0) of c also verifies every *descendant* of c as
  absent (if c is absent, so are its subclasses; its superclasses may still be present).

The files are read by the readers of :mod:`eqlv2.data.openimages_files`, the same ones the
training loader uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from detectron2.utils.file_io import PathManager

from eqlv2.data.openimages_files import (
    FLAG_KEYS,
    ClassHierarchy,
    read_boxes,
    read_image_labels,
)

__all__ = ["OpenImagesGroundTruth"]

_GROUP_OF = FLAG_KEYS.index("is_group_of")

#: A raw box row: (image_id, label, xmin, ymin, xmax, ymax, is_group_of), normalized.
BoxLabelRow = tuple[str, str, float, float, float, float, bool]


@dataclass
class ImageGroundTruth:
    """One image's expanded ground truth: (n, 4) normalized XYXY ``boxes``, their (n,) class
    indices and group-of flags, and the classes whose detections are evaluated on the image."""

    boxes: np.ndarray
    classes: np.ndarray
    group_of: np.ndarray
    verified: frozenset[int]


@dataclass
class OpenImagesGroundTruth:
    """Hierarchy-expanded ground truth of the evaluated classes, per ImageID.

    Attributes:
        mids: the evaluated classes' LabelNames, in class-index order.
        images: ImageID -> its :class:`ImageGroundTruth`.
    """

    mids: list[str]
    images: dict[str, ImageGroundTruth]

    @classmethod
    def from_rows(
        cls,
        mids: Sequence[str],
        hierarchy: ClassHierarchy,
        boxes: Iterable[BoxLabelRow],
        image_labels: Iterable[tuple[str, str, bool]],
    ) -> OpenImagesGroundTruth:
        """From raw (not expanded) rows.

        A label that is neither an evaluated class nor in the hierarchy is an error; a label of
        the hierarchy that is not evaluated only counts through its evaluated ancestors.

        Args:
            mids: LabelName of each evaluated class, by class index.
            hierarchy: the class hierarchy used to expand boxes and labels.
            boxes: ``(image_id, label, xmin, ymin, xmax, ymax, is_group_of)``, normalized.
            image_labels: ``(image_id, label, verified_present)``.

        Raises:
            ValueError: unknown labels (with their count and a few of them).
        """
        index = {mid: i for i, mid in enumerate(mids)}
        known = hierarchy.labels | set(index)
        unknown: list[str] = []
        per_image_boxes: dict[str, list] = {}
        verified: dict[str, set[int]] = {}
        for image_id, label, x0, y0, x1, y1, group_of in boxes:
            if label not in known:
                unknown.append(label)
            targets = [index[m] for m in hierarchy.up(label) if m in index]
            rows = per_image_boxes.setdefault(image_id, [])
            rows.extend((x0, y0, x1, y1, c, group_of) for c in targets)
            verified.setdefault(image_id, set()).update(targets)
        for image_id, label, present in image_labels:
            if label not in known:
                unknown.append(label)
            expanded = hierarchy.up(label) if present else hierarchy.down(label)
            verified.setdefault(image_id, set()).update(index[m] for m in expanded if m in index)
        if unknown:
            raise ValueError(
                f"{len(unknown)} ground-truth rows have a LabelName that is neither an evaluated "
                f"class nor in the hierarchy, e.g. {sorted(set(unknown))[:5]}"
            )
        images = {
            image_id: _image_ground_truth(per_image_boxes.get(image_id, []), classes)
            for image_id, classes in verified.items()
        }
        return cls(list(mids), images)

    @classmethod
    def from_files(
        cls, mids: Sequence[str], hierarchy_json: str, bbox_csv: str, image_labels_csv: str
    ) -> OpenImagesGroundTruth:
        """From the challenge's files: hierarchy JSON, box CSV and image-level label CSV.

        Raises:
            DatasetFormatError: a malformed row, or a LabelName that is neither in ``mids`` nor
                in the hierarchy (the message names the file and the line).
        """
        hierarchy = ClassHierarchy.load(_local(hierarchy_json))
        labels = list(mids) + sorted(hierarchy.labels - set(mids))
        index_of = {label: i for i, label in enumerate(labels)}
        boxes = read_boxes(_local(bbox_csv), index_of, drop_empty=False)
        verified = read_image_labels(_local(image_labels_csv), index_of)
        return cls.from_rows(
            mids, hierarchy, _box_label_rows(boxes, labels), _label_rows(verified, labels)
        )

    def num_positives(self) -> np.ndarray:
        """(K,) ground-truth instances per class: non-group-of boxes plus group-of boxes."""
        counts = np.zeros(len(self.mids), dtype=np.int64)
        for image in self.images.values():
            counts += np.bincount(image.classes, minlength=len(self.mids))
        return counts


def _local(path: str) -> str:
    return os.fspath(PathManager.get_local_path(path))


def _image_ground_truth(rows: list, classes: set[int]) -> ImageGroundTruth:
    return ImageGroundTruth(
        boxes=np.array([r[:4] for r in rows], dtype=np.float64).reshape(-1, 4),
        classes=np.array([r[4] for r in rows], dtype=np.int64),
        group_of=np.array([r[5] for r in rows], dtype=bool),
        verified=frozenset(classes),
    )


def _box_label_rows(boxes: dict[str, list], labels: list[str]) -> Iterator[BoxLabelRow]:
    for image_id, rows in boxes.items():
        for category, x0, y0, x1, y1, flags in rows:
            yield image_id, labels[category], x0, y0, x1, y1, flags[_GROUP_OF]


def _label_rows(
    verified: dict[str, tuple[set[int], set[int]]], labels: list[str]
) -> Iterator[tuple[str, str, bool]]:
    for image_id, (present, absent) in verified.items():
        yield from ((image_id, labels[c], True) for c in sorted(present))
        yield from ((image_id, labels[c], False) for c in sorted(absent))
