"""Two interchangeable engines that compute LVIS AP: the official API and a fast one.

Both take a dataset's detections (:class:`LVISDetections`, or a list of LVIS result dicts) and one
task ("bbox" or "segm") and return an :class:`LVISEvalResult` with the same nine numbers, in
percent: AP, AP50, AP75, APs, APm, APl, APr, APc, APf.

The LVIS protocol (Gupta et al., 2019, and ``lvis==0.5.3``'s ``LVISEval``), which both follow:

* at most 300 detections per image (the best-scored ones) take part;
* federated ignore rule: a detection of category c on image i counts only when c is annotated on
  i (has a ground-truth instance) or is in i's ``neg_category_ids``; other detections are dropped;
* for a category in i's ``not_exhaustive_category_ids``, detections matched to nothing are ignored
  instead of counted as false positives;
* COCO-style matching and 101-point interpolated precision over IoU 0.50:0.95; areas
  small < 32^2 <= medium < 96^2 <= large; AP is the mean over (IoU, recall, category) of the
  defined precisions, APr/APc/APf the same over the rare/common/frequent categories.

A number whose group has no ground truth at all (e.g. APr on a split without rare categories) is
NaN here; the LVIS API reports -1 for it (and detectron2 then -100).

:class:`OfficialLVISEngine` runs ``lvis.LVISEval``, the ground truth of record, with the
``np.float`` workaround of :mod:`eqlv2.evaluation.lvis_numpy_compat`.

:class:`FastLVISEngine` gives the same numbers much faster (``benchmarks/eval_speed.py``):

1. The ground truth is indexed once (arrays, sets of annotated / negative / not-exhaustive
   image-category pairs) and reused by every evaluation.
2. Detections stay in memory as arrays; the top-300 cut and the federated filter are vectorised,
   so only the detections that can count are turned into dicts.
3. The matching and accumulation run in the C++ of ``faster-coco-eval`` (``COCOeval_faster`` with
   ``lvis_style=True``), but only over the image-category pairs that have ground truth or a
   detection: the LVIS API walks all images x categories (2.4 M pairs on a 2,000-image split),
   almost all empty. To that end each category's non-empty pairs get consecutive *virtual* image
   ids, and categories with similar counts of such pairs are evaluated together, so each C++ call
   covers a nearly full (virtual image x category) grid. Per-category results do not depend on
   which other categories share a call: precision and recall are computed per category, and the
   virtual ids keep the real image order, hence the same tie-breaking of equal scores.
4. Categories (with their detections) are split into ``workers`` shards evaluated in forked
   processes; their per-category precision arrays are merged and summarised here exactly as
   ``LVISEval.summarize`` does.
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import numpy as np
from faster_coco_eval import COCOeval_faster
from faster_coco_eval.core import mask as mask_api
from lvis import LVIS, LVISEval, LVISResults

from .lvis_detections import LVISDetections, mask_areas
from .lvis_numpy_compat import lvis_numpy_compat

__all__ = [
    "METRIC_NAMES",
    "FastLVISEngine",
    "LVISEvalResult",
    "OfficialLVISEngine",
    "summarize_lvis_precision",
]

logger = logging.getLogger(__name__)

#: The numbers reported for each task, in this order (detectron2's LVIS evaluator's names).
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")

#: LVIS protocol constants (``lvis.eval.Params``).
MAX_DETS_PER_IMAGE = 300
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
AREA_LABELS = ("all", "small", "medium", "large")
FREQUENCY_LABELS = ("r", "c", "f")

IouType = str  # "bbox" or "segm"


@dataclass
class LVISEvalResult:
    """What one engine computed for one task.

    Attributes:
        iou_type: "bbox" or "segm".
        metrics: METRIC_NAMES -> value in percent (NaN when undefined).
        precision: (10 IoU, 101 recall, K categories, 4 areas) interpolated precision, -1 where
            the category has no ground truth in that area range (``LVISEval.eval["precision"]``).
        recall: (10 IoU, K, 4 areas) final recall, -1 likewise.
        category_ids: the K LVIS category ids, ascending (the order of the K axis).
    """

    iou_type: str
    metrics: dict[str, float]
    precision: np.ndarray = field(repr=False)
    recall: np.ndarray = field(repr=False)
    category_ids: np.ndarray = field(repr=False)


def _mean_defined(values: np.ndarray) -> float:
    defined = values[values > -1]
    return float(np.mean(defined)) if defined.size else -1.0


def summarize_lvis_precision(precision: np.ndarray, frequencies: Sequence[str]) -> dict[str, float]:
    """The nine LVIS numbers (percent) from a (T, R, K, A) precision array, as
    ``LVISEval.summarize``: each is the mean of the entries > -1 of its slice; -1 becomes NaN.

    Args:
        precision: interpolated precision, -1 where undefined.
        frequencies: the "r"/"c"/"f" group of each of the K categories.
    """
    frequencies = np.asarray(list(frequencies))
    t50 = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(IOU_THRESHOLDS, 0.75))[0])
    raw = {
        "AP": _mean_defined(precision[:, :, :, 0]),
        "AP50": _mean_defined(precision[t50, :, :, 0]),
        "AP75": _mean_defined(precision[t75, :, :, 0]),
        "APs": _mean_defined(precision[:, :, :, 1]),
        "APm": _mean_defined(precision[:, :, :, 2]),
        "APl": _mean_defined(precision[:, :, :, 3]),
    }
    for label in FREQUENCY_LABELS:
        raw["AP" + label] = _mean_defined(precision[:, :, frequencies == label, 0])
    return {k: _to_percent(raw[k]) for k in METRIC_NAMES}


def _to_percent(value: float) -> float:
    return float("nan") if value == -1 else float(value) * 100.0


def _load_json(json_file_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(json_file_or_dict, dict):
        return json_file_or_dict
    with open(json_file_or_dict) as f:
        return json.load(f)


def ground_truth_of_images(dataset: dict, image_ids: Iterable[int]) -> dict:
    """The LVIS ground truth ``dataset`` (a parsed JSON) restricted to ``image_ids``: their images
    and annotations, every category (with its frequency group) kept."""
    kept = set(image_ids)
    return {
        **dataset,
        "images": [image for image in dataset["images"] if image["id"] in kept],
        "annotations": [ann for ann in dataset["annotations"] if ann["image_id"] in kept],
    }


def _lvis_api(dataset: dict) -> LVIS:
    """An ``lvis.LVIS`` of a parsed ground truth (the API reads only files)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ground_truth.json")
        with open(path, "w") as f:
            json.dump(dataset, f)
        return LVIS(path)


