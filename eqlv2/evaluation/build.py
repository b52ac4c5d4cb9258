"""Picks the evaluator of a registered dataset from its metadata's ``evaluator_type``."""

from __future__ import annotations

import logging

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils.logger import log_first_n

from .lvis import ENGINES, LVISEvaluator
from .openimages import OpenImagesEvaluator

__all__ = ["build_evaluator", "evaluated_images", "evaluates_masks"]


def _lvis_engine(cfg: CfgNode) -> str:
    """``cfg.TEST.EQLV2.LVIS_ENGINE``, or "fast" for a config without the project's keys."""
    eqlv2_test = cfg.TEST.get("EQLV2")
    engine = eqlv2_test.get("LVIS_ENGINE", "fast") if eqlv2_test is not None else "fast"
    if engine not in ENGINES:
        raise ValueError(f"TEST.EQLV2.LVIS_ENGINE must be one of {ENGINES}, got {engine!r}")
    return engine


def evaluates_masks(cfg: CfgNode) -> bool:
    """Whether ``cfg``'s model predicts masks at test time: ``MODEL.MASK_ON`` unless
    ``TEST.EQLV2.EVALUATE_MASKS`` is False (a config without the project's keys: ``MODEL.MASK_ON``)."""
    eqlv2_test = cfg.TEST.get("EQLV2")
    wanted = eqlv2_test.get("EVALUATE_MASKS", True) if eqlv2_test is not None else True
    return bool(cfg.MODEL.MASK_ON and wanted)


class FirstImagesCOCOEvaluator(COCOEvaluator):
    """detectron2's ``COCOEvaluator`` scoring ``image_ids`` only (by default it scores every image
    of the dataset, those without predictions included)."""

    def __init__(self, dataset_name: str, output_dir: str | None, image_ids: list) -> None:
        super().__init__(dataset_name, output_dir=output_dir)
        self._image_ids = list(image_ids)

    def evaluate(self, img_ids=None):
        return super().evaluate(self._image_ids if img_ids is None else img_ids)


def evaluated_images(cfg: CfgNode, dataset_name: str) -> list[dict] | None:
    """The dataset dicts of ``dataset_name`` evaluated under ``TEST.EQLV2.MAX_IMAGES`` (its first
    N), or None when every image is (0, a config without the key, or N at least the set's size)."""
    eqlv2_test = cfg.TEST.get("EQLV2")
    limit = int(eqlv2_test.get("MAX_IMAGES", 0)) if eqlv2_test is not None else 0
    if limit < 0:
        raise ValueError(f"TEST.EQLV2.MAX_IMAGES must be 0 (every image) or positive, got {limit}")
    dicts = DatasetCatalog.get(dataset_name) if limit else []
    if len(dicts) <= limit:
        return None
    # Once per process: the test loader and the evaluator of every evaluation pick the same images.
    message = f"Evaluating {dataset_name} on its first {limit} of {len(dicts)} images (TEST.EQLV2.MAX_IMAGES)"
    log_first_n(logging.INFO, message, key="message", name=__name__)
    return dicts[:limit]


def build_evaluator(
    cfg: CfgNode, dataset_name: str, output_dir: str | None = None
) -> DatasetEvaluator:
    """The evaluator of ``dataset_name`` by ``MetadataCatalog.get(dataset_name).evaluator_type``:

    * "lvis": :class:`~eqlv2.evaluation.lvis.LVISEvaluator` with the engine
      ``cfg.TEST.EQLV2.LVIS_ENGINE``, "segm" too when :func:`evaluates_masks`;
    * "openimages": :class:`~eqlv2.evaluation.openimages.OpenImagesEvaluator`;
    * "coco": detectron2's ``COCOEvaluator``.

    Each scores the images of :func:`evaluated_images` (``TEST.EQLV2.MAX_IMAGES``) against their
    ground truth alone (COCO: :class:`FirstImagesCOCOEvaluator`).

    Raises:
        NotImplementedError: for any other (or a missing) ``evaluator_type``.
    """
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type")
    subset = evaluated_images(cfg, dataset_name) if evaluator_type in ("lvis", "openimages", "coco") else None
    image_ids = None if subset is None else [record["image_id"] for record in subset]
    if evaluator_type == "lvis":
        # A mask model reports "segm" even before it detects anything (NaN numbers then);
        # otherwise detectron2 infers the tasks from the predictions.
        tasks = ("bbox", "segm") if evaluates_masks(cfg) else ("bbox",) if cfg.MODEL.MASK_ON else None
        engine = _lvis_engine(cfg)
        return LVISEvaluator(dataset_name, tasks, output_dir=output_dir, engine=engine, image_ids=image_ids)
    if evaluator_type == "openimages":
        return OpenImagesEvaluator(dataset_name, output_dir=output_dir, image_ids=image_ids)
    if evaluator_type == "coco" and image_ids is not None:
        return FirstImagesCOCOEvaluator(dataset_name, output_dir, image_ids)
    if evaluator_type == "coco":
        return COCOEvaluator(dataset_name, output_dir=output_dir)
    raise NotImplementedError(
        f"no evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r} "
        "(known: 'lvis', 'openimages', 'coco')"
    )
