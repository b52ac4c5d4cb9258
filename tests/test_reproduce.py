"""benchmarks/reproduce.py without training: the study's rows, their config overrides, the report."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce  # noqa: E402

from eqlv2.engine import setup_cfg  # noqa: E402

SCALED = {"repeat_threshold": 0.125, "eqlv1_lambda": 0.22, "fed_classes": 3, "step_fractions": (0.8,), "warmup": 20}


def test_study_trains_each_distinct_setting_once():
    tables = reproduce.study()
    assert [title.split()[1] for title in tables] == ["1", "2", "7", "8", "9"]
    rows = {reproduce.run_key(row) for table in tables.values() for row in table.values()}
    # Table 1: 6; Table 2: +obj, +neg; Table 7: 5 besides (12, 0.8); Table 8: 4 besides 4; Table 9: 3 2C rows
    assert len(rows) == 20
    eqlv2 = reproduce.run_key(reproduce.EQLV2)
    assert reproduce.run_key(tables["Table 8 analogue: alpha (gamma 12, mu 0.8)"]["alpha 4"]) == eqlv2
    assert list(reproduce.study([9])) == ["Table 9 analogue: C-sigmoid vs 2C-softmax"]


def test_every_job_gives_a_valid_config(tmp_path):
    args = reproduce.parse_args(["--iters", "50", "--seeds", "3", "--output", str(tmp_path)])
    jobs = reproduce.make_jobs(args, reproduce.study(), {}, tmp_path)
    assert len(jobs) == 20 and {job.seed for job in jobs} == {3}
    for job in jobs:
        cfg = setup_cfg(job.config_file, reproduce.job_opts(job, SCALED))
        assert cfg.SOLVER.MAX_ITER == 50 and cfg.SOLVER.STEPS == (40,) and cfg.SEED == 3
        assert cfg.MODEL.EQLV2.LOSS == job.row["LOSS"]
        assert cfg.MODEL.EQLV2.EQLV1_LAMBDA == 0.22 and cfg.MODEL.EQLV2.FED_LOSS_NUM_CLASSES == 3
        rfs = cfg.DATALOADER.SAMPLER_TRAIN == "RepeatFactorTrainingSampler"
        assert rfs == bool(job.row.get("RFS")) and (not rfs or cfg.DATALOADER.REPEAT_THRESHOLD == 0.125)
        if "ALPHA" in job.row:
            assert (cfg.MODEL.EQLV2.ALPHA, cfg.MODEL.EQLV2.GAMMA) == (job.row["ALPHA"], job.row["GAMMA"])


def fake_results(num_classes=6, seeds=(0, 1, 2)):
    """Results as train_one returns them: EQL v2 rows better on APr, made-up ratios and norms."""
    rng = np.random.default_rng(0)
    results = []
    for table in reproduce.study().values():
        for row in table.values():
            key = reproduce.run_key(row)
            if any(r["key"] == key for r in results):
                continue
            bonus = 5.0 if row.get("LOSS", "").startswith("eqlv2") and row.get("ALPHA") != 0.0 else 0.0
            ratio = 0.9 if bonus else 0.1
            for seed in seeds:
                metrics = {c: 10.0 + bonus * (c == "APr") + rng.normal(0, 0.3) for c in reproduce.COLUMNS}
                results.append({"key": key, "seed": seed, "metrics": metrics,
                                "ratios": {i: list(np.full(num_classes, ratio) + seed * 0.01) for i in (2, 4)},
                                "weight_norms": list(rng.random(num_classes)), "seconds": 1.0})
    return results


def test_report_tables_claims_and_figures(tmp_path):
    results = fake_results()
    groups, counts = ["f", "f", "c", "c", "r", "r"], [90, 80, 30, 20, 5, 2]
    figures = reproduce.write_figures(results, counts, groups, [2, 4], tmp_path)
    assert [p.name for p in figures] == ["figure1_2_gradient_ratio.png", "figure3_weight_norms.png",
                                         "figure4_mapping.png"]
    info = {"command": "reproduce.py --smoke", "config_file": "cfg.yaml", "iters": 4, "seeds": [0, 1, 2],
            "num_trainings": len(results), "minutes": 1.0, "groups": groups, "ratio_iters": [2, 4]}
    text = reproduce.write_report(results, reproduce.study(), info, figures, tmp_path).read_text()
    softmax = [r["metrics"]["APr"] for r in results if r["key"] == "LOSS=softmax"]
    expected = f"{np.mean(softmax):.2f} ± {np.std(softmax, ddof=1):.2f}"
    softmax_line = next(line for line in text.splitlines() if line.startswith("| softmax CE |"))
    assert softmax_line.split(" | ")[2] == expected
    claims = [line for line in text.splitlines() if line.startswith("- ")]
    assert len(claims) == 4
    assert "EQL v2 APr above" in claims[0] and "**holds beyond 2 standard errors**" in claims[0]
    assert "**holds beyond 2 standard errors**" in claims[2] and "**holds beyond 2" in claims[3]
    assert "![figure4_mapping](figure4_mapping.png)" in text


def test_claims_cannot_be_decided_with_one_seed():
    line = reproduce.claim_line("x", [1.0], [0.0])
    assert "cannot be decided" in line
    assert "difference +1.000 ± nan AP points (" in line
    assert "difference +1.000 ± nan (" in reproduce.claim_line("x", [1.0], [0.0], unit="")  # no empty unit
    diff, error = reproduce.difference([1.0, 3.0], [0.0, 0.0, 0.0])
    assert diff == 2.0 and error == pytest.approx(math.sqrt(2.0 / 2))


@pytest.mark.parametrize("argv, pattern", [(["--iters", "0"], "--iters"), (["--parallel", "0"], "--parallel"),
                                          (["--tables", "3"], "invalid choice")])
def test_bad_arguments_are_named(argv, pattern, capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(argv)
    assert pattern in capsys.readouterr().err


def test_mlflow_parent_and_child_runs_read_back(tmp_path):
    from mlflow.tracking import MlflowClient

    results = [r for r in fake_results(seeds=(0, 1)) if r["key"] in ("LOSS=softmax", reproduce.run_key(reproduce.EQLV2))]
    settings = {"LOSS=softmax": {"LOSS": "softmax"}, reproduce.run_key(reproduce.EQLV2): reproduce.EQLV2}
    (tmp_path / "report.md").write_text("# report\n")
    (tmp_path / "runs.json").write_text("{}")
    info = {"command": "reproduce.py --smoke", "config_file": "cfg.yaml", "iters": 3, "seeds": [0, 1]}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id = reproduce.log_to_mlflow(uri, "repro-test", results, settings, info, tmp_path)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("repro-test")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 4 and all(run.info.status == "FINISHED" for run in children)
    by_name = {(run.data.params["setting/LOSS"], run.data.params["seed"]): run for run in children}
    expected = next(r for r in results if r["key"] == "LOSS=softmax" and r["seed"] == 1)["metrics"]["APr"]
    assert by_name[("softmax", "1")].data.metrics["APr"] == pytest.approx(expected)
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"report.md", "runs.json"} <= artifacts
    assert client.get_run(parent_id).data.params["iters"] == "3"


def test_credentials_in_the_tracking_uri_are_refused(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--mlflow-uri", "http://user:s3cret@127.0.0.1:5001"])
    err = capsys.readouterr().err
    assert "MLFLOW_TRACKING_PASSWORD" in err
    assert reproduce.check_tracking_uri("http://127.0.0.1:5001") == "http://127.0.0.1:5001"
