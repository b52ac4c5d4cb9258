"""Times three ways to compute LVIS AP, side by side on one generated val-sized case.

The three columns:

* ``lvis API``: the official ``lvis`` package (``LVISResults`` + ``LVISEval``), what detectron2's
  own LVIS evaluator runs;
* ``faster-coco-eval``: plain ``faster_coco_eval.COCOeval_faster(..., lvis_style=True)`` on its
  own ``COCO`` ground truth and ``loadRes`` results (the library's public LVIS mode);
* ``fast engine``: the project's :class:`~eqlv2.evaluation.lvis_engines.FastLVISEngine`, given
  the result dicts as :class:`~eqlv2.evaluation.lvis.LVISEvaluator` gives them.

The case is made in memory from a seed: ``--images`` images (2,000 by default), LVIS v1's 1,203
categories with their real frequency groups and training image counts
(``detectron2.data.datasets.lvis_v1_category_image_count``), a few ground-truth boxes of a few
positive categories per image, negative and not-exhaustive labels, and 300 detections per image
(jittered copies of ground-truth boxes plus random boxes of positive, negative and unrelated
categories, the way a detector's top-300 list looks).

Each column loads the ground truth once before timing (as an evaluator does at construction) and
gets its own copy of the same results list; the per-call evaluation is timed (``--repeats``:
best of n). Printed: the times, the ratios to the ``lvis API`` column, and the largest absolute
difference of each column from the ``lvis API`` over every reported number (AP, AP50, AP75, APs,
APm, APl, APr, APc, APf, in percent). On a shared machine the times move with the load: the
load average is printed at the start and the end.

    .venv/bin/python benchmarks/eval_speed.py                  # bbox, 2,000 images, 2 workers
    .venv/bin/python benchmarks/eval_speed.py --images 500 --workers 1 --segm
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from faster_coco_eval import COCO, COCOeval_faster  # noqa: E402

from eqlv2.evaluation.lvis_engines import (  # noqa: E402
    METRIC_NAMES,
    FastLVISEngine,
    OfficialLVISEngine,
)

#: faster-coco-eval's ``stats_as_dict`` names of the nine LVIS numbers.
_FCE_NAMES = {
    "AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small", "APm": "AP_medium",
    "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf",
}  # fmt: skip
COLUMNS = ("lvis API", "faster-coco-eval", "fast engine")


def _lvis_v1_categories() -> list[dict]:
    """LVIS v1 categories (id, name, frequency, image_count) from detectron2's tables."""
    from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
    from detectron2.data.datasets.lvis_v1_category_image_count import LVIS_CATEGORY_IMAGE_COUNT

    counts = {c["id"]: c["image_count"] for c in LVIS_CATEGORY_IMAGE_COUNT}
    return [
        {
            "id": c["id"],
            "name": c["name"],
            "frequency": c["frequency"],
            "image_count": counts[c["id"]],
        }
        for c in LVIS_CATEGORIES
    ]


def _box_polygon(box: np.ndarray) -> list[list[float]]:
    """An octagon inscribed in an XYWH box, as an LVIS polygon."""
    x, y, w, h = (float(v) for v in box)
    dx, dy = 0.25 * w, 0.25 * h
    return [
        [
            x + dx,
            y,
            x + w - dx,
            y,
            x + w,
            y + dy,
            x + w,
            y + h - dy,
            x + w - dx,
            y + h,
            x + dx,
            y + h,
            x,
            y + h - dy,
            x,
            y + dy,
        ]
    ]


def _random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """``n`` XYWH boxes inside a ``width`` x ``height`` image with log-uniform sizes."""
    w = np.exp(rng.uniform(np.log(8), np.log(width * 0.8), n))
    h = np.clip(w * np.exp(rng.normal(0.0, 0.4, n)), 6, height * 0.9)
    x = rng.uniform(0, 1, n) * (width - w)
    y = rng.uniform(0, 1, n) * (height - h)
    return np.stack([x, y, w, h], axis=1)


def _jitter(
    rng: np.random.Generator, boxes: np.ndarray, scale: float, width: int, height: int
) -> np.ndarray:
    """Noisy copies of XYWH ``boxes``, clipped to the image."""
    x, y, w, h = boxes.T
    w2 = np.clip(w * np.exp(rng.normal(0, scale, len(w))), 2, width)
    h2 = np.clip(h * np.exp(rng.normal(0, scale, len(h))), 2, height)
    x2 = np.clip(x + rng.normal(0, scale, len(x)) * w, 0, width - w2)
    y2 = np.clip(y + rng.normal(0, scale, len(y)) * h, 0, height - h2)
    return np.stack([x2, y2, w2, h2], axis=1)