def _check_iou_type(iou_type: str) -> None:
    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")


# ---------------------------------------------------------------------------------------------
# The official LVIS API
# ---------------------------------------------------------------------------------------------


class OfficialLVISEngine:
    """``lvis==0.5.3``'s ``LVISResults`` + ``LVISEval``, as detectron2's LVIS evaluator runs them.

    Args:
        ground_truth: the LVIS ground-truth JSON (the ``LVIS`` object is built once), its
            parsed dict, or an ``lvis.LVIS`` object already built.
        max_dets: detections per image that take part (300 in the LVIS protocol).
    """

    name = "lvis"

    def __init__(self, ground_truth: str | os.PathLike | dict | LVIS, max_dets: int = MAX_DETS_PER_IMAGE):
        if isinstance(ground_truth, dict):
            ground_truth = _lvis_api(ground_truth)
        elif not isinstance(ground_truth, LVIS):
            ground_truth = LVIS(os.fspath(ground_truth))
        self.lvis_gt = ground_truth
        self.max_dets = max_dets

    @property
    def num_annotations(self) -> int:
        return len(self.lvis_gt.anns)

    def evaluate(
        self, detections: LVISDetections | Sequence[dict], iou_type: IouType
    ) -> LVISEvalResult:
        """Evaluates ``detections`` (LVIS category ids) on one task. They must not be empty."""
        _check_iou_type(iou_type)
        results = self._results(detections, iou_type)
        if not results:
            raise ValueError("the LVIS API cannot evaluate an empty list of detections")
        with lvis_numpy_compat():
            lvis_results = LVISResults(self.lvis_gt, results, max_dets=self.max_dets)
            lvis_eval = LVISEval(self.lvis_gt, lvis_results, iou_type)
            lvis_eval.run()
        metrics = {k: _to_percent(float(lvis_eval.results[k])) for k in METRIC_NAMES}
        return LVISEvalResult(
            iou_type=iou_type,
            metrics=metrics,
            precision=lvis_eval.eval["precision"],
            recall=lvis_eval.eval["recall"],
            category_ids=np.asarray(lvis_eval.params.cat_ids),
        )

    @staticmethod
    def _results(detections: LVISDetections | Sequence[dict], iou_type: IouType) -> list[dict]:
        """Fresh result dicts (the LVIS API writes into them); for "segm" without ``bbox`` so
        that the instance area is the mask's, as in detectron2."""
        if isinstance(detections, LVISDetections):
            if iou_type == "segm" and not detections.has_masks:
                raise ValueError("segm evaluation needs detections with masks")
            return detections.to_results(
                with_boxes=iou_type == "bbox", with_masks=iou_type == "segm"
            )
        if iou_type == "bbox":
            return [dict(r) for r in detections]
        out = []
        for r in detections:
            if "segmentation" not in r:
                raise ValueError("segm evaluation needs detections with masks")
            r = dict(r)
            r.pop("bbox", None)
            out.append(r)
        return out


