"""Ray Train across two nodes: a ``ray.cluster_utils.Cluster`` of two 1-CPU nodes, STRICT_SPREAD.

Both nodes run on this machine, as two raylets of one cluster. Ray places the two workers on
different nodes, and the EQL v2 all-reduce and DDP go between them. Ray ranks nodes by IP
address, so here both workers have node rank 0 and local ranks 0 and 1 (on a real cluster the
node ranks differ); detectron2's local groups follow Ray's ranks either way. Local groups for
distinct, unequally filled node ranks are tested without Ray in ``test_local_process_groups``.
"""

from __future__ import annotations

import functools
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
