"""The base checkpoint: the offline benchmark's stand-in for an ImageNet-pretrained backbone.

The paper fine-tunes every detector from ImageNet weights. Offline there are none, and a tiny
detector trained from random weights for the length of one search trial learns almost nothing.
So a config can name a *base* config (``MODEL.EQLV2.BASE_CHECKPOINT_CONFIG``): a class-agnostic
detector (``DATASETS.EQLV2.CLASS_AGNOSTIC``, every annotation is one category "object") trained
once on the benchmark's training images. It learns features, proposals, boxes and masks, but
nothing about the categories or their long tail; each trial then trains the whole network with
its own classification loss, starting from these weights (:func:`load_base_weights`).

:func:`ensure_base_checkpoint` returns the weights file, training it first if needed. The result
is cached beside the benchmark, ``<benchmark root>/base_checkpoints/<stem>-<digest>/``, where the
digest covers everything that produced it (:func:`base_checkpoint_inputs`): the base config as
merged, the generation parameters of its training data, the torch / detectron2 / eqlv2 versions
and :data:`RECIPE_VERSION`. Training runs in a child process (so that a caller inside a
distributed process group can wait for it), under a file lock, in a temporary folder renamed
into place at the end; concurrent callers train it once, and a later call reuses it.

Command line (prints the weights file)::

    python -m eqlv2.engine.base_checkpoint --config-file configs/tiny/mask_rcnn_tiny_synthetic_lvis.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import detectron2
import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import HookBase
from filelock import FileLock
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import eqlv2

from .setup import setup_cfg

logger = logging.getLogger(__name__)

__all__ = [
    "RECIPE_VERSION",
    "WEIGHTS_FILE",
    "MARKER_FILE",
    "BaseCheckpointError",
    "base_config_file",
    "base_checkpoint_inputs",
    "base_checkpoint_dir",
    "ensure_base_checkpoint",
    "load_base_weights",
    "main",
]

#: Bumped whenever the way a base checkpoint is trained or saved changes.
RECIPE_VERSION = 1
#: The weights file inside a base checkpoint folder (detectron2 format: ``{"model": state_dict}``).
WEIGHTS_FILE = "model_final.pth"
#: What produced the checkpoint (the digest's inputs), written last: its presence marks it done.
MARKER_FILE = "base-checkpoint.json"
#: Parameters that depend on the categories: never part of a base checkpoint.
_CATEGORY_KEYS = ("box_predictor.cls_score.", "classification_loss.")
#: Class-specific predictors whose single class-agnostic row is copied to every category.
_TILED_KEYS = ("box_predictor.bbox_pred.", "mask_head.predictor.")


class BaseCheckpointError(RuntimeError):
    """The base checkpoint cannot be built or does not fit the model."""


def base_config_file(cfg: CfgNode) -> Path | None:
    """The base config named by ``cfg`` (``MODEL.EQLV2.BASE_CHECKPOINT_CONFIG``), or None.

    A relative path is taken from the working directory, else from the repository.

    Raises:
        FileNotFoundError: the named file exists in neither place.
    """
    value = cfg.MODEL.EQLV2.BASE_CHECKPOINT_CONFIG
    if not value:
        return None
    path = Path(os.path.expanduser(value))
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, _repository_root() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"MODEL.EQLV2.BASE_CHECKPOINT_CONFIG={value!r}: no such file "
        f"(looked in {', '.join(str(c) for c in candidates)})"
    )


def _repository_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _base_cfg(cfg: CfgNode) -> CfgNode | None:
    """The base config, on the same benchmark root as ``cfg``."""
    path = base_config_file(cfg)
    if path is None:
        return None
    opts = []
    if cfg.DATASETS.EQLV2.SYNTHETIC_ROOT:
        opts = ["DATASETS.EQLV2.SYNTHETIC_ROOT", cfg.DATASETS.EQLV2.SYNTHETIC_ROOT]
    base = setup_cfg(str(path), opts)
    if base.MODEL.EQLV2.BASE_CHECKPOINT_CONFIG:
        raise ValueError(f"base config {path} names a base config itself; chains are not supported")
    return base


def _dataset_identity(name: str) -> Any:
    """What identifies the content of a registered dataset: the benchmark's generation parameters,
    else its annotation file's path, size and modification time."""
    metadata = MetadataCatalog.get(name)
    spec = metadata.get("synthetic_spec", None)
    if spec is not None:
        return {"synthetic_spec": dict(spec)}
    identity: dict[str, Any] = {}
    for key in ("json_file", "bbox_csv", "annotation_file"):
        value = metadata.get(key, None)
        if value and os.path.exists(value):
            stat = os.stat(value)
            identity[key] = [os.path.abspath(value), stat.st_size, int(stat.st_mtime)]
    return identity or {"name": name}


