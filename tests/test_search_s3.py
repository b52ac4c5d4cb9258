"""A search whose Tune storage is S3 (``--storage-path s3://...``), against a local S3 server.

The server is moto's (``moto.server.ThreadedMotoServer``, from PyPI), on a free loopback port;
the search reaches it as it would reach AWS, through pyarrow and ``AWS_ENDPOINT_URL`` in the
environment, with no credential in any URL. The files are read back from the bucket with boto3.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cluster_fixtures import free_port
from test_search_smoke import run_cli

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "eqlv2-results"


@pytest.fixture
def s3(monkeypatch) -> dict[str, str]:
    """A running S3 server with an empty bucket; its environment set for this process and its
    children (the search and its Ray workers)."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "eqlv2-test-key",
        "AWS_SECRET_ACCESS_KEY": "eqlv2-test-secret-0123456789",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        server.stop()


def _keys(prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def _object(key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()


@pytest.mark.slow
def test_search_keeps_its_tune_experiment_in_s3_and_resumes_from_there(s3, tmp_path):
    storage = f"s3://{BUCKET}/ray_results"
    args = ["--smoke", "--num-trials", "1", "--baseline", "none", "--noise-seeds", "0",
            "--results-dir", str(tmp_path / "runs"), "--storage-path", storage, "--name", "s3search"]  # fmt: skip
    first = run_cli(args, cwd=tmp_path, timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    assert f"Ray Tune results: {storage}/s3search" in first.stdout
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "runs" / "s3:").exists()

    keys = _keys("ray_results/")
    assert "ray_results/latest_search.json" in keys
    assert json.loads(_object("ray_results/latest_search.json")) == {"name": "s3search"}
    state = json.loads(_object("ray_results/s3search/eqlv2_search.json"))
    assert state["name"] == "s3search" and state["study_name"]
    for report in ("ranked_trials.csv", "ranked_trials.md", "best_config.json"):
        assert f"ray_results/s3search/{report}" in keys
    assert any(key.startswith("ray_results/s3search/experiment_state") for key in keys), keys  # what --resume restores
    assert any(key.startswith("ray_results/s3search/ray_train/") for key in keys), keys  # Ray Train checkpoints
    assert s3["AWS_SECRET_ACCESS_KEY"] not in first.stdout + first.stderr

    # --resume without --name finds the search through latest_search.json in the bucket
    resumed = run_cli(args[:-2] + ["--resume"], cwd=tmp_path, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert f"Ray Tune results: {storage}/s3search" in resumed.stdout
    assert "| 1 " in resumed.stdout  # the finished trial, ranked again, not re-run


def test_unreachable_bucket_is_named_before_anything_starts(s3, tmp_path):
    proc = run_cli(["--smoke", "--results-dir", str(tmp_path / "runs"), "--storage-path", "s3://no-such-bucket/r"],
                   cwd=tmp_path, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "--storage-path: cannot write to s3://no-such-bucket/r" in proc.stdout + proc.stderr
    assert "Bucket 'no-such-bucket' not found" in proc.stdout + proc.stderr
    assert not Path(tmp_path / "runs" / "ray_results").exists() or not os.listdir(tmp_path / "runs" / "ray_results")
