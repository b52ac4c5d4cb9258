"""The detectron2 trainer of the project: EQL v2 heads, the project's evaluators and hooks."""

from __future__ import annotations

import logging
import os
import weakref

from detectron2.config import CfgNode
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, hooks
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from eqlv2.data.preflight import check_dataset_files
from eqlv2.engine.checkpoint import SafeDetectionCheckpointer, UntrustedWeightsError
from eqlv2.engine.hooks import GradientStatisticsHook

from .base_checkpoint import ensure_base_checkpoint, load_base_weights

logger = logging.getLogger(__name__)


class WeightsUnavailableError(RuntimeError):
    """``MODEL.WEIGHTS`` names a file or URL that cannot be read."""


def frequency_groups_of(dataset_name: str) -> list[str] | None:
    """The r/c/f group of each category of a registered dataset, or None when unknown."""
    from eqlv2.data import category_statistics

    try:
        return list(category_statistics(dataset_name).frequency_groups)
    except (KeyError, ValueError, FileNotFoundError, AttributeError) as error:
        logger.warning("No frequency groups for %s (%s); statistics are not grouped", dataset_name, error)
        return None


class EQLv2Trainer(DefaultTrainer):
    """``DefaultTrainer`` with the project's evaluators and the gradient-statistics hook.

    The EQL v2 statistics live in the model (see :class:`EQLv2FastRCNNOutputLayers`), so the
    standard :class:`DetectionCheckpointer` saves them and ``resume_or_load(resume=True)``
    restores them with the rest of the model.
    """

    def __init__(self, cfg: CfgNode) -> None:
        check_dataset_files(cfg)  # a broken dataset file is named before anything is built
        super().__init__(cfg)
        # Loading (MODEL.WEIGHTS, resume) refuses untrusted pickles; see eqlv2.engine.checkpoint.
        self.checkpointer = SafeDetectionCheckpointer.from_config(
            cfg, self.checkpointer.model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        from eqlv2.evaluation import build_evaluator

        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """detectron2's loader, over the first ``TEST.EQLV2.MAX_IMAGES`` images when that is set
        (:func:`eqlv2.evaluation.evaluated_images`; the evaluator scores the same images)."""
        from eqlv2.evaluation import evaluated_images

        subset = evaluated_images(cfg, dataset_name)
        if subset is None:
            return super().build_test_loader(cfg, dataset_name)
        return build_detection_test_loader(subset, mapper=DatasetMapper(cfg, False), num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None):
        """detectron2's ``test``; with ``TEST.EQLV2.EVALUATE_MASKS`` False the mask head of a mask
        model is skipped while it runs (boxes only, :func:`eqlv2.evaluation.evaluates_masks`)."""
        from eqlv2.evaluation import evaluates_masks

        roi_heads = getattr(getattr(model, "module", model), "roi_heads", None)
        if not cfg.MODEL.MASK_ON or evaluates_masks(cfg) or roi_heads is None:
            return super().test(cfg, model, evaluators)
        roi_heads.mask_on = False
        try:
            return super().test(cfg, model, evaluators)
        finally:
            roi_heads.mask_on = True

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """detectron2's loader; with ``DATASETS.EQLV2.CLASS_AGNOSTIC`` every annotation is category 0."""
        if not cfg.DATASETS.EQLV2.CLASS_AGNOSTIC:
            return super().build_train_loader(cfg)
        if cfg.MODEL.ROI_HEADS.NUM_CLASSES != 1:
            raise ValueError(
                "DATASETS.EQLV2.CLASS_AGNOSTIC needs MODEL.ROI_HEADS.NUM_CLASSES 1, got "
                f"{cfg.MODEL.ROI_HEADS.NUM_CLASSES}"
            )
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        return build_detection_train_loader(cfg, dataset=class_agnostic(dicts))

    def build_hooks(self) -> list[hooks.HookBase]:
        hook_list = super().build_hooks()
        period = self.cfg.MODEL.EQLV2.LOG_PERIOD
        if period > 0:
            groups = frequency_groups_of(self.cfg.DATASETS.TRAIN[0]) if self.cfg.DATASETS.TRAIN else None
            self.gradient_statistics = GradientStatisticsHook(period, groups)
            # Before the PeriodicWriter (the last hook on the main process), so that the
            # summaries of an iteration are written in that same iteration.
            position = len(hook_list) - 1 if comm.is_main_process() else len(hook_list)
            hook_list.insert(position, self.gradient_statistics)
        return hook_list

    def resume_or_load(self, resume: bool = True) -> None:
        """As detectron2's, but a missing or unreadable ``MODEL.WEIGHTS`` raises an error naming it,
        and an empty one starts from the config's base checkpoint (trained first if needed; see
        :mod:`eqlv2.engine.base_checkpoint`) or, without one, from random initialisation."""
        weights = self.cfg.MODEL.WEIGHTS
        if resume and self.checkpointer.has_checkpoint():
            super().resume_or_load(resume=True)
            return
        if not weights:
            self.start_iter = 0
            base = ensure_base_checkpoint(self.cfg)
            if base is None:
                logger.info("MODEL.WEIGHTS is empty: training from random initialisation")
            else:
                load_base_weights(self.model, base)
            return
        try:
            super().resume_or_load(resume=resume)
        except UntrustedWeightsError:
            raise
        except Exception as error:  # fvcore raises AssertionError, iopath URL/OS errors
            raise WeightsUnavailableError(
                f"cannot read MODEL.WEIGHTS={weights!r} ({type(error).__name__}: {error}). "
                "Give a readable local path or a URL this machine can reach, "
                "or MODEL.WEIGHTS '' to start from random initialisation."
            ) from error


def class_agnostic(dataset_dicts: list[dict]) -> list[dict]:
    """Copies of detectron2 dataset dicts with every annotation's ``category_id`` set to 0."""
    return [
        {**record, "annotations": [{**a, "category_id": 0} for a in record.get("annotations", [])]}
        for record in dataset_dicts
    ]


def load_model_weights(model, path: str, allow_pickle: bool = False) -> None:
    """Loads a detectron2 checkpoint into ``model`` for evaluation, naming ``path`` on failure.

    ``allow_pickle``: ``MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS`` (see eqlv2.engine.checkpoint).
    """
    try:
        SafeDetectionCheckpointer(model, allow_pickle=allow_pickle).load(path)
    except UntrustedWeightsError:
        raise
    except Exception as error:
        raise WeightsUnavailableError(f"cannot read weights {path!r}: {error}") from error
