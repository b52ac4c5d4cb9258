"""The outcome of a search: trial records, the ranked table, the best configuration.

Trial states come from the Optuna study (the authority on complete / pruned / failed); the numbers
from the Ray Tune results (each trial's last result: its final metrics, or for a trial stopped
early those of its last evaluation).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from .optuna_study import COMPLETION_KEY, TRIAL_NUMBER_KEY
from .settings import TrialSettings

logger = logging.getLogger(__name__)

__all__ = [
    "TrialRecord",
    "best_record",
    "best_config_text",
    "format_table",
    "ranked_rows",
    "records_from_results",
    "search_metrics",
    "write_reports",
]

#: Rank of each status in the table: complete trials first, then stopped early, then failed.
_STATUS_ORDER = {"complete": 0, "pruned": 1, "running": 2, "failed": 3}
#: Metrics shown per dataset (the first ones the dataset reports).
_SHOWN = {"lvis": ("AP", "APr", "APc", "APf"), "openimages": ("AP", "AP1", "AP3", "AP5")}


@dataclass
class TrialRecord:
    """One trial of the search.

    Attributes:
        trial_id: Tune trial id.
        number: Optuna trial number (None if unknown).
        params: full parameter assignment (searched and fixed).
        status: ``complete``, ``pruned``, ``failed`` or ``running``.
        metrics: the trial's last Tune result (flat).
        error: error text of a failed trial.
        pareto: on the Pareto front (multi-objective searches).
    """

    trial_id: str
    number: int | None
    params: dict[str, Any]
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pareto: bool = False

    @property
    def objective(self) -> float:
        """The trial's objective (NaN if unknown)."""
        value = self.metrics.get("objective")
        try:
            value = float(value)
        except (TypeError, ValueError):
            return math.nan
        return value


def _study_states(study) -> dict[int, str]:
    if study is None:
        return {}
    names = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "running"}
    return {trial.number: names.get(trial.state.name, trial.state.name.lower()) for trial in study.get_trials(deepcopy=False)}


def records_from_results(results: Iterable[Any], settings: TrialSettings, study=None) -> list[TrialRecord]:
    """Trial records from Tune ``Result`` objects (a ``ResultGrid``) and the study.

    Args:
        results: Tune results (``.config``, ``.metrics``, ``.error``).
        settings: the search's settings (for the fixed parameters).
        study: the Optuna study, or None to derive states from the Tune results alone.
    """
    states = _study_states(study)
    pareto: set[int] = set()
    if study is not None and settings.multi_objective:
        try:
            pareto = {trial.number for trial in study.best_trials}
        except Exception as error:
            logger.info("No Pareto front: %s", error)
    records = []
    for result in results:
        config = dict(getattr(result, "config", None) or {})
        metrics = dict(getattr(result, "metrics", None) or {})
        error = getattr(result, "error", None)
        number = config.get(TRIAL_NUMBER_KEY)
        number = int(number) if isinstance(number, int | float) else None
        try:
            params = settings.space.complete(config)
        except ValueError:
            params = {k: config.get(k) for k in settings.space.all_names}
        if error is not None:
            status = "failed"
        elif number is not None and number in states:
            status = states[number]
        else:
            status = "complete" if metrics.get(COMPLETION_KEY) else "pruned"
        records.append(
            TrialRecord(
                trial_id=str(metrics.get("trial_id") or getattr(result, "path", "?")).split("/")[-1],
                number=number,
                params=params,
                status=status,
                metrics=metrics,
                error=str(error).strip().splitlines()[-1][:200] if error is not None else None,
                pareto=number in pareto,
            )
        )
    return records


def _sort_key(record: TrialRecord) -> tuple:
    objective = record.objective
    return (_STATUS_ORDER.get(record.status, 9), -(objective if math.isfinite(objective) else -math.inf))