def make_lvis_case(
    num_images: int = 2000,
    dets_per_image: int = 300,
    seed: int = 0,
    with_masks: bool = False,
) -> tuple[dict, list[dict]]:
    """A seeded LVIS v1-shaped ground truth dict and a results list for it.

    Returns:
        ``(gt, results)``: ``gt`` in the LVIS v1 JSON layout (polygon masks), ``results`` a list of
        LVIS result dicts (``image_id``, ``category_id``, ``bbox``, ``score``, and an RLE
        ``segmentation`` when ``with_masks``).
    """
    rng = np.random.default_rng(seed)
    categories = _lvis_v1_categories()
    cat_ids = np.array([c["id"] for c in categories])
    # Rare categories must show up in a small case too: sample by sqrt of the image count.
    weights = np.sqrt(np.array([c["image_count"] for c in categories], dtype=float))
    weights /= weights.sum()

    images, annotations, results = [], [], []
    ann_id = 1
    for image_id in range(1, num_images + 1):
        width, height = int(rng.integers(480, 641)), int(rng.integers(360, 481))
        chosen = rng.choice(cat_ids, size=int(rng.integers(2, 12)), replace=False, p=weights)
        num_pos = int(rng.integers(1, min(5, len(chosen) - 1) + 1))
        pos, neg = chosen[:num_pos], chosen[num_pos:]
        not_exhaustive = [int(c) for c in pos if rng.random() < 0.1]
        images.append(
            {
                "id": image_id,
                "width": width,
                "height": height,
                "neg_category_ids": sorted(int(c) for c in neg),
                "not_exhaustive_category_ids": sorted(not_exhaustive),
            }
        )
        gt_boxes, gt_cats = [], []
        for cat in pos:
            n = int(min(rng.geometric(0.35), 15))
            boxes = _random_boxes(rng, n, width, height)
            gt_boxes.append(boxes)
            gt_cats += [int(cat)] * n
        gt_boxes = np.concatenate(gt_boxes)
        for box, cat in zip(gt_boxes, gt_cats, strict=True):
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [float(v) for v in box],
                    "area": float(box[2] * box[3]),
                    "segmentation": _box_polygon(box),
                }
            )
            ann_id += 1

        # Detections: ~3 jittered copies per gt box (right category, sometimes a wrong one),
        # the rest random boxes spread over the image's labelled and unrelated categories.
        num_near = min(dets_per_image, 3 * len(gt_boxes))
        src = rng.integers(0, len(gt_boxes), num_near)
        near = _jitter(rng, gt_boxes[src], 0.12, width, height)
        near_cats = np.array(gt_cats)[src]
        wrong = rng.random(num_near) < 0.2
        near_cats[wrong] = rng.choice(chosen, size=int(wrong.sum()))
        near_scores = rng.beta(4, 2, num_near)
        num_far = dets_per_image - num_near
        far = _random_boxes(rng, num_far, width, height)
        pick = rng.random(num_far)
        far_cats = np.where(
            pick < 0.5,
            rng.choice(chosen, size=num_far),
            rng.choice(cat_ids, size=num_far, p=weights),
        )
        far_scores = rng.beta(1.2, 5, num_far)
        boxes = np.concatenate([near, far])
        cats = np.concatenate([near_cats, far_cats])
        scores = np.round(np.concatenate([near_scores, far_scores]), 6)
        for box, cat, score in zip(boxes, cats, scores, strict=True):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "bbox": [round(float(v), 2) for v in box],
                    "score": float(score),
                }
            )
    if with_masks:
        _add_result_masks(results, {im["id"]: im for im in images})
    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


def _add_result_masks(results: list[dict], images: dict[int, dict]) -> None:
    """Gives every result an RLE ``segmentation``: the octagon inscribed in its box."""
    import pycocotools.mask as mask_util

    for result in results:
        image = images[result["image_id"]]
        rle = mask_util.merge(
            mask_util.frPyObjects(
                _box_polygon(np.array(result["bbox"])), image["height"], image["width"]
            )
        )
        rle["counts"] = rle["counts"].decode("ascii")
        result["segmentation"] = rle


def _difference(a: float, b: float) -> float:
    """|a - b|, 0 when both are NaN, infinite when only one is."""
    if np.isnan(a) and np.isnan(b):
        return 0.0
    if np.isnan(a) or np.isnan(b):
        return float("inf")
    return abs(a - b)


def _time(label: str, fn, *args, **kwargs):
    print(f"[eval_speed] {label} ...", flush=True)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    seconds = time.perf_counter() - start
    print(f"[eval_speed] {label}: {seconds:.2f} s", flush=True)
    return out, seconds


