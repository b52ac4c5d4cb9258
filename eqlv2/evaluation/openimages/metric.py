"""The OpenImages Challenge 2019 object detection metric.

The metric is the one of the challenge's evaluation code (the TF object detection API's
``OpenImagesChallengeEvaluator`` with ``group_of_weight=1``, run on ground truth expanded by
``oid_hierarchical_labels_expansion.py``; see :mod:`.ground_truth`). Implemented here from its
description.

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

Units: every AP a caller gets from :func:`evaluate_openimages` (``metrics`` and
``ap_per_class``) is in percent, as on the LVIS side; only the building block
:func:`average_precision` returns a fraction in [0, 1].

Input checks of :func:`evaluate_openimages` (the official tool's behaviour in brackets):

* image ids that are not strings: ``TypeError`` [AP 0, silently];
* detections of image ids without ground truth: one warning with their counts, the detections
  are not evaluated [ignored, silently]; when *no* image id is known: ``ValueError``;
* class indices outside ``[0, K)`` (negative ones included): ``ValueError`` [a crash or the
  wrong class];
* box coordinates outside [0, 1] beyond rounding: ``ValueError`` naming the image, as pixel
  boxes are the usual cause [accepted, scored 0];
* boxes, scores and classes of different lengths: ``ValueError`` when the
  :class:`OpenImagesDetections` is made [a late, unreadable error].
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from eqlv2.data.openimages_files import NORM_TOLERANCE, ClassHierarchy

from .ground_truth import ImageGroundTruth, OpenImagesGroundTruth

__all__ = [
    "IOU_THRESHOLD",
    "NUM_GROUPS",
    "OpenImagesDetections",
    "OpenImagesEvalResult",
    "average_precision",
    "check_detections",
    "evaluate_openimages",
    "instance_count_groups",
    "match_detections",
]

logger = logging.getLogger(__name__)

IOU_THRESHOLD = 0.5
NUM_GROUPS = 5


@dataclass
class OpenImagesDetections:
    """One image's N detections.

    Attributes:
        boxes: (N, 4) float64, normalized XMin, YMin, XMax, YMax (fractions of the image size).
        scores: (N,) float64.
        classes: (N,) int64 class indices into the evaluated classes (``mids``).

    Raises:
        ValueError: the three differ in length, ``boxes`` is not (N, 4), or a class index is not
            an integer.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray

    def __post_init__(self) -> None:
        boxes = np.asarray(self.boxes, dtype=np.float64)
        self.boxes = boxes.reshape(0, 4) if boxes.size == 0 else boxes
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        classes = np.asarray(self.classes).reshape(-1)
        if classes.size and not np.issubdtype(classes.dtype, np.integer):
            if not np.array_equal(classes, np.round(classes.astype(np.float64))):
                raise ValueError(
                    f"OpenImagesDetections: class indices must be integers, got {classes[:5]}"
                )
        self.classes = classes.astype(np.int64)
        if self.boxes.ndim != 2 or self.boxes.shape[1] != 4:
            raise ValueError(f"OpenImagesDetections: boxes must be (N, 4), got shape {boxes.shape}")
        lengths = (len(self.boxes), len(self.scores), len(self.classes))
        if len(set(lengths)) > 1:
            raise ValueError(
                "OpenImagesDetections: boxes, scores and classes differ in length: "
                f"{lengths[0]} boxes, {lengths[1]} scores, {lengths[2]} classes"
            )


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
    """VOC 2010-2012 AP, as a fraction in [0, 1]: area under the precision envelope at every
    recall reached. ``scores`` and ``is_tp`` are (n,); ``is_tp`` holds 1.0 / 0.0.

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


def instance_count_groups(
    instance_counts: Sequence[int], num_groups: int = NUM_GROUPS
) -> list[np.ndarray]:
    """Class indices sorted by ``instance_counts`` ascending (ties by index), split into
    ``num_groups`` consecutive groups with ``numpy.array_split`` (rarest first)."""
    order = np.argsort(np.asarray(instance_counts), kind="stable")
    return [g for g in np.array_split(order, num_groups)]


@dataclass
class OpenImagesEvalResult:
    """Per-class AP (NaN for classes without positives), its mean, and the group means.

    Attributes:
        ap_per_class: (K,) AP of each class in percent, NaN for classes without positives.
        num_positives: (K,) ground-truth instances of each class.
        metrics: "AP" (the challenge mAP@0.5) and, when instance counts were given,
            "AP1".."AP5", in percent.
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

    Raises:
        TypeError, ValueError: bad detections, see the module doc ("Input checks").
    """
    num_classes = len(ground_truth.mids)
    check_detections(detections, ground_truth)
    expand = None
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
        for c, scores, is_tp in _match_image(gt, dets, num_classes, expand, iou_threshold):
            scores_per_class[c].append(scores)
            tp_per_class[c].append(is_tp)

    positives = ground_truth.num_positives()
    ap = np.full(num_classes, np.nan)
    for c in np.flatnonzero(positives > 0).tolist():
        s = np.concatenate(scores_per_class[c]) if scores_per_class[c] else np.zeros(0)
        tp = np.concatenate(tp_per_class[c]) if tp_per_class[c] else np.zeros(0)
        ap[c] = 100.0 * average_precision(s, tp, int(positives[c]))

    metrics = {"AP": _nanmean(ap)}
    if instance_counts is not None:
        if len(instance_counts) != num_classes:
            raise ValueError(f"{len(instance_counts)} instance counts for {num_classes} classes")
        for g, members in enumerate(instance_count_groups(instance_counts, num_groups), start=1):
            metrics[f"AP{g}"] = _nanmean(ap[members])
    return OpenImagesEvalResult(ap, positives, metrics)


def _match_image(
    gt: ImageGroundTruth,
    dets: OpenImagesDetections,
    num_classes: int,
    expand: list[list[int]] | None,
    iou_threshold: float,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(class, scores, is_tp)`` of :func:`match_detections` for each class detected on one
    image, after dropping the detections of classes not verified on it."""
    boxes, scores, classes = dets.boxes, dets.scores, dets.classes
    if expand is not None:
        boxes, scores, classes = _expand(boxes, scores, classes, expand)
    verified = np.zeros(num_classes, dtype=bool)
    verified[list(gt.verified)] = True
    counted = verified[classes]
    boxes, scores, classes = boxes[counted], scores[counted], classes[counted]
    for c in np.unique(classes).tolist():
        in_class = classes == c
        gt_in = gt.classes == c
        s, tp = match_detections(
            boxes[in_class], scores[in_class], gt.boxes[gt_in], gt.group_of[gt_in], iou_threshold
        )
        yield c, s, tp


