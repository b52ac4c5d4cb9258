"""The OpenImages Challenge 2019 object detection metric, and its detectron2 evaluator.

The metric is the one of the challenge's evaluation code (the TF object detection API's
``OpenImagesChallengeEvaluator`` with ``group_of_weight=1``, run on ground truth expanded by
``oid_hierarchical_labels_expansion.py``). Implemented here from its description:

Ground truth expansion along the class hierarchy (``hierarchy_json``, its root skipped):

* a box of class c is also a box of every ancestor of c (same coordinates and group-of flag);
* a verified-present image-level label (Confidence 1) of c also verifies every ancestor of c as
  present; a verified-absent label (Confidence 0) of c also verifies every *descendant* of c as
  absent (if c is absent, so are its subclasses; its superclasses may still be present).

Detections are *not* expanded (the challenge expects a submission to contain the parent classes
itself); ``expand_detections=True`` copies each detection to the ancestors of its class, for
models trained on leaf classes only.

Per image, the detections of a class c are dropped unless c is *verified* on the image: c has a
box, or a positive or negative image-level label (after expansion). Then, per image and class,
detections sorted by score (descending, ties in input order; boxes with xmin >= xmax or
ymin >= ymax dropped first):

1. every detection is matched against the non-group-of boxes: it takes the box of highest IoU;
   if that IoU >= 0.5 and the box is not taken yet, the detection is a true positive and takes
   it; otherwise it is a false positive (no fallback to the second-best box, as officially);
2. every detection still false positive is compared with the group-of boxes by the fraction of
   the *detection's* area inside the box (intersection over detection area); with the best such
   box at >= 0.5 it is *ignored* (neither TP nor FP);
3. each group-of box hit in step 2 counts as one true positive, scored with the highest score of
   the detections it absorbed (if that score is > 0, as officially); a group-of box hit by
   nothing is one missed instance.

A class has ``#non-group-of boxes + #group-of boxes`` positives (over all images). Precision and
recall are cumulated over the score-sorted TP/FP list of the class and its AP is the VOC
2010-2012 area: the area under the precision envelope (precision made non-increasing from the
right) at every recall value reached, not an 11-point or 101-point sample. A class with
positives but no detection has AP 0; a class without positives is left out (NaN). The challenge
number is the mean AP over classes with positives.

Groups AP1..AP5 (EQL v2 paper, Table 10): classes sorted by training instance count ascending
(``category_instance_counts``; ties by class index) and split into 5 consecutive groups with
``numpy.array_split`` -- K/5 classes each (100 for the 500 challenge classes); when K is not a
multiple of 5 the first ``K mod 5`` groups hold one class more. AP1 is the rarest group; each is
the mean AP over its classes with positives.
"""

from __future__ import annotations

import csv
import functools
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

__all__ = [
    "ClassHierarchy",
    "OpenImagesDetections",
    "OpenImagesEvalResult",
    "OpenImagesEvaluator",
    "OpenImagesGroundTruth",
    "average_precision",
    "evaluate_openimages",
    "frequency_groups",
    "match_detections",
]

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
NUM_GROUPS = 5

# ---------------------------------------------------------------------------------------------
# Class hierarchy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassHierarchy:
    """All ancestors and all descendants of each label of an OpenImages hierarchy JSON.

    A label may sit under several parents; its ancestors are the union over its places. The root
    node (the JSON's top ``LabelName``, "Entity") is nobody's ancestor or descendant.
    """

    ancestors: Mapping[str, frozenset[str]]
    descendants: Mapping[str, frozenset[str]]

    @classmethod
    def from_dict(cls, root: Mapping) -> ClassHierarchy:
        ancestors: dict[str, set[str]] = {}
        descendants: dict[str, set[str]] = {}

        def visit(node: Mapping, path: tuple[str, ...]) -> None:
            label = node["LabelName"]
            ancestors.setdefault(label, set()).update(path)
            descendants.setdefault(label, set())
            for parent in path:
                descendants[parent].add(label)
            for child in node.get("Subcategory", ()):
                visit(child, path + (label,))

        for child in root.get("Subcategory", ()):
            visit(child, ())
        return cls(
            {k: frozenset(v) for k, v in ancestors.items()},
            {k: frozenset(v) for k, v in descendants.items()},
        )

    @classmethod
    def load(cls, path: str) -> ClassHierarchy:
        with PathManager.open(path) as f:
            return cls.from_dict(json.load(f))

    def up(self, label: str) -> frozenset[str]:
        """``label`` and its ancestors."""
        return self.ancestors.get(label, frozenset()) | {label}

    def down(self, label: str) -> frozenset[str]:
        """``label`` and its descendants."""
        return self.descendants.get(label, frozenset()) | {label}


