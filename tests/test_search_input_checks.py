"""Search inputs checked before the first trial: --metric grammar, parameter domains, folders."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from eqlv2.search.options import SearchInputError
from eqlv2.search.settings import DATASETS, parse_objective
from eqlv2.search.space import load_search_space as load_checked_search_space
from eqlv2.search.stores import prepare_writable_dir


def parse_metric_strict(text, known=None):
    return parse_objective(text, known).terms

ROOT = Path(__file__).resolve().parents[1]
LVIS_METRICS = DATASETS["lvis"][1]

# --- --metric ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "AP",
        "APr",
        "0.5*AP+0.5*APr",
        " 0.5 * AP + 0.5 * APr ",
        "AP-0.1*APf",
        "-APf",
        "2e1*AP+.5*APb",
    ],
)
def test_valid_metric_matches_parse_objective(text):
    objective = parse_objective(text, LVIS_METRICS)
    assert objective.text == text.replace(" ", "") and objective == parse_objective(text)


def test_signed_exponent_weights():
    assert parse_metric_strict("1e-1*AP+9E-1*APc-2.5e+0*APf") == (
        (0.1, "AP"),
        (0.9, "APc"),
        (-2.5, "APf"),
    )


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("AP+", "ends with an operator"),
        ("AP-", "ends with an operator"),
        ("+", "ends with an operator"),
        ("AP++APr", "expected a metric name at column 4, found '+'"),
        ("AP+-APr", "expected a metric name at column 4, found '-'"),
        ("AP APr", "expected + or - before 'APr'"),
        ("AP*2", "expected + or - before '*'"),
        ("2*3*AP", "expected a metric name at column 3, found '3'"),
        ("0.5AP", "number 0.5 at column 1 must be followed by *METRIC"),
        ("0.5*", "ends with *"),
        ("0*AP", "must be finite and non-zero"),
        ("AP+AP", "names ['AP'] more than once"),
        ("AP%", "expected + or - before '%'"),
        ("AP;APr", "expected + or - before ';'"),
        ("", "--metric is empty"),
        ("   ", "--metric is empty"),
        ("mAP", "unknown metric(s) ['mAP'] (reported: AP, APr, APc, APf, APb)"),
    ],
)
def test_bad_metric_is_refused_with_reason(text, says):
    with pytest.raises(SearchInputError) as caught:
        parse_metric_strict(text, LVIS_METRICS)
    message = str(caught.value)
    assert says in message
    assert "\n" not in message
    if text.strip():
        assert repr(text) in message


def test_metric_names_unchecked_without_known_list():
    assert parse_metric_strict("myMetric") == ((1.0, "myMetric"),)


# --- search space -----------------------------------------------------------------------------


def _write_space(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "configs/search/default.yaml").read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        data[section][name] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["default.yaml", "alpha_only.yaml", "log_gamma.yaml"])
def test_shipped_search_spaces_pass(name):
    space = load_checked_search_space(ROOT / "configs/search" / name)
    assert space.params


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (
            {"params__gamma": {"low": -4.0, "high": 16.0}},
            "params.gamma range [-4, 16] is invalid: its low -4 breaks gamma > 0",
        ),
        ({"params__gamma": {"low": 0.0, "high": 16.0}}, "its low 0 breaks gamma > 0"),
        (
            {"params__alpha": {"low": -1.0, "high": 8.0}},
            "params.alpha range [-1, 8] is invalid: its low -1 breaks alpha >= 0",
        ),
        (
            {"params__alpha": {"choices": [0.0, 2.0, -2.0]}},
            "choice alpha=-2.0 is invalid: EQL v2 needs alpha >= 0",
        ),
        (
            {"params__gamma": {"choices": [4.0, "big"]}},
            "choice gamma='big' is invalid: EQL v2 needs gamma > 0",
        ),
    ],
)
def test_out_of_domain_range_names_file_and_parameter(tmp_path, changes, says):
    path = _write_space(tmp_path, **changes)
    data = yaml.safe_load(path.read_text())
    data["seed_points"] = []  # the paper's seed point may be outside these ranges
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SearchInputError) as caught:
        load_checked_search_space(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert says in str(caught.value)


def test_fixed_value_out_of_domain(tmp_path):
    data = yaml.safe_load((ROOT / "configs/search/alpha_only.yaml").read_text())
    data["fixed"]["gamma"] = -12.0
    path = tmp_path / "fixed.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        SearchInputError, match=r"fixed value gamma=-12.0 is invalid: EQL v2 needs gamma > 0"
    ):
        load_checked_search_space(path)


def test_fixed_mu_not_finite_by_config_key(tmp_path):
    from eqlv2.search.space import parse_search_space

    with pytest.raises(
        SearchInputError,
        match=r"inline.yaml: fixed value MODEL.EQLV2.MU=nan is invalid: EQL v2 needs mu finite",
    ):  # parsing checks the domains (check_search_space) last
        parse_search_space(
            {"params": {"alpha": {"low": 0, "high": 8}}, "fixed": {"MODEL.EQLV2.MU": float("nan")}},
            source="inline.yaml",
        )


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        (
            {"params__mu": {"low": 1.0, "high": 0.5}},
            "params.mu: need finite low < high, got [1.0, 0.5]",
        ),
        (
            {"params__gamma": {"low": 0.0, "high": 16.0, "log": True}},
            "params.gamma: a log scale needs low > 0",
        ),
        ({"params__mu": {"low": 0.5, "high": float("inf")}}, "params.mu: need finite low < high"),
    ],
)
def test_malformed_range_names_file_and_parameter(tmp_path, changes, says):
    path = _write_space(tmp_path, **changes)
    with pytest.raises(SearchInputError) as caught:
        load_checked_search_space(path)
    assert says in str(caught.value) and str(path) in str(caught.value)


def test_seed_point_outside_range_names_file(tmp_path):
    path = _write_space(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["seed_points"] = [{"gamma": 20.0, "mu": 0.8, "alpha": 4.0}]
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(
        SearchInputError,
        match=r"seed_points\[0\]\.gamma=20\.0 is outside uniform\[4, 16\] in .*space.yaml",
    ):
        load_checked_search_space(path)


def test_missing_search_space_file(tmp_path):
    with pytest.raises(
        SearchInputError, match=r"--search-space: search-space file not found: .*nope.yaml"
    ):
        load_checked_search_space(tmp_path / "nope.yaml")


# --- folders ----------------------------------------------------------------------------------


def test_folder_created_with_parents(tmp_path):
    folder = prepare_writable_dir(tmp_path / "a" / "b", "--results-dir")
    assert folder == (tmp_path / "a" / "b").resolve() and folder.is_dir()
    assert list(folder.iterdir()) == []  # the write probe is removed


def test_remote_uri_is_left_alone(tmp_path):
    assert prepare_writable_dir("s3://bucket/ray_results", "--storage-path") is None
    assert (
        prepare_writable_dir(f"file://{tmp_path}/r", "--storage-path") == (tmp_path / "r").resolve()
    )


def test_folder_that_is_a_file(tmp_path):
    path = tmp_path / "results"
    path.write_text("not a folder")
    with pytest.raises(SearchInputError) as caught:
        prepare_writable_dir(path, "--results-dir")
    assert str(caught.value) == f"--results-dir {path} is a file; give a folder"


def test_folder_under_a_file(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(SearchInputError) as caught:
        prepare_writable_dir(blocker / "ray_results", "--storage-path")
    assert (
        str(caught.value)
        == f"--storage-path {blocker}/ray_results cannot be created: {blocker} is a file; give a folder"
    )


@pytest.fixture
def immutable_dir(tmp_path):
    """A folder nobody, root included, can create files in (``chattr +i``)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed: cannot make a folder unwritable for root")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(
            f"chattr +i is not permitted here ({done.stderr.strip()}): cannot test an unwritable folder"
        )
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("below", ["", "new/sub"])
def test_unwritable_folder(immutable_dir, below):
    target = immutable_dir / below if below else immutable_dir
    with pytest.raises(SearchInputError) as caught:
        prepare_writable_dir(target, "--results-dir")
    message = str(caught.value)
    assert message.startswith(f"--results-dir {target} is not writable (")
    assert "Operation not permitted" in message and "\n" not in message
