"""What a trial needs to know: the datasets (:data:`DATASETS`), the :class:`Objective` (one metric
or a weighted mix such as ``0.5*AP+0.5*APr``, per dataset; across datasets their mean), and the
picklable :class:`TrialSettings` the driver hands to every trial.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .options import SearchInputError
from .space import SearchSpace, finite_number

#: Config key the driver adds to a suggested trial: the id of the MLflow run it created for it
#: (:mod:`eqlv2.search.mlflow_trial_run`).
RUN_ID_KEY = "mlflow_run_id"


def repository_root() -> Path:
    """The project's checkout (where ``configs/`` lives)."""
    return Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset a trial trains on: its short name (the prefix of its metrics), the absolute path
    of its detectron2 config, and the flat metrics its evaluator reports (the first: its main AP)."""

    name: str
    config_file: str
    metrics: tuple[str, ...]

    @property
    def eval_key(self) -> str:
        """The metric whose presence marks a report as an evaluation."""
        return self.metrics[0]


#: Known datasets: default config (relative to the repository) and reported metrics.
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lvis": ("configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml", ("AP", "APr", "APc", "APf", "APb")),
    "openimages": ("configs/tiny/faster_rcnn_tiny_synthetic_openimages.yaml", ("AP", "AP1", "AP2", "AP3", "AP4", "AP5")),
}


def dataset_specs(names: Sequence[str], config_files: Sequence[str] = ()) -> tuple[DatasetSpec, ...]:
    """Dataset specs for ``names`` (in training order), with ``config_files`` entries ``NAME=PATH``
    or, with one dataset, a bare ``PATH``; datasets not named keep their default config."""
    names = [name.strip().lower() for name in names if name.strip()]
    if not names:
        raise ValueError("no dataset given: use --datasets lvis, openimages or lvis,openimages")
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise ValueError(f"unknown dataset(s) {unknown}: choose from {sorted(DATASETS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"dataset named twice in {names}")
    chosen: dict[str, str] = {}
    for entry in config_files:
        prefix, equals, path = entry.partition("=")
        name = prefix.strip().lower()
        if equals and name in DATASETS:
            if name not in names:
                raise ValueError(f"--config-file {entry!r} names dataset {name!r}, which is not searched")
        elif len(names) == 1:
            name, path = names[0], entry
        else:
            raise ValueError(f"--config-file {entry!r}: with several datasets give NAME=PATH (e.g. lvis=my.yaml)")
        chosen[name] = path
    specs = []
    for name in names:
        default, metrics = DATASETS[name]
        path = Path(chosen.get(name) or repository_root() / default).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"config file of {name} not found: {path}")
        specs.append(DatasetSpec(name=name, config_file=str(path.resolve()), metrics=metrics))
    return tuple(specs)


@dataclass(frozen=True)
class Objective:
    """A weighted sum of flat evaluation metrics (``(weight, name)`` terms), maximised."""

    terms: tuple[tuple[float, str], ...]
    text: str

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.terms]

    @property
    def slug(self) -> str:
        """The expression as a file- and name-safe string."""
        return re.sub(r"[^A-Za-z0-9.]+", "_", self.text).strip("_")

    def check(self, datasets: Sequence[DatasetSpec]) -> None:
        """Raises ValueError if a dataset does not report a metric of the objective."""
        for spec in datasets:
            missing = [name for name in self.names if name not in spec.metrics]
            if missing:
                raise ValueError(f"--metric {self.text!r}: {spec.name} does not report {missing} (it reports {', '.join(spec.metrics)})")

    def value(self, metrics: Mapping[str, Any]) -> float | None:
        """The objective from one dataset's flat metrics; None if a term is missing or not finite."""
        numbers = [finite_number(metrics.get(name)) for _, name in self.terms]
        if None in numbers:
            return None
        return sum((weight * number for (weight, _), number in zip(self.terms, numbers, strict=True)), 0.0)


#: One token of a metric expression: a number, a metric name, ``*``, ``+``/``-``, or anything else.
_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"
    r"|(?P<name>[A-Za-z][A-Za-z0-9_]*)|(?P<times>\*)|(?P<sign>[+-])|(?P<other>\S))"
)
_EXAMPLES = "use e.g. AP, APr or 0.5*AP+0.5*APr"