def check_detections(
    detections: Mapping[str, OpenImagesDetections], ground_truth: OpenImagesGroundTruth
) -> None:
    """The input checks of :func:`evaluate_openimages` (see the module doc).

    Raises:
        TypeError: an image id is not a string (OpenImages ImageIDs are strings).
        ValueError: a class index outside ``[0, K)``, a box not normalized to [0, 1], or no
            image id with ground truth at all.
    """
    num_classes = len(ground_truth.mids)
    unknown_images, unknown_dets = [], 0
    for image_id, dets in detections.items():
        if not isinstance(image_id, str):
            raise TypeError(
                f"detections are keyed by {type(image_id).__name__} image ids (e.g. "
                f"{image_id!r}); OpenImages ImageIDs are strings such as '000026e7ee790996'"
            )
        _check_image_detections(image_id, dets, num_classes)
        if image_id not in ground_truth.images:
            unknown_images.append(image_id)
            unknown_dets += len(dets.scores)
    if not unknown_images:
        return
    message = (
        f"{len(unknown_images)} of {len(detections)} images with detections ({unknown_dets} "
        f"detections) have no ground truth and are not evaluated, e.g. {unknown_images[:3]}"
    )
    if len(unknown_images) == len(detections) and unknown_dets:
        raise ValueError(f"no detection is on an image of the ground truth: {message}")
    logger.warning(message)


def _check_image_detections(image_id: str, dets: OpenImagesDetections, num_classes: int) -> None:
    bad_classes = dets.classes[(dets.classes < 0) | (dets.classes >= num_classes)]
    if bad_classes.size:
        raise ValueError(
            f"image {image_id}: {bad_classes.size} detections have class indices outside "
            f"[0, {num_classes}), e.g. {np.unique(bad_classes)[:5].tolist()}"
        )
    outside = (dets.boxes < -NORM_TOLERANCE) | (dets.boxes > 1 + NORM_TOLERANCE)
    outside |= ~np.isfinite(dets.boxes)
    if outside.any():
        first = dets.boxes[outside.any(axis=1)][0].tolist()
        raise ValueError(
            f"image {image_id}: {int(outside.any(axis=1).sum())} detection boxes are not "
            f"normalized to [0, 1], e.g. {first}; give XMin, YMin, XMax, YMax as fractions of "
            "the image width and height, not pixels"
        )


def _ancestor_table(mids: Sequence[str], hierarchy: ClassHierarchy) -> list[list[int]]:
    index = {m: i for i, m in enumerate(mids)}
    return [sorted(index[a] for a in hierarchy.ancestors.get(m, ()) if a in index) for m in mids]


def _expand(boxes, scores, classes, table):
    rows = [i for i, c in enumerate(classes.tolist()) for _ in range(1 + len(table[c]))]
    new_classes = [a for c in classes.tolist() for a in [c, *table[c]]]
    rows = np.asarray(rows, dtype=np.int64)
    return boxes[rows], scores[rows], np.asarray(new_classes, dtype=np.int64)
