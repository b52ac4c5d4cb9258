"""detectron2 hooks of the project."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from detectron2.engine import HookBase
from detectron2.utils.events import get_event_storage

from eqlv2.losses.statistics import GradientStatistics, summarize
from eqlv2.modeling.roi_heads import classification_losses

__all__ = ["GradientStatisticsHook"]

logger = logging.getLogger(__name__)


class GradientStatisticsHook(HookBase):
    """Every ``period`` iterations, writes gradient-statistics summaries to the storage.

    Every classification loss collects the statistics (EQL v2 and the baselines alike); q and r
    are summarised only for the losses that reweigh (EQL v2).

    The summaries (see :func:`eqlv2.losses.statistics.summarize`) go into detectron2's ``EventStorage``
    under ``eqlv2/...`` (``eqlv2/stage{k}/...`` for cascade heads with several losses), so every
    event writer sees them: detectron2's console, JSON and TensorBoard writers, and in a search
    :class:`eqlv2.search.mlflow_worker.MlflowEventWriter`.
    :meth:`snapshots` returns the full per-category arrays for other code to log.
    """

    def __init__(self, period: int, frequency_groups: Sequence[str] | None = None) -> None:
        """
        Args:
            period: iterations between two summaries (> 0).
            frequency_groups: ``(C,)`` group label per category, or None.
        """
        if period <= 0:
            raise ValueError(f"period must be > 0, got {period}")
        self._period = period
        self._groups = list(frequency_groups) if frequency_groups is not None else None

    def _losses(self) -> list:
        return classification_losses(self.trainer.model)

    def snapshots(self) -> list[GradientStatistics]:
        """One snapshot per classification loss in the model (one per cascade stage)."""
        return [GradientStatistics.from_loss(loss) for loss in self._losses()]

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter % self._period != 0 and next_iter != self.trainer.max_iter:
            return
        snapshots = self.snapshots()
        storage = get_event_storage()
        for stage, stats in enumerate(snapshots):
            prefix = "eqlv2/" if len(snapshots) == 1 else f"eqlv2/stage{stage}/"
            storage.put_scalars(**summarize(stats, self._groups, prefix=prefix), smoothing_hint=False)