# ---------------------------------------------------------------------------------------------
# Ground truth and detections
# ---------------------------------------------------------------------------------------------


@dataclass
class _ImageGroundTruth:
    boxes: np.ndarray  # (n, 4) normalized XMin, YMin, XMax, YMax
    classes: np.ndarray  # (n,) class index
    group_of: np.ndarray  # (n,) bool
    verified: frozenset[int]  # classes whose detections are evaluated on this image


@dataclass
class OpenImagesGroundTruth:
    """Hierarchy-expanded ground truth of the evaluated classes, per ImageID.

    Attributes:
        mids: the evaluated classes' LabelNames, in class-index order.
        images: ImageID -> boxes, their classes and group-of flags, and the verified classes.
    """

    mids: list[str]
    images: dict[str, _ImageGroundTruth]

    @classmethod
    def from_rows(
        cls,
        mids: Sequence[str],
        hierarchy: ClassHierarchy,
        boxes: Iterable[tuple[str, str, float, float, float, float, bool]],
        image_labels: Iterable[tuple[str, str, bool]],
    ) -> OpenImagesGroundTruth:
        """From raw (not expanded) rows.

        Args:
            mids: LabelName of each evaluated class, by class index.
            hierarchy: the class hierarchy used to expand boxes and labels.
            boxes: ``(image_id, label, xmin, ymin, xmax, ymax, is_group_of)``, normalized.
            image_labels: ``(image_id, label, verified_present)``.
        """
        index = {mid: i for i, mid in enumerate(mids)}
        per_image_boxes: dict[str, list] = {}
        verified: dict[str, set[int]] = {}
        for image_id, label, x0, y0, x1, y1, group_of in boxes:
            targets = [index[m] for m in hierarchy.up(label) if m in index]
            rows = per_image_boxes.setdefault(image_id, [])
            rows.extend((x0, y0, x1, y1, c, group_of) for c in targets)
            verified.setdefault(image_id, set()).update(targets)
        for image_id, label, present in image_labels:
            expanded = hierarchy.up(label) if present else hierarchy.down(label)
            verified.setdefault(image_id, set()).update(index[m] for m in expanded if m in index)
        images = {}
        for image_id, classes in verified.items():
            rows = per_image_boxes.get(image_id, [])
            data = np.array([r[:4] for r in rows], dtype=np.float64).reshape(-1, 4)
            images[image_id] = _ImageGroundTruth(
                boxes=data,
                classes=np.array([r[4] for r in rows], dtype=np.int64),
                group_of=np.array([r[5] for r in rows], dtype=bool),
                verified=frozenset(classes),
            )
        return cls(list(mids), images)

    @classmethod
    def from_files(
        cls, mids: Sequence[str], hierarchy_json: str, bbox_csv: str, image_labels_csv: str
    ) -> OpenImagesGroundTruth:
        """From the challenge's files: hierarchy JSON, box CSV and image-level label CSV."""
        hierarchy = ClassHierarchy.load(hierarchy_json)
        return cls.from_rows(
            mids, hierarchy, _read_boxes(bbox_csv), _read_image_labels(image_labels_csv)
        )

    def num_positives(self) -> np.ndarray:
        """(K,) ground-truth instances per class: non-group-of boxes plus group-of boxes."""
        counts = np.zeros(len(self.mids), dtype=np.int64)
        for image in self.images.values():
            counts += np.bincount(image.classes, minlength=len(self.mids))
        return counts


