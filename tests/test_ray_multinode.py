"""Ray Train across two nodes: a ``ray.cluster_utils.Cluster`` of two 1-CPU nodes, STRICT_SPREAD;
and a search submitted with ``ray job submit`` to two nodes started with ``ray start``.

Both nodes run on this machine, as two raylets of one cluster. Ray places the two workers on
different nodes, and the EQL v2 all-reduce and DDP go between them. Ray ranks nodes by IP
address, so here both workers have node rank 0 and local ranks 0 and 1 (on a real cluster the
node ranks differ); detectron2's local groups follow Ray's ranks either way. Local groups for
distinct, unequally filled node ranks are tested without Ray in ``test_local_process_groups``.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterator

import pytest
import torch
from ray_fixtures import TINY, RecordingHook, free_port, pickle_by_value, tiny_opts, write_handful

from eqlv2.raytrain.launch import build_torch_trainer


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[object]:
    """A two-node Ray cluster (one CPU each) with the driver connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    pickle_by_value()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "dashboard_port": free_port()},
    )
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_two_workers_on_two_nodes_share_the_statistics(two_node_cluster, tmp_path):
    import ray

    assert len([node for node in ray.nodes() if node["Alive"]]) == 2
    data = write_handful(tmp_path / "data")
    max_iter = 4
    trainer = build_torch_trainer(
        TINY, tiny_opts(data, max_iter, **{"DATASETS.TEST": "()"}), num_workers=2,
        storage_path=str(tmp_path / "storage"), name="two_nodes", placement_strategy="STRICT_SPREAD",
        all_rank_hooks=[functools.partial(RecordingHook, str(tmp_path / "recorded"))],
    )  # fmt: skip
    result = trainer.fit()
    assert result.metrics["iteration"] == max_iter
    rank0, rank1 = (torch.load(tmp_path / "recorded" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert rank0["node_id"] != rank1["node_id"]  # STRICT_SPREAD: one worker per node
    for recorded in (rank0, rank1):
        assert recorded["world_size"] == 2
        assert recorded["local_rank"] == recorded["ray_local_rank"]
        assert recorded["local_size"] == recorded["ray_local_world_size"]
    for key in ("pos_grad", "neg_grad"):
        assert torch.equal(rank0["end"][key], rank1["end"][key])
    assert rank0["end"]["num_updates"] == max_iter
    assert rank0["end"]["neg_grad"].sum() > 0


# --------------------------------------------------------------------------- ray start + ray job submit
@pytest.mark.slow
def test_search_submitted_as_a_job_to_a_two_node_ray_start_cluster(tmp_path):
    """``ray start --head``, ``ray start --address ...`` and ``ray job submit --working-dir . --
    python tune/search.py --ray-address auto ...``: the job succeeds, its status and logs read
    back, and the trial's two Ray Train workers fill both one-CPU nodes."""
    from cluster_fixtures import ray_start_cluster
    from ray_fixtures import ROOT

    runs = tmp_path / "runs"
    datasets = {"EQLV2_SYNTHETIC_ROOT": os.environ.get("EQLV2_SYNTHETIC_ROOT", str(ROOT / "datasets/eqlv2_synthetic"))}
    with ray_start_cluster(num_workers=1, cpus_per_node=1, env=datasets) as cluster:
        submission_id = f"search-{os.getpid()}"
        submitted = cluster.ray(
            "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
            "--working-dir", str(ROOT), "--", sys.executable, "tune/search.py", "--ray-address", "auto",
            "--smoke", "--num-trials", "1", "--workers-per-trial", "2", "--baseline", "none", "--noise-seeds", "0", "--results-dir", str(runs),
            "--name", "two_nodes",
            timeout=900,
        )  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
        status = cluster.ray("job", "status", "--address", cluster.dashboard_url, submission_id)
        status_text = status.stdout + status.stderr
        assert re.search(r"succeeded", status_text, re.I), status_text  # "Job '...' succeeded"
        logs = cluster.ray("job", "logs", "--address", cluster.dashboard_url, submission_id).stdout
        assert re.search(r"^\| 1 +\| .* \| complete", logs, re.M), logs[-3000:]
        assert "2 Ray Train worker(s) per trial" in logs, logs[-3000:]

    optuna = pytest.importorskip("optuna")
    (summary,) = optuna.get_all_study_summaries(storage=f"sqlite:///{runs}/optuna.db")
    study = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{runs}/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    assert (runs / "ray_results/two_nodes").is_dir()