def base_checkpoint_inputs(base_cfg: CfgNode) -> dict[str, Any]:
    """Everything that produces a base checkpoint, as stored in its marker file."""
    config = base_cfg.clone()
    config.defrost()
    config.OUTPUT_DIR = ""  # where it is trained does not change it
    config.DATASETS.EQLV2.SYNTHETIC_ROOT = ""  # the checkpoint lives inside that root
    return {
        "recipe_version": RECIPE_VERSION,
        "config": config.dump(sort_keys=True),
        "datasets": {name: _dataset_identity(name) for name in base_cfg.DATASETS.TRAIN},
        "versions": {
            "torch": torch.__version__,
            "detectron2": detectron2.__version__,
            "eqlv2": eqlv2.__version__,
        },
    }


def _digest(inputs: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def base_checkpoint_dir(base_cfg: CfgNode, config_name: str = "base") -> Path:
    """The cache folder of a base config: ``<benchmark root>/base_checkpoints/<name>-<digest>``."""
    from eqlv2.data import synthetic_root

    digest = _digest(base_checkpoint_inputs(base_cfg))
    return synthetic_root(base_cfg) / "base_checkpoints" / f"{config_name}-{digest}"


def _is_complete(folder: Path, inputs: Mapping[str, Any]) -> bool:
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker.get("inputs") == json.loads(json.dumps(inputs)) and (folder / WEIGHTS_FILE).is_file()


def ensure_base_checkpoint(cfg: CfgNode) -> str | None:
    """The base checkpoint of ``cfg`` (its weights file), trained first if not cached yet.

    Idempotent and safe to call from many processes at once: one trains, the others wait for it
    (file lock) and reuse it. Returns None when ``cfg`` names no base config.

    Raises:
        FileNotFoundError: the base config does not exist.
        BaseCheckpointError: its training failed (the message names its log file).
    """
    base_cfg = _base_cfg(cfg)
    if base_cfg is None:
        return None
    path = base_config_file(cfg)
    folder = base_checkpoint_dir(base_cfg, path.stem)
    inputs = base_checkpoint_inputs(base_cfg)
    if _is_complete(folder, inputs):
        logger.info("Base checkpoint %s (cached)", folder / WEIGHTS_FILE)
        return str(folder / WEIGHTS_FILE)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        if not _is_complete(folder, inputs):  # else another process built it while we waited
            _build(path, base_cfg, folder, inputs)
    return str(folder / WEIGHTS_FILE)


def _build(config_file: Path, base_cfg: CfgNode, folder: Path, inputs: Mapping[str, Any]) -> None:
    """Trains the base config in a child process into a temporary folder renamed to ``folder``."""
    logger.info(
        "Training the base checkpoint %s once (%d iterations of %s); it is cached for every later run",
        folder.name, base_cfg.SOLVER.MAX_ITER, config_file,
    )  # fmt: skip
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    start = time.perf_counter()
    try:
        command = [
            sys.executable, "-m", "eqlv2.engine.base_checkpoint",
            "--config-file", str(config_file), "--train-into", str(tmp),
            "DATASETS.EQLV2.SYNTHETIC_ROOT", str(_benchmark_root(base_cfg)),
        ]  # fmt: skip
        env = dict(os.environ)
        package_parent = str(Path(eqlv2.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        status = subprocess.run(command, env=env, check=False).returncode
        if status != 0 or not (tmp / WEIGHTS_FILE).is_file():
            raise BaseCheckpointError(
                f"training the base checkpoint of {config_file} failed (exit status {status}); "
                f"its log: {tmp / 'log.txt'}"
            )
        _strip_category_parameters(tmp / WEIGHTS_FILE)
        marker = {"inputs": inputs, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1, sort_keys=True), encoding="utf-8")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException as error:
        if not isinstance(error, BaseCheckpointError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Base checkpoint %s trained in %.0f s", folder / WEIGHTS_FILE, time.perf_counter() - start)


def _benchmark_root(base_cfg: CfgNode) -> Path:
    from eqlv2.data import synthetic_root

    return synthetic_root(base_cfg)


def _strip_category_parameters(path: Path) -> None:
    """Keeps only the model's category-independent parameters in the weights file."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    kept = {k: v for k, v in state.items() if not any(part in k for part in _CATEGORY_KEYS)}
    torch.save({"model": kept}, path)


# --- loading ----------------------------------------------------------------------------------


def load_base_weights(model: nn.Module, path: str) -> None:
    """Initialises ``model`` from a base checkpoint.

    Parameters of the same shape are copied; the class-agnostic box-regression and mask predictors
    (one category) are copied to each of the model's ``C`` categories (``(4, D)`` -> ``(4C, D)``,
    ``(1, K, 1, 1)`` -> ``(C, K, 1, 1)``); the classifier and the loss state keep their fresh
    initialisation. Base parameters the model lacks (a mask head for Faster R-CNN) are skipped.

    Raises:
        BaseCheckpointError: the file is unreadable, or a parameter does not fit the model (the
            base config describes another architecture).
    """
    if isinstance(model, DistributedDataParallel):
        model = model.module
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    except Exception as error:
        raise BaseCheckpointError(f"cannot read the base checkpoint {path!r}: {error}") from error
    target = model.state_dict()
    loaded, unused = {}, []
    for key, value in state.items():
        if key not in target:
            unused.append(key)
            continue
        want = target[key].shape
        if value.shape != want and any(part in key for part in _TILED_KEYS):
            value = _tile_rows(value, want, key, path)
        if value.shape != want:
            raise BaseCheckpointError(
                f"base checkpoint {path}: {key} has shape {tuple(value.shape)}, the model "
                f"{tuple(want)}; the base config must describe the same architecture"
            )
        loaded[key] = value
    model.load_state_dict(loaded, strict=False)
    fresh = sorted(set(target) - set(loaded))
    logger.info(
        "Initialised %d tensors from the base checkpoint %s; %d start afresh (%s); %d unused",
        len(loaded), path, len(fresh), _summary(fresh), len(unused),
    )  # fmt: skip


def _tile_rows(value: torch.Tensor, want: torch.Size, key: str, path: str) -> torch.Tensor:
    """``value`` with its rows (one category's) repeated for every category of ``want``."""
    rows = value.shape[0]
    if rows == 0 or want[0] % rows or tuple(value.shape[1:]) != tuple(want[1:]):
        raise BaseCheckpointError(
            f"base checkpoint {path}: {key} of shape {tuple(value.shape)} cannot be copied to "
            f"every category of shape {tuple(want)}"
        )
    return value.repeat(want[0] // rows, *([1] * (value.dim() - 1)))


def _summary(keys: Sequence[str]) -> str:
    prefixes = sorted({k.rsplit(".", 1)[0] for k in keys})
    return ", ".join(prefixes) if prefixes else "none"


# --- training (the child process) -------------------------------------------------------------


class _ProgressBar(HookBase):
    """A tqdm bar over the training iterations."""

    def before_train(self) -> None:
        self._bar = tqdm(
            total=self.trainer.max_iter, initial=self.trainer.start_iter,
            desc="eqlv2 base checkpoint", unit="it", disable=None,
        )  # fmt: skip

    def after_step(self) -> None:
        self._bar.update(1)

    def after_train(self) -> None:
        self._bar.close()


def _train_into(config_file: str, opts: Sequence[str], out_dir: str) -> None:
    from detectron2.utils.logger import setup_logger

    from .trainer import EQLv2Trainer

    cfg = setup_cfg(config_file, [*opts, "OUTPUT_DIR", out_dir])
    setup_logger(out_dir, name="detectron2", abbrev_name="d2")
    setup_logger(out_dir, name="eqlv2")
    torch.manual_seed(cfg.SEED if cfg.SEED >= 0 else 0)
    trainer = EQLv2Trainer(cfg)
    trainer.register_hooks([_ProgressBar()])
    trainer.resume_or_load(resume=False)
    trainer.train()  # detectron2's PeriodicCheckpointer writes model_final.pth at the end


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m eqlv2.engine.base_checkpoint",
        description="Train (once) and print the base checkpoint a config starts from "
        "(MODEL.EQLV2.BASE_CHECKPOINT_CONFIG). A cached one is reused.",
    )
    parser.add_argument("--config-file", required=True, help="a config naming a base config")
    parser.add_argument("--train-into", help=argparse.SUPPRESS)  # internal: the child process
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.train_into:
        _train_into(args.config_file, args.opts, args.train_into)
        return 0
    try:
        path = ensure_base_checkpoint(setup_cfg(args.config_file, args.opts))
    except (ValueError, FileNotFoundError, BaseCheckpointError) as error:
        logger.error("%s", error)
        return 2
    if path is None:
        logger.error("%s names no base config (MODEL.EQLV2.BASE_CHECKPOINT_CONFIG is empty)", args.config_file)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
