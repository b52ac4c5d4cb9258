"""Ray fixtures and helpers for the Ray Train tests (import them from the test modules).

The hooks and the callback defined here run inside Ray workers and the Ray Train controller:
this module is pickled by value (see :func:`pickle_by_value`), so they need not be importable
there. They write what they see into files under the test's ``tmp_path``.

Ray is started with ``address="local"`` so that a test never attaches to a cluster somebody else
started on this machine with ``ray start``, and with its dashboard on a free port (Ray Train
needs the State API it serves to clean up placement groups). Nothing here needs
``RAY_AUTH_MODE``: ``ray.init`` creates ``~/.ray/auth_token`` itself when the home folder has none.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils import comm

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pickle_by_value() -> None:
    """Ship this module's hooks and callbacks to Ray processes by value."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_local() -> Iterator[dict]:
    """A fresh local Ray instance with 2 CPUs for the tests of one module.

    Yields ``{"dashboard_url": ...}``, the address ``ray job submit`` takes.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    pickle_by_value()
    port = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=port,
        log_to_driver=False,
        configure_logging=False,
    )
    try:
        yield {"dashboard_url": f"http://127.0.0.1:{port}"}
    finally:
        ray.shutdown()


def write_handful(root: Path) -> dict[str, str]:
    """Generate the handful LVIS images (train 12, val 6) and return the ``DATASETS.EQLV2`` paths."""
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import write_handful_lvis

    paths = {}
    for split, count, seed in (("train", 12, 0), ("val", 6, 1)):
        json_file, image_root = write_handful_lvis(root, split, count, seed)
        paths[split] = (str(json_file), str(image_root))
    return {
        "DATASETS.EQLV2.CUSTOM_NAME": "handful",
        "DATASETS.EQLV2.CUSTOM_TRAIN_JSON": paths["train"][0],
        "DATASETS.EQLV2.CUSTOM_TRAIN_IMAGES": paths["train"][1],
        "DATASETS.EQLV2.CUSTOM_VAL_JSON": paths["val"][0],
        "DATASETS.EQLV2.CUSTOM_VAL_IMAGES": paths["val"][1],
    }


def tiny_opts(data: dict[str, str], max_iter: int, **overrides) -> list[str]:
    """Overrides training the tiny config a few iterations on the handful of 96 px images.

    The handful is registered in every worker through the ``DATASETS.EQLV2.CUSTOM_*`` keys.
    """
    values = {
        **data,
        "DATASETS.TRAIN": "('handful_train',)",
        "DATASETS.TEST": "('handful_val',)",
        "MODEL.ROI_HEADS.NUM_CLASSES": "4",
        "SOLVER.IMS_PER_BATCH": "2",
        "SOLVER.MAX_ITER": str(max_iter),
        "SOLVER.WARMUP_ITERS": "2",
        "SOLVER.CHECKPOINT_PERIOD": "1000",
        "TEST.EVAL_PERIOD": "0",
        "MODEL.EQLV2.LOG_PERIOD": "2",
        "INPUT.MIN_SIZE_TRAIN": "(96,)",
        "INPUT.MAX_SIZE_TRAIN": "96",
        "INPUT.MIN_SIZE_TEST": "96",
        "INPUT.MAX_SIZE_TEST": "96",
        "TEST.DETECTIONS_PER_IMAGE": "50",
        "SEED": "0",
        "MODEL.EQLV2.BASE_CHECKPOINT_CONFIG": "",  # random initialisation: no base to train first
        **{key: str(value) for key, value in overrides.items()},
    }
    return [item for pair in values.items() for item in pair]


def _eqlv2_loss(trainer):
    from eqlv2.modeling.roi_heads import classification_losses

    (loss,) = [loss for loss in classification_losses(trainer.model) if hasattr(loss, "pos_grad")]
    return loss


def _statistics(loss) -> dict:
    return {
        "pos_grad": loss.pos_grad.detach().clone(),
        "neg_grad": loss.neg_grad.detach().clone(),
        "num_updates": int(loss.num_updates),
    }


class RecordingHook(HookBase):
    """On every rank: the (logits, labels) each training step feeds to the EQL v2 loss, the
    statistics at the start and at the end, and the comm placement, saved to ``rank<r>.pt``."""

    def __init__(self, out_dir: str, cfg, trainer) -> None:
        self._out = Path(out_dir)
        self._batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def before_train(self) -> None:
        loss = _eqlv2_loss(self.trainer)
        self._start = _statistics(loss)
        self._start_iter = self.trainer.start_iter
        original = loss.forward

        def forward(logits, labels):
            if loss.training:
                self._batches.append((self.trainer.iter, logits.detach().clone(), labels.detach().clone()))
            return original(logits, labels)

        loss.forward = forward

    def after_train(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self._out.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "rank": comm.get_rank(),
                "world_size": comm.get_world_size(),
                "local_rank": comm.get_local_rank(),
                "local_size": comm.get_local_size(),
                "ray_node_rank": context.get_node_rank(),
                "ray_local_rank": context.get_local_rank(),
                "ray_local_world_size": context.get_local_world_size(),
                "node_id": __import__("ray").get_runtime_context().get_node_id(),
                "pid": os.getpid(),
                "start_iter": self._start_iter,
                "start": self._start,
                "end": _statistics(_eqlv2_loss(self.trainer)),
                "batches": self._batches,
            },
            self._out / f"rank{comm.get_rank()}.pt",
        )


class AttemptHook(HookBase):
    """On rank 0, at the start of each attempt: the checkpoint restored, the start iteration
    and the statistics, saved to ``attempt<k>.pt`` (k = 0, 1, ...)."""

    def __init__(self, out_dir: str, cfg, trainer) -> None:
        self._out = Path(out_dir)

    def before_train(self) -> None:
        import ray.train

        self._out.mkdir(parents=True, exist_ok=True)
        attempt = len(list(self._out.glob("attempt*.pt")))
        checkpoint = ray.train.get_checkpoint()
        torch.save(
            {
                "checkpoint": checkpoint.path if checkpoint else None,
                "start_iter": self.trainer.start_iter,
                "statistics": _statistics(_eqlv2_loss(self.trainer)),
                "pid": os.getpid(),
            },
            self._out / f"attempt{attempt}.pt",
        )


class KillOnceHook(HookBase):
    """Kills its own worker process (SIGKILL) after iteration ``at`` on rank ``rank``, once:
    the marker file ``marker`` records that it happened."""

    def __init__(self, marker: str, at: int, rank: int, cfg, trainer) -> None:
        self._marker = Path(marker)
        self._at = at
        self._rank = rank

    def after_step(self) -> None:
        if comm.get_rank() != self._rank or self.trainer.iter + 1 != self._at or self._marker.exists():
            return
        self._marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)


def _recording_callback_base():
    from ray.train import UserCallback

    return UserCallback


class RecordingCallback(_recording_callback_base()):
    """A Ray Train callback (runs in the controller) appending every report to a JSON-lines file:
    ``{"metrics": [per-rank metrics], "checkpoint": path or None}``."""

    def __init__(self, path: str) -> None:
        self._path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self._path, "a") as f:
            f.write(json.dumps({"metrics": metrics, "checkpoint": checkpoint.path if checkpoint else None}) + "\n")


def read_reports(path: Path) -> list[dict]:
    """The reports a :class:`RecordingCallback` wrote."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



