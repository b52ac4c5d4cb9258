"""benchmarks/reproduce.py --smoke end to end: every row and figure trained on a local Ray, the
report written into a README; and one training in two processes, as ``--full`` trains on GPUs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import reproduce  # noqa: E402
from reproduce_run import Job, train_one  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Runs the smoke study once; returns its output folder and README copy."""
    folder = tmp_path_factory.mktemp("reproduce_smoke")
    readme = folder / "README.md"
    readme.write_text(f"# Copy\n\n{reproduce.README_BEGIN}\n{reproduce.README_END}\n")
    output = folder / "docs" / "results"
    command = [sys.executable, str(ROOT / "benchmarks/reproduce.py"), "--smoke", "--output", str(output),
               "--readme", str(readme)]  # fmt: skip
    done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return output, readme, done.stderr


def test_every_setting_and_seed_is_trained_once(smoke):
    output, _, log = smoke
    runs = json.loads((output / "runs.json").read_text())
    results = runs["results"]
    assert len(results) == 17 * 2 and "done 34/34" in log
    assert len({(r["key"], r["seed"]) for r in results}) == 34
    num_classes = len(runs["groups"])
    for result in results:
        assert set(result["metrics"]) == set(reproduce.COLUMNS)
        assert sorted(map(int, result["ratios"])) == [1, 2, 3]
        assert all(len(ratios) == num_classes for ratios in result["ratios"].values())
        assert len(result["weight_norms"]) == num_classes


def test_report_has_every_table_claim_and_figure(smoke):
    output, _, _ = smoke
    report = (output / "report.md").read_text()
    assert [line.split(":")[0] for line in report.splitlines() if line.startswith("### Table")] == [
        f"### Table {n} analogue" for n in (1, 2, 7, 8, 9)
    ]
    assert sum(line.startswith("- ") and ": difference " in line for line in report.splitlines()) == 4
    assert "- Schedule: 3 iterations see 6 images, 0.06 passes over the 100 training images." in report
    for name in ("figure1_2_gradient_ratio", "figure3_weight_norms", "figure4_mapping"):
        assert (output / f"{name}.png").stat().st_size > 10_000
        assert f"![{name}]({name}.png)" in report
    assert "masks not evaluated" in report and "| APb |" not in report


def test_the_report_is_written_again_from_runs_json_alone(smoke, tmp_path):
    output, _, _ = smoke
    again = tmp_path / "again"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/reproduce.py"), "--from-runs",
                           str(output / "runs.json"), "--output", str(again)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (again / "report.md").read_text() == (output / "report.md").read_text()


def test_the_readme_gets_the_report_with_its_figure_links(smoke):
    output, readme, _ = smoke
    text = readme.read_text()
    assert text.startswith(f"# Copy\n\n{reproduce.README_BEGIN}\nRegenerate it with `python benchmarks/reproduce.py --smoke")
    assert "](docs/results/figure4_mapping.png)" in text
    assert text.endswith(f"{reproduce.README_END}\n")


def test_one_training_in_two_processes_as_full_trains_on_gpus(smoke, tmp_path, monkeypatch):
    """detectron2's launch with 2 processes (gloo on this CPU, NCCL on GPUs): rank 0's result."""
    output, _, _ = smoke
    data = {"root": str(output / "smoke_benchmark"),
            "spec": {"num_classes": 60, "num_train_images": 100, "num_val_images": 8}}  # fmt: skip
    args = reproduce.parse_args(["--smoke"])
    job = Job("LOSS=eqlv2", dict(reproduce.EQLV2), 0, args.config_file, tuple(args.opts), 2,
              str(tmp_path / "run"), data, processes=2)  # fmt: skip
    scaled = {"repeat_threshold": 1.0, "eqlv1_lambda": 1.0, "fed_classes": 3, "step_fractions": (), "warmup": 1}
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # gloo's connections on loopback only
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = train_one(job, scaled, [1, 2])
    assert result["key"] == "LOSS=eqlv2" and sorted(result["ratios"]) == [1, 2]
    assert set(result["metrics"]) == set(reproduce.COLUMNS)
    assert not list((tmp_path / "run").glob("*.pth"))
