"""The OpenImages Challenge 2019 detection metric, its detectron2 evaluators and Kaggle submissions.

* :mod:`.ground_truth`: the hierarchy-expanded ground truth, read from the official files by the
  readers of :mod:`eqlv2.data.openimages_files`;
* :mod:`.metric`: the metric, its input checks, and AP1..AP5 by training instance count;
* :mod:`.evaluator`: :class:`OpenImagesEvaluator` and :class:`OpenImagesSubmissionWriter`;
* :mod:`.submission`: the Kaggle submission format and its offline evaluation, also on the
  command line::

      python -m eqlv2.evaluation.openimages --submission sub.csv --annotations-dir DIR

Every AP is in percent (``metrics`` and ``ap_per_class`` alike), as on the LVIS side.
"""

from eqlv2.data.openimages_files import ClassHierarchy

from .evaluator import OpenImagesEvaluator, OpenImagesSubmissionWriter, instances_to_openimages
from .ground_truth import OpenImagesGroundTruth
from .metric import (
    OpenImagesDetections,
    OpenImagesEvalResult,
    average_precision,
    check_detections,
    evaluate_openimages,
    instance_count_groups,
    match_detections,
)
from .submission import (
    evaluate_submission,
    parse_submission,
    prediction_string,
    submission_to_detections,
    write_submission,
)

__all__ = [
    "ClassHierarchy",
    "OpenImagesDetections",
    "OpenImagesEvalResult",
    "OpenImagesEvaluator",
    "OpenImagesGroundTruth",
    "OpenImagesSubmissionWriter",
    "average_precision",
    "check_detections",
    "evaluate_openimages",
    "evaluate_submission",
    "instance_count_groups",
    "instances_to_openimages",
    "match_detections",
    "parse_submission",
    "prediction_string",
    "submission_to_detections",
    "write_submission",
]
