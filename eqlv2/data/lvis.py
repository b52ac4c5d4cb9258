"""LVIS v1 datasets: detectron2's built-in splits with frequency metadata, and a user's own
dataset in LVIS JSON format.

detectron2 registers ``lvis_v1_train`` / ``lvis_v1_val`` (and the test splits) on
``import detectron2.data``, under ``$DETECTRON2_DATASETS`` (default ``datasets``) with the layout
``lvis/lvis_v1_{train,val}.json`` and images under ``coco/{train2017,val2017}``. This module keeps
those registrations and only adds the metadata the project needs, computed from detectron2's
shipped category tables (no JSON is read, so nothing happens on import):

* ``category_image_counts`` (list[int], contiguous order): training images per category,
* ``frequency_groups`` (list[str]): "r" / "c" / "f" per category (LVIS definition),
* ``num_train_images``: number of LVIS v1 training images (100,170),
* ``evaluator_type = "lvis"``, ``json_file``, ``image_root`` (set by detectron2).

:func:`register_lvis_json` registers any LVIS-format JSON + image folder the same way, reading
the categories of the JSON (never building the dataset dicts) for the metadata. Its loader
validates the file (see :mod:`eqlv2.data.validation`), then parses it with detectron2's own
``load_lvis_json``; the records keep LVIS's ``neg_category_ids`` and
``not_exhaustive_category_ids`` (LVIS category ids, 1-based, as detectron2 stores them).
"""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import (
    get_lvis_instances_meta,
    load_lvis_json,
    register_lvis_instances,
)
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES as _LVIS_V1_CATEGORIES
from detectron2.data.datasets.lvis_v1_category_image_count import (
    LVIS_CATEGORY_IMAGE_COUNT as _LVIS_V1_IMAGE_COUNTS,
)

from .frequency import (
    CategoryStatistics,
    category_statistics,
    frequency_groups,
    register_statistics_provider,
)
from .validation import (
    DatasetFormatError,
    check_xywh_box,
    is_number,
    read_json,
    require_keys,
    warn_skipped,
)

logger = logging.getLogger(__name__)

__all__ = [
    "LVIS_V1_TRAIN_NUM_IMAGES",
    "BUILTIN_LVIS_V1_SPLITS",
    "datasets_root",
    "lvis_v1_builtin_statistics",
    "register_builtin_lvis",
    "lvis_statistics_from_json",
    "validate_lvis_dict",
    "load_lvis_dataset",
    "register_lvis_json",
    "register_custom_from_config",
    "category_statistics",
]

#: Images in ``lvis_v1_train.json`` (the denominator of EQL v1's image frequency).
LVIS_V1_TRAIN_NUM_IMAGES = 100_170

