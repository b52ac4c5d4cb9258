"""Search-space files, objectives and dataset choices of the search (no Ray, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("optuna")
pytest.importorskip("ray")

from eqlv2.search.settings import dataset_specs, parse_objective  # noqa: E402
from eqlv2.search.space import (  # noqa: E402
    PAPER_SETTING,
    SearchSpaceError,
    load_search_space,
    parse_search_space,
)

ROOT = Path(__file__).resolve().parents[1]


def test_default_space_is_the_papers_ranges():
    space = load_search_space(ROOT / "configs/search/default.yaml")
    assert space.names == ["gamma", "mu", "alpha"]
    bounds = {name: (spec.low, spec.high, spec.log) for name, spec in space.params.items()}
    assert bounds == {"gamma": (4.0, 16.0, False), "mu": (0.5, 1.0, False), "alpha": (0.0, 8.0, False)}
    assert space.seed_points == (PAPER_SETTING,)
    distributions = space.optuna_distributions()
    assert distributions["gamma"].low == 4.0 and distributions["gamma"].high == 16.0


def test_every_shipped_space_loads():
    files = sorted((ROOT / "configs/search").glob("*.yaml"))
    assert len(files) >= 2
    for path in files:
        assert load_search_space(path).params


def test_fixed_parameters_are_applied_and_seed_points_projected():
    space = load_search_space(ROOT / "configs/search/alpha_only.yaml")
    assert space.names == ["alpha"]
    assert space.seed_points == ({"alpha": 4.0},)
    values = space.complete({"alpha": 2.5, "optuna_trial_number": 3})
    assert values == {"alpha": 2.5, "gamma": 12.0, "mu": 0.8}
    opts = space.config_overrides(values)
    assert opts == ["MODEL.EQLV2.ALPHA", "2.5", "MODEL.EQLV2.GAMMA", "12.0", "MODEL.EQLV2.MU", "0.8"]


def test_overrides_are_accepted_by_detectron2_config():
    from eqlv2.engine import setup_cfg

    space = load_search_space(ROOT / "configs/search/log_gamma.yaml")
    opts = space.config_overrides(space.complete({"gamma": 5, "mu": 0.6, "alpha": 0}))
    cfg = setup_cfg(str(ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml"), opts)
    assert (cfg.MODEL.EQLV2.GAMMA, cfg.MODEL.EQLV2.MU, cfg.MODEL.EQLV2.ALPHA) == (5.0, 0.6, 0.0)


def test_log_scale_and_integer_and_categorical_parameters():
    space = parse_search_space(
        {
            "params": {
                "gamma": {"low": 4, "high": 16, "log": True},
                "SOLVER.IMS_PER_BATCH": {"type": "int", "low": 2, "high": 8, "step": 2},
                "MODEL.EQLV2.USE_AGNOSTIC_TASK": {"choices": [True, False]},
            }
        }
    )
    dist = space.optuna_distributions()
    assert dist["gamma"].log is True
    assert dist["SOLVER.IMS_PER_BATCH"].step == 2
    assert dist["MODEL.EQLV2.USE_AGNOSTIC_TASK"].choices == (True, False)
    assert "log-uniform" in space.describe()["gamma"]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"params": {"alpha": {"low": 0, "high": 8, "log": True}}}, "log scale needs low > 0"),
        ({"params": {"alpha": {"low": 8, "high": 0}}}, "low < high"),
        ({"params": {"beta": {"low": 0, "high": 1}}}, "unknown parameter 'beta'"),
        ({"params": {"alpha": {"low": 0, "high": 8}}, "fixed": {"alpha": 4}}, "both searched and fixed"),
        ({"params": {}, "fixed": {"alpha": 4}}, "nothing to search"),
        ({"params": {"alpha": {"low": 0, "high": 8}}, "seed_points": [{"alpha": 9}]}, "outside"),
        ({"params": {"alpha": {"low": 0, "high": 8}}, "seed_points": [{"gamma": 9}]}, "lacks searched"),
        ({"params": {"alpha": {"low": 0, "high": 8, "scale": "log"}}}, "unknown fields"),
        ({"parms": {}}, "unknown top-level"),
    ],
)
def test_bad_spaces_name_the_problem(data, message):
    with pytest.raises(SearchSpaceError, match=message):
        parse_search_space(data)


def test_space_round_trips_through_its_dict():
    space = load_search_space(ROOT / "configs/search/alpha_only.yaml")
    again = parse_search_space(space.to_dict())
    assert again.params == space.params and again.fixed == space.fixed
    assert again.seed_points == space.seed_points


def test_objective_expressions():
    assert parse_objective("AP").value({"AP": 12.5}) == 12.5
    mix = parse_objective("0.5*AP + 0.5*APr")
    assert mix.names == ["AP", "APr"]
    assert mix.value({"AP": 10.0, "APr": 4.0}) == pytest.approx(7.0)
    assert parse_objective("AP-0.1*APf").value({"AP": 1.0, "APf": 10.0}) == pytest.approx(0.0)
    assert mix.value({"AP": 10.0}) is None
    assert mix.value({"AP": 10.0, "APr": float("nan")}) is None
    with pytest.raises(ValueError):
        parse_objective("AP**2")


def test_objective_must_exist_for_every_dataset():
    specs = dataset_specs(["lvis", "openimages"])
    parse_objective("AP").check(specs)
    with pytest.raises(ValueError, match="openimages does not report"):
        parse_objective("APr").check(specs)


def test_dataset_choices():
    (lvis,) = dataset_specs(["lvis"])
    assert lvis.config_file.endswith("mask_rcnn_tiny_synthetic_lvis.yaml")
    both = dataset_specs(["lvis", "openimages"], [f"openimages={lvis.config_file}"])
    assert both[1].config_file == lvis.config_file
    with pytest.raises(ValueError, match="NAME=PATH"):
        dataset_specs(["lvis", "openimages"], [lvis.config_file])
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_specs(["coco"])


def test_trial_overrides_of_the_space_file():
    space = load_search_space(ROOT / "configs/search/default.yaml")
    opts = dict(zip(space.trial_overrides[::2], space.trial_overrides[1::2], strict=True))
    assert opts["SOLVER.MAX_ITER"] == "300" and opts["SOLVER.LR_SCHEDULER_NAME"] == "WarmupCosineLR"  # the calibrated default budget
    again = parse_search_space(space.to_dict())
    assert again.trial_overrides == space.trial_overrides
    with pytest.raises(SearchSpaceError, match="searched or fixed"):
        parse_search_space({"params": {"alpha": {"low": 0, "high": 8}}, "trial_overrides": {"MODEL.EQLV2.ALPHA": 1}})
    with pytest.raises(SearchSpaceError, match="not a detectron2 config key"):
        parse_search_space({"params": {"alpha": {"low": 0, "high": 8}}, "trial_overrides": {"max_iter": 1}})


def test_reports_are_translated_for_tune():
    """What a trial reports to Tune: prefixed metrics, evaluations counted from the iteration,
    the per-dataset and combined objectives (NaN until a dataset has been evaluated)."""
    import math

    from eqlv2.search.trial import ReportTranslator, combine_objectives

    lvis, openimages = dataset_specs(["lvis", "openimages"])
    objective = parse_objective("AP")
    first = ReportTranslator(lvis, ["lvis", "openimages"], objective, {}, 0, (80, 40))
    early = first({"iteration": 20, "total_loss": 2.5})
    assert early["lvis/total_loss"] == 2.5 and early["eval_step"] == 0 and math.isnan(early["objective"])
    evaluated = first({"iteration": 40, "total_loss": 2.0, "AP": 3.0, "APr": 1.0})
    assert evaluated["eval_step"] == 1 and evaluated["objective"] == 3.0
    assert evaluated["lvis/objective"] == 3.0 and math.isnan(evaluated["openimages/objective"])
    assert first({"iteration": 60, "total_loss": 1.9})["objective"] == 3.0  # until the next evaluation
    # The second dataset's run: the first one's final objective is known, evaluations add up.
    second = ReportTranslator(openimages, ["lvis", "openimages"], objective, {"lvis": 4.0}, 2, (80, 40))
    result = second({"iteration": 40, "AP": 2.0, "AP1": 0.5})
    assert result["eval_step"] == 3 and result["objective"] == 3.0 and result["dataset"] == "openimages"
    assert result["openimages/AP1"] == 0.5
    assert math.isnan(combine_objectives({"a": None, "b": float("nan")}))
