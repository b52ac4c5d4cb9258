"""Registration of the project's dataset names (run on ``import eqlv2.data``).

* ``lvis_v1_train`` / ``lvis_v1_val``: detectron2's own registrations plus frequency metadata.
* ``openimages_challenge2019_train`` / ``openimages_challenge2019_val``: the official files under
  ``$DETECTRON2_DATASETS/openimages``.
* ``synthetic_lvis_{train,val}`` / ``synthetic_openimages_{train,val}``: the offline benchmark
  (default size) under :func:`synthetic_root`, generated on first use; their metadata comes from
  the generation plan, so it is there before any file is written.

:func:`register_from_config` adds what a config asks for: a user's LVIS-format data
(``DATASETS.EQLV2.CUSTOM_*``) and another root for the benchmark (``DATASETS.EQLV2.SYNTHETIC_ROOT``).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog

from .lvis import (
    datasets_root,
    load_lvis_dataset,
    register_builtin_lvis,
    register_custom_from_config,
    register_lvis_json,
)
from .openimages import load_openimages, register_builtin_openimages, register_openimages
from .synthetic_plan import SyntheticPlan, SyntheticSpec, make_plan

logger = logging.getLogger(__name__)

__all__ = [
    "SYNTHETIC_DATASETS",
    "synthetic_root",
    "synthetic_plan",
    "register_synthetic",
    "register_from_config",
    "register_all",
]

#: Registered names of the offline benchmark: name -> (format, split).
SYNTHETIC_DATASETS = {
    "synthetic_lvis_train": ("lvis", "train"),
    "synthetic_lvis_val": ("lvis", "val"),
    "synthetic_openimages_train": ("openimages", "train"),
    "synthetic_openimages_val": ("openimages", "val"),
}

_registered_synthetic: dict[str, Any] = {}


def synthetic_root(cfg: Any = None) -> Path:
    """Absolute root of the offline benchmark.

    ``cfg.DATASETS.EQLV2.SYNTHETIC_ROOT`` if ``cfg`` is given and the key is set, else
    ``$EQLV2_SYNTHETIC_ROOT``, else ``$DETECTRON2_DATASETS/eqlv2_synthetic`` (default
    ``./datasets/eqlv2_synthetic``), relative paths taken from the current directory.
    """
    configured = ""
    if cfg is not None:
        configured = cfg.DATASETS.EQLV2.SYNTHETIC_ROOT
    root = (
        configured
        or os.getenv("EQLV2_SYNTHETIC_ROOT")
        or os.path.join(datasets_root(), "eqlv2_synthetic")
    )
    return Path(os.path.expanduser(root)).absolute()


@functools.lru_cache(maxsize=8)
def synthetic_plan(spec: SyntheticSpec) -> SyntheticPlan:
    """The (cached) generation plan of ``spec``."""
    return make_plan(spec)


def _load_synthetic(root: str, fmt: str, split: str, spec: SyntheticSpec, name: str) -> list[dict]:
    # Imported here: the generator is only needed once a loader runs.
    from .synthetic import ensure_synthetic

    folder = ensure_synthetic(root, fmt, spec=spec)
    if fmt == "lvis":
        return load_lvis_dataset(folder / f"lvis_v1_{split}.json", str(folder) + os.sep, name)
    return load_openimages(folder, split, name)


def register_synthetic(
    root: str | os.PathLike | None = None, spec: SyntheticSpec | None = None
) -> list[str]:
    """(Re-)register the four ``synthetic_*`` names for the benchmark ``spec`` under ``root``.

    Nothing is generated here: the loaders call :func:`~eqlv2.data.synthetic.ensure_synthetic`.
    Re-registering with the same root and spec does nothing.

    Returns:
        The registered names.
    """
    root_path = (
        synthetic_root() if root is None else Path(os.path.expanduser(os.fspath(root))).absolute()
    )
    spec = spec or SyntheticSpec()
    key = (str(root_path), spec)
    if all(
        _registered_synthetic.get(name) == key and name in DatasetCatalog
        for name in SYNTHETIC_DATASETS
    ):
        return list(SYNTHETIC_DATASETS)
    plan = synthetic_plan(spec)
    for name, (fmt, split) in SYNTHETIC_DATASETS.items():
        folder = root_path / fmt
        loader = functools.partial(_load_synthetic, str(root_path), fmt, split, spec, name)
        stats = plan.statistics(fmt)
        if fmt == "lvis":
            register_lvis_json(
                name,
                folder / f"lvis_v1_{split}.json",
                str(folder) + os.sep,
                train_json_file=folder / "lvis_v1_train.json",
                statistics=stats,
                loader=loader,
            )
        else:
            register_openimages(
                name,
                folder,
                split,
                statistics=stats,
                loader=loader,
                classes=(plan.mids(), list(stats.class_names)),
            )
        MetadataCatalog.get(name).set(synthetic_root=str(root_path), synthetic_spec=spec.as_dict())
        _registered_synthetic[name] = key
    return list(SYNTHETIC_DATASETS)


def register_from_config(cfg: Any) -> list[str]:
    """Register the datasets a config needs beyond the built-in ones.

    * ``DATASETS.EQLV2.CUSTOM_NAME`` set: ``<NAME>_train`` / ``<NAME>_val`` from the
      ``CUSTOM_*`` JSON and image folders (:func:`~eqlv2.data.lvis.register_custom_from_config`).
    * ``DATASETS.EQLV2.SYNTHETIC_ROOT`` set: the ``synthetic_*`` names move to that root.

    Safe to call more than once. Returns the names (re-)registered.
    """
    names = register_custom_from_config(cfg)
    if cfg.DATASETS.EQLV2.SYNTHETIC_ROOT:
        names += register_synthetic(synthetic_root(cfg))
    return names


def register_all() -> None:
    """Register every built-in name (done once on ``import eqlv2.data``)."""
    register_builtin_lvis()
    register_builtin_openimages()
    register_synthetic()
