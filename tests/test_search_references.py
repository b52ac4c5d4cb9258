"""Reference trials of a search (baseline loss, noise seeds of the paper point) and how the ranked
table, the summary and the parent-run metrics show them (no Ray, no training: Tune-like results)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("optuna")
pytest.importorskip("ray")

from eqlv2.losses import LOSS_NAMES  # noqa: E402
from eqlv2.search.options import BASELINE_LOSSES  # noqa: E402
from eqlv2.search.optuna_study import COMPLETION_KEY, TRIAL_NUMBER_KEY  # noqa: E402
from eqlv2.search.ranking import (  # noqa: E402
    best_config_text,
    format_table,
    paper_point_band,
    records_from_results,
    reference_text,
    search_metrics,
)
from eqlv2.search.references import (  # noqa: E402
    REFERENCE_KEY,
    reference_configs,
    reference_setup,
    trial_setup,
)
from eqlv2.search.settings import TrialSettings, dataset_specs, parse_objective  # noqa: E402
from eqlv2.search.space import parse_search_space  # noqa: E402

SPACE = parse_search_space(
    {
        "params": {"alpha": {"low": 0.0, "high": 8.0}, "SOLVER.BASE_LR": {"choices": [0.01, 0.02]}},
        "fixed": {"gamma": 12.0, "mu": 0.8},
        "seed_points": [{"alpha": 4.0, "SOLVER.BASE_LR": 0.02}],
    }
)
SETTINGS = TrialSettings(space=SPACE, datasets=dataset_specs(["lvis"]), objective=parse_objective("AP"), seed=42)
PAPER = {"alpha": 4.0, "SOLVER.BASE_LR": 0.02, "gamma": 12.0, "mu": 0.8}


def result(config: dict, ap: float | None, number: int | None = None, error: str | None = None):
    metrics = {"trial_id": f"t{number if number is not None else config[REFERENCE_KEY].get('seed', 'b')}"}
    if ap is not None:
        metrics.update({"objective": ap, "lvis/AP": ap, "lvis/APr": ap / 10, "lvis/APc": ap, "lvis/APf": 2 * ap})
        metrics[COMPLETION_KEY] = 1
    if number is not None:
        config = {**config, TRIAL_NUMBER_KEY: number}
    return SimpleNamespace(config=config, metrics=metrics, error=error)


def search_and_references():
    """Four search trials (the paper point is #0) and three references (baseline, seeds 43, 44)."""
    baseline, seed43, seed44 = ({REFERENCE_KEY: c} for c in reference_configs(SPACE, "sigmoid", 2, 42))
    return [
        result({"alpha": 4.0, "SOLVER.BASE_LR": 0.02}, 18.0, 0),
        result({"alpha": 1.0, "SOLVER.BASE_LR": 0.02}, 25.0, 1),
        result({"alpha": 7.0, "SOLVER.BASE_LR": 0.01}, 18.5, 2),
        result({"alpha": 2.0, "SOLVER.BASE_LR": 0.01}, None, 3, error="RuntimeError: boom"),
        result(baseline, 19.0),
        result(seed43, 17.0),
        result(seed44, 19.0),
    ]


def test_reference_configs_and_what_they_train():
    configs = reference_configs(SPACE, "sigmoid", 2, 42)
    assert configs == [{"role": "baseline", "loss": "sigmoid"}, {"role": "noise", "seed": 43}, {"role": "noise", "seed": 44}]
    assert reference_configs(SPACE, "none", 0, 42) == []
    no_seed_points = parse_search_space({"params": {"alpha": {"low": 0, "high": 8}}})
    assert reference_configs(no_seed_points, "sigmoid", 2, 42) == [{"role": "baseline", "loss": "sigmoid"}]
    # the baseline keeps the paper point's learning rate and drops EQL v2's parameters
    assert reference_setup(configs[0], SPACE, 42) == ({"SOLVER.BASE_LR": 0.02}, ["MODEL.EQLV2.LOSS", "sigmoid"], 42)
    assert reference_setup(configs[2], SPACE, 42) == (PAPER, [], 44)
    setup = trial_setup({REFERENCE_KEY: configs[1]}, SPACE, 42)
    assert (setup.values, setup.seed, setup.role, setup.label) == (PAPER, 43, "noise", "paper point, seed 43")
    search = trial_setup({"alpha": 1.0, "SOLVER.BASE_LR": 0.01, TRIAL_NUMBER_KEY: 5}, SPACE, 42)
    assert (search.seed, search.role, search.extra_opts) == (42, "search", [])


def test_baseline_losses_are_losses_the_project_has():
    assert set(BASELINE_LOSSES) <= set(LOSS_NAMES) and "eqlv2" not in BASELINE_LOSSES


def test_noise_band_against_numpy():
    records = records_from_results(search_and_references(), SETTINGS)
    band = paper_point_band(records, SETTINGS)
    runs = np.array([18.0, 17.0, 19.0], dtype=np.float64)  # search trial #0 and seeds 43, 44
    assert band.values == (18.0, 17.0, 19.0)
    assert band.mean == pytest.approx(runs.mean(), abs=1e-12)
    assert band.std == pytest.approx(runs.std(ddof=1), abs=1e-12)
    assert band.differs(25.0) and not band.differs(19.9)
    assert band.distance(25.0) == pytest.approx((25.0 - runs.mean()) / runs.std(ddof=1))


def test_table_ranks_the_search_and_lists_references_last():
    records = records_from_results(search_and_references(), SETTINGS)
    band = paper_point_band(records, SETTINGS)
    lines = format_table(records, SETTINGS, band).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-1] == "vs paper point"
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "ref", "ref", "ref"]
    assert [r[1] for r in rows[4:]] == ["baseline sigmoid", "paper point, seed 43", "paper point, seed 44"]
    assert rows[0][1] == "t1 (#1)" and rows[0][-1] == "+7.000 (+7.0 std) *"
    assert rows[1][-1] == "+0.500 (+0.5 std)"  # within the band: no mark
    assert rows[3][2] == "failed" and rows[3][-1] == "-"


def test_summary_and_parent_metrics_carry_baseline_and_band():
    records = records_from_results(search_and_references(), SETTINGS)
    band = paper_point_band(records, SETTINGS)
    text = reference_text(records, SETTINGS, band)
    assert "Noise band of the paper point (3 seeds): AP = 18.000 +- 1.000" in text
    assert "Best trial t1 against the baseline sigmoid: AP +6.000, APr +0.600, APc +6.000, APf +12.000" in text
    metrics, tags = search_metrics(records, SETTINGS, band)
    assert metrics["trials_complete"] == 3 and metrics["trials_failed"] == 1  # references are not counted
    assert metrics["noise/objective_mean"] == 18.0 and metrics["noise/objective_std"] == 1.0
    assert metrics["noise/runs"] == 3
    assert metrics["baseline/lvis/AP"] == 19.0 and metrics["best/lvis/AP"] == 25.0
    assert tags["best_trial"] == "t1"


def test_a_best_trial_inside_the_band_is_called_indistinguishable():
    records = records_from_results(search_and_references()[:1] + search_and_references()[4:], SETTINGS)
    band = paper_point_band(records, SETTINGS)
    assert "cannot tell it apart from the paper point" in best_config_text(records[0], SETTINGS, band)
    alone = records_from_results(search_and_references()[:1], SETTINGS)
    one_run = paper_point_band(alone, SETTINGS)
    assert math.isnan(one_run.std) and "too few to measure seed noise" in reference_text(alone, SETTINGS, one_run)
