"""Training speed of the tiny config: plain detectron2 versus Ray Train, and 2-worker scaling.

Trainings of ``configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml`` on the generated benchmark, in
one run, each for ``--iters`` iterations, without evaluation:

1. plain: ``EQLv2Trainer`` in this process exactly as ``train/train_net.py`` runs it
   (``--threads`` torch threads, default 1; ``--batch`` images per iteration, default 4, the
   config's), once before and once after the Ray runs (their mean is used, so that a load that
   drifts during the run affects both sides alike);
2. Ray, 1 worker x ``--threads`` threads, ``--batch`` images (``build_torch_trainer``, what
   ``train/ray_train.py`` runs);
3. Ray, 1 worker x 1 thread and 2 workers x 1 thread (DDP over gloo, each worker half the batch),
   both with ``--scaling-batch`` images per iteration (default 16).

Speed is iterations per second between the end of iteration ``--warmup`` and the end of the last
one, wall clock on rank 0, hooks included (Ray's reports and the all-reduces too); start-up,
data generation and the final checkpoint are not included. Printed: (2)/(1), the overhead of
Ray Train (target >= 0.9), and the 2-worker / 1-worker ratio of (3), the scaling on this 2-core
machine (target >= 1.6).

Why these settings: on a machine whose cores other processes also use, multi-threaded OpenMP
kernels slow down far more than single-threaded ones, which would swamp the overheads measured
here, hence one thread. And at the config's 4 images per iteration each of two workers
computes only 2 images (about 0.4 CPU seconds here) between two all-reduces of the 11M
gradients, where any wait for the other worker counts in full; 16 images per iteration make
the scaling a measure of the training rather than of that latency, hence the larger batch
for (3).
The load average at the start of each training and the CPU seconds rank 0's process used per
iteration (which other processes change little) are printed with the figures.

Usage: ``python benchmarks/ray_overhead.py [--iters 30] [--warmup 5] [--threads 1] [--batch 4]
[--scaling-batch 16] [--json out.json]``
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from detectron2.engine import HookBase

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml")
TARGET_OVERHEAD = 0.9
TARGET_SCALING = 1.6
SPEED_KEY = "benchmark/iterations_per_second"
CPU_KEY = "benchmark/cpu_seconds_per_iteration"


class SpeedHook(HookBase):
    """Measures iterations per second after ``warmup`` iterations, and the CPU seconds the
    process used per iteration (all its threads), and puts both in the storage (so that the
    last Ray report carries them) and in :attr:`speed` / :attr:`cpu_per_iteration`."""

    def __init__(self, warmup: int, cfg=None, trainer=None) -> None:
        self._warmup = warmup
        self._start: tuple[float, float] | None = None
        self.speed: float | None = None
        self.cpu_per_iteration: float | None = None

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if done == self._warmup:
            self._start = (time.perf_counter(), time.process_time())
        elif done == self.trainer.max_iter and self._start is not None:
            iterations = done - self._warmup
            self.speed = iterations / (time.perf_counter() - self._start[0])
            self.cpu_per_iteration = (time.process_time() - self._start[1]) / iterations
            self.trainer.storage.put_scalar(SPEED_KEY, self.speed, smoothing_hint=False)
            self.trainer.storage.put_scalar(CPU_KEY, self.cpu_per_iteration, smoothing_hint=False)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=30, help="iterations of each training")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the plain and 1-worker runs")
    parser.add_argument("--warmup", type=int, default=5, help="iterations not timed")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration of (1) and (2)")
    parser.add_argument("--scaling-batch", type=int, default=16, help="images per iteration of (3)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args()


def overrides(args: argparse.Namespace, output_dir: str, batch: int) -> list[str]:
    return [
        "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.IMS_PER_BATCH", str(batch),
        "SOLVER.CHECKPOINT_PERIOD", str(10 * args.iters),
        "TEST.EVAL_PERIOD", "0",
        "DATASETS.TEST", "()",
        "SEED", "0",
        "OUTPUT_DIR", output_dir,
    ]  # fmt: skip


def plain_speed(args: argparse.Namespace, work: Path, name: str) -> tuple[float, float]:
    """(iterations per second, CPU seconds per iteration) of the plain trainer, set up as
    ``train/train_net.py`` does."""
    from detectron2.data import DatasetCatalog
    from detectron2.engine import default_setup

    from eqlv2.engine import EQLv2Trainer, setup_cfg

    torch.set_num_threads(args.threads)
    cfg = setup_cfg(CONFIG, overrides(args, str(work / name), args.batch))
    DatasetCatalog.get(cfg.DATASETS.TRAIN[0])  # generate the benchmark data before timing
    if not name.endswith("second"):  # loggers once
        default_setup(cfg, argparse.Namespace(config_file=CONFIG, eval_only=False))
    trainer = EQLv2Trainer(cfg)
    hook = SpeedHook(args.warmup)
    trainer.register_hooks([hook])
    trainer.resume_or_load(resume=False)
    trainer.train()
    return float(hook.speed), float(hook.cpu_per_iteration)


def ray_speed(
    args: argparse.Namespace, work: Path, num_workers: int, threads: int, batch: int
) -> tuple[float, float]:
    """(iterations per second, rank 0's CPU seconds per iteration) of ``build_torch_trainer``
    with ``num_workers`` x ``threads`` and ``batch`` images per iteration."""
    from eqlv2.raytrain.launch import build_torch_trainer

    name = f"ray_{num_workers}w{threads}t{batch}b"
    trainer = build_torch_trainer(
        CONFIG, overrides(args, str(work / name), batch), num_workers=num_workers,
        storage_path=str(work / "storage"), name=name, cpus_per_worker=threads,
        extra_hooks=[functools.partial(SpeedHook, args.warmup)],
    )  # fmt: skip
    metrics = trainer.fit().metrics
    return float(metrics[SPEED_KEY]), float(metrics[CPU_KEY])


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for Ray's dashboard: the default may be taken)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    args = parse_args()
    if args.iters <= args.warmup:
        print("--iters must exceed --warmup", file=sys.stderr)
        return 2
    import ray

    figures: dict[str, Any] = {
        "iterations": args.iters, "warmup": args.warmup, "batch": args.batch,
        "scaling_batch": args.scaling_batch,
        "load_average_before": list(os.getloadavg()),
    }  # fmt: skip
    plain = f"plain_{args.threads}_thread_{args.batch}_images"
    single = f"ray_1_worker_{args.threads}_thread_{args.batch}_images"
    one = f"ray_1_worker_1_thread_{args.scaling_batch}_images"
    two = f"ray_2_workers_1_thread_{args.scaling_batch}_images"
    loads: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(key: str, run) -> None:
        loads[key] = os.getloadavg()[0]
        figures[key], cpu[key] = run()

    with tempfile.TemporaryDirectory(prefix="eqlv2-ray-overhead-") as tmp:
        work = Path(tmp)
        # plain, Ray..., plain again: the mean of the two plain runs evens out a load that drifts.
        timed(f"{plain}_first", lambda: plain_speed(args, work, "plain_first"))
        ray.init(address="local", num_cpus=2, dashboard_port=free_port(), log_to_driver=False)
        try:
            timed(single, lambda: ray_speed(args, work, 1, args.threads, args.batch))
            if one != single:
                timed(one, lambda: ray_speed(args, work, 1, 1, args.scaling_batch))
            timed(two, lambda: ray_speed(args, work, 2, 1, args.scaling_batch))
        finally:
            ray.shutdown()
        timed(f"{plain}_second", lambda: plain_speed(args, work, "plain_second"))
    figures[plain] = (figures[f"{plain}_first"] + figures[f"{plain}_second"]) / 2
    figures["load_average_at_start_of_each"] = loads
    figures["cpu_seconds_per_iteration_rank0"] = cpu
    figures["load_average_after"] = list(os.getloadavg())
    figures["overhead_ratio"] = figures[single] / figures[plain]
    figures["scaling_ratio"] = figures[two] / figures[one]

    print(f"\ntiny config, {args.iters} iterations each ({args.warmup} untimed)")
    for key, value in figures.items():
        if key.startswith(("plain_", "ray_")):
            if key in loads:
                note = f"  {cpu[key]:.3f} CPU s/it on rank 0, load {loads[key]:.1f} at its start"
            else:
                note = "  (mean of the two)"
            print(f"  {key:<36} {value:6.3f} it/s{note}")
    print(
        f"Ray 1 worker / plain ({args.threads} thread(s) each): {figures['overhead_ratio']:.3f} "
        f"(target >= {TARGET_OVERHEAD})"
    )
    print(
        f"2 workers x 1 thread / 1 worker x 1 thread ({args.scaling_batch} images per iteration): "
        f"{figures['scaling_ratio']:.3f} (target >= {TARGET_SCALING})"
    )
    load = ", ".join(f"{v:.2f}" for v in figures["load_average_after"])
    print(f"load average (1, 5, 15 min) at the end: {load} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