def _csv_rows(path: str, needed: Sequence[str]) -> Iterable[tuple[list[str], dict[str, int]]]:
    with PathManager.open(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        col = {name: i for i, name in enumerate(h.strip() for h in header)}
        missing = [n for n in needed if n not in col]
        if missing:
            raise ValueError(f"{path}: header lacks column(s) {missing}")
        for row in reader:
            if row:
                yield row, col


def _read_boxes(path: str) -> Iterable[tuple[str, str, float, float, float, float, bool]]:
    needed = ("ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf")
    for row, c in _csv_rows(path, needed):
        yield (
            row[c["ImageID"]],
            row[c["LabelName"]],
            float(row[c["XMin"]]),
            float(row[c["YMin"]]),
            float(row[c["XMax"]]),
            float(row[c["YMax"]]),
            int(float(row[c["IsGroupOf"]])) == 1,
        )


def _read_image_labels(path: str) -> Iterable[tuple[str, str, bool]]:
    for row, c in _csv_rows(path, ("ImageID", "LabelName", "Confidence")):
        yield row[c["ImageID"]], row[c["LabelName"]], float(row[c["Confidence"]]) > 0.5


@dataclass
class OpenImagesDetections:
    """One image's detections: normalized XMin, YMin, XMax, YMax boxes, scores, class indices."""

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.classes = np.asarray(self.classes, dtype=np.int64).reshape(-1)


# ---------------------------------------------------------------------------------------------
# The metric
# ---------------------------------------------------------------------------------------------


def _intersections(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) intersection areas of XYXY boxes."""
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.maximum(w, 0.0) * np.maximum(h, 0.0)


def _areas(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def match_detections(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    gt_boxes: np.ndarray,
    gt_group_of: np.ndarray,
    iou_threshold: float = IOU_THRESHOLD,
) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP of one class's detections on one image (steps 1-3 of the module doc).

    Args:
        det_boxes: (n, 4) XYXY; det_scores: (n,).
        gt_boxes: (m, 4) XYXY of the class on the image; gt_group_of: (m,) bool.

    Returns:
        ``(scores, is_tp)``: the scores of the detections that count, followed by one entry per
        group-of box that was hit (its score the best of its detections), and whether each is a
        true positive (float 1.0 / 0.0).
    """
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_group_of = np.asarray(gt_group_of, dtype=bool).reshape(-1)
    valid = (det_boxes[:, 0] < det_boxes[:, 2]) & (det_boxes[:, 1] < det_boxes[:, 3])
    det_boxes, det_scores = det_boxes[valid], det_scores[valid]
    order = np.argsort(-det_scores, kind="stable")
    det_boxes, det_scores = det_boxes[order], det_scores[order]
    n = len(det_scores)
    is_tp = np.zeros(n, dtype=bool)
    if n == 0 or len(gt_boxes) == 0:
        return det_scores, is_tp.astype(np.float64)

    single = gt_boxes[~gt_group_of]
    if len(single):
        inter = _intersections(det_boxes, single)
        iou = inter / (_areas(det_boxes)[:, None] + _areas(single)[None, :] - inter)
        best = np.argmax(iou, axis=1)
        taken = np.zeros(len(single), dtype=bool)
        for i in range(n):
            g = best[i]
            if iou[i, g] >= iou_threshold and not taken[g]:
                is_tp[i] = True
                taken[g] = True

    ignored = np.zeros(n, dtype=bool)
    group_scores = np.zeros(0)
    groups = gt_boxes[gt_group_of]
    if len(groups):
        ioa = _intersections(det_boxes, groups) / _areas(det_boxes)[:, None]
        best = np.argmax(ioa, axis=1)
        hit = ~is_tp & (ioa[np.arange(n), best] >= iou_threshold)
        ignored = hit
        # As officially: a hit group-of box counts with its best score, if that is > 0.
        best_score = np.zeros(len(groups))
        np.maximum.at(best_score, best[hit], det_scores[hit])
        group_scores = best_score[best_score > 0]

    keep = ~ignored
    scores = np.concatenate([det_scores[keep], group_scores])
    labels = np.concatenate([is_tp[keep].astype(np.float64), np.ones(len(group_scores))])
    return scores, labels


def average_precision(scores: np.ndarray, is_tp: np.ndarray, num_positives: int) -> float:
    """VOC 2010-2012 AP: area under the precision envelope at every recall reached.

    NaN when ``num_positives`` is 0; 0 when there are positives but no detections.
    """
    if num_positives <= 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    tp = np.asarray(is_tp, dtype=np.float64)[order]
    cum_tp = np.cumsum(tp)
    cum_fp = np.cumsum(tp <= 0)
    precision = cum_tp / (cum_tp + cum_fp)
    recall = cum_tp / num_positives
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    changes = np.flatnonzero(recall[1:] != recall[:-1]) + 1
    return float(np.sum((recall[changes] - recall[changes - 1]) * precision[changes]))


def frequency_groups(
    instance_counts: Sequence[int], num_groups: int = NUM_GROUPS
) -> list[np.ndarray]:
    """Class indices sorted by ``instance_counts`` ascending (ties by index), split into
    ``num_groups`` consecutive groups with ``numpy.array_split`` (rarest first)."""
    order = np.argsort(np.asarray(instance_counts), kind="stable")
    return [g for g in np.array_split(order, num_groups)]


@dataclass
class OpenImagesEvalResult:
    """Per-class AP (NaN for classes without positives), its mean, and the group means.

    ``metrics`` holds the reported numbers in percent: "AP" (the challenge mAP@0.5) and, when
    instance counts were given, "AP1".."AP5".
    """

    ap_per_class: np.ndarray
    num_positives: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def evaluate_openimages(
    ground_truth: OpenImagesGroundTruth,
    detections: Mapping[str, OpenImagesDetections],
    instance_counts: Sequence[int] | None = None,
    *,
    hierarchy: ClassHierarchy | None = None,
    expand_detections: bool = False,
    iou_threshold: float = IOU_THRESHOLD,
    num_groups: int = NUM_GROUPS,
) -> OpenImagesEvalResult:
    """The challenge metric of ``detections`` (ImageID -> detections) on ``ground_truth``.

    Args:
        instance_counts: training instances per class; gives AP1..AP``num_groups``.
        hierarchy: needed with ``expand_detections``.
        expand_detections: copy each detection to the ancestors of its class (not official).
    """
    num_classes = len(ground_truth.mids)
    if expand_detections:
        if hierarchy is None:
            raise ValueError("expand_detections needs the class hierarchy")
        expand = _ancestor_table(ground_truth.mids, hierarchy)
    scores_per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    tp_per_class: list[list[np.ndarray]] = [[] for _ in range(num_classes)]
    for image_id, gt in ground_truth.images.items():
        dets = detections.get(image_id)
        if dets is None or len(dets.scores) == 0:
            continue
        boxes, scores, classes = dets.boxes, dets.scores, dets.classes
        if expand_detections:
            boxes, scores, classes = _expand(boxes, scores, classes, expand)
        verified = np.zeros(num_classes, dtype=bool)
        verified[list(gt.verified)] = True
        counted = verified[classes]
        boxes, scores, classes = boxes[counted], scores[counted], classes[counted]
        for c in np.unique(classes).tolist():
            in_class = classes == c
            gt_in = gt.classes == c
            s, tp = match_detections(
                boxes[in_class],
                scores[in_class],
                gt.boxes[gt_in],
                gt.group_of[gt_in],
                iou_threshold,
            )
            scores_per_class[c].append(s)
            tp_per_class[c].append(tp)

    positives = ground_truth.num_positives()
    ap = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if positives[c] == 0:
            continue
        s = np.concatenate(scores_per_class[c]) if scores_per_class[c] else np.zeros(0)
        tp = np.concatenate(tp_per_class[c]) if tp_per_class[c] else np.zeros(0)
        ap[c] = average_precision(s, tp, int(positives[c]))

    metrics = {"AP": _nanmean(ap) * 100.0}
    if instance_counts is not None:
        if len(instance_counts) != num_classes:
            raise ValueError(f"{len(instance_counts)} instance counts for {num_classes} classes")
        for g, members in enumerate(frequency_groups(instance_counts, num_groups), start=1):
            metrics[f"AP{g}"] = _nanmean(ap[members]) * 100.0
    return OpenImagesEvalResult(ap, positives, metrics)


def _ancestor_table(mids: Sequence[str], hierarchy: ClassHierarchy) -> list[list[int]]:
    index = {m: i for i, m in enumerate(mids)}
    return [sorted(index[a] for a in hierarchy.ancestors.get(m, ()) if a in index) for m in mids]


def _expand(boxes, scores, classes, table):
    rows = [i for i, c in enumerate(classes.tolist()) for _ in range(1 + len(table[c]))]
    new_classes = [a for c in classes.tolist() for a in [c, *table[c]]]
    rows = np.asarray(rows, dtype=np.int64)
    return boxes[rows], scores[rows], np.asarray(new_classes, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# detectron2 evaluator
# ---------------------------------------------------------------------------------------------


def _file_key(path: str) -> tuple:
    local = PathManager.get_local_path(path)
    stat = os.stat(local)
    return (os.path.realpath(local), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_ground_truth(
    mids: tuple[str, ...], hierarchy_key, bbox_key, labels_key
) -> OpenImagesGroundTruth:
    return OpenImagesGroundTruth.from_files(mids, hierarchy_key[0], bbox_key[0], labels_key[0])


def instances_to_openimages(instances, height: int, width: int) -> OpenImagesDetections:
    """Predicted ``Instances`` (absolute XYXY boxes of an image of ``height`` x ``width``) as
    normalized detections."""
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
    boxes = boxes / np.array([width, height, width, height], dtype=np.float64)
    return OpenImagesDetections(
        boxes=boxes,
        scores=instances.scores.numpy(),
        classes=instances.pred_classes.numpy(),
    )


class OpenImagesEvaluator(DatasetEvaluator):
    """OpenImages Challenge 2019 detection AP (IoU 0.5) and the frequency groups AP1..AP5.

    The dataset's metadata must have ``thing_mids`` (LabelName per contiguous id),
    ``hierarchy_json``, ``bbox_csv`` and ``image_labels_csv``, and may have
    ``category_instance_counts`` (training instances per contiguous id; gives AP1..AP5). Inputs
    carry ``image_id`` (the ImageID string), ``height`` and ``width``.

    Returns ``OrderedDict({"bbox": {"AP": ..., "AP1": ..., ..., "AP5": ...}})`` in percent.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        expand_detections: bool = False,
    ):
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._expand_detections = expand_detections
        self._metadata = MetadataCatalog.get(dataset_name)
        for key in ("thing_mids", "hierarchy_json", "bbox_csv", "image_labels_csv"):
            if not hasattr(self._metadata, key):
                raise KeyError(
                    f"{dataset_name}: metadata lacks {key!r}, needed by OpenImagesEvaluator"
                )
        self._predictions: list[tuple[str, OpenImagesDetections]] = []

    def ground_truth(self) -> OpenImagesGroundTruth:
        """The expanded ground truth (loaded once per set of files)."""
        m = self._metadata
        return _cached_ground_truth(
            tuple(m.thing_mids),
            _file_key(m.hierarchy_json),
            _file_key(m.bbox_csv),
            _file_key(m.image_labels_csv),
        )

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs, outputs) -> None:
        for input_, output in zip(inputs, outputs, strict=True):
            if "instances" not in output:
                continue
            instances = output["instances"].to(torch.device("cpu"))
            dets = instances_to_openimages(instances, input_["height"], input_["width"])
            self._predictions.append((str(input_["image_id"]), dets))

    def evaluate(self) -> OrderedDict | None:
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return None
            predictions = list(itertools.chain(*gathered))
        if not predictions:
            logger.warning("[OpenImagesEvaluator] Did not receive valid predictions.")
            return {}
        counts = self._metadata.get("category_instance_counts")
        hierarchy = (
            ClassHierarchy.load(self._metadata.hierarchy_json) if self._expand_detections else None
        )
        result = evaluate_openimages(
            self.ground_truth(),
            dict(predictions),
            counts,
            hierarchy=hierarchy,
            expand_detections=self._expand_detections,
        )
        logger.info(
            "OpenImages Challenge 2019 detection metric: \n%s", create_small_table(result.metrics)
        )
        return OrderedDict({"bbox": dict(result.metrics)})