#: detectron2's layout of the LVIS v1 splits under ``$DETECTRON2_DATASETS``:
#: name -> (image root, json file), both relative to the datasets root.
BUILTIN_LVIS_V1_SPLITS = {
    "lvis_v1_train": ("coco/", "lvis/lvis_v1_train.json"),
    "lvis_v1_val": ("coco/", "lvis/lvis_v1_val.json"),
}


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` (default ``datasets``), as detectron2's builtin module reads it."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def _with_trailing_sep(path: str | os.PathLike) -> str:
    # detectron2's load_lvis_json builds ``image_root + "train2017"``: the root must end in a
    # separator.
    path = os.fspath(path)
    return path if path.endswith(("/", os.sep)) else path + os.sep


def _set_missing(dataset_name: str, values: dict[str, Any]) -> None:
    """Set the metadata keys of ``values`` that ``dataset_name`` does not have yet."""
    meta = MetadataCatalog.get(dataset_name)
    missing = {key: value for key, value in values.items() if not hasattr(meta, key)}
    if missing:
        meta.set(**missing)


def _class_name(category: dict) -> str:
    # detectron2 names LVIS categories by their first synonym.
    synonyms = category.get("synonyms")
    if isinstance(synonyms, list) and synonyms and isinstance(synonyms[0], str):
        return synonyms[0]
    return str(category["name"])


def _warn_inconsistent_frequency(
    source: str, names: Sequence[str], given: Sequence[str], counted: Sequence[str]
) -> None:
    wrong = [
        f"{name} ({g} but {c})" for name, g, c in zip(names, given, counted, strict=True) if g != c
    ]
    if wrong:
        logger.warning(
            "%s: the 'frequency' of %d categories disagrees with their image_count: %s%s",
            source,
            len(wrong),
            ", ".join(wrong[:5]),
            " ..." if len(wrong) > 5 else "",
        )


def lvis_v1_builtin_statistics() -> CategoryStatistics:
    """Statistics of LVIS v1 train from the tables shipped with detectron2 (no file is read).

    Instance counts are not shipped, so ``instance_counts`` is None.
    """
    categories = sorted(_LVIS_V1_CATEGORIES, key=lambda c: c["id"])
    counts_by_id = {entry["id"]: entry["image_count"] for entry in _LVIS_V1_IMAGE_COUNTS}
    image_counts = [counts_by_id[category["id"]] for category in categories]
    names = [_class_name(category) for category in categories]
    given = [category["frequency"] for category in categories]
    _warn_inconsistent_frequency(
        "detectron2 LVIS v1 tables", names, given, frequency_groups(image_counts)
    )
    return CategoryStatistics(
        class_names=tuple(names),
        image_counts=tuple(image_counts),
        instance_counts=None,
        frequency_groups=tuple(given),
        num_images=LVIS_V1_TRAIN_NUM_IMAGES,
    )


def register_builtin_lvis(root: str | None = None) -> list[str]:
    """Make sure ``lvis_v1_train`` / ``lvis_v1_val`` exist and carry the frequency metadata.

    detectron2 registers both on import; they are only registered here if absent (with
    detectron2's own :func:`register_lvis_instances`), and only metadata keys that are not set yet
    are added, so calling this twice is harmless.

    Returns:
        The names of the two splits.
    """
    root = datasets_root() if root is None else root
    stats = lvis_v1_builtin_statistics()
    for name, (image_root, json_file) in BUILTIN_LVIS_V1_SPLITS.items():
        if name not in DatasetCatalog:
            register_lvis_instances(
                name,
                get_lvis_instances_meta("lvis_v1"),
                os.path.join(root, json_file),
                os.path.join(root, image_root),
            )
        _set_missing(name, {"evaluator_type": "lvis", **stats.to_metadata()})
    return list(BUILTIN_LVIS_V1_SPLITS)


def _sorted_categories(data: dict, path: str) -> list[dict]:
    require_keys(path, data, ["categories"], "top level")
    categories = data["categories"]
    if not isinstance(categories, list) or not categories:
        raise DatasetFormatError(path, "'categories' must be a non-empty list")
    seen: set[int] = set()
    for index, category in enumerate(categories):
        require_keys(path, category, ["id", "name"], f"categories[{index}]")
        cid = category["id"]
        if not isinstance(cid, int) or isinstance(cid, bool) or cid < 1:
            raise DatasetFormatError(
                path, f"categories[{index}]: id {cid!r} is not a positive integer"
            )
        if cid in seen:
            raise DatasetFormatError(path, f"categories[{index}]: duplicate category id {cid}")
        seen.add(cid)
    return sorted(categories, key=lambda c: c["id"])


def lvis_statistics_from_json(
    data: dict, path: str | os.PathLike, check_frequency: bool = True
) -> CategoryStatistics:
    """Category statistics of a parsed LVIS JSON, from its ``categories`` entries.

    Image and instance counts come from the categories' ``image_count`` / ``instance_count``
    fields when every category has them, else they are counted from ``annotations``. Groups come
    from the ``frequency`` field when present (checked against the image counts if
    ``check_frequency``, i.e. when ``data`` is a training split), else from the image counts.
    """
    path = os.fspath(path)
    categories = _sorted_categories(data, path)
    names = [_class_name(category) for category in categories]
    has_counts = all("image_count" in c and "instance_count" in c for c in categories)
    if has_counts:
        image_counts = [int(c["image_count"]) for c in categories]
        instance_counts = [int(c["instance_count"]) for c in categories]
    else:
        index_of = {c["id"]: index for index, c in enumerate(categories)}
        pairs = [
            (index_of.get(a.get("category_id")), a.get("image_id"))
            for a in data.get("annotations", [])
        ]
        instances = Counter(category for category, _ in pairs)
        images = Counter(category for category, _ in set(pairs))
        image_counts = [images[index] for index in range(len(categories))]
        instance_counts = [instances[index] for index in range(len(categories))]
    counted = frequency_groups(image_counts)
    if all(c.get("frequency") in ("r", "c", "f") for c in categories):
        groups = [c["frequency"] for c in categories]
        if check_frequency:
            _warn_inconsistent_frequency(os.path.basename(path), names, groups, counted)
    else:
        groups = counted
    return CategoryStatistics(
        class_names=tuple(names),
        image_counts=tuple(image_counts),
        instance_counts=tuple(instance_counts),
        frequency_groups=tuple(groups),
        num_images=len(data.get("images", [])),
    )


def _check_polygons(path: str, segmentation: Any, where: str) -> None:
    if not isinstance(segmentation, list) or not segmentation:
        raise DatasetFormatError(
            path, f"{where}: 'segmentation' must be a non-empty list of polygons"
        )
    for polygon in segmentation:
        if (
            not isinstance(polygon, list)
            or len(polygon) < 6
            or len(polygon) % 2
            or not all(map(is_number, polygon))
        ):
            raise DatasetFormatError(
                path,
                f"{where}: segmentation polygon {str(polygon)[:80]} is not a list of at least 3 "
                "(x, y) points",
            )


def validate_lvis_dict(data: Any, path: str | os.PathLike) -> dict[str, Any]:
    """Check a parsed LVIS JSON before detectron2's loader reads it.

    Returns:
        ``{"category_ids": sorted ids, "num_empty_boxes": count of zero-size boxes}``.

    Raises:
        DatasetFormatError: see :mod:`eqlv2.data.validation` for what is checked.
    """
    path = os.fspath(path)
    require_keys(path, data, ["images", "annotations", "categories"], "top level")
    category_ids = {c["id"] for c in _sorted_categories(data, path)}
    images = _validated_images(data["images"], path, category_ids)
    if not isinstance(data["annotations"], list):
        raise DatasetFormatError(path, "'annotations' must be a list")
    ann_ids: set[Any] = set()
    empty = 0
    for index, anno in enumerate(data["annotations"]):
        if not _check_annotation(anno, index, path, images, category_ids, ann_ids):
            empty += 1
    return {"category_ids": sorted(category_ids), "num_empty_boxes": empty}


def _validated_images(images: Any, path: str, category_ids: set[int]) -> dict[Any, dict]:
    """``{image id: image}`` of the ``images`` list, each entry checked."""
    if not isinstance(images, list):
        raise DatasetFormatError(path, "'images' must be a list")
    by_id: dict[Any, dict] = {}
    for index, image in enumerate(images):
        require_keys(path, image, ["id", "height", "width"], f"images[{index}]")
        where = f"image id {image['id']}"
        if image["id"] in by_id:
            raise DatasetFormatError(path, f"{where}: duplicate image id")
        if not all(is_number(image[key]) and image[key] > 0 for key in ("height", "width")):
            raise DatasetFormatError(
                path,
                f"{where}: height/width {image['height']!r}x{image['width']!r} must be positive",
            )
        url = image.get("coco_url")
        if not isinstance(url, str) or url.count("/") < 1:
            raise DatasetFormatError(
                path,
                f"{where}: no 'coco_url' of the form '.../<folder>/<file>' (detectron2's LVIS "
                "loader finds images at <image_root>/<folder>/<file> from it)",
            )
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            ids = image.get(key, [])
            unknown = (
                [cid for cid in ids if cid not in category_ids] if isinstance(ids, list) else ids
            )
            if unknown:
                raise DatasetFormatError(path, f"{where}: {key} has unknown category ids {unknown}")
        by_id[image["id"]] = image
    return by_id


def _check_annotation(
    anno: Any,
    index: int,
    path: str,
    images: dict[Any, dict],
    category_ids: set[int],
    ann_ids: set[Any],
) -> bool:
    """Check one annotation (adding its id to ``ann_ids``); False when its box is empty."""
    keys = ["id", "image_id", "category_id", "bbox", "segmentation"]
    require_keys(path, anno, keys, f"annotations[{index}]")
    where = f"annotation id {anno['id']} (image {anno['image_id']})"
    if anno["id"] in ann_ids:
        raise DatasetFormatError(path, f"{where}: duplicate annotation id")
    ann_ids.add(anno["id"])
    image = images.get(anno["image_id"])
    if image is None:
        raise DatasetFormatError(path, f"{where}: unknown image id {anno['image_id']!r}")
    if anno["category_id"] not in category_ids:
        raise DatasetFormatError(path, f"{where}: unknown category id {anno['category_id']!r}")
    if anno["category_id"] in image.get("neg_category_ids", []):
        raise DatasetFormatError(
            path,
            f"{where}: category {anno['category_id']} is listed in the image's neg_category_ids",
        )
    nonempty = check_xywh_box(path, anno["bbox"], image["width"], image["height"], where)
    _check_polygons(path, anno["segmentation"], where)
    return nonempty


def _image_path(image_root: str, image: dict) -> str:
    # The same rule as detectron2's load_lvis_json.
    split_folder, file_name = image["coco_url"].split("/")[-2:]
    return os.path.join(image_root + split_folder, file_name)


def _check_image_files(data: dict, path: str, image_root: str) -> None:
    missing = [(image["id"], _image_path(image_root, image)) for image in data["images"]]
    missing = [(image_id, file) for image_id, file in missing if not os.path.isfile(file)]
    if missing:
        image_id, file = missing[0]
        raise FileNotFoundError(
            f"{os.path.basename(path)}: image id {image_id}: image file {file} not found "
            f"({len(missing)} of {len(data['images'])} images missing; image_root={image_root!r})"
        )


def _set_category_metadata(dataset_name: str, data: dict, path: str) -> None:
    categories = _sorted_categories(data, path)
    _set_missing(
        dataset_name,
        {
            "thing_classes": [_class_name(category) for category in categories],
            "thing_dataset_id_to_contiguous_id": {
                category["id"]: index for index, category in enumerate(categories)
            },
        },
    )


def load_lvis_dataset(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    dataset_name: str | None = None,
    check_files: bool = True,
) -> list[dict]:
    """Load an LVIS-format JSON into detectron2 dataset dicts, after validating it.

    The records are exactly those of detectron2's ``load_lvis_json``, except that category ids
    that are not ``1..C`` are mapped to contiguous ids in id order, and boxes of zero size are
    dropped (one warning with their count).

    Args:
        json_file: the LVIS JSON.
        image_root: folder such that ``image_root/<folder>/<file>`` is the image of each
            ``coco_url`` ``.../<folder>/<file>``.
        dataset_name: if given, ``thing_classes`` and ``thing_dataset_id_to_contiguous_id`` are
            set in its metadata (when absent).
        check_files: raise ``FileNotFoundError`` if an image file is missing.
    """
    json_file = os.fspath(json_file)
    image_root = _with_trailing_sep(image_root)
    data = read_json(json_file)
    report = validate_lvis_dict(data, json_file)
    if check_files:
        _check_image_files(data, json_file, image_root)
    if dataset_name is not None:
        _set_category_metadata(dataset_name, data, json_file)
    del data
    dicts = load_lvis_json(json_file, image_root, dataset_name=None)
    ids = report["category_ids"]
    contiguous = ids == list(range(1, len(ids) + 1))
    index_of = {cid - 1: index for index, cid in enumerate(ids)}
    for record in dicts:
        annotations = [a for a in record["annotations"] if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if not contiguous:
            for anno in annotations:
                anno["category_id"] = index_of[anno["category_id"]]
        record["annotations"] = annotations
    warn_skipped(json_file, report["num_empty_boxes"], "annotations with a zero-size bbox")
    return dicts


def _statistics_provider(name: str, stats_json: str) -> CategoryStatistics:
    data = read_json(stats_json)
    stats = lvis_statistics_from_json(data, stats_json)
    _set_category_metadata(name, data, stats_json)
    return stats


def _register_statistics(name: str, stats_json: str, statistics: CategoryStatistics | None) -> None:
    """The category metadata of ``name``: from ``statistics``, from ``stats_json`` now, or (when
    that file does not exist yet) from a provider called on first use."""
    register_statistics_provider(name, None)
    if statistics is not None:
        _set_missing(
            name,
            {
                "thing_classes": list(statistics.class_names),
                "thing_dataset_id_to_contiguous_id": {
                    index + 1: index for index in range(statistics.num_classes)
                },
                **statistics.to_metadata(),
            },
        )
        return
    provider = functools.partial(_statistics_provider, name, stats_json)
    if os.path.isfile(stats_json):
        _set_missing(name, provider().to_metadata())
    else:
        logger.debug(
            "%s: %s does not exist yet; statistics are computed on first use", name, stats_json
        )
        register_statistics_provider(name, provider)


def register_lvis_json(
    name: str,
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    train_json_file: str | os.PathLike | None = None,
    check_files: bool = True,
    statistics: CategoryStatistics | None = None,
    loader: Callable[[], list[dict]] | None = None,
) -> None:
    """Register a dataset in LVIS JSON format (a user's own data, or the offline benchmark).

    Re-registering a name replaces the previous registration. The metadata (``thing_classes``,
    ``thing_dataset_id_to_contiguous_id``, ``evaluator_type="lvis"``, ``json_file``,
    ``image_root`` and the frequency keys of :class:`CategoryStatistics`) is computed from the
    categories of ``train_json_file`` (the training split the statistics describe; default
    ``json_file`` itself) when that file exists, else on the first call of
    :func:`category_statistics`.

    Args:
        name: dataset name, e.g. ``"mydata_train"``.
        json_file: the LVIS JSON of this split.
        image_root: folder of the images (see :func:`load_lvis_dataset`); a trailing separator is
            added if missing.
        train_json_file: JSON of the training split, for the statistics of an evaluation split.
        check_files: let the loader check that every image file exists.
        statistics: known statistics (category ids then are ``1..C``); no JSON is read.
        loader: the function the catalog calls instead of :func:`load_lvis_dataset` (the offline
            benchmark passes one that generates the files first).
    """
    json_file = os.fspath(json_file)
    image_root = _with_trailing_sep(image_root)
    stats_json = os.fspath(train_json_file) if train_json_file else json_file
    if name in DatasetCatalog:
        logger.info("Dataset %s was registered already; replacing it", name)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if loader is None:
        loader = functools.partial(
            load_lvis_dataset, json_file, image_root, name, check_files=check_files
        )
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(json_file=json_file, image_root=image_root, evaluator_type="lvis")
    _register_statistics(name, stats_json, statistics)


def register_custom_from_config(cfg: Any) -> list[str]:
    """Register ``<NAME>_train`` / ``<NAME>_val`` from ``cfg.DATASETS.EQLV2.CUSTOM_*``.

    Nothing happens when ``CUSTOM_NAME`` is empty. A split is registered when its JSON key is
    set; the statistics of ``<NAME>_val`` are those of the training JSON when it is given.

    Returns:
        The registered names.

    Raises:
        ValueError: ``CUSTOM_NAME`` is set but no JSON is, or a JSON is given without images.
        FileNotFoundError: a given JSON file does not exist.
    """
    keys = cfg.DATASETS.EQLV2
    prefix = keys.CUSTOM_NAME
    if not prefix:
        return []
    splits = {
        "train": (keys.CUSTOM_TRAIN_JSON, keys.CUSTOM_TRAIN_IMAGES),
        "val": (keys.CUSTOM_VAL_JSON, keys.CUSTOM_VAL_IMAGES),
    }
    if not any(json_file for json_file, _ in splits.values()):
        raise ValueError(
            f"DATASETS.EQLV2.CUSTOM_NAME={prefix!r} but neither CUSTOM_TRAIN_JSON nor "
            "CUSTOM_VAL_JSON is set"
        )
    names = []
    train_json = keys.CUSTOM_TRAIN_JSON or None
    for split, (json_file, images) in splits.items():
        if not json_file:
            continue
        key = f"DATASETS.EQLV2.CUSTOM_{split.upper()}"
        if not images:
            raise ValueError(f"{key}_JSON is set but {key}_IMAGES (the image folder) is empty")
        if not os.path.isfile(json_file):
            raise FileNotFoundError(f"{key}_JSON: {json_file} does not exist")
        name = f"{prefix}_{split}"
        register_lvis_json(name, json_file, images, train_json_file=train_json)
        names.append(name)
    logger.info("Registered the LVIS-format datasets %s", names)
    return names
