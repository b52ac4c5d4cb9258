"""The factories of a trial run's rank-0 hooks, light enough for the trial process.

The trial process (:mod:`eqlv2.search.trial`) builds a :class:`TrialRunHooks` per training run
and hands its factories to the Ray Train workers; only rank 0 calls them. So this module imports
neither detectron2 nor torch: the hooks themselves (:mod:`eqlv2.search.mlflow_worker`) are
imported where they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .mlflow_client import limit_http_retries
from .mlflow_outbox import DurableMlflow, node_outbox

if TYPE_CHECKING:  # detectron2 types, for the annotations only
    from detectron2.engine import PeriodicWriter

    from .mlflow_worker import TrialArtifactsHook

__all__ = ["TrialRunHooks"]


@dataclass(frozen=True)
class TrialRunHooks:
    """Picklable factories of the rank-0 hooks that write one training run into a trial's run.

    Attributes:
        tracking_uri: the MLflow tracking URI (absolute for SQLite).
        outbox_root: the search's outbox folder (absolute; the node's subfolder is used).
        run_id: the trial's child run (its id, or its outbox placeholder).
        dataset: short dataset name (``lvis``, ``openimages``): the metric prefix.
        period: iterations between two writes of the training scalars.
        baseline_ratio: ``(C,)`` gradient ratio of a baseline model for the plots, or None.
    """

    tracking_uri: str
    outbox_root: str
    run_id: str
    dataset: str
    period: int = 20
    baseline_ratio: tuple[float, ...] | None = None

    def _mlflow(self) -> DurableMlflow:
        limit_http_retries()  # in the rank-0 worker: a dead server must not stall training
        return DurableMlflow(self.tracking_uri, node_outbox(self.outbox_root))

    def writer(self, cfg, trainer) -> PeriodicWriter:
        """The rank-0 ``PeriodicWriter`` of the training scalars."""
        from detectron2.engine import PeriodicWriter

        from .mlflow_worker import MlflowEventWriter

        writer = MlflowEventWriter(self._mlflow(), self.run_id, self.dataset, cfg.SOLVER.MAX_ITER, cfg.DATASETS.TEST)
        return PeriodicWriter([writer], period=max(1, int(self.period)))

    def artifacts(self, cfg, trainer) -> TrialArtifactsHook:
        """The rank-0 hook of the gradient statistics and weight norms."""
        from .mlflow_worker import TrialArtifactsHook

        return TrialArtifactsHook(self._mlflow(), self.run_id, self.dataset, cfg, self.baseline_ratio)

    def factories(self) -> list:
        """The factories for ``build_torch_trainer(extra_hooks=...)``."""
        return [self.writer, self.artifacts]
