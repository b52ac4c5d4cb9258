"""What ``TEST.EQLV2.MAX_IMAGES`` saves in an evaluation of ``tune/search.py --smoke``.

Builds the tiny LVIS and OpenImages models (random weights: the evaluation's cost does not depend
on what the model learned) with the smoke search's test-time overrides, then times
``EQLv2Trainer.test`` on the whole validation set (200 images) and on its first 40 images
(``--smoke``'s setting), alternating, in one process, after one warm-up evaluation each. Prints the
median of each and their ratio.

Usage: ``python benchmarks/smoke_evaluation.py [--repeats 3] [--max-images 40]``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectron2.modeling import build_model  # noqa: E402

from eqlv2.engine import EQLv2Trainer, setup_cfg  # noqa: E402

CONFIGS = {
    "lvis": ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml",
    "openimages": ROOT / "configs/tiny/faster_rcnn_tiny_synthetic_openimages.yaml",
}
#: The test-time part of the driver's SMOKE_OVERRIDES, without MAX_IMAGES.
SMOKE_TEST_OVERRIDES = [
    "TEST.DETECTIONS_PER_IMAGE", "10", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
    "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "160", "MODEL.EQLV2.BASE_CHECKPOINT_CONFIG", "",
]  # fmt: skip


def _seconds(config_file: Path, model, opts: list[str]) -> float:
    cfg = setup_cfg(str(config_file), opts)
    start = time.perf_counter()
    EQLv2Trainer.test(cfg, model)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-images", type=int, default=40)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as output:
        base = [*SMOKE_TEST_OVERRIDES, "OUTPUT_DIR", output]
        for dataset, config_file in CONFIGS.items():
            model = build_model(setup_cfg(str(config_file), base)).eval()
            _seconds(config_file, model, base)  # warm-up: parses the dataset, builds the engine
            times: dict[int, list[float]] = {0: [], args.max_images: []}
            for _ in range(args.repeats):
                for limit in times:
                    times[limit].append(_seconds(config_file, model, [*base, "TEST.EQLV2.MAX_IMAGES", str(limit)]))
            every, first = statistics.median(times[0]), statistics.median(times[args.max_images])
            print(f"{dataset}: every image {every:.2f} s, first {args.max_images} {first:.2f} s, ratio {every / first:.1f}x")


if __name__ == "__main__":
    main()
