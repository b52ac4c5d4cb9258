"""Datasets of the project: LVIS v1, OpenImages Challenge 2019 and the offline benchmark.

Importing this package registers, in detectron2's ``DatasetCatalog`` / ``MetadataCatalog``:

* ``lvis_v1_train``, ``lvis_v1_val`` (detectron2's, with frequency metadata added),
* ``openimages_challenge2019_train``, ``openimages_challenge2019_val``,
* ``synthetic_lvis_train``, ``synthetic_lvis_val``, ``synthetic_openimages_train``,
  ``synthetic_openimages_val`` (generated on first load).

:func:`category_statistics` gives the per-category training counts and r/c/f groups of any
registered dataset. The generator (:func:`ensure_synthetic`) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from .builtin import (
    SYNTHETIC_DATASETS,
    register_all,
    register_from_config,
    register_synthetic,
    synthetic_root,
)
from .frequency import (
    CategoryStatistics,
    category_statistics,
    frequency_group,
    frequency_groups,
)
from .lvis import load_lvis_dataset, register_lvis_json
from .openimages import load_openimages, register_openimages
from .preflight import check_dataset_files
from .synthetic_plan import SyntheticSpec
from .validation import DatasetFormatError

__all__ = [
    "SYNTHETIC_DATASETS",
    "CategoryStatistics",
    "DatasetFormatError",
    "SyntheticSpec",
    "category_statistics",
    "check_dataset_files",
    "ensure_synthetic",
    "frequency_group",
    "frequency_groups",
    "generate_synthetic",
    "load_lvis_dataset",
    "load_openimages",
    "register_from_config",
    "register_lvis_json",
    "register_openimages",
    "register_synthetic",
    "synthetic_root",
]

_LAZY = {"ensure_synthetic", "generate_synthetic"}


def __getattr__(name: str) -> Any:
    # The generator module is also the command line (``python -m eqlv2.data.synthetic``); it is
    # imported lazily so that running it does not find it already imported by this package.
    if name in _LAZY:
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register_all()