def best_record(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The complete trial with the highest finite objective, or None."""
    complete = [r for r in records if r.status == "complete" and math.isfinite(r.objective)]
    return max(complete, key=lambda r: r.objective) if complete else None


def _number(value: Any, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return f"{number:.{digits}f}" if math.isfinite(number) else "-"


def ranked_rows(records: Sequence[TrialRecord], settings: TrialSettings) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the ranked table (best first; stopped-early and failed trials last)."""
    param_names = settings.space.all_names
    multi = len(settings.datasets) > 1
    headers = ["rank", "trial", "status", *param_names]
    metric_keys = []
    for spec in settings.datasets:
        shown = _SHOWN.get(spec.name, spec.metrics[:4])
        for name in shown:
            metric_keys.append(f"{spec.name}/{name}")
            headers.append(f"{spec.name} {name}" if multi else name)
    if multi or settings.objective.text != "AP":
        headers.append("objective")
    if settings.multi_objective:
        headers.append("pareto")
    rows = []
    for rank, record in enumerate(sorted(records, key=_sort_key), start=1):
        label = record.trial_id if record.number is None else f"{record.trial_id} (#{record.number})"
        row = [str(rank), label, record.status]
        row += [_number(record.params.get(name)) for name in param_names]
        row += [_number(record.metrics.get(key)) for key in metric_keys]
        if multi or settings.objective.text != "AP":
            row.append(_number(record.objective, 4))
        if settings.multi_objective:
            row.append("*" if record.pareto else "")
        rows.append(row)
    return headers, rows


def format_table(records: Sequence[TrialRecord], settings: TrialSettings, fmt: str = "github") -> str:
    """The ranked table as text (``tabulate`` format ``fmt``)."""
    headers, rows = ranked_rows(records, settings)
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def best_config_text(record: TrialRecord | None, settings: TrialSettings) -> str:
    """The best configuration and how to train with it."""
    if record is None:
        return "No trial completed: no best configuration."
    values = ", ".join(f"{name} = {_number(value, 4)}" for name, value in record.params.items())
    what = settings.objective.text
    if len(settings.datasets) > 1:
        what = f"mean over {', '.join(settings.dataset_names)} of {what}"
    lines = [f"Best configuration (trial {record.trial_id}, objective {what} = {_number(record.objective, 4)}):"]
    lines.append(f"  {values}")
    overrides = " ".join(settings.space.config_overrides(record.params))
    if settings.opts:
        lines.append(f"  (its trials also ran with: {' '.join(settings.opts)})")
    for spec in settings.datasets:
        lines.append(
            f"  train it: python train/train_net.py --config-file {spec.config_file} {overrides}"
        )
    return "\n".join(lines)


def write_reports(records: Sequence[TrialRecord], settings: TrialSettings, folder: str | Path) -> dict[str, Path]:
    """Writes ``ranked_trials.csv``, ``ranked_trials.md`` and ``best_config.json`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    headers, rows = ranked_rows(records, settings)
    paths = {"csv": folder / "ranked_trials.csv", "md": folder / "ranked_trials.md", "best": folder / "best_config.json"}
    pd.DataFrame(rows, columns=headers).to_csv(paths["csv"], index=False)
    paths["md"].write_text(format_table(records, settings) + "\n")
    best = best_record(records)
    payload: Mapping[str, Any] = {}
    if best is not None:
        payload = {
            "trial_id": best.trial_id,
            "optuna_trial_number": best.number,
            "params": best.params,
            "objective": best.objective,
            "metric": settings.objective.text,
            "config_overrides": settings.space.config_overrides(best.params),
            "trial_overrides": list(settings.opts),
            "metrics": {k: v for k, v in best.metrics.items() if isinstance(v, int | float) and "/" in k},
        }
    paths["best"].write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return paths


def search_metrics(records: Sequence[TrialRecord], settings: TrialSettings) -> tuple[dict[str, float], dict[str, Any]]:
    """The search's outcome as parent-run metrics (trial counts, the best trial's objective and
    paper metrics as ``best/<dataset>/<metric>``) and tags (the best trial and its parameters)."""
    metrics: dict[str, Any] = {f"trials_{s}": sum(r.status == s for r in records) for s in ("complete", "pruned", "failed")}
    best = best_record(records)
    if best is None:
        return metrics, {}
    metrics["best_objective"] = best.objective
    for spec in settings.datasets:
        for name in spec.metrics:
            metrics[f"best/{spec.name}/{name}"] = best.metrics.get(f"{spec.name}/{name}")
    return metrics, {"best_trial": best.trial_id, **{f"best_{k}": v for k, v in best.params.items()}}