# ---------------------------------------------------------------------------------------------
# The fast engine
# ---------------------------------------------------------------------------------------------


class _GroundTruthIndex:
    """The LVIS ground truth as arrays, built once per engine.

    Images and categories are addressed by their row / column in ascending id order; an
    image-category pair by the key ``column * num_images + row``.
    """

    def __init__(self, dataset: dict):
        images = sorted(dataset["images"], key=lambda im: im["id"])
        categories = sorted(dataset["categories"], key=lambda c: c["id"])
        annotations = dataset.get("annotations", [])
        self.image_ids = np.array([im["id"] for im in images], dtype=np.int64)
        self.heights = np.array([im["height"] for im in images], dtype=np.int64)
        self.widths = np.array([im["width"] for im in images], dtype=np.int64)
        self.category_ids = np.array([c["id"] for c in categories], dtype=np.int64)
        self.frequencies = [c["frequency"] for c in categories]
        self.num_images = len(images)
        self.num_categories = len(categories)
        if len(np.unique(self.image_ids)) != self.num_images:
            raise ValueError("LVIS ground truth: duplicate image ids")

        n = len(annotations)
        self.ann_ids = np.fromiter((a["id"] for a in annotations), np.int64, n)
        self.ann_rows = self.image_rows(
            np.fromiter((a["image_id"] for a in annotations), np.int64, n)
        )
        self.ann_cols = self.category_cols(
            np.fromiter((a["category_id"] for a in annotations), np.int64, n)
        )
        if (self.ann_cols < 0).any():
            raise ValueError("LVIS ground truth: an annotation has an unknown category_id")
        self.ann_boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(n, 4)
        self.ann_areas = np.fromiter((a["area"] for a in annotations), np.float64, n)
        self._ann_segmentations = [a.get("segmentation") for a in annotations]
        self._ann_rles: list[dict] | None = None
        if any(a.get("ignore", 0) for a in annotations):
            logger.warning(
                "LVIS ground truth has 'ignore' flags; the fast engine does not use them"
            )

        self.cat_has_gt = np.bincount(self.ann_cols, minlength=self.num_categories) > 0
        positive = np.unique(self.ann_cols * self.num_images + self.ann_rows)
        negative = self._pair_keys(images, "neg_category_ids")
        self.allowed_keys = np.union1d(positive, negative)
        self.not_exhaustive_keys = self._pair_keys(images, "not_exhaustive_category_ids")

    def _pair_keys(self, images: list[dict], field_name: str) -> np.ndarray:
        rows, cats = [], []
        for row, image in enumerate(images):
            ids = image.get(field_name) or []
            rows.extend([row] * len(ids))
            cats.extend(ids)
        cols = self.category_cols(np.asarray(cats, dtype=np.int64))
        rows = np.asarray(rows, dtype=np.int64)
        known = cols >= 0
        return np.unique(cols[known] * self.num_images + rows[known])

    def image_rows(self, image_ids: np.ndarray) -> np.ndarray:
        """Rows of ``image_ids``; raises ValueError for an id not in the ground truth."""
        rows = np.searchsorted(self.image_ids, image_ids)
        rows = np.minimum(rows, max(self.num_images - 1, 0))
        if len(image_ids) and (self.num_images == 0 or (self.image_ids[rows] != image_ids).any()):
            raise ValueError("Results do not correspond to current LVIS set: unknown image_id")
        return rows

    def category_cols(self, category_ids: np.ndarray) -> np.ndarray:
        """Columns of ``category_ids``, -1 for ids not in the ground truth."""
        if self.num_categories == 0:
            return np.full(len(category_ids), -1, dtype=np.int64)
        cols = np.minimum(np.searchsorted(self.category_ids, category_ids), self.num_categories - 1)
        return np.where(self.category_ids[cols] == category_ids, cols, -1)

    def ann_rles(self) -> list[dict]:
        """Each annotation's mask as a compressed RLE (polygons rasterised once, then cached)."""
        if self._ann_rles is None:
            import pycocotools.mask as mask_util

            rles = []
            for segm, row in zip(self._ann_segmentations, self.ann_rows.tolist(), strict=True):
                h, w = int(self.heights[row]), int(self.widths[row])
                if segm is None:
                    raise ValueError("segm evaluation needs 'segmentation' in every gt annotation")
                if isinstance(segm, list):
                    rle = mask_util.merge(mask_util.frPyObjects(segm, h, w))
                elif isinstance(segm["counts"], list):
                    rle = mask_util.frPyObjects(segm, h, w)
                else:
                    rle = segm
                rles.append(rle)
            self._ann_rles = rles
            self._ann_segmentations = []
        return self._ann_rles


