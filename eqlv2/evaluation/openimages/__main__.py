"""Evaluates a Kaggle-format OpenImages submission offline against the official files.

    python -m eqlv2.evaluation.openimages --submission sub.csv --annotations-dir DIR

``DIR`` holds the Challenge 2019 files (classes CSV, hierarchy JSON and the bbox and image-level
label CSVs of the split; see :mod:`eqlv2.data.openimages_files`). The class list is the one of
the classes CSV, so no label-to-index mapping is needed. Prints AP (and AP1..AP5 with
``--groups``) in percent; ``--output`` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from detectron2.utils.logger import create_small_table

from eqlv2.data.openimages import openimages_train_statistics

from .submission import evaluate_submission


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eqlv2.evaluation.openimages", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--submission", required=True, help="the ImageId,PredictionString CSV")
    parser.add_argument(
        "--annotations-dir", required=True, help="folder with the official Challenge 2019 files"
    )
    parser.add_argument(
        "--split", default="validation", choices=("validation", "train"), help="default validation"
    )
    parser.add_argument(
        "--groups",
        action="store_true",
        help="also report AP1..AP5 by training instance count (reads the train bbox CSV of the "
        "folder once; the counts are cached next to it)",
    )
    parser.add_argument(
        "--expand-detections",
        action="store_true",
        help="copy each detection to the ancestors of its class (not the official protocol)",
    )
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counts = None
    if args.groups:
        counts = openimages_train_statistics(args.annotations_dir).instance_counts
    result = evaluate_submission(
        args.submission,
        args.annotations_dir,
        args.split,
        instance_counts=counts,
        expand_detections=args.expand_detections,
    )
    print(create_small_table(result.metrics))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(result.metrics, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
