"""Detections of a whole dataset in columnar form, the input of the LVIS engines.

A list of LVIS result dicts (what detectron2's ``instances_to_coco_json`` makes, one dict per
detection) is the interchange format of the LVIS API, but 600k small dicts are slow to build, to
gather across workers and to walk. :class:`LVISDetections` keeps the same information as a few
numpy arrays (plus one RLE per detection when there are masks) and converts both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from faster_coco_eval.core import mask as mask_api

__all__ = ["LVISDetections", "mask_areas"]


@dataclass
class LVISDetections:
    """Detections of many images, one row per detection.

    Attributes:
        image_ids: (N,) int64, the LVIS ``image_id`` of each detection.
        category_ids: (N,) int64, LVIS category ids (not detectron2's contiguous ids).
        scores: (N,) float64.
        boxes: (N, 4) float64, absolute XYWH (``[x, y, width, height]``, as in LVIS results).
        masks: None, or N compressed RLEs (dicts with ``size`` and ``counts``).
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    masks: list[dict] | None = None

    def __post_init__(self) -> None:
        self.image_ids = np.asarray(self.image_ids, dtype=np.int64).reshape(-1)
        self.category_ids = np.asarray(self.category_ids, dtype=np.int64).reshape(-1)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        n = len(self.image_ids)
        if not (len(self.category_ids) == len(self.scores) == len(self.boxes) == n):
            raise ValueError(
                "LVISDetections: image_ids, category_ids, scores and boxes differ in length: "
                f"{n}, {len(self.category_ids)}, {len(self.scores)}, {len(self.boxes)}"
            )
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"LVISDetections: {len(self.masks)} masks for {n} detections")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    @classmethod
    def empty(cls, with_masks: bool = False) -> LVISDetections:
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0),
            np.zeros((0, 4)),
            [] if with_masks else None,
        )

    @classmethod
    def from_results(cls, results: Sequence[dict]) -> LVISDetections:
        """From LVIS result dicts (``image_id``, ``category_id``, ``bbox``, ``score``, optional
        ``segmentation`` RLE). Masks are kept only when every result has one."""
        n = len(results)
        if n == 0:
            return cls.empty()
        image_ids = np.fromiter((r["image_id"] for r in results), dtype=np.int64, count=n)
        category_ids = np.fromiter((r["category_id"] for r in results), dtype=np.int64, count=n)
        scores = np.fromiter((r["score"] for r in results), dtype=np.float64, count=n)
        if all("bbox" in r for r in results):
            boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(n, 4)
        else:
            boxes = np.full((n, 4), np.nan)
        masks = None
        if all("segmentation" in r for r in results):
            masks = [r["segmentation"] for r in results]
        if np.isnan(boxes).any():
            if masks is None:
                raise ValueError("LVIS results need a 'bbox' or a 'segmentation' each")
            boxes = _boxes_of_masks(masks)
        return cls(image_ids, category_ids, scores, boxes, masks)

    def top_k_per_image(self, k: int) -> np.ndarray:
        """Indices of the ``k`` best-scored detections of each image (all when ``k < 0``).

        The order is by image id, then score descending, then original position, which is the
        order in which the LVIS API (``LVISResults.limit_dets_per_image`` with a stable sort, then
        per-category stable sorts) ranks detections; ties at the cut keep the earlier ones, as
        there.
        """
        n = len(self)
        by_score = np.argsort(-self.scores, kind="stable")
        order = by_score[np.argsort(self.image_ids[by_score], kind="stable")]
        if k < 0 or n == 0:
            return order
        sorted_images = self.image_ids[order]
        starts = np.flatnonzero(np.r_[True, sorted_images[1:] != sorted_images[:-1]])
        counts = np.diff(np.r_[starts, n])
        rank = np.arange(n) - np.repeat(starts, counts)
        return order[rank < k]

    def to_results(self, with_boxes: bool = True, with_masks: bool = True) -> list[dict]:
        """LVIS result dicts, one per row (the format of the LVIS API and of result JSON files).

        For mask evaluation pass ``with_boxes=False``: the LVIS API then takes the instance area
        from the mask instead of the box (as detectron2's LVIS evaluator does).
        """
        results = []
        boxes = self.boxes.tolist()
        for i, (image_id, category_id, score) in enumerate(
            zip(
                self.image_ids.tolist(),
                self.category_ids.tolist(),
                self.scores.tolist(),
                strict=True,
            )
        ):
            result = {"image_id": image_id, "category_id": category_id, "score": score}
            if with_boxes:
                result["bbox"] = boxes[i]
            if with_masks and self.masks is not None:
                result["segmentation"] = self.masks[i]
            results.append(result)
        return results

    def areas(self, iou_type: str) -> np.ndarray:
        """Instance areas as the LVIS API computes them: box ``w * h`` for "bbox", mask pixel
        count for "segm"."""
        if iou_type == "bbox":
            return self.boxes[:, 2] * self.boxes[:, 3]
        if self.masks is None:
            raise ValueError("segm areas need masks")
        return mask_areas(self.masks)


def mask_areas(masks: Sequence[dict]) -> np.ndarray:
    """Pixel counts of compressed RLEs (with ``bytes`` or ``str`` counts)."""
    if not masks:
        return np.zeros(0)
    # faster-coco-eval's area(): pycocotools 2.0.11's fails on lists of over 255 RLEs.
    return np.asarray(mask_api.area(list(masks)), dtype=np.float64)


def _boxes_of_masks(masks: Sequence[dict]) -> np.ndarray:
    if not masks:
        return np.zeros((0, 4))
    return np.asarray(mask_api.toBbox(list(masks)), dtype=np.float64).reshape(-1, 4)