def parse_objective(text: str, known: Iterable[str] | None = None) -> Objective:
    """Reads ``--metric`` with the grammar ``[sign] term (sign term)*``, ``term = [number '*'] NAME``
    (e.g. ``0.5*AP + 0.5*APr``); ``known`` (None: unchecked) are the metrics the datasets report.
    Any error is a one-line SearchInputError saying where and why."""
    if not text or not text.strip():
        raise SearchInputError(f"--metric is empty: {_EXAMPLES}")

    def fail(reason: str) -> SearchInputError:
        return SearchInputError(f"--metric {text!r}: {reason}; {_EXAMPLES}")

    tokens = [(m.lastgroup, m.group(m.lastgroup), m.start(m.lastgroup)) for m in _TOKEN.finditer(text) if m.lastgroup]
    terms: list[tuple[float, str]] = []
    index = 0
    while index < len(tokens):
        sign = 1.0
        kind, value, column = tokens[index]
        if kind == "sign":  # a leading sign, or the one between two terms
            sign = -1.0 if value == "-" else 1.0
            index += 1
        elif terms:
            raise fail(f"expected + or - before {value!r} at column {column + 1}")
        if index >= len(tokens):
            raise fail("ends with an operator, a term is missing after it")
        weight, index = _read_term(tokens, index, fail)
        terms.append((sign * weight, tokens[index - 1][1]))
    names = [name for _, name in terms]
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise fail(f"names {doubled} more than once (give one term with the summed weight)")
    if known is not None:
        known = list(known)
        unknown = [name for name in names if name not in known]
        if unknown:
            raise fail(f"unknown metric(s) {unknown} (reported: {', '.join(known)})")
    return Objective(terms=tuple(terms), text=text.replace(" ", ""))


def _read_term(
    tokens: list[tuple[str, str, int]], index: int, fail: Callable[[str], SearchInputError]
) -> tuple[float, int]:
    """Reads ``[number '*'] NAME`` from ``tokens[index]``; returns the weight and the next index."""
    kind, value, column = tokens[index]
    weight = 1.0
    if kind == "number":
        weight = float(value)
        if not math.isfinite(weight) or weight == 0.0:
            raise fail(f"weight {value} at column {column + 1} must be finite and non-zero")
        if index + 1 >= len(tokens) or tokens[index + 1][0] != "times":
            raise fail(f"number {value} at column {column + 1} must be followed by *METRIC")
        index += 2
        if index >= len(tokens):
            raise fail("ends with *, a metric name is missing")
        kind, value, column = tokens[index]
    if kind != "name":
        raise fail(f"expected a metric name at column {column + 1}, found {value!r}")
    return weight, index + 1


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial needs, fixed by the driver for the whole search (picklable).

    ``seed`` is the detectron2 ``SEED`` of every trial (trials differ by their parameters only).
    MLflow fields are None when the search is not tracked; ``mlflow_outbox`` is the search's
    outbox folder (each node journals in a subfolder named after its host). ``remote_storage`` is
    the Tune storage when it is a remote URI: the trials' Ray Train checkpoints then go under
    ``<it>/<search>/ray_train/`` where any node finds them. ``schedules`` maps a dataset to
    ``(SOLVER.MAX_ITER, TEST.EVAL_PERIOD)``; ``baseline_ratios`` to a baseline's gradient ratio.
    ``resume``: the search continues an interrupted one, so a trial first looks for what an
    earlier attempt of it left (its Optuna record, its MLflow run); a new search's trials cannot
    have one and skip both lookups (about 0.7 CPU-s per trial on PostgreSQL).
    """

    space: SearchSpace
    datasets: tuple[DatasetSpec, ...]
    objective: Objective
    opts: tuple[str, ...] = ()
    multi_objective: bool = False
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    max_failures: int = 0
    seed: int = 42
    resume: bool = False
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    mlflow_outbox: str | None = None
    search_name: str = "eqlv2_search"
    remote_storage: str | None = None
    optuna_storage: str | None = None
    study_name: str | None = None
    log_period: int = 20
    baseline_ratios: dict[str, tuple[float, ...]] = field(default_factory=dict)
    schedules: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def dataset_names(self) -> list[str]:
        return [spec.name for spec in self.datasets]

    @property
    def tracked(self) -> bool:
        """Whether the trials have MLflow runs."""
        return bool(self.tracking_uri and self.experiment_id and self.mlflow_outbox)

    def evaluations(self, dataset: str) -> int:
        """Evaluations one training run on ``dataset`` does (periodic ones and the final one)."""
        max_iter, period = self.schedules.get(dataset, (1, 0))
        return evaluations_done(max_iter, max_iter, period)

    def run_params(self, extra_opts: Sequence[str] = ()) -> dict[str, str]:
        """The datasets, their configs and the overrides, as MLflow params."""
        configs = {f"config/{spec.name}": spec.config_file for spec in self.datasets}
        return {"datasets": ",".join(self.dataset_names), **configs, "overrides": " ".join([*self.opts, *extra_opts]) or "-"}

    def objective_keys(self) -> list[str]:
        return [f"{name}/objective" for name in self.dataset_names]


def evaluations_done(iteration: int, max_iter: int, eval_period: int) -> int:
    """Evaluations a detectron2 run has done once ``iteration`` iterations are complete: its
    ``EvalHook`` evaluates at every multiple of ``eval_period`` below ``max_iter`` and once after
    training (counted from the iteration, so right after a resume from a checkpoint too)."""
    periodic = 0
    if eval_period > 0:
        periodic = len(range(eval_period, min(iteration, max_iter - 1) + 1, eval_period))
    return periodic + (1 if iteration >= max_iter else 0)
