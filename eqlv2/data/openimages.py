"""OpenImages Challenge 2019 (object detection track): dataset loader and registration.

The official files and their readers are in :mod:`eqlv2.data.openimages_files`.

Dataset dicts follow detectron2's standard format: ``file_name``, ``image_id`` (the OpenImages
ImageID string), ``height``, ``width``, ``annotations`` (``bbox`` in absolute XYXY pixels,
``bbox_mode``, contiguous ``category_id`` in the order of the classes CSV, and the bools
``is_group_of``, ``is_occluded``, ``is_truncated``, ``is_depiction``, ``is_inside``), plus
``pos_category_ids`` / ``neg_category_ids``: *contiguous* ids of the human-verified image-level
labels (Confidence 1 = present, 0 = absent). Group-of boxes are kept as ordinary boxes.

Image sizes are read from the image headers (no decoding, EXIF rotation applied as detectron2's
reader does) and cached in ``root/eqlv2-image-sizes-<split>.json``; the training counts of the
categories are cached in ``root/eqlv2-category-counts-train.json``. Both caches are skipped when
``root`` is read-only.

Frequency groups: OpenImages has no official rare/common/frequent split; the project applies the
LVIS thresholds (1-10, 11-100, >100 training images) to its training image counts.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from PIL import Image

from .frequency import (
    CategoryStatistics,
    frequency_groups,
    register_statistics_provider,
    set_statistics_metadata,
)
from .openimages_files import (
    BBOX_COLUMNS,
    CLASSES_CSV,
    FLAG_KEYS,
    HIERARCHY_JSON,
    IMAGE_LABEL_COLUMNS,
    ROOT_LABEL,
    SPLITS,
    OpenImagesFiles,
    read_boxes,
    read_classes,
    read_hierarchy,
    read_image_labels,
)
from .validation import DatasetFormatError

logger = logging.getLogger(__name__)

# The file names, columns, OpenImagesFiles and the readers are re-exported from
# eqlv2.data.openimages_files for the generator and older callers.
__all__ = [
    "CLASSES_CSV",
    "HIERARCHY_JSON",
    "ROOT_LABEL",
    "BBOX_COLUMNS",
    "IMAGE_LABEL_COLUMNS",
    "BUILTIN_OPENIMAGES_SPLITS",
    "OpenImagesFiles",
    "read_classes",
    "read_hierarchy",
    "read_boxes",
    "read_image_labels",
    "read_image_sizes",
    "write_image_size_cache",
    "load_openimages",
    "openimages_train_statistics",
    "register_openimages",
    "register_builtin_openimages",
]

#: Names registered under ``$DETECTRON2_DATASETS/openimages``: name -> split.
BUILTIN_OPENIMAGES_SPLITS = {
    "openimages_challenge2019_train": "train",
    "openimages_challenge2019_val": "validation",
}


def _read_cache(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: str, value: dict) -> None:
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(value, handle, sort_keys=True)
        os.chmod(tmp, 0o644)  # mkstemp creates it private
        os.replace(tmp, path)
    except OSError as error:
        logger.debug("Cannot write the cache %s: %s", path, error)


def _size_cache_path(root: str, split: str) -> str:
    return os.path.join(root, f"eqlv2-image-sizes-{split}.json")


def write_image_size_cache(
    root: str | os.PathLike, split: str, sizes: dict[str, tuple[int, int]]
) -> None:
    """Store ``{ImageID: (width, height)}`` where :func:`read_image_sizes` looks first."""
    _write_cache(
        _size_cache_path(os.fspath(root), SPLITS[split]), {k: list(v) for k, v in sizes.items()}
    )


def _header_size(file_name: str) -> tuple[int, int]:
    with Image.open(file_name) as image:
        width, height = image.size
        # EXIF orientations 5-8 rotate by 90 degrees; detectron2's reader applies them.
        if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def read_image_sizes(
    files: OpenImagesFiles, image_ids: Iterable[str]
) -> dict[str, tuple[int, int]]:
    """``(width, height)`` of each image, from the cache or the image header.

    Every image file must exist, cached or not.

    Raises:
        FileNotFoundError: an image file is missing (the message names it and its ImageID).
    """
    cache_path = _size_cache_path(files.root, files.split)
    cache = _read_cache(cache_path)
    sizes: dict[str, tuple[int, int]] = {}
    added = 0
    for image_id in image_ids:
        file_name = os.path.join(files.image_root, f"{image_id}.jpg")
        if not os.path.isfile(file_name):
            raise FileNotFoundError(
                f"{os.path.basename(files.bbox_csv)}: ImageID {image_id}: image file {file_name} not found"
            )
        cached = cache.get(image_id)
        if cached is not None:
            sizes[image_id] = (int(cached[0]), int(cached[1]))
            continue
        try:
            sizes[image_id] = _header_size(file_name)
        except OSError as error:
            raise DatasetFormatError(
                file_name, f"ImageID {image_id}: unreadable image: {error}"
            ) from None
        cache[image_id] = list(sizes[image_id])
        added += 1
    if added:
        _write_cache(cache_path, cache)
    return sizes


def _check_hierarchy(files: OpenImagesFiles, mids: list[str]) -> None:
    nodes = read_hierarchy(files.hierarchy_json)
    absent = [mid for mid in mids if mid not in nodes]
    if absent:
        logger.warning(
            "%s: %d classes of %s are not in the hierarchy, e.g. %s",
            os.path.basename(files.hierarchy_json),
            len(absent),
            CLASSES_CSV,
            absent[:3],
        )


def load_openimages(
    root: str | os.PathLike, split: str, dataset_name: str | None = None
) -> list[dict]:
    """Load one split of the OpenImages Challenge 2019 files in ``root`` as dataset dicts.

    The images are those named in the bbox CSV or the image-level labels CSV, sorted by ImageID.
    When ``dataset_name`` is given, ``thing_classes`` / ``thing_mids`` are set in its metadata,
    and for the training split the category statistics too (if absent).
    """
    files = OpenImagesFiles.at(root, split)
    mids, names = read_classes(files.classes_csv)
    _check_hierarchy(files, mids)
    index_of = {mid: index for index, mid in enumerate(mids)}
    boxes = read_boxes(files.bbox_csv, index_of)
    labels = read_image_labels(files.image_labels_csv, index_of)
    image_ids = sorted(set(boxes) | set(labels))
    sizes = read_image_sizes(files, image_ids)
    no_labels: tuple[set[int], set[int]] = (set(), set())
    dicts = []
    for image_id in image_ids:
        width, height = sizes[image_id]
        annotations = [
            {
                "bbox": [x0 * width, y0 * height, x1 * width, y1 * height],
                "bbox_mode": BoxMode.XYXY_ABS,
                "category_id": category,
                **dict(zip(FLAG_KEYS, flags, strict=True)),
            }
            for category, x0, y0, x1, y1, flags in boxes.get(image_id, ())
        ]
        pos, neg = labels.get(image_id, no_labels)
        dicts.append(
            {
                "file_name": os.path.join(files.image_root, f"{image_id}.jpg"),
                "image_id": image_id,
                "height": height,
                "width": width,
                "annotations": annotations,
                "pos_category_ids": sorted(pos),
                "neg_category_ids": sorted(neg),
            }
        )
    logger.info(
        "Loaded %d images with %d boxes of OpenImages %s from %s",
        len(dicts),
        sum(len(b) for b in boxes.values()),
        files.split,
        files.root,
    )
    if dataset_name is not None:
        meta = MetadataCatalog.get(dataset_name)
        if not hasattr(meta, "thing_classes"):
            meta.set(thing_classes=names, thing_mids=mids)
        if files.split == "train" and not hasattr(meta, "category_image_counts"):
            stats = _statistics_from_boxes(names, boxes, image_ids)
            set_statistics_metadata(dataset_name, stats)
    return dicts


def _statistics_from_boxes(
    names: list[str], boxes: dict[str, list], image_ids: list[str]
) -> CategoryStatistics:
    image_counts = [0] * len(names)
    instance_counts = [0] * len(names)
    for image_boxes in boxes.values():
        for category in {box[0] for box in image_boxes}:
            image_counts[category] += 1
        for box in image_boxes:
            instance_counts[box[0]] += 1
    return CategoryStatistics(
        class_names=tuple(names),
        image_counts=tuple(image_counts),
        instance_counts=tuple(instance_counts),
        frequency_groups=tuple(frequency_groups(image_counts)),
        num_images=len(image_ids),
    )


def openimages_train_statistics(root: str | os.PathLike) -> CategoryStatistics:
    """Category statistics of the training split in ``root`` (cached next to the CSVs).

    The cache ``eqlv2-category-counts-train.json`` is reused while the size and modification time
    of the train CSVs and the classes CSV are unchanged.
    """
    files = OpenImagesFiles.at(root, "train")
    mids, names = read_classes(files.classes_csv)
    key = [
        [os.path.getsize(p), os.path.getmtime(p)]
        for p in (files.classes_csv, files.bbox_csv, files.image_labels_csv)
        if os.path.isfile(p)
    ]
    cache_path = os.path.join(files.root, "eqlv2-category-counts-train.json")
    cache = _read_cache(cache_path)
    if cache.get("key") == key and cache.get("mids") == mids:
        image_counts, instance_counts = cache["image_counts"], cache["instance_counts"]
        return CategoryStatistics(
            class_names=tuple(names),
            image_counts=tuple(image_counts),
            instance_counts=tuple(instance_counts),
            frequency_groups=tuple(frequency_groups(image_counts)),
            num_images=int(cache["num_images"]),
        )
    index_of = {mid: index for index, mid in enumerate(mids)}
    boxes = read_boxes(files.bbox_csv, index_of)
    labels = read_image_labels(files.image_labels_csv, index_of)
    stats = _statistics_from_boxes(names, boxes, sorted(set(boxes) | set(labels)))
    _write_cache(
        cache_path,
        {
            "key": key,
            "mids": mids,
            "image_counts": list(stats.image_counts),
            "instance_counts": list(stats.instance_counts or ()),
            "num_images": stats.num_images,
        },
    )
    return stats


def register_openimages(
    name: str,
    root: str | os.PathLike,
    split: str,
    statistics: CategoryStatistics | None = None,
    loader: Callable[[], list[dict]] | None = None,
    classes: tuple[list[str], list[str]] | None = None,
) -> None:
    """Register one split of OpenImages Challenge 2019 files in ``root``.

    Metadata: ``thing_classes`` (display names) and ``thing_mids`` when the classes CSV exists,
    ``evaluator_type="openimages"``, the file keys of :meth:`OpenImagesFiles.metadata`, and the
    training statistics (``category_image_counts``, ``category_instance_counts``,
    ``frequency_groups``, ...) — from ``statistics`` if given, else computed from the train CSV
    on the first call of :func:`~eqlv2.data.frequency.category_statistics` (or set by loading
    the train split). Re-registering a name replaces it.

    Args:
        statistics: known training statistics (no CSV is read for them).
        loader: the function the catalog calls (default: :func:`load_openimages` of ``root``);
            the offline benchmark passes one that generates the files first.
        classes: known ``(mids, display names)``, instead of reading the classes CSV.
    """
    files = OpenImagesFiles.at(root, split)
    if name in DatasetCatalog:
        logger.info("Dataset %s was registered already; replacing it", name)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    if loader is None:
        loader = functools.partial(load_openimages, files.root, files.split, name)
    DatasetCatalog.register(name, loader)
    meta = MetadataCatalog.get(name)
    meta.set(evaluator_type="openimages", **files.metadata())
    if classes is None and os.path.isfile(files.classes_csv):
        classes = read_classes(files.classes_csv)
    if classes is not None:
        meta.set(thing_mids=list(classes[0]), thing_classes=list(classes[1]))
    if statistics is not None:
        set_statistics_metadata(name, statistics)
        register_statistics_provider(name, None)
    else:
        register_statistics_provider(
            name, functools.partial(openimages_train_statistics, files.root)
        )


def register_builtin_openimages(root: str | None = None) -> list[str]:
    """Register ``openimages_challenge2019_{train,val}`` under ``$DETECTRON2_DATASETS/openimages``.

    Cheap when the files are absent: only paths are recorded.
    """
    if root is None:
        root = os.path.join(
            os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "openimages"
        )
    for name, split in BUILTIN_OPENIMAGES_SPLITS.items():
        register_openimages(name, root, split)
    return list(BUILTIN_OPENIMAGES_SPLITS)
