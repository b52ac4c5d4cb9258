"""The set-up script: re-runs are no-ops, and pip's check accepts only written-down exceptions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (Path(sys.prefix) / ".eqlv2-setup-stamp").exists(), reason="venv not built by setup.sh")
def test_second_setup_run_changes_nothing():
    env = dict(os.environ, EQLV2_VENV=sys.prefix)
    proc = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "is up to date" in proc.stdout


def test_pip_check_passes_with_the_projects_exceptions():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/pip_check.py"), str(ROOT / "requirements/pip-check-allowed.txt")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout


def test_pip_check_fails_without_them(tmp_path):
    empty = tmp_path / "allowed.txt"
    empty.write_text("# nothing accepted\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/pip_check.py"), str(empty)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "UNEXPECTED: sal-detectron2 0.7.2 has requirement numpy<2" in proc.stdout


def test_detectron2_is_the_pinned_release():
    import detectron2

    assert detectron2.__version__ == "0.7.2"
