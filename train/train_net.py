#!/usr/bin/env python
"""Trains and evaluates a detectron2 model with EQL v2 (or a baseline loss).

Same shape and flags as detectron2's ``tools/train_net.py``::

    python train/train_net.py --config-file configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml
    python train/train_net.py --config-file configs/LVISv1/mask_rcnn_R_50_FPN_1x_eqlv2.yaml \
        --num-gpus 8 SOLVER.IMS_PER_BATCH 16
    python train/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
    python train/train_net.py --config-file ... --resume

Trailing ``KEY VALUE`` pairs override config keys.
"""

from __future__ import annotations

import logging

from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from eqlv2.engine import EQLv2Trainer, setup_cfg
from eqlv2.engine.trainer import load_model_weights

logger = logging.getLogger("eqlv2.train_net")


def setup(args):
    """Frozen config from ``args`` with detectron2's logging and output folder set up."""
    cfg = setup_cfg(args.config_file, args.opts)
    default_setup(cfg, args)
    # The project's own messages (the base checkpoint, the data) in the console and log.txt too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="eqlv2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = EQLv2Trainer.build_model(cfg)
        load_model_weights(model, cfg.MODEL.WEIGHTS, allow_pickle=cfg.MODEL.EQLV2.ALLOW_UNSAFE_PICKLED_WEIGHTS)
        results = EQLv2Trainer.test(cfg, model)
        if comm.is_main_process():
            logger.info("Evaluation results: %s", results)
        return results
    trainer = EQLv2Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
