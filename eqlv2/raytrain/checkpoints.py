"""The Ray Train checkpoints of a detectron2 trainer (written by rank 0, restored on every rank).

One directory per checkpoint, ``checkpoint_<iteration:07d>``::

    model.pth        detectron2 checkpoint: {"model": state_dict (with the EQL v2 buffers
                     pos_grad, neg_grad, num_updates), "trainer": {"iteration", "_trainer":
                     {"optimizer", ...}, "hooks": {"LRScheduler": ...}}, "iteration"}; the
                     iteration is the 0-based index of the last one done, as in detectron2's own
    last_checkpoint  detectron2's pointer to model.pth
    metadata.json    {"iteration": completed iterations, "last_iter", "world_size", "metrics"}
    config.yaml      the full detectron2 config of the run
"""

from __future__ import annotations

import json
import logging
import os
import weakref
from collections.abc import Mapping
from typing import Any

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

logger = logging.getLogger(__name__)

MODEL_FILE, METADATA_FILE, CONFIG_FILE = "model.pth", "metadata.json", "config.yaml"


def save_checkpoint(trainer, directory: str, iteration: int, metrics: Mapping[str, Any], config_yaml: str) -> None:
    """Writes the checkpoint of ``trainer`` after ``iteration`` completed iterations (rank 0 only);
    it records ``iteration - 1``, as detectron2's own do, so loading it resumes at ``iteration``."""
    current = trainer.iter
    trainer.iter = iteration - 1  # after train(), detectron2 leaves iter at max_iter
    try:
        # Hooks hold their trainer as a weakref proxy already (detectron2's register_hooks).
        proxy = trainer if isinstance(trainer, weakref.ProxyTypes) else weakref.proxy(trainer)
        checkpointer = DetectionCheckpointer(trainer.model, directory, trainer=proxy, save_to_disk=True)
        # The extra "iteration" key is what detectron2's PeriodicCheckpointer adds too.
        checkpointer.save(os.path.splitext(MODEL_FILE)[0], iteration=iteration - 1)
    finally:
        trainer.iter = current
    # NaN (e.g. AP of an empty group) is written as NaN
    metadata = {"iteration": iteration, "last_iter": iteration - 1, "world_size": comm.get_world_size(), "metrics": dict(metrics)}
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata, f)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        f.write(config_yaml)


def restore_checkpoint(trainer, checkpoint) -> dict[str, Any]:
    """Loads a ``ray.train.Checkpoint`` of :func:`save_checkpoint` into a detectron2 trainer (model
    with the EQL v2 statistics, optimizer, LR scheduler, iteration); returns its metadata."""
    with checkpoint.as_directory() as directory:
        trainer.checkpointer.load(os.path.join(directory, MODEL_FILE))
        with open(os.path.join(directory, METADATA_FILE)) as f:
            metadata = json.load(f)
    trainer.start_iter = trainer.iter + 1
    logger.info("Restored %s: resuming at iteration %d of %d", checkpoint.path, trainer.start_iter, trainer.max_iter)
    return metadata
