#!/usr/bin/env python
"""Trains a detectron2 EQL v2 model on Ray Train: N workers, DDP, checkpoints, fault recovery.

The same training as ``train/train_net.py``, one detectron2 trainer per Ray Train worker::

    # a laptop: starts a local Ray instance
    python train/ray_train.py --config-file configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml \
        --num-workers 2 --storage-path ray_results SOLVER.MAX_ITER 100
    # a running cluster
    RAY_ADDRESS=head-node:6379 python train/ray_train.py --config-file ... --num-workers 8 --use-gpu
    # a job on a cluster (the working directory is shipped to every node)
    ray job submit --working-dir . -- python train/ray_train.py --config-file ... --num-workers 2

Runs are named deterministically (``--name``, default: the config's file stem plus a hash of the
overrides) under ``--storage-path`` (default ``~/ray_results``; shared storage for several
nodes). Running a name that exists again needs ``--resume``, which continues it from its latest
checkpoint (a finished run only re-reports its final metrics). ``--max-failures K`` restarts the
workers from the latest checkpoint up to K times.

If ``ray.init()`` ran before on this machine, ``~/.ray/auth_token`` exists and the ``ray`` command
line (``ray start``, ``ray status``, ``ray job submit``) must be told to use it against a local
head: set ``RAY_AUTH_MODE=token`` for those commands (this script needs nothing).

Exit codes: 0 trained; 1 training failed; 2 bad input (config file, override, dataset, number of
workers, unreachable ``RAY_ADDRESS``, existing run without ``--resume``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# Under ``ray job submit --working-dir .`` the shipped copy of the project must win over an
# installed one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("eqlv2.ray_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: flags, then ``KEY VALUE`` config overrides."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Trailing KEY VALUE pairs override config keys, e.g. SOLVER.MAX_ITER 100.",
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="detectron2 YAML config")
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers (default 1)")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per worker")
    parser.add_argument(
        "--placement-strategy", default="PACK",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        help="placement of the workers on the nodes (default PACK)",
    )  # fmt: skip
    parser.add_argument("--storage-path", default=None, help="runs and checkpoints (default ~/ray_results)")
    parser.add_argument("--name", default=None, help="run name (default: config stem + overrides hash)")
    parser.add_argument("--max-failures", type=int, default=0, help="worker failures to recover from (-1: any)")
    parser.add_argument("--resume", action="store_true", help="continue the run NAME if it exists")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s %(levelname)s: %(message)s")
    if not os.path.isfile(args.config_file):  # before the slow imports
        print(f"ray_train.py: error: config file not found: {args.config_file}", file=sys.stderr)
        return 2

    import ray
    from ray.train import TrainingFailedError

    from eqlv2.raytrain.launch import build_torch_trainer, default_run_name, run_exists

    name = args.name or default_run_name(args.config_file, args.opts)
    # build_torch_trainer checks the config and datasets before it connects to Ray
    # ($RAY_ADDRESS, else a new or running local instance) and checks the resources.
    try:
        if run_exists(args.storage_path, name) and not args.resume:
            raise ValueError(
                f"run {name!r} exists in {args.storage_path or '~/ray_results'}: pass --resume to "
                "continue it, or --name to start another"
            )
        trainer = build_torch_trainer(
            args.config_file,
            args.opts,
            num_workers=args.num_workers,
            use_gpu=args.use_gpu,
            storage_path=args.storage_path,
            name=name,
            max_failures=args.max_failures,
            cpus_per_worker=args.cpus_per_worker,
            placement_strategy=args.placement_strategy,
        )
    except (FileNotFoundError, ValueError, ConnectionError) as error:
        print(f"ray_train.py: error: {error}", file=sys.stderr)
        return 2
    try:
        result = trainer.fit()
    except TrainingFailedError as error:
        print(f"ray_train.py: training failed: {error}", file=sys.stderr)
        return 1
    finally:
        if ray.is_initialized():
            ray.shutdown()
    logger.info("Final metrics: %s", result.metrics)
    logger.info("Last checkpoint: %s", result.checkpoint.path if result.checkpoint else None)
    print(f"run {name!r} finished: {result.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
