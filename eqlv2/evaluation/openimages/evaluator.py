"""detectron2 evaluators of an OpenImages dataset: the Challenge metric and the Kaggle submission
writer."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Collection
from typing import Any

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from eqlv2.data.openimages_files import ClassHierarchy

from .ground_truth import OpenImagesGroundTruth
from .metric import OpenImagesDetections, evaluate_openimages
from .submission import prediction_string, write_submission

__all__ = [
    "OpenImagesEvaluator",
    "OpenImagesSubmissionWriter",
    "instances_to_openimages",
    "normalized_boxes",
]

logger = logging.getLogger(__name__)


def normalized_boxes(instances, height: int, width: int) -> np.ndarray:
    """(N, 4) float64 XMin, YMin, XMax, YMax of predicted ``Instances`` (absolute XYXY on an image
    of ``height`` x ``width``), as fractions of the image size."""
    boxes = instances.pred_boxes.tensor.numpy().astype(np.float64).reshape(-1, 4)
    return boxes / np.array([width, height, width, height], dtype=np.float64)


def instances_to_openimages(instances, height: int, width: int) -> OpenImagesDetections:
    """Predicted ``Instances`` (on CPU) as normalized detections."""
    return OpenImagesDetections(
        boxes=normalized_boxes(instances, height, width),
        scores=instances.scores.numpy(),
        classes=instances.pred_classes.numpy(),
    )


def _gather(items: list, distributed: bool) -> list | None:
    """Every rank's ``items`` on the main process (None elsewhere)."""
    if not distributed:
        return items
    comm.synchronize()
    gathered = comm.gather(items, dst=0)
    if not comm.is_main_process():
        return None
    return list(itertools.chain(*gathered))


def _file_key(path: str) -> tuple:
    local = PathManager.get_local_path(path)
    stat = os.stat(local)
    return (os.path.realpath(local), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _cached_ground_truth(
    mids: tuple[str, ...], hierarchy_key: tuple, bbox_key: tuple, labels_key: tuple
) -> OpenImagesGroundTruth:
    return OpenImagesGroundTruth.from_files(mids, hierarchy_key[0], bbox_key[0], labels_key[0])


class OpenImagesEvaluator(DatasetEvaluator):
    """OpenImages Challenge 2019 detection AP (IoU 0.5) and the frequency groups AP1..AP5.

    The dataset's metadata must have ``thing_mids`` (LabelName per contiguous id),
    ``hierarchy_json``, ``bbox_csv`` and ``image_labels_csv``, and may have
    ``category_instance_counts`` (training instances per contiguous id; gives AP1..AP5). Inputs
    carry ``image_id`` (the ImageID string), ``height`` and ``width``.

    With ``image_ids`` (those of ``TEST.EQLV2.MAX_IMAGES``) only their ground truth is scored.

    Returns ``OrderedDict({"bbox": {"AP": ..., "AP1": ..., ..., "AP5": ...}})`` in percent.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        expand_detections: bool = False,
        image_ids: Collection[str] | None = None,
    ):
        self._distributed = distributed
        self._image_ids = None if image_ids is None else frozenset(str(i) for i in image_ids)
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
        """The expanded ground truth (loaded once per set of files), of ``image_ids`` only if given."""
        m = self._metadata
        ground_truth = _cached_ground_truth(
            tuple(m.thing_mids),
            _file_key(m.hierarchy_json),
            _file_key(m.bbox_csv),
            _file_key(m.image_labels_csv),
        )
        if self._image_ids is None:
            return ground_truth
        images = {k: v for k, v in ground_truth.images.items() if k in self._image_ids}
        return dataclasses.replace(ground_truth, images=images)

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
        predictions = _gather(self._predictions, self._distributed)
        if predictions is None:
            return None
        if not predictions:
            logger.warning("[OpenImagesEvaluator] Did not receive valid predictions.")
            return {}
        hierarchy = None
        if self._expand_detections:
            hierarchy = ClassHierarchy.load(
                PathManager.get_local_path(self._metadata.hierarchy_json)
            )
        result = evaluate_openimages(
            self.ground_truth(),
            dict(predictions),
            self._metadata.get("category_instance_counts"),
            hierarchy=hierarchy,
            expand_detections=self._expand_detections,
        )
        logger.info(
            "OpenImages Challenge 2019 detection metric: \n%s", create_small_table(result.metrics)
        )
        return OrderedDict({"bbox": dict(result.metrics)})


class OpenImagesSubmissionWriter(DatasetEvaluator):
    """Writes a model's predictions on a dataset as a Kaggle submission CSV
    (see :mod:`.submission`).

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
                text = prediction_string(
                    [self._thing_mids[c] for c in instances.pred_classes.tolist()],
                    instances.scores.numpy(),
                    normalized_boxes(instances, input_["height"], input_["width"]),
                    self._decimals,
                )
            self._rows.append((str(input_["image_id"]), text))

    def evaluate(self) -> dict[str, Any]:
        rows = _gather(self._rows, self._distributed)
        if rows is None:
            return {}
        write_submission(self._output_file, rows)
        logger.info("Wrote the submission of %d images to %s", len(rows), self._output_file)
        return {}
