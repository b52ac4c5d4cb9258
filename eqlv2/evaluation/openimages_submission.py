"""Kaggle submission files of the OpenImages 2019 object detection challenge.

The format (Kaggle "Open Images 2019 - Object Detection"): a CSV with the header
``ImageId,PredictionString`` and one row per test image; ``PredictionString`` is a space-separated
list of 6-tuples ``LabelName Confidence XMin YMin XMax YMax`` with coordinates normalized to
[0, 1] by the image size, and is empty for an image without detections, e.g.::

    ImageId,PredictionString
    fd162df2a4fdb29d,/m/05s2s 0.9 0.46 0.08 0.93 0.5 /m/0c9ph5 0.5 0.25 0.96 0.6 0.9

:class:`OpenImagesSubmissionWriter` is a detectron2 ``DatasetEvaluator`` that writes this file from
a model's outputs (inputs with ``image_id``, ``height``, ``width``; outputs with ``instances`` in
absolute XYXY and contiguous classes); :func:`parse_submission` reads it back.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

__all__ = [
    "SUBMISSION_HEADER",
    "OpenImagesSubmissionWriter",
    "SubmissionDetections",
    "instances_to_prediction_string",
    "parse_submission",
    "prediction_string",
    "write_submission",
]

logger = logging.getLogger(__name__)

SUBMISSION_HEADER = ("ImageId", "PredictionString")


@dataclass
class SubmissionDetections:
    """One image's detections of a submission: LabelNames, scores and normalized
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


def instances_to_prediction_string(
    instances, height: int, width: int, thing_mids: Sequence[str], decimals: int = 6
) -> str:
    """The ``PredictionString`` of one image's predicted ``Instances`` (on CPU)."""
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
    boxes = boxes / np.array([width, height, width, height], dtype=np.float64)
    labels = [thing_mids[c] for c in instances.pred_classes.tolist()]
    return prediction_string(labels, instances.scores.numpy(), boxes, decimals)


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


def parse_submission(path: str) -> dict[str, SubmissionDetections]:
    """Reads a submission CSV back: ImageId -> its detections."""
    out: dict[str, SubmissionDetections] = {}
    with PathManager.open(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != SUBMISSION_HEADER:
            raise ValueError(f"{path}: header must be {','.join(SUBMISSION_HEADER)}, got {header}")
        for row in reader:
            if not row:
                continue
            image_id, text = row[0], row[1] if len(row) > 1 else ""
            fields = text.split()
            if len(fields) % 6:
                raise ValueError(
                    f"{path}: {image_id}: PredictionString length {len(fields)} is not a multiple of 6"
                )
            labels = fields[0::6]
            numbers = np.array(
                [[float(v) for v in fields[i + 1 : i + 6]] for i in range(0, len(fields), 6)],
                dtype=np.float64,
            ).reshape(-1, 5)
            out[image_id] = SubmissionDetections(labels, numbers[:, 0], numbers[:, 1:])
    return out


class OpenImagesSubmissionWriter(DatasetEvaluator):
    """Writes a model's predictions on a dataset as a Kaggle submission CSV.

    Args:
        dataset_name: a dataset whose metadata has ``thing_mids`` (LabelName per contiguous id).
        output_file: the CSV to write.
        distributed: gather every rank's predictions and write on the main one.
        decimals: digits after the point of scores and coordinates.
    """

    def __init__(
        self, dataset_name: str, output_file: str, distributed: bool = True, decimals: int = 6
    ):
        self._thing_mids = list(MetadataCatalog.get(dataset_name).thing_mids)
        self._output_file = output_file
        self._distributed = distributed
        self._decimals = decimals
        self._rows: list[tuple[str, str]] = []

    def reset(self) -> None:
        self._rows = []

    def process(self, inputs, outputs) -> None:
        for input_, output in zip(inputs, outputs, strict=True):
            text = ""
            if "instances" in output:
                instances = output["instances"].to(torch.device("cpu"))
                text = instances_to_prediction_string(
                    instances, input_["height"], input_["width"], self._thing_mids, self._decimals
                )
            self._rows.append((str(input_["image_id"]), text))

    def evaluate(self) -> dict:
        rows = self._rows
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._rows, dst=0)
            if not comm.is_main_process():
                return {}
            rows = list(itertools.chain(*gathered))
        write_submission(self._output_file, rows)
        logger.info("Wrote the submission of %d images to %s", len(rows), self._output_file)
        return {}
