"""Kaggle submission files of the OpenImages 2019 object detection challenge, and their offline
evaluation.

The format (Kaggle "Open Images 2019 - Object Detection"): a CSV with the header
``ImageId,PredictionString`` and one row per test image; ``PredictionString`` is a space-separated
list of 6-tuples ``LabelName Confidence XMin YMin XMax YMax`` with coordinates normalized to
[0, 1] by the image size, and is empty for an image without detections, e.g.::

    ImageId,PredictionString
    fd162df2a4fdb29d,/m/05s2s 0.9 0.46 0.08 0.93 0.5 /m/0c9ph5 0.5 0.25 0.96 0.6 0.9

:func:`evaluate_submission` scores such a file against the official validation files of a folder,
with the class list of its classes CSV (no label-to-index mapping to write); it is also the
command line ``python -m eqlv2.evaluation.openimages``.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from detectron2.utils.file_io import PathManager

from eqlv2.data.openimages_files import ClassHierarchy, OpenImagesFiles, read_classes

from .ground_truth import OpenImagesGroundTruth
from .metric import OpenImagesDetections, OpenImagesEvalResult, evaluate_openimages

__all__ = [
    "SUBMISSION_HEADER",
    "SubmissionDetections",
    "evaluate_submission",
    "parse_submission",
    "prediction_string",
    "submission_to_detections",
    "write_submission",
]

SUBMISSION_HEADER = ("ImageId", "PredictionString")


@dataclass
class SubmissionDetections:
    """One image's N detections of a submission: LabelNames, (N,) scores and (N, 4) normalized
    (XMin, YMin, XMax, YMax) boxes."""

    labels: list[str]
    scores: np.ndarray
    boxes: np.ndarray


def prediction_string(
    labels: Sequence[str], scores: Sequence[float], boxes: np.ndarray, decimals: int = 6
) -> str:
    """``LabelName Confidence XMin YMin XMax YMax ...`` for normalized XYXY ``boxes`` (clipped to
    [0, 1]), numbers rounded to ``decimals`` places."""
    boxes = np.clip(np.asarray(boxes, dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not (len(labels) == len(scores) == len(boxes)):
        raise ValueError(f"{len(labels)} labels, {len(scores)} scores, {len(boxes)} boxes")
    fmt = f"{{:.{decimals}f}}"
    parts = []
    for label, score, box in zip(labels, scores.tolist(), boxes.tolist(), strict=True):
        parts.append(" ".join([label, fmt.format(score), *(fmt.format(v) for v in box)]))
    return " ".join(parts)


def write_submission(path: str, rows: Mapping[str, str] | Iterable[tuple[str, str]]) -> None:
    """Writes ``ImageId -> PredictionString`` rows (sorted by ImageId) as a submission CSV."""
    items = sorted(rows.items() if isinstance(rows, Mapping) else rows)
    directory = os.path.dirname(path)
    if directory:
        PathManager.mkdirs(directory)
    with PathManager.open(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(SUBMISSION_HEADER)
        writer.writerows(items)


def _parse_prediction_string(
    path: str, line: int, image_id: str, text: str
) -> SubmissionDetections:
    fields = text.split()
    if len(fields) % 6:
        raise ValueError(
            f"{path}: line {line} (ImageId {image_id}): PredictionString length {len(fields)} "
            "is not a multiple of 6 (LabelName Score XMin YMin XMax YMax)"
        )
    try:
        numbers = np.array(
            [[float(v) for v in fields[i + 1 : i + 6]] for i in range(0, len(fields), 6)],
            dtype=np.float64,
        ).reshape(-1, 5)
    except ValueError as error:
        raise ValueError(f"{path}: line {line} (ImageId {image_id}): {error}") from None
    return SubmissionDetections(fields[0::6], numbers[:, 0], numbers[:, 1:])


def parse_submission(path: str) -> dict[str, SubmissionDetections]:
    """Reads a submission CSV: ImageId -> its detections.

    Raises:
        ValueError: a wrong header, a repeated ImageId, or a PredictionString that is not 6-tuples
            of a LabelName and five numbers (the message names the line).
    """
    out: dict[str, SubmissionDetections] = {}
    with PathManager.open(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != SUBMISSION_HEADER:
            raise ValueError(f"{path}: header must be {','.join(SUBMISSION_HEADER)}, got {header}")
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            image_id, text = row[0], row[1] if len(row) > 1 else ""
            if image_id in out:
                raise ValueError(f"{path}: line {line}: ImageId {image_id} appears twice")
            out[image_id] = _parse_prediction_string(path, line, image_id, text)
    return out


def submission_to_detections(
    submission: Mapping[str, SubmissionDetections], mids: Sequence[str], source: str = "submission"
) -> dict[str, OpenImagesDetections]:
    """The detections of a parsed submission with class indices into ``mids``.

    Raises:
        ValueError: LabelNames that are not in ``mids`` (their count and a few of them), as the
            official tool fails on them too.
    """
    index = {mid: i for i, mid in enumerate(mids)}
    unknown = sorted({label for dets in submission.values() for label in dets.labels} - set(index))
    if unknown:
        count = sum(label not in index for dets in submission.values() for label in dets.labels)
        raise ValueError(
            f"{source}: {count} detections have {len(unknown)} LabelNames that are not in the "
            f"class list, e.g. {unknown[:5]}"
        )
    return {
        image_id: OpenImagesDetections(
            dets.boxes, dets.scores, np.array([index[label] for label in dets.labels], np.int64)
        )
        for image_id, dets in submission.items()
    }


def evaluate_submission(
    submission_csv: str,
    annotations_dir: str,
    split: str = "validation",
    *,
    instance_counts: Sequence[int] | None = None,
    expand_detections: bool = False,
) -> OpenImagesEvalResult:
    """The Challenge metric of a Kaggle submission on the official files of ``split`` in
    ``annotations_dir`` (see :class:`~eqlv2.data.openimages_files.OpenImagesFiles`); classes are
    indexed in the order of the classes CSV.

    Args:
        instance_counts: training instances per class (classes CSV order): gives AP1..AP5.
        expand_detections: copy each detection to the ancestors of its class (not official).
    """
    files = OpenImagesFiles.at(annotations_dir, split)
    mids, _ = read_classes(files.classes_csv)
    ground_truth = OpenImagesGroundTruth.from_files(
        mids, files.hierarchy_json, files.bbox_csv, files.image_labels_csv
    )
    detections = submission_to_detections(
        parse_submission(submission_csv), mids, os.path.basename(submission_csv)
    )
    hierarchy = ClassHierarchy.load(files.hierarchy_json) if expand_detections else None
    return evaluate_openimages(
        ground_truth,
        detections,
        instance_counts,
        hierarchy=hierarchy,
        expand_detections=expand_detections,
    )