class PlainFasterCocoEval:
    """faster-coco-eval's public LVIS mode: ``COCO`` ground truth, ``loadRes``, ``COCOeval_faster``
    with ``lvis_style=True`` and the LVIS limit of detections per image."""

    def __init__(self, json_file: str, max_dets: int = 300):
        self.gt = COCO(json_file)
        self.max_dets = max_dets

    def evaluate(self, results: list[dict], iou_type: str) -> dict[str, float]:
        if iou_type == "segm":
            results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
        quiet = logging.getLogger("faster_coco_eval").debug
        evaluator = COCOeval_faster(
            self.gt, self.gt.loadRes(results), iou_type, lvis_style=True, print_function=quiet
        )
        evaluator.params.maxDets = [self.max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        stats = evaluator.stats_as_dict
        return {name: 100.0 * float(stats[_FCE_NAMES[name]]) for name in METRIC_NAMES}


def _load_columns(gt: dict, workers: int) -> tuple[dict, dict[str, float]]:
    """Each column's evaluator with its ground truth loaded, and the load times."""
    with tempfile.TemporaryDirectory() as tmp:
        json_file = os.path.join(tmp, "lvis_gt.json")
        with open(json_file, "w") as f:
            json.dump(gt, f)
        builders = {
            "lvis API": lambda: OfficialLVISEngine(json_file),
            "faster-coco-eval": lambda: PlainFasterCocoEval(json_file),
            "fast engine": lambda: FastLVISEngine(json_file, workers=workers),
        }
        loaded, seconds = {}, {}
        for column, build in builders.items():
            loaded[column], seconds[column] = _time(f"{column}: load ground truth", build)
    return loaded, seconds


def _time_task(columns: dict, results: list[dict], task: str, repeats: int):
    """Metrics and best time of each column on one task; each run gets a fresh copy of the
    results (the lvis API and ``loadRes`` write into them), made before the clock starts."""
    metrics, seconds = {}, {}
    for column, evaluator in columns.items():
        seconds[column] = float("inf")
        for run in range(repeats):
            fresh = copy.deepcopy(results)
            out, t = _time(
                f"{column}: evaluate {task} [run {run + 1}]", evaluator.evaluate, fresh, task
            )
            metrics[column] = out if isinstance(out, dict) else out.metrics
            seconds[column] = min(seconds[column], t)
    return metrics, seconds


def _print_task(task: str, metrics: dict, seconds: dict) -> float:
    ref = metrics["lvis API"]
    print(f"\n[{task}] {'metric':<8}" + "".join(f"{c:>18}" for c in COLUMNS))
    for name in METRIC_NAMES:
        print(f"[{task}] {name:<8}" + "".join(f"{metrics[c][name]:>18.4f}" for c in COLUMNS))
    print(f"[{task}] {'seconds':<8}" + "".join(f"{seconds[c]:>18.2f}" for c in COLUMNS))
    ratios = [seconds["lvis API"] / seconds[c] for c in COLUMNS]
    print(f"[{task}] {'speed-up':<8}" + "".join(f"{r:>17.1f}x" for r in ratios))
    diffs = [max(_difference(ref[k], metrics[c][k]) for k in METRIC_NAMES) for c in COLUMNS]
    print(f"[{task}] {'max|diff|':<8}" + "".join(f"{d:>18.1e}" for d in diffs) + "  (AP points)\n")
    return max(diffs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="number of images (default 2000)")
    parser.add_argument("--dets", type=int, default=300, help="detections per image (default 300)")
    parser.add_argument(
        "--workers", type=int, default=2, help="processes of the fast engine (default 2)"
    )
    parser.add_argument("--segm", action="store_true", help="also time the mask (segm) task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per column (best is reported)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    print(
        f"[eval_speed] load average at the start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    (gt, results), _ = _time(
        f"generating {args.images} images x {args.dets} detections, 1203 categories",
        make_lvis_case,
        args.images,
        args.dets,
        args.seed,
        args.segm,
    )
    print(f"[eval_speed] {len(gt['annotations'])} gt boxes, {len(results)} detections", flush=True)
    columns, load_seconds = _load_columns(gt, args.workers)
    max_diff = 0.0
    for task in ["bbox", "segm"] if args.segm else ["bbox"]:
        metrics, seconds = _time_task(columns, results, task, args.repeats)
        max_diff = max(max_diff, _print_task(task, metrics, seconds))
    print(
        "[eval_speed] ground-truth load (once per evaluator): "
        + ", ".join(f"{c} {load_seconds[c]:.2f} s" for c in COLUMNS)
    )
    print(f"[eval_speed] max |diff| from the lvis API over all numbers: {max_diff:.2e} (AP points)")
    print(
        f"[eval_speed] load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
