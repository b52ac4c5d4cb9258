"""Reference trials of a search: the baseline loss, and the paper point re-trained with more seeds.

A ranked table alone cannot say whether the best (gamma, mu, alpha) beats the plain sigmoid loss,
or the paper's point by more than seed noise. So after the search the driver trains, in a second
Tune experiment outside the study and the scheduler: the **baseline** (``MODEL.EQLV2.LOSS
<--baseline>`` with the paper point's other values) and the **noise seeds** (the paper point, the
space's first seed point, with ``--noise-seeds K`` further seeds). The **noise band** is the mean
and standard deviation of the objective over every completed run of the paper point; a trial
more than :data:`NOISE_MARGIN` std from the mean is marked in the ranked table.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .space import CONFIG_KEYS, SearchSpace

#: Config key of a reference trial (absent in search trials): ``baseline`` or ``noise``.
REFERENCE_KEY = "reference"
#: A trial differs from the paper point when ``|objective - mean| > NOISE_MARGIN * std``.
NOISE_MARGIN = 2.0
LOSS_KEY = "MODEL.EQLV2.LOSS"


def paper_point(space: SearchSpace) -> dict[str, Any] | None:
    return space.complete(space.seed_points[0]) if space.seed_points else None


def reference_configs(space: SearchSpace, baseline: str, noise_seeds: int, seed: int) -> list[dict[str, Any]]:
    """The reference trials, the baseline (unless ``none``) first: ``{"role": "baseline", "loss":
    ...}`` or ``{"role": "noise", "seed": ...}`` with seeds ``seed + 1 ... seed + noise_seeds``."""
    configs: list[dict[str, Any]] = []
    if baseline != "none":
        configs.append({"role": "baseline", "loss": baseline})
    if paper_point(space) is not None:
        configs += [{"role": "noise", "seed": seed + k} for k in range(1, noise_seeds + 1)]
    return configs


def reference_label(reference: Mapping[str, Any]) -> str:
    if reference["role"] == "baseline":
        return f"baseline {reference['loss']}"
    return f"paper point, seed {reference['seed']}"


def reference_setup(reference: Mapping[str, Any], space: SearchSpace, seed: int) -> tuple[dict[str, Any], list[str], int]:
    """``(values, extra overrides, seed)`` of a reference trial; the baseline drops gamma, mu and
    alpha (its loss does not read them) and keeps the paper point's other values."""
    point = paper_point(space) or dict(space.fixed)
    if reference["role"] == "baseline":
        values = {name: value for name, value in point.items() if name not in CONFIG_KEYS}
        return values, [LOSS_KEY, str(reference["loss"])], seed
    return dict(point), [], int(reference["seed"])


@dataclass(frozen=True)
class NoiseBand:
    """The objective of each completed run of the paper point."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (NaN with fewer than two runs)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    def distance(self, objective: float) -> float:
        """``(objective - mean) / std`` (NaN when unknown)."""
        if not (math.isfinite(objective) and math.isfinite(self.std)) or self.std == 0:
            return math.nan
        return (objective - self.mean) / self.std

    def differs(self, objective: float) -> bool:
        distance = self.distance(objective)
        return math.isfinite(distance) and abs(distance) > NOISE_MARGIN

    def describe(self, metric: str) -> str:
        runs = len(self.values)
        if runs < 2:
            return f"Noise band: {runs} completed run of the paper point, too few to measure seed noise."
        return (
            f"Noise band of the paper point ({runs} seeds): {metric} = {self.mean:.3f} +- {self.std:.3f} "
            f"(std); trials marked * differ from it by more than {NOISE_MARGIN:g} std."
        )


@dataclass(frozen=True)
class TrialSetup:
    """What one trial trains: its parameter ``values``, overrides beyond them, its detectron2
    ``seed``, its ``role`` (``search``, ``baseline`` or ``noise``) and a run ``label``."""

    values: dict[str, Any]
    extra_opts: list[str]
    seed: int
    role: str
    label: str | None


def trial_setup(config: Mapping[str, Any], space: SearchSpace, seed: int) -> TrialSetup:
    """A trial's setup from its Tune config: a search trial's sampled values with the search's
    ``seed``, or a reference trial's."""
    reference = config.get(REFERENCE_KEY)
    if reference:
        values, extra, seed = reference_setup(reference, space, seed)
        return TrialSetup(values, extra, seed, str(reference["role"]), reference_label(reference))
    return TrialSetup(space.complete(config), [], seed, "search", None)
