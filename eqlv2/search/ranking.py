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
from .references import NOISE_MARGIN, NoiseBand, paper_point, trial_setup
from .settings import TrialSettings
from .space import same_assignment

logger = logging.getLogger(__name__)

#: Rank of each status in the table: complete trials first, then stopped early, then failed.
_STATUS_ORDER = {"complete": 0, "pruned": 1, "running": 2, "failed": 3}
#: Metrics shown per dataset (the first ones the dataset reports).
_SHOWN = {"lvis": ("AP", "APr", "APc", "APf"), "openimages": ("AP", "AP1", "AP3", "AP5")}
#: Optuna's trial states as the table names them.
_STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "running"}


@dataclass
class TrialRecord:
    """One trial: its Tune id, Optuna number, full assignment, status (``complete``, ``pruned``,
    ``failed`` or ``running``), last Tune result, and for a reference trial its ``role``
    (``baseline`` / ``noise``) and table ``label``."""

    trial_id: str
    number: int | None
    params: dict[str, Any]
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pareto: bool = False
    role: str = "search"
    label: str | None = None

    @property
    def objective(self) -> float:
        return _float(self.metrics.get("objective"))


def _float(value: Any) -> float:
    """``value`` as a float; NaN when it is not a number."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def records_from_results(results: Iterable[Any], settings: TrialSettings, study=None) -> list[TrialRecord]:
    """Trial records from Tune ``Result`` objects and the study (None: states from Tune alone)."""
    trials = study.get_trials(deepcopy=False) if study is not None else []
    states = {trial.number: _STATES.get(trial.state.name, trial.state.name.lower()) for trial in trials}
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
            setup = trial_setup(config, settings.space, settings.seed)
            role, label, params = setup.role, setup.label, setup.values
        except ValueError:
            role, label, params = "search", None, {k: config.get(k) for k in settings.space.all_names}
        if error is not None:
            status = "failed"
        else:
            status = states.get(number) or ("complete" if metrics.get(COMPLETION_KEY) else "pruned")
        trial_id = str(metrics.get("trial_id") or getattr(result, "path", "?")).split("/")[-1]
        error_line = str(error).strip().splitlines()[-1][:200] if error is not None else None
        records.append(TrialRecord(trial_id, number, params, status, metrics, error_line, number in pareto, role, label))
    return records


def search_records(records: Sequence[TrialRecord]) -> list[TrialRecord]:
    return [r for r in records if r.role == "search"]


def paper_point_band(records: Sequence[TrialRecord], settings: TrialSettings) -> NoiseBand | None:
    """The noise band over every completed run of the paper point (search trial, noise seeds)."""
    point = paper_point(settings.space)
    runs = [r for r in records if r.role in ("search", "noise") and r.status == "complete"]
    values = tuple(r.objective for r in runs if same_assignment(r.params, point) and math.isfinite(r.objective))
    return NoiseBand(values) if values else None


def _sort_key(record: TrialRecord) -> tuple:
    objective = record.objective
    return (_STATUS_ORDER.get(record.status, 9), -(objective if math.isfinite(objective) else -math.inf))


def best_record(records: Sequence[TrialRecord]) -> TrialRecord | None:
    """The complete search trial with the highest finite objective, or None."""
    complete = [r for r in search_records(records) if r.status == "complete" and math.isfinite(r.objective)]
    return max(complete, key=lambda r: r.objective) if complete else None


def _param_text(value: Any) -> str:
    """A parameter value with 4 significant digits (``0.0001``, ``12``, ``1e+05``)."""
    return f"{value:.4g}" if isinstance(value, int | float) and not isinstance(value, bool) else "-" if value is None else str(value)


def _number(value: Any, digits: int = 3, sign: str = "") -> str:
    number = _float(value)
    return f"{number:{sign}.{digits}f}" if math.isfinite(number) else "-"


def _metric_columns(settings: TrialSettings) -> tuple[list[str], list[str]]:
    """``(headers, result keys)`` of the metrics shown for each dataset."""
    multi = len(settings.datasets) > 1
    headers, keys = [], []
    for spec in settings.datasets:
        for name in _SHOWN.get(spec.name, spec.metrics[:4]):
            keys.append(f"{spec.name}/{name}")
            headers.append(f"{spec.name} {name}" if multi else name)
    return headers, keys


def _versus_band(record: TrialRecord, band: NoiseBand | None) -> str:
    """The objective's distance from the paper point's mean, in objective units and std."""
    if band is None or not math.isfinite(band.std) or not math.isfinite(record.objective):
        return "-"
    mark = " *" if band.differs(record.objective) else ""
    return f"{record.objective - band.mean:+.3f} ({band.distance(record.objective):+.1f} std){mark}"


def ranked_rows(
    records: Sequence[TrialRecord], settings: TrialSettings, band: NoiseBand | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the ranked table: the search's trials best first (stopped-early and
    failed ones last), then the reference trials (rank ``ref``); with a noise ``band``, the column
    ``vs paper point`` gives each objective's distance from the paper point's mean."""
    param_names = settings.space.all_names
    show_objective = len(settings.datasets) > 1 or settings.objective.text != "AP"
    metric_headers, metric_keys = _metric_columns(settings)
    headers = ["rank", "trial", "status", *param_names, *metric_headers]
    headers += ["objective"] if show_objective else []
    headers += ["pareto"] if settings.multi_objective else []
    headers += ["vs paper point"] if band is not None else []
    ranked = [(str(rank), r) for rank, r in enumerate(sorted(search_records(records), key=_sort_key), start=1)]
    ranked += [("ref", r) for r in records if r.role != "search"]
    rows = []
    for rank, record in ranked:
        label = record.label or record.trial_id
        label = label if record.number is None else f"{label} (#{record.number})"
        row = [rank, label, record.status]
        row += [_param_text(record.params.get(name)) for name in param_names]
        row += [_number(record.metrics.get(key)) for key in metric_keys]
        row += [_number(record.objective, 4)] if show_objective else []
        row += ["*" if record.pareto else ""] if settings.multi_objective else []
        row += [_versus_band(record, band)] if band is not None else []
        rows.append(row)
    return headers, rows


