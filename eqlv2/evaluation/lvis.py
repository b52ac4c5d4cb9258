"""detectron2's ``LVISEvaluator`` with the project's scoring engines, and the paper's columns.

:class:`LVISEvaluator` is detectron2's evaluator (same inputs, gathering across ranks, box
proposals, output ``OrderedDict({"bbox": {...}, "segm": {...}})`` with AP, AP50, AP75, APs, APm,
APl, APr, APc and APf in percent); only the scoring step is swapped for an engine of
:mod:`eqlv2.evaluation.lvis_engines` (``engine=``, config key ``TEST.EQLV2.LVIS_ENGINE``):

* "fast" (default): the official numbers, many times faster (``benchmarks/eval_speed.py``);
* "lvis": the official ``lvis`` API itself.

Differences in what a caller sees:

* a number that is undefined (its group has no ground truth) is NaN, not -100;
* result files (``instances_predictions.pth``, ``lvis_instances_results.json``) are written to
  ``output_dir`` only with ``save_results=True``: a training run evaluates often and the files
  of a 20k-image split are large;
* the fast engine's ground-truth index is kept per JSON file, for the periodic evaluations of a
  training run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection, Mapping

import numpy as np
from detectron2.evaluation import LVISEvaluator as Detectron2LVISEvaluator
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from .lvis_detections import LVISDetections
from .lvis_engines import (
    MAX_DETS_PER_IMAGE,
    METRIC_NAMES,
    FastLVISEngine,
    OfficialLVISEngine,
    ground_truth_of_images,
)

__all__ = ["ENGINES", "LVISEvaluator", "summary"]

logger = logging.getLogger(__name__)

ENGINES = ("fast", "lvis")

#: The fast engine of the last ground truth evaluated: (file, mtime, size, image ids, max_dets,
#: workers) -> engine.
_FAST_ENGINE: dict[tuple, FastLVISEngine] = {}


class LVISEvaluator(Detectron2LVISEvaluator):
    """detectron2's LVIS evaluator scoring with :mod:`eqlv2.evaluation.lvis_engines`.

    Args:
        dataset_name, tasks, distributed, output_dir, max_dets_per_image: as detectron2's.
        engine: "fast" or "lvis" (the official API).
        workers: processes of the fast engine.
        save_results: write detectron2's result files to ``output_dir``.
        image_ids: score against the ground truth of these images only (None: all), the images
            of ``TEST.EQLV2.MAX_IMAGES``.
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
        image_ids: Collection[int] | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"unknown LVIS engine {engine!r}: use one of {ENGINES}")
        if tasks is not None and not set(tasks) <= {"bbox", "segm"}:
            raise ValueError(f"LVIS tasks are 'bbox' and 'segm', got {tasks}")
        super().__init__(
            dataset_name,
            tasks,
            distributed,
            output_dir if save_results else None,
            max_dets_per_image=max_dets_per_image,
        )
        self.engine_name = engine
        self._dataset_name = dataset_name
        # detectron2 has loaded the ground truth into ``_lvis_api`` and offers no public accessor;
        # the engines reuse it rather than parse the JSON a second time.
        json_file = PathManager.get_local_path(self._metadata.json_file)
        ground_truth = self._lvis_api.dataset
        if image_ids is not None:
            ground_truth = ground_truth_of_images(ground_truth, image_ids)
        if engine == "lvis":
            lvis_api = self._lvis_api if image_ids is None else ground_truth
            self.engine = OfficialLVISEngine(lvis_api, max_dets=max_dets_per_image)
        else:
            images = None if image_ids is None else tuple(sorted(image_ids))
            self.engine = _fast_engine(ground_truth, json_file, images, max_dets_per_image, workers)
        self.reset()  # usable without a reset() first, as the project's evaluators are

    # detectron2's scoring step: private, but the only place to swap the scoring (no public
    # hook). It reads ``_tasks``, ``_metadata`` and ``_output_dir`` and fills ``_results``;
    # tests/test_eval_lvis.py::test_scoring_goes_through_the_engine fails if that changes.
    def _eval_predictions(self, predictions: list[dict]) -> None:
        results = [r for p in predictions for r in p["instances"]]
        tasks = self._tasks or self._tasks_from_predictions(results)
        detections = LVISDetections.from_results(results)
        detections.category_ids = self._dataset_ids(detections.category_ids)
        if self._output_dir:
            self._write_results(detections)
        if self.engine.num_annotations == 0:
            logger.info("Annotations are not available for evaluation.")
            return
        for task in sorted(tasks):
            if len(detections) == 0:
                logger.warning("No predictions from the model!")
                self._results[task] = dict.fromkeys(METRIC_NAMES, float("nan"))
                continue
            logger.info("Evaluating %s with the %s LVIS engine ...", task, self.engine_name)
            metrics = self.engine.evaluate(detections, task).metrics
            logger.info("Evaluation results for %s: \n%s", task, create_small_table(metrics))
            self._results[task] = metrics

    def _dataset_ids(self, contiguous: np.ndarray) -> np.ndarray:
        """LVIS category ids of contiguous class ids (``thing_dataset_id_to_contiguous_id``, or
        ``+1`` without it, as detectron2)."""
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if mapping is None:
            return contiguous + 1
        lookup = np.full(max(mapping.values()) + 1, -1, dtype=np.int64)
        for dataset_id, contiguous_id in mapping.items():
            lookup[contiguous_id] = dataset_id
        if len(contiguous) and (contiguous.max() >= len(lookup) or (lookup[contiguous] < 0).any()):
            raise ValueError(f"{self._dataset_name}: a predicted class has no LVIS category id")
        return lookup[contiguous]

    def _write_results(self, detections: LVISDetections) -> None:
        path = os.path.join(self._output_dir, "lvis_instances_results.json")
        logger.info("Saving results to %s", path)
        with PathManager.open(path, "w") as f:
            json.dump(detections.to_results(), f)


def _fast_engine(dataset: dict, json_file: str, image_ids: tuple | None, max_dets: int, workers: int) -> FastLVISEngine:
    """The fast engine of ``json_file``'s ground truth on ``image_ids`` (None: every image), built
    from ``dataset`` when the file, the images or the settings changed since the last call."""
    stat = os.stat(json_file)
    key = (os.path.realpath(json_file), stat.st_mtime_ns, stat.st_size, image_ids, max_dets, workers)
    if key not in _FAST_ENGINE:
        _FAST_ENGINE.clear()
        _FAST_ENGINE[key] = FastLVISEngine(dataset, max_dets=max_dets, workers=workers)
    return _FAST_ENGINE[key]


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