@dataclass
class _Job:
    """One evaluation's inputs, shared with the shard workers (inherited by fork)."""

    gt: _GroundTruthIndex
    iou_type: str
    max_dets: int
    rows: np.ndarray  # image row of each counted detection
    cols: np.ndarray  # category column
    ids: np.ndarray  # unique detection ids (>= 1)
    scores: np.ndarray
    boxes: np.ndarray
    areas: np.ndarray
    masks: list[dict] | None


#: The job of the evaluation in progress, read by forked workers (see FastLVISEngine.evaluate).
_JOB: _Job | None = None
_JOB_LOCK = threading.Lock()


def _run_shard(cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Worker entry point: evaluates the categories ``cols`` of the job in progress."""
    assert _JOB is not None, "no LVIS evaluation job in progress"
    return _evaluate_categories(_JOB, cols)


def _evaluate_categories(job: _Job, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision (T, R, k, A) and recall (T, k, A) of the categories ``cols`` (sorted, all with
    ground truth), with ``cols`` itself."""
    gt = job.gt
    num_images = gt.num_images
    cols = np.sort(np.asarray(cols, dtype=np.int64))
    in_shard = np.zeros(gt.num_categories, dtype=bool)
    in_shard[cols] = True
    g_sel = np.flatnonzero(in_shard[gt.ann_cols])
    d_sel = np.flatnonzero(in_shard[job.cols])
    g_keys = gt.ann_cols[g_sel] * num_images + gt.ann_rows[g_sel]
    d_keys = job.cols[d_sel] * num_images + job.rows[d_sel]

    # Consecutive virtual image ids (from 1) for each category's non-empty pairs, in image order.
    pair_keys = np.unique(np.concatenate([g_keys, d_keys]))
    pair_cols = pair_keys // num_images
    virtual = np.arange(len(pair_keys)) - np.searchsorted(pair_cols, pair_cols) + 1
    d_not_exhaustive = np.isin(d_keys, gt.not_exhaustive_keys)
    g_virtual = virtual[np.searchsorted(pair_keys, g_keys)]
    d_virtual = virtual[np.searchsorted(pair_keys, d_keys)]
    pairs_per_col = np.bincount(pair_cols, minlength=gt.num_categories)

    # Groups of categories whose pair counts are within a factor of 2.
    group_of_col = np.floor(np.log2(np.maximum(pairs_per_col, 1))).astype(np.int64)
    precision = np.empty((len(IOU_THRESHOLDS), 101, len(cols), len(AREA_LABELS)))
    recall = np.empty((len(IOU_THRESHOLDS), len(cols), len(AREA_LABELS)))
    position = {int(c): i for i, c in enumerate(cols)}
    for group in np.unique(group_of_col[cols]):
        group_cols = cols[group_of_col[cols] == group]
        p, r = _evaluate_group(
            job, group_cols, g_sel, g_virtual, d_sel, d_virtual, d_not_exhaustive
        )
        at = [position[int(c)] for c in group_cols]
        precision[:, :, at, :] = p
        recall[:, at, :] = r
    return cols, precision, recall


class _PreparedCOCOeval(COCOeval_faster):
    """``COCOeval_faster`` fed with ready-made annotation dicts and IoU matrices.

    Its own ``_prepare`` indexes two ``COCO`` objects and re-applies the LVIS filters in Python
    for every detection, and its ``computeIoU`` fetches and re-sorts each pair's annotations; here
    the filters have been applied (vectorised) and the IoUs computed already. The dicts carry only
    what its C++ reads: ``id``, ``area``, ``ignore`` / ``iscrowd`` (0) on ground truth, and
    ``score`` and ``lvis_mark`` (the pair is not exhaustively annotated) on detections.
    """

    def __init__(
        self,
        gts: list[dict],
        dts: list[dict],
        ious: dict[tuple[int, int], np.ndarray],
        iou_type: str,
        cat_ids: list[int],
        num_images: int,
        max_dets: int,
    ):
        quiet = logging.getLogger("faster_coco_eval").debug
        super().__init__(None, None, iou_type, lvis_style=True, print_function=quiet)
        self.params.imgIds = list(range(1, num_images + 1))
        self.params.catIds = sorted(cat_ids)
        self.params.maxDets = [max_dets]
        self._ready_gts = gts
        self._ready_dts = dts
        self._ready_ious = ious

    def _prepare(self) -> None:
        self.gt_dataset.clean()
        self.dt_dataset.clean()
        for ann in self._ready_gts:
            self.gt_dataset.append_ref(ann["image_id"], ann["category_id"], ann)
        for ann in self._ready_dts:
            self.dt_dataset.append_ref(ann["image_id"], ann["category_id"], ann)
        self._nonempty_iou_pairs = set(self._ready_ious)

    def computeIoU(self, imgId: int, catId: int) -> np.ndarray | list:  # noqa: N802 (API name)
        return self._ready_ious.get((imgId, catId), [])


def _pair_slices(keys: np.ndarray) -> dict[int, slice]:
    """``{key: slice}`` of each run of equal values in the sorted array ``keys``."""
    if len(keys) == 0:
        return {}
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], len(keys)]
    return {int(keys[s]): slice(int(s), int(e)) for s, e in zip(starts, ends, strict=True)}