def reference_text(records: Sequence[TrialRecord], settings: TrialSettings, band: NoiseBand | None) -> str:
    """The noise band, and what the best trial gains over the baseline, as summary lines."""
    lines = [band.describe(settings.objective.text)] if band is not None else []
    best, baseline = best_record(records), _baseline_record(records)
    if best is not None and baseline is not None:
        headers, keys = _metric_columns(settings)
        differences = [_float(best.metrics.get(key)) - _float(baseline.metrics.get(key)) for key in keys]
        gains = ", ".join(f"{h} {_number(d, sign='+')}" for h, d in zip(headers, differences, strict=True))
        lines.append(f"Best trial {best.trial_id} against the {baseline.label}: {gains}")
    return "\n".join(lines)


def _baseline_record(records: Sequence[TrialRecord]) -> TrialRecord | None:
    return next((r for r in records if r.role == "baseline" and r.status == "complete"), None)


def format_table(records: Sequence[TrialRecord], settings: TrialSettings, band: NoiseBand | None = None) -> str:
    """The ranked table as GitHub Markdown."""
    headers, rows = ranked_rows(records, settings, band)
    return tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)


def best_config_text(record: TrialRecord | None, settings: TrialSettings, band: NoiseBand | None = None) -> str:
    """The best configuration, whether it stands out of the noise ``band``, and how to train it."""
    if record is None:
        return "No trial completed: no best configuration."
    values = ", ".join(f"{name} = {_number(value, 4)}" for name, value in record.params.items())
    what = settings.objective.text
    if len(settings.datasets) > 1:
        what = f"mean over {', '.join(settings.dataset_names)} of {what}"
    lines = [f"Best configuration (trial {record.trial_id}, objective {what} = {_number(record.objective, 4)}):", f"  {values}"]
    if band is not None and math.isfinite(band.std) and not band.differs(record.objective):
        lines.append(
            f"  It lies within {NOISE_MARGIN:g} std of the paper point's mean over seeds: this search cannot "
            "tell it apart from the paper point (train longer, or add seeds, to separate them)."
        )
    overrides = " ".join(settings.space.config_overrides(record.params))
    if settings.opts:
        last_values = dict(zip(settings.opts[::2], settings.opts[1::2], strict=True))  # later ones win
        lines.append(f"  (its trials also ran with: {' '.join(f'{k} {v}' for k, v in last_values.items())})")
    lines += [f"  train it: python train/train_net.py --config-file {spec.config_file} {overrides}" for spec in settings.datasets]
    return "\n".join(lines)


def write_reports(
    records: Sequence[TrialRecord], settings: TrialSettings, folder: str | Path, band: NoiseBand | None = None
) -> dict[str, Path]:
    """Writes ``ranked_trials.csv``, ``ranked_trials.md`` and ``best_config.json`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    headers, rows = ranked_rows(records, settings, band)
    paths = {"csv": folder / "ranked_trials.csv", "md": folder / "ranked_trials.md", "best": folder / "best_config.json"}
    pd.DataFrame(rows, columns=headers).to_csv(paths["csv"], index=False)
    paths["md"].write_text(format_table(records, settings, band) + "\n")
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


def search_metrics(
    records: Sequence[TrialRecord], settings: TrialSettings, band: NoiseBand | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """The parent run's metrics (trial counts, ``best/<dataset>/<metric>``,
    ``baseline/<dataset>/<metric>``, ``noise/...``, ``best_objective``) and tags (the best trial
    and its parameters)."""
    searched = search_records(records)
    metrics: dict[str, Any] = {f"trials_{s}": sum(r.status == s for r in searched) for s in ("complete", "pruned", "failed")}
    if band is not None:
        metrics.update({"noise/objective_mean": band.mean, "noise/objective_std": band.std, "noise/runs": len(band.values)})
    for prefix, record in (("baseline", _baseline_record(records)), ("best", best_record(records))):
        if record is not None:
            for spec in settings.datasets:
                metrics.update({f"{prefix}/{spec.name}/{m}": record.metrics.get(f"{spec.name}/{m}") for m in spec.metrics})
    best = best_record(records)
    if best is None:
        return metrics, {}
    metrics["best_objective"] = best.objective
    return metrics, {"best_trial": best.trial_id, **{f"best_{k}": v for k, v in best.params.items()}}
