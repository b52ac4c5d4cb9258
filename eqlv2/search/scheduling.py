"""Early stopping of the search: ASHA on the intermediate objective (time: evaluations done), or none.

A NaN objective (a model that detects nothing) ranks last: Ray's ASHA would never stop such a
trial, since ``NaN < cutoff`` is false. And no decision is taken at a trial's last evaluation:
stopping it there saves nothing and would record a fully trained trial as pruned.
"""

from __future__ import annotations

import logging
import math

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from .optuna_study import STEP_KEY

logger = logging.getLogger(__name__)


class NonFiniteLastASHA(ASHAScheduler):
    """ASHA where NaN is the worst objective and a trial at ``last_step`` (its last evaluation)
    always finishes."""

    def __init__(self, last_step: int, *, time_attr: str, metric: str, mode: str, **kwargs) -> None:
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, **kwargs)
        self.last_step = int(last_step)
        self.step_key = time_attr
        self.worst = -math.inf if mode == "max" else math.inf

    def _fixed(self, result: dict) -> dict:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isnan(float(value)):
            result = {**result, self.metric: self.worst}
        return result

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        step = result.get(self.step_key)
        if isinstance(step, int | float) and step >= self.last_step:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, self._fixed(result))

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._fixed(result))


def build_scheduler(
    kind: str, total_evaluations: int, grace_period: int = 1, reduction_factor: int = 2
) -> TrialScheduler:
    """``asha`` or ``fifo`` (no early stopping); ``total_evaluations`` of a complete trial."""
    kind = kind.lower()
    if kind == "fifo":
        return FIFOScheduler()
    if kind != "asha":
        raise ValueError(f"unknown scheduler {kind!r}: use asha or fifo")
    if total_evaluations < 2:
        logger.warning("A trial evaluates only once: ASHA cannot stop any trial early (lower TEST.EVAL_PERIOD)")
    # max_t beyond the last evaluation: a trial that reaches it is complete, never "stopped".
    return NonFiniteLastASHA(
        last_step=total_evaluations,
        time_attr=STEP_KEY,
        metric="objective",
        mode="max",
        max_t=total_evaluations + 1,
        grace_period=max(1, grace_period),
        reduction_factor=max(2, reduction_factor),
    )