def _evaluate_group(
    job: _Job,
    group_cols: np.ndarray,
    g_sel: np.ndarray,
    g_virtual: np.ndarray,
    d_sel: np.ndarray,
    d_virtual: np.ndarray,
    d_not_exhaustive: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One C++ evaluation over the categories ``group_cols`` and their virtual images."""
    gt = job.gt
    in_group = np.zeros(gt.num_categories, dtype=bool)
    in_group[group_cols] = True
    # Ground truth and detections of the group, each sorted by (category, virtual image) with
    # a stable sort: within a pair, gt keep the file order and detections the score order.
    g_in = in_group[gt.ann_cols[g_sel]]
    g_idx, g_v = g_sel[g_in], g_virtual[g_in]
    g_order, g_pair = _pair_order(gt, gt.ann_cols[g_idx], g_v)
    g_idx, g_v = g_idx[g_order], g_v[g_order]
    g_cat = gt.category_ids[gt.ann_cols[g_idx]]
    d_in = in_group[job.cols[d_sel]]
    d_idx, d_v, d_mark = d_sel[d_in], d_virtual[d_in], d_not_exhaustive[d_in]
    d_order, d_pair = _pair_order(gt, job.cols[d_idx], d_v)
    d_idx, d_v, d_mark = d_idx[d_order], d_v[d_order], d_mark[d_order]
    d_cat = gt.category_ids[job.cols[d_idx]]

    gt_anns = [
        {"id": i, "image_id": v, "category_id": c, "area": a, "ignore": 0, "iscrowd": 0}
        for i, v, c, a in zip(
            gt.ann_ids[g_idx].tolist(), g_v.tolist(), g_cat.tolist(),
            gt.ann_areas[g_idx].tolist(), strict=True,
        )
    ]  # fmt: skip
    dt_anns = [
        {"id": i, "image_id": v, "category_id": c, "score": s, "area": a, "lvis_mark": m}
        for i, v, c, s, a, m in zip(
            job.ids[d_idx].tolist(), d_v.tolist(), d_cat.tolist(), job.scores[d_idx].tolist(),
            job.areas[d_idx].tolist(), d_mark.tolist(), strict=True,
        )
    ]  # fmt: skip
    ious = _pair_ious(job, g_idx, g_v, g_cat, g_pair, d_idx, d_pair)
    num_virtual = int(max(g_v.max(initial=0), d_v.max(initial=0)))
    coco_eval = _PreparedCOCOeval(
        gt_anns, dt_anns, ious, job.iou_type, gt.category_ids[group_cols].tolist(),
        num_virtual, job.max_dets,
    )  # fmt: skip
    coco_eval.evaluate()
    coco_eval.accumulate()
    # eval["precision"]: (T, R, K, A, M), K in ascending category id order, as group_cols.
    return coco_eval.eval["precision"][..., -1], coco_eval.eval["recall"][..., -1]


def _pair_order(
    gt: _GroundTruthIndex, cols: np.ndarray, virtual: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The stable sort order of rows by (category id, virtual image), and their sorted keys."""
    keys = gt.category_ids[cols] * (gt.num_images + 1) + virtual
    order = np.argsort(keys, kind="stable")
    return order, keys[order]


def _pair_ious(
    job: _Job,
    g_idx: np.ndarray,
    g_v: np.ndarray,
    g_cat: np.ndarray,
    g_pair: np.ndarray,
    d_idx: np.ndarray,
    d_pair: np.ndarray,
) -> dict[tuple[int, int], np.ndarray]:
    """IoU (detections x ground truth) of every (virtual image, category) pair that has both,
    as COCOeval computes it."""
    g_slices, d_slices = _pair_slices(g_pair), _pair_slices(d_pair)
    segm = job.iou_type == "segm"
    if segm:
        gt_rles, dt_rles = job.gt.ann_rles(), job.masks
    else:
        g_boxes, d_boxes = job.gt.ann_boxes[g_idx], job.boxes[d_idx]
    ious: dict[tuple[int, int], np.ndarray] = {}
    for key, gs in g_slices.items():
        ds = d_slices.get(key)
        if ds is None:
            continue
        pair = (int(g_v[gs.start]), int(g_cat[gs.start]))
        crowd = [0] * (gs.stop - gs.start)
        if segm:
            dt_m = [dt_rles[i] for i in d_idx[ds].tolist()]
            gt_m = [gt_rles[i] for i in g_idx[gs].tolist()]
            ious[pair] = mask_api.iou(dt_m, gt_m, crowd)
        else:
            ious[pair] = mask_api.iou(d_boxes[ds], g_boxes[gs], crowd)
    return ious


def _split_categories(costs: np.ndarray, cols: np.ndarray, parts: int) -> list[np.ndarray]:
    """Splits ``cols`` into at most ``parts`` groups of about equal total cost (greedy LPT)."""
    parts = max(1, min(parts, len(cols)))
    loads = np.zeros(parts)
    members: list[list[int]] = [[] for _ in range(parts)]
    for c in cols[np.argsort(-costs[cols], kind="stable")].tolist():
        j = int(np.argmin(loads))
        members[j].append(c)
        loads[j] += costs[c]
    return [np.sort(np.asarray(m, dtype=np.int64)) for m in members if m]


def _fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class FastLVISEngine:
    """LVIS evaluation with the official numbers in a fraction of the time (see module doc).

    Args:
        json_file: the LVIS ground-truth JSON, or its already-loaded dict.
        max_dets: detections per image that take part (300 in the LVIS protocol).
        workers: processes the per-category evaluation is split over (forked; 0 or 1 evaluates in
            this process). Defaults to 2.
    """

    name = "fast"

    def __init__(
        self,
        json_file: str | os.PathLike | dict,
        max_dets: int = MAX_DETS_PER_IMAGE,
        workers: int = 2,
    ):
        self.gt = _GroundTruthIndex(_load_json(json_file))
        self.max_dets = max_dets
        self.workers = workers

    @property
    def num_annotations(self) -> int:
        return len(self.gt.ann_ids)

    @property
    def category_ids(self) -> np.ndarray:
        return self.gt.category_ids

    @property
    def frequencies(self) -> list[str]:
        return self.gt.frequencies

    def evaluate(
        self, detections: LVISDetections | Sequence[dict], iou_type: IouType
    ) -> LVISEvalResult:
        """Evaluates ``detections`` (LVIS category ids) on one task."""
        _check_iou_type(iou_type)
        if not isinstance(detections, LVISDetections):
            detections = LVISDetections.from_results(detections)
        if iou_type == "segm" and not detections.has_masks:
            raise ValueError("segm evaluation needs detections with masks")
        job = self._make_job(detections, iou_type)
        gt = self.gt
        cols = np.flatnonzero(gt.cat_has_gt)
        costs = (
            np.bincount(job.cols, minlength=gt.num_categories)
            + np.bincount(gt.ann_cols, minlength=gt.num_categories)
            + 20.0
        )
        shards = _split_categories(costs, cols, self.workers)
        pieces = self._run(job, shards)

        num_t, num_a, k = len(IOU_THRESHOLDS), len(AREA_LABELS), gt.num_categories
        precision = -np.ones((num_t, 101, k, num_a))
        recall = -np.ones((num_t, k, num_a))
        for shard_cols, p, r in pieces:
            precision[:, :, shard_cols, :] = p
            recall[:, shard_cols, :] = r
        metrics = summarize_lvis_precision(precision, gt.frequencies)
        return LVISEvalResult(iou_type, metrics, precision, recall, gt.category_ids.copy())

    def _make_job(self, detections: LVISDetections, iou_type: IouType) -> _Job:
        """The top-``max_dets`` cut per image and the federated filter, vectorised."""
        gt = self.gt
        rows_all = gt.image_rows(detections.image_ids)
        top = detections.top_k_per_image(self.max_dets)
        cols = gt.category_cols(detections.category_ids[top])
        rows = rows_all[top]
        safe_cols = np.maximum(cols, 0)
        keys = safe_cols * gt.num_images + rows
        counted = (cols >= 0) & gt.cat_has_gt[safe_cols] & np.isin(keys, gt.allowed_keys)
        kept = top[counted]
        masks = None
        if iou_type == "segm":
            masks = [detections.masks[i] for i in kept.tolist()]
            areas = mask_areas(masks)
        else:
            areas = detections.areas("bbox")[kept]
        return _Job(
            gt=gt,
            iou_type=iou_type,
            max_dets=self.max_dets,
            rows=rows[counted],
            cols=cols[counted],
            ids=np.arange(1, len(kept) + 1, dtype=np.int64),
            scores=detections.scores[kept],
            boxes=detections.boxes[kept],
            areas=areas,
            masks=masks,
        )

    def _run(
        self, job: _Job, shards: list[np.ndarray]
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Evaluates the shards: the first in this process, the others in forked workers."""
        if job.iou_type == "segm":
            self.gt.ann_rles()  # rasterise once, before forking, so that every worker has them
        if len(shards) <= 1 or not _fork_available():
            return [_evaluate_categories(job, s) for s in shards]
        global _JOB
        with _JOB_LOCK:
            _JOB = job
            # Keep the collector of the forked workers off the objects they inherit: a collection
            # would touch (and so copy) every page of the parent's heap.
            gc.freeze()
            pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
            try:
                context = multiprocessing.get_context("fork")
                with ProcessPoolExecutor(max_workers=len(shards) - 1, mp_context=context) as pool:
                    futures = [pool.submit(_run_shard, s) for s in shards[1:]]
                    pieces.append(_evaluate_categories(job, shards[0]))
                    pieces += [f.result() for f in futures]
                return pieces
            except (OSError, AssertionError, BrokenProcessPool) as error:
                # E.g. a daemonic process may not have children: evaluate here instead.
                logger.warning("LVIS workers unavailable (%s); evaluating in this process", error)
                done = {int(p[0][0]) for p in pieces}
                return pieces + [
                    _evaluate_categories(job, s) for s in shards if int(s[0]) not in done
                ]
            finally:
                gc.unfreeze()
                _JOB = None