#: One gloo process of :func:`run_local_groups` (argv: rank, world size, store, nodes JSON, out):
#: builds detectron2's local groups from a made-up placement and all-reduces a one in its group.
_LOCAL_GROUPS_WORKER = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
from detectron2.utils import comm
from eqlv2.raytrain.distributed import WorkerPlacement, setup_detectron2_comm

rank, world_size, store, nodes, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world_size)
node = next(int(n) for n, ranks in nodes.items() if rank in ranks)
ranks = nodes[str(node)]
setup_detectron2_comm(WorkerPlacement(rank, ranks.index(rank), node, world_size, len(ranks)))
ones = torch.ones(1)
dist.all_reduce(ones, group=comm.get_local_process_group())
seen = {"local_rank": comm.get_local_rank(), "local_size": comm.get_local_size(), "local_sum": float(ones)}
Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
dist.destroy_process_group()
"""


def run_local_groups(tmp: Path, nodes: dict[int, list[int]]) -> list[dict]:
    """Runs one plain torch.distributed (gloo) process per rank, without Ray, placed on made-up
    nodes; returns what each rank's detectron2 ``comm`` saw."""
    import subprocess

    world_size = sum(len(ranks) for ranks in nodes.values())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOCAL_GROUPS_WORKER, str(rank), str(world_size), str(tmp / "store"),
             json.dumps(nodes), str(tmp)],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for rank in range(world_size)
    ]
    for proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(world_size)]
