"""benchmarks/reproduce.py without training: the study's rows, their config overrides, the report."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce  # noqa: E402
from reproduce_run import job_opts  # noqa: E402

from eqlv2.engine import setup_cfg  # noqa: E402

SCALED = {"repeat_threshold": 0.125, "eqlv1_lambda": 0.22, "fed_classes": 3, "step_fractions": (0.8,), "warmup": 20}


def test_study_trains_each_distinct_setting_once():
    tables = reproduce.study()
    assert [title.split()[1] for title in tables] == ["1", "2", "7", "8", "9"]
    rows = {reproduce.run_key(row) for table in tables.values() for row in table.values()}
    # Table 1: 6; Table 2: +obj, +neg; Table 7: 3 besides (12, 0.8); Table 8: 3 besides 4 and 0 (= +neg);
    # Table 9: 3 2C rows
    assert len(rows) == 17
    eqlv2 = reproduce.run_key(reproduce.EQLV2)
    alphas = tables["Table 8 analogue: alpha (gamma 12, mu 0.8)"]
    assert reproduce.run_key(alphas["alpha 4"]) == eqlv2
    assert alphas["alpha 0"] == tables["Table 2 analogue: ablation of EQL v2"]["+ negative down-weighting"]
    assert list(reproduce.study([9])) == ["Table 9 analogue: C-sigmoid vs 2C-softmax"]


def test_every_job_gives_a_valid_config(tmp_path):
    args = reproduce.parse_args(["--iters", "50", "--seeds", "3", "--output", str(tmp_path)])
    jobs = reproduce.make_jobs(args, reproduce.study(), {}, tmp_path)
    assert len(jobs) == 17 and {job.seed for job in jobs} == {3}
    labels = {job.key: job.label for job in jobs}
    assert labels[reproduce.run_key(reproduce.OBJ_NEG)] == "Table 2 + negative down-weighting"  # first table
    assert labels[reproduce.run_key({**reproduce.EQLV2, "ALPHA": 8.0})] == "Table 8 alpha 8"
    for job in jobs:
        cfg = setup_cfg(job.config_file, job_opts(job, SCALED))
        assert cfg.MODEL.MASK_ON and not cfg.TEST.EQLV2.EVALUATE_MASKS  # the default CPU study: box AP
        assert cfg.TEST.DETECTIONS_PER_IMAGE == 300
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
            up_weighted = row.get("POS_UP_WEIGHT") and row.get("ALPHA") != 0.0
            bonus = 5.0 if row.get("LOSS", "").startswith("eqlv2") and up_weighted else 0.0
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
            "num_trainings": len(results), "minutes": 1.0, "groups": groups, "counts": counts, "ratio_iters": [2, 4]}
    text = reproduce.write_report(results, reproduce.study(), info, figures, tmp_path).read_text()
    softmax = [r["metrics"]["APr"] for r in results if r["key"] == "LOSS=softmax"]
    expected = f"{np.mean(softmax):.2f} ± {np.std(softmax, ddof=1):.2f}"
    softmax_line = next(line for line in text.splitlines() if line.startswith("| softmax CE |"))
    assert softmax_line.split(" | ")[2] == expected
    claims = [line for line in text.splitlines() if line.startswith("- ") and ": difference " in line]
    assert len(claims) == 4
    assert "EQL v2 APr above" in claims[0] and "**holds beyond 2 standard errors**" in claims[0]
    assert "**holds beyond 2 standard errors**" in claims[2] and "**holds beyond 2" in claims[3]
    assert "![figure4_mapping](figure4_mapping.png)" in text
    # diagnostics: seed-mean ratio per group (0.1 / 0.9 plus 0.01 per seed), rare instance counts
    assert "| softmax CE | 0.11, 0%, 0% | 0.11, 0%, 0% | 0.11, 0%, 0% |" in text
    assert "| EQL v2 | 0.91, 0%, 0% | 0.91, 0%, 0% | 0.91, 0%, 0% |" in text
    agnostic = reproduce.difference(
        [r["metrics"]["AP"] for r in results if r["key"] == reproduce.run_key(reproduce.OBJ_ONLY)],
        [r["metrics"]["AP"] for r in results if r["key"] == "LOSS=sigmoid"])
    assert f"change AP {agnostic[0]:+.2f} ± {agnostic[1]:.2f}, APf " in text
    findings = [line.split(":")[0] for line in text.splitlines() if line.startswith("- ") and ": difference " not in line]
    assert findings == ["- Agnostic task", "- Seed noise"]  # no schedule without train_images, no overshoot below 1


def test_ratio_profile_counts_starved_and_overshooting_categories():
    groups = ["r", "r", "r", "r", "f"]
    results = [{"key": "k", "seed": s, "ratios": {9: [0.0, 0.05 + s, 2.0, 1.0, 1.0]}} for s in (0.0, 0.02)]
    profile = reproduce.ratio_profile(results, "k", groups, 9)
    assert profile["r"] == pytest.approx((np.mean([0.0, 0.06, 2.0, 1.0]), 0.5, 0.25))
    assert profile["f"] == pytest.approx((1.0, 0.0, 0.0)) and "c" not in profile
    assert reproduce.ratio_profile(results, "other", groups, 9) == {}


def test_from_runs_writes_the_same_report_without_training(tmp_path):
    results = fake_results()
    runs = {"results": results, "counts": [90, 80, 30, 20, 5, 2], "groups": ["f", "f", "c", "c", "r", "r"],
            "settings": {r["key"]: {} for r in results},
            "info": {"command": "reproduce.py --smoke", "config_file": "cfg.yaml", "iters": 4, "seeds": [0, 1, 2],
                     "num_trainings": len(results), "minutes": 1.0, "ratio_iters": [2, 4], "masks_evaluated": False,
                     "tables": [1, 2, 7, 8, 9]}}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    expected = reproduce.render(runs, first).read_text()
    (first / "runs.json").write_text(json.dumps(runs))  # ratio iterations become text keys
    assert reproduce.main(["--from-runs", str(first / "runs.json"), "--output", str(second)]) == 0
    assert (second / "report.md").read_text() == expected
    assert sorted(p.name for p in second.glob("*.png")) == sorted(p.name for p in first.glob("*.png"))
    assert not (second / "runs.json").exists()


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


def test_presets_fill_only_what_the_user_left_unset():
    default = reproduce.parse_args([])
    assert default.config_file == str(reproduce.DEFAULT_CONFIG) and default.seeds == [0, 1, 2]
    assert default.opts[-2:] == ["SOLVER.MAX_ITER", "300"] and default.address is None
    smoke = reproduce.parse_args(["--smoke", "SOLVER.BASE_LR", "0.01"])
    assert smoke.iters == 3 and smoke.seeds == [0, 1]
    assert smoke.opts[-2:] == ["SOLVER.BASE_LR", "0.01"]  # the user's overrides come last and win
    assert smoke.opts.index("MODEL.EQLV2.BASE_CHECKPOINT_CONFIG") > smoke.opts.index("SOLVER.MAX_ITER")
    full = reproduce.parse_args(["--full", "--seeds", "5"])
    assert full.config_file.endswith("LVISv1/mask_rcnn_R_50_FPN_1x_eqlv2.yaml") and full.opts == []
    assert (full.address, full.gpus_per_run, full.seeds) == ("auto", 8, [5])
    cfg = setup_cfg(full.config_file, [])
    assert cfg.MODEL.MASK_ON and cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1203


def test_full_jobs_name_the_config_inside_the_checkout_and_their_gpus(tmp_path):
    args = reproduce.parse_args(["--full", "--tables", "1"])
    jobs = reproduce.make_jobs(args, reproduce.study([1]), {}, tmp_path)
    assert len(jobs) == 18 and {job.processes for job in jobs} == {8}
    assert {job.config_file for job in jobs} == {"configs/LVISv1/mask_rcnn_R_50_FPN_1x_eqlv2.yaml"}
    assert reproduce.worker_env(on_cluster=True)["PYTHONPATH"].split(os.pathsep)[:2] == [".", "benchmarks"]


def test_smoke_and_full_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--smoke", "--full"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_the_report_goes_between_the_readme_markers_and_nowhere_else(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Project\n\nintro\n{reproduce.README_BEGIN}\nold report\n{reproduce.README_END}\n\n## After\n")
    report = tmp_path / "docs" / "results" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# EQL v2 reproduction report\n\n| a | b |\n\n![figure4_mapping](figure4_mapping.png)\n")
    reproduce.update_readme(readme, report)
    reproduce.update_readme(readme, report)  # twice: the same text, not two copies
    assert readme.read_text() == (
        f"# Project\n\nintro\n{reproduce.README_BEGIN}\n| a | b |\n\n"
        f"![figure4_mapping](docs/results/figure4_mapping.png)\n{reproduce.README_END}\n\n## After\n"
    )


def test_a_readme_without_markers_is_named_and_left_as_it_was(tmp_path):
    readme = tmp_path / "NOTES.md"
    readme.write_text("# Notes\n")
    report = tmp_path / "report.md"
    report.write_text("# title\nbody\n")
    with pytest.raises(ValueError, match="NOTES.md: add the lines"):
        reproduce.update_readme(readme, report)
    assert readme.read_text() == "# Notes\n"


def test_findings_name_the_schedule_and_an_overshooting_tail():
    info = {"counts": [100, 5, 2, 9], "groups": ["f", "r", "r", "r"], "train_images": 800, "images_per_batch": 2,
            "iters": 300}
    assert reproduce.exposure_finding(info) == (
        "Schedule: 300 iterations see 600 images, 0.75 passes over the 800 training images. The 3 rare categories "
        "have 2 to 9 training instances (median 5), so a median rare category's instances are met about 3.8 times "
        "in a whole training.")
    assert reproduce.exposure_finding({**info, "train_images": None}) is None
    ratios = {"softmax": [1.0, 0.1, 0.2, 0.3], "eqlv2": [1.0, 1.0, 2.0, 1.6]}
    results = [{"key": reproduce.run_key({"LOSS": "softmax"}), "ratios": {7: ratios["softmax"]}},
               {"key": reproduce.run_key(reproduce.EQLV2), "ratios": {7: ratios["eqlv2"]}}]
    text = reproduce.overshoot_finding(results, info["groups"], 7)
    assert text.startswith("Gradient ratio: EQL v2 raises the rare categories' mean ratio from 0.20 (softmax CE) "
                           "to 1.53, past 1: 67% of them end above 1.5")
    results[1]["ratios"][7] = [1.0, 0.9, 0.9, 0.9]
    assert reproduce.overshoot_finding(results, info["groups"], 7) is None
