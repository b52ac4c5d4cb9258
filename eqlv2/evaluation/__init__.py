"""Evaluation of the project's models: LVIS (two engines), OpenImages Challenge 2019, COCO.

* :func:`build_evaluator` picks the evaluator of a registered dataset by its ``evaluator_type``;
  :func:`evaluated_images`, the images ``TEST.EQLV2.MAX_IMAGES`` keeps.
* :class:`LVISEvaluator` (box / mask AP, APr / APc / APf) and :func:`summary` (the paper's
  columns); the engines are in :mod:`eqlv2.evaluation.lvis_engines`.
* :class:`OpenImagesEvaluator` (the Challenge 2019 detection metric, with AP1..AP5 by class
  frequency), the Kaggle submission writer and the offline evaluation of a submission
  (``python -m eqlv2.evaluation.openimages``), in :mod:`eqlv2.evaluation.openimages`.
"""

from .build import build_evaluator, evaluated_images, evaluates_masks
from .lvis import LVISEvaluator, summary
from .lvis_detections import LVISDetections
from .lvis_engines import METRIC_NAMES, FastLVISEngine, LVISEvalResult, OfficialLVISEngine
from .lvis_numpy_compat import lvis_numpy_compat
from .openimages import (
    OpenImagesEvaluator,
    OpenImagesSubmissionWriter,
    evaluate_openimages,
    evaluate_submission,
    parse_submission,
    write_submission,
)

__all__ = [
    "METRIC_NAMES",
    "FastLVISEngine",
    "LVISDetections",
    "LVISEvalResult",
    "LVISEvaluator",
    "OfficialLVISEngine",
    "OpenImagesEvaluator",
    "OpenImagesSubmissionWriter",
    "build_evaluator",
    "evaluated_images",
    "evaluates_masks",
    "evaluate_openimages",
    "evaluate_submission",
    "lvis_numpy_compat",
    "parse_submission",
    "summary",
    "write_submission",
]
