"""The factories of a trial run's rank-0 hooks, picklable and light enough for the trial process:
this module imports neither detectron2 nor torch; the hooks (:mod:`eqlv2.search.mlflow_worker`)
are imported where they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .mlflow_outbox import DurableMlflow

if TYPE_CHECKING:  # detectron2 types, for the annotations only
    from detectron2.engine import PeriodicWriter

    from .mlflow_worker import TrialArtifactsHook

@dataclass(frozen=True)
class TrialRunHooks:
    """Factories of the rank-0 hooks that write one training run into a trial's run (its id or
    outbox placeholder); ``baseline_ratio`` is a baseline's ``(C,)`` gradient ratio for the plots."""

    tracking_uri: str
    outbox_root: str
    run_id: str
    dataset: str
    period: int = 20
    baseline_ratio: tuple[float, ...] | None = None

    def _mlflow(self) -> DurableMlflow:
        return DurableMlflow.on_node(self.tracking_uri, self.outbox_root, short_retries=True)

    def writer(self, cfg, trainer) -> PeriodicWriter:
        from detectron2.engine import PeriodicWriter

        from .mlflow_worker import MlflowEventWriter

        writer = MlflowEventWriter(self._mlflow(), self.run_id, self.dataset, cfg.SOLVER.MAX_ITER, cfg.DATASETS.TEST)
        return PeriodicWriter([writer], period=max(1, int(self.period)))

    def artifacts(self, cfg, trainer) -> TrialArtifactsHook:
        from .mlflow_worker import TrialArtifactsHook

        return TrialArtifactsHook(self._mlflow(), self.run_id, self.dataset, cfg, self.baseline_ratio)

    def factories(self) -> list:
        """For ``build_torch_trainer(extra_hooks=...)``."""
        return [self.writer, self.artifacts]
