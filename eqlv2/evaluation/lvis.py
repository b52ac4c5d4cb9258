"""detectron2 evaluator for LVIS v1 (box and mask AP with APr / APc / APf).

Modelled on detectron2's ``LVISEvaluator``: ``process()`` keeps each image's detections,
``evaluate()`` gathers them on the main process and computes, for "bbox" and (when the model
predicts masks) "segm", AP, AP50, AP75, APs, APm, APl, APr, APc and APf in percent, returned as
``OrderedDict({"bbox": {...}, "segm": {...}})``.

Differences from detectron2's evaluator:

* Two engines compute the numbers (``engine=``, config key ``TEST.EQLV2.LVIS_ENGINE``): "fast"
  (default) and "lvis", the official API. They agree to floating-point rounding; see
  :mod:`eqlv2.evaluation.lvis_engines`.
* Detections are kept as arrays (not one dict per detection) and handed to the engine in memory.
  The result JSON ``lvis_instances_results.json`` is written only with ``save_results=True``.
* The engine, with its ground-truth index, is cached per JSON file, so the periodic evaluations
  of a training run load and index the ground truth once.
* A number that is undefined (its group has no ground truth) is NaN, not -100.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from .lvis_detections import LVISDetections
from .lvis_engines import (
    MAX_DETS_PER_IMAGE,
    METRIC_NAMES,
    FastLVISEngine,
    OfficialLVISEngine,
    build_lvis_engine,
)

__all__ = ["LVISEvaluator", "summary", "instances_to_lvis_arrays"]

logger = logging.getLogger(__name__)

ENGINES = ("fast", "lvis")

_ENGINE_CACHE: OrderedDict[tuple, FastLVISEngine | OfficialLVISEngine] = OrderedDict()
_ENGINE_CACHE_SIZE = 2
_ENGINE_CACHE_LOCK = threading.Lock()


def _cached_engine(
    engine: str, json_file: str, max_dets: int, workers: int
) -> FastLVISEngine | OfficialLVISEngine:
    """The engine for ``json_file``, built once and reused while the file is unchanged."""
    stat = os.stat(json_file)
    key = (engine, os.path.realpath(json_file), stat.st_mtime_ns, stat.st_size, max_dets, workers)
    with _ENGINE_CACHE_LOCK:
        if key in _ENGINE_CACHE:
            _ENGINE_CACHE.move_to_end(key)
            return _ENGINE_CACHE[key]
        built = build_lvis_engine(engine, json_file, max_dets=max_dets, workers=workers)
        _ENGINE_CACHE[key] = built
        while len(_ENGINE_CACHE) > _ENGINE_CACHE_SIZE:
            _ENGINE_CACHE.popitem(last=False)
        return built


def instances_to_lvis_arrays(instances, image_id: int) -> dict:
    """One image's predicted ``Instances`` (on CPU) as arrays: the fields of detectron2's
    ``instances_to_coco_json`` (XYWH boxes, scores, contiguous classes, RLE masks with ``str``
    counts) without one dict per detection."""
    import pycocotools.mask as mask_util

    boxes = instances.pred_boxes.tensor.numpy().astype(np.float32, copy=True).reshape(-1, 4)
    boxes[:, 2:] -= boxes[:, :2]
    record = {
        "image_id": image_id,
        "boxes": boxes,
        "scores": instances.scores.numpy().astype(np.float32).reshape(-1),
        "classes": instances.pred_classes.numpy().astype(np.int64).reshape(-1),
        "masks": None,
    }
    if instances.has("pred_masks"):
        masks = []
        for mask in instances.pred_masks:
            rle = mask_util.encode(np.asfortranarray(mask.numpy()[:, :, None].astype(np.uint8)))[0]
            rle["counts"] = rle["counts"].decode("utf-8")
            masks.append(rle)
        record["masks"] = masks
    return record


class LVISEvaluator(DatasetEvaluator):
    """LVIS box / mask AP of a detectron2 model on a registered LVIS-format dataset.

    The dataset's metadata must have ``json_file`` (LVIS v1 format ground truth) and may have
    ``thing_dataset_id_to_contiguous_id`` (otherwise contiguous id ``i`` is LVIS id ``i + 1``, as in
    detectron2).

    Args:
        dataset_name: the registered dataset.
        tasks: ("bbox",), ("segm",) or both; default: "bbox", plus "segm" when the predictions
            have masks.
        distributed: gather the predictions of all ranks and evaluate on the main one.
        output_dir: where ``save_results=True`` writes ``lvis_instances_results.json``.
        engine: "fast" or "lvis" (the official API).
        max_dets_per_image: detections per image that count (300 in the LVIS protocol).
        workers: processes of the fast engine.
        save_results: also write the detections as an LVIS result JSON in ``output_dir``.
    """

    def __init__(
        self,
        dataset_name: str,
        tasks: tuple[str, ...] | None = None,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        engine: str = "fast",
        max_dets_per_image: int = MAX_DETS_PER_IMAGE,
        workers: int = 2,
        save_results: bool = False,
    ):
        if engine not in ENGINES:
            raise ValueError(f"unknown LVIS engine {engine!r}: use one of {ENGINES}")
        if tasks is not None and not set(tasks) <= {"bbox", "segm"}:
            raise ValueError(f"LVIS tasks are 'bbox' and 'segm', got {tasks}")
        self._dataset_name = dataset_name
        self._tasks = tuple(tasks) if tasks is not None else None
        self._distributed = distributed
        self._output_dir = output_dir
        self._engine_name = engine
        self._max_dets = max_dets_per_image
        self._workers = workers
        self._save_results = save_results
        self._metadata = MetadataCatalog.get(dataset_name)
        self._json_file = PathManager.get_local_path(self._metadata.json_file)
        if not os.path.isfile(self._json_file):
            raise FileNotFoundError(f"{dataset_name}: LVIS json_file {self._json_file} not found")
        self._dataset_to_contiguous = getattr(
            self._metadata, "thing_dataset_id_to_contiguous_id", None
        )
        self._predictions: list[dict] = []

    @property
    def engine(self) -> FastLVISEngine | OfficialLVISEngine:
        """The (cached) engine of this evaluator's ground truth."""
        return _cached_engine(self._engine_name, self._json_file, self._max_dets, self._workers)

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs, outputs) -> None:
        for input_, output in zip(inputs, outputs, strict=True):
            if "instances" not in output:
                continue
            instances = output["instances"].to(torch.device("cpu"))
            self._predictions.append(instances_to_lvis_arrays(instances, input_["image_id"]))

    def _gather(self) -> list[dict] | None:
        if not self._distributed:
            return self._predictions
        comm.synchronize()
        gathered = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return None
        return list(itertools.chain(*gathered))

    def to_detections(self, predictions: list[dict]) -> LVISDetections:
        """The gathered per-image records as one :class:`LVISDetections` (LVIS category ids)."""
        if not predictions:
            return LVISDetections.empty()
        counts = [len(p["scores"]) for p in predictions]
        classes = np.concatenate([p["classes"] for p in predictions])
        with_masks = all(p["masks"] is not None for p in predictions)
        return LVISDetections(
            image_ids=np.repeat([p["image_id"] for p in predictions], counts),
            category_ids=self._dataset_ids(classes),
            scores=np.concatenate([p["scores"] for p in predictions]).astype(np.float64),
            boxes=np.concatenate([p["boxes"] for p in predictions]).astype(np.float64),
            masks=[m for p in predictions for m in p["masks"]] if with_masks else None,
        )

    def _dataset_ids(self, contiguous: np.ndarray) -> np.ndarray:
        if self._dataset_to_contiguous is None:
            return contiguous + 1
        lookup = np.full(max(self._dataset_to_contiguous.values()) + 1, -1, dtype=np.int64)
        for dataset_id, contiguous_id in self._dataset_to_contiguous.items():
            lookup[contiguous_id] = dataset_id
        if len(contiguous) and (contiguous.max() >= len(lookup) or (lookup[contiguous] < 0).any()):
            raise ValueError(f"{self._dataset_name}: a predicted class has no LVIS category id")
        return lookup[contiguous]

    def evaluate(self) -> OrderedDict | None:
        predictions = self._gather()
        if predictions is None:
            return None
        if len(predictions) == 0:
            logger.warning("[LVISEvaluator] Did not receive valid predictions.")
            return {}
        detections = self.to_detections(predictions)
        tasks = self._tasks or (("bbox", "segm") if detections.has_masks else ("bbox",))
        if self._output_dir and self._save_results:
            self._write_results(detections)

        results: OrderedDict[str, dict[str, float]] = OrderedDict()
        if len(detections) == 0:
            logger.warning("No predictions from the model!")
            for task in sorted(tasks):
                results[task] = {name: float("nan") for name in METRIC_NAMES}
            return results
        engine = self.engine
        if engine.num_annotations == 0:
            logger.info("Annotations are not available for evaluation.")
            return results
        for task in sorted(tasks):
            logger.info("Evaluating %s with the %s LVIS engine ...", task, self._engine_name)
            metrics = engine.evaluate(detections, task).metrics
            logger.info("Evaluation results for %s: \n%s", task, create_small_table(metrics))
            results[task] = metrics
        return copy.deepcopy(results)

    def _write_results(self, detections: LVISDetections) -> None:
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, "lvis_instances_results.json")
        logger.info("Saving results to %s", path)
        with PathManager.open(path, "w") as f:
            json.dump(detections.to_results(), f)


def summary(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The paper's columns from an LVIS evaluator's result.

    Returns ``{"AP", "APr", "APc", "APf", "APb"}``: AP and its frequency groups are mask numbers
    when there is a "segm" task, box numbers otherwise; APb is the box AP (NaN without "bbox").
    """
    main = results.get("segm") or results.get("bbox")
    if not main:
        raise ValueError("summary() needs a result with a 'bbox' or 'segm' task")
    box = results.get("bbox") or {}
    return {
        "AP": float(main["AP"]),
        "APr": float(main["APr"]),
        "APc": float(main["APc"]),
        "APf": float(main["APf"]),
        "APb": float(box.get("AP", float("nan"))),
    }
