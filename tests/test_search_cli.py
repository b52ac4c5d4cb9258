"""The command line of ``tune/search.py``: its options and its early, named errors (no Ray)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("search_cli", ROOT / "tune/search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_lists_the_options():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tune/search.py"), "--help"], capture_output=True, text=True, timeout=120
    ).stdout
    for option in (
        "--search-space", "--datasets", "--config-file", "--num-trials", "--concurrency",
        "--workers-per-trial", "--use-gpu", "--scheduler", "--metric", "--multi-objective",
        "--storage-path", "--mlflow-uri", "--optuna-storage", "--resume", "--smoke", "--sync", "KEY VALUE",
        "--baseline", "--noise-seeds",
    ):  # fmt: skip
        assert option in out, option


def test_options_and_overrides_are_parsed():
    cli = _cli()
    options = cli.options_from_args(
        ["--datasets", "lvis,openimages", "--metric", "0.5*AP+0.5*AP1", "--num-trials", "6",
         "--config-file", "lvis=a.yaml", "SOLVER.MAX_ITER", "50"]
    )  # fmt: skip
    assert options.datasets == ("lvis", "openimages")
    assert options.config_files == ("lvis=a.yaml",) and options.opts == ("SOLVER.MAX_ITER", "50")
    assert options.num_trials == 6 and options.metric == "0.5*AP+0.5*AP1"
    later = cli.options_from_args(["SOLVER.MAX_ITER", "6", "MODEL.X", "-1", "--resume"])
    assert later.opts == ("SOLVER.MAX_ITER", "6", "MODEL.X", "-1") and later.resume  # options may follow
    assert cli.options_from_args(["--smoke"]).num_trials == 3
    assert cli.options_from_args(["--smoke", "--num-trials", "2"]).num_trials == 2
    synced = cli.options_from_args(["--sync", "--results-dir", "elsewhere"])
    assert synced.sync and synced.results_dir == "elsewhere"
    with pytest.raises(SystemExit):
        cli.options_from_args(["SOLVER.MAX_ITER"])  # not a KEY VALUE pair
    defaults = cli.options_from_args([])
    assert (defaults.baseline, defaults.noise_seeds) == ("sigmoid", 2)
    assert (cli.options_from_args(["--baseline", "none", "--noise-seeds", "0"]).baseline, later.noise_seeds) == ("none", 2)


@pytest.mark.parametrize(
    "argv, message",
    [(["--noise-seeds", "-1"], "--noise-seeds: must be >= 0"), (["--baseline", "eqlv2"], "--baseline: invalid choice")],
)
def test_bad_reference_options_are_named(capsys, argv, message):
    with pytest.raises(SystemExit):
        _cli().options_from_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--metric", "APr", "--datasets", "lvis,openimages"], "openimages does not report"),
        (["--datasets", "coco"], "unknown dataset"),
        (["--multi-objective"], "at least two --datasets"),
        (["--search-space", "nowhere.yaml"], "search-space file not found"),
        (["SOLVER.NO_SUCH_KEY", "1"], "bad config or override"),
        (["--metric", "AP+"], "--metric"),
        (["--mlflow-uri", "http://user:s3cret@127.0.0.1:9/"], "MLFLOW_TRACKING_PASSWORD"),
        (["--optuna-storage", "postgresql://eqlv2:s3cret@127.0.0.1:9/optuna"], "PGPASSWORD"),
        (["--search-space", str(ROOT / "tests/data/negative_gamma_space.yaml")], "negative_gamma_space.yaml.*gamma"),
    ],
)
def test_bad_options_fail_before_anything_starts(tmp_path, monkeypatch, argv, message):
    import ray

    # run_search pins the dataset roots in the environment: restored after the test.
    monkeypatch.setenv("DETECTRON2_DATASETS", os.environ.get("DETECTRON2_DATASETS", str(ROOT / "datasets")))
    monkeypatch.setenv(
        "EQLV2_SYNTHETIC_ROOT", os.environ.get("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets" / "eqlv2_synthetic"))
    )
    from eqlv2.search.driver import run_search

    options = _cli().options_from_args([*argv, "--results-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=message) as raised:
        run_search(options)
    assert not ray.is_initialized()
    assert "s3cret" not in str(raised.value)  # a refused URL's password is not echoed back


def test_results_folder_that_is_a_file_is_named(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune/search.py"), "--results-dir", str(blocker)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert str(blocker) in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "flag, url",
    [("--mlflow-uri", "http://eqlv2:s3cret-pw@127.0.0.1:9/"), ("--optuna-storage", "postgresql://eqlv2:s3cret-pw@127.0.0.1:9/optuna")],
)
def test_a_password_in_a_url_is_refused_and_written_nowhere(tmp_path, flag, url):
    """The whole search run as a user runs it: the password appears in no output and no file."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tune/search.py"), flag, url, "--results-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 and f"{flag} " in proc.stderr and "carries a password" in proc.stderr
    assert "s3cret" not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and b"s3cret" in p.read_bytes()]
    assert written == []
