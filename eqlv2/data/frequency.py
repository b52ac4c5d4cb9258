"""Per-category training statistics of a dataset and the LVIS frequency groups.

LVIS (Gupta et al. 2019) splits its categories by the number of *training images* that contain
them: rare ``r`` (1-10 images), common ``c`` (11-100) and frequent ``f`` (more than 100). This
module applies the same thresholds to every dataset the project knows (LVIS, OpenImages, the
offline benchmark and a user's own data), so that per-group metrics mean the same thing everywhere.

:func:`category_statistics` is the single entry point other modules use: it answers for any
registered dataset name, from the metadata set at registration when present, else from a lazy
provider registered with the dataset, else by counting the dataset dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog

logger = logging.getLogger(__name__)

__all__ = [
    "RARE_MAX_IMAGES",
    "COMMON_MAX_IMAGES",
    "FREQUENCY_GROUPS",
    "CategoryStatistics",
    "frequency_group",
    "frequency_groups",
    "count_categories",
    "statistics_from_dataset_dicts",
    "set_statistics_metadata",
    "register_statistics_provider",
    "category_statistics",
]

#: Largest training image count of a rare category (LVIS definition).
RARE_MAX_IMAGES = 10
#: Largest training image count of a common category (LVIS definition).
COMMON_MAX_IMAGES = 100
#: The group letters, from the tail to the head of the distribution.
FREQUENCY_GROUPS = ("r", "c", "f")


def frequency_group(image_count: int) -> str:
    """The LVIS group of a category seen in ``image_count`` training images: "r", "c" or "f".

    A category with no training image is rare (it is at the very tail).
    """
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


def frequency_groups(image_counts: Iterable[int]) -> list[str]:
    """:func:`frequency_group` of each count, in the same order."""
    return [frequency_group(int(count)) for count in image_counts]


@dataclass(frozen=True)
class CategoryStatistics:
    """Training statistics of the categories of a dataset, in contiguous-id order.

    Attributes:
        class_names: name of each category (``thing_classes``).
        image_counts: number of training images containing each category.
        instance_counts: number of training instances (boxes) of each category, or None when
            unknown (e.g. LVIS v1 from detectron2's built-in tables without the JSON).
        frequency_groups: "r", "c" or "f" per category (see :func:`frequency_group`).
        num_images: number of training images the counts were taken from.
    """

    class_names: tuple[str, ...]
    image_counts: tuple[int, ...]
    instance_counts: tuple[int, ...] | None
    frequency_groups: tuple[str, ...]
    num_images: int

    def __post_init__(self) -> None:
        num = len(self.class_names)
        lengths = {
            "image_counts": len(self.image_counts),
            "frequency_groups": len(self.frequency_groups),
        }
        if self.instance_counts is not None:
            lengths["instance_counts"] = len(self.instance_counts)
        wrong = {key: value for key, value in lengths.items() if value != num}
        if wrong:
            raise ValueError(f"CategoryStatistics: {num} class names but lengths {wrong}")
        bad_groups = sorted(set(self.frequency_groups) - set(FREQUENCY_GROUPS))
        if bad_groups:
            raise ValueError(f"CategoryStatistics: unknown frequency groups {bad_groups}")

    @property
    def num_classes(self) -> int:
        """Number of categories."""
        return len(self.class_names)

    @property
    def image_frequencies(self) -> tuple[float, ...]:
        """Fraction of training images containing each category (EQL v1's image frequency)."""
        total = max(self.num_images, 1)
        return tuple(count / total for count in self.image_counts)

    def group_indices(self, group: str) -> list[int]:
        """Contiguous ids of the categories of ``group`` ("r", "c" or "f")."""
        if group not in FREQUENCY_GROUPS:
            raise ValueError(
                f"unknown frequency group {group!r}; expected one of {FREQUENCY_GROUPS}"
            )
        return [index for index, value in enumerate(self.frequency_groups) if value == group]

    def group_sizes(self) -> dict[str, int]:
        """Number of categories in each group, e.g. ``{"r": 17, "c": 23, "f": 20}``."""
        return {group: len(self.group_indices(group)) for group in FREQUENCY_GROUPS}

    def to_metadata(self) -> dict[str, Any]:
        """The metadata keys this project sets on ``MetadataCatalog`` for these statistics.

        ``class_image_count`` is detectron2's own format (read by its federated loss).
        """
        meta: dict[str, Any] = {
            "category_image_counts": list(self.image_counts),
            "frequency_groups": list(self.frequency_groups),
            "num_train_images": int(self.num_images),
            "class_image_count": [
                {"id": index + 1, "image_count": int(count)}
                for index, count in enumerate(self.image_counts)
            ],
        }
        if self.instance_counts is not None:
            meta["category_instance_counts"] = list(self.instance_counts)
        return meta


def count_categories(
    dataset_dicts: Iterable[dict], num_classes: int
) -> tuple[list[int], list[int], int]:
    """Images and instances per category in detectron2 dataset dicts.

    Returns:
        (image_counts, instance_counts, num_images), counts indexed by contiguous ``category_id``.

    Raises:
        ValueError: an annotation's ``category_id`` is outside ``[0, num_classes)``.
    """
    image_counts = [0] * num_classes
    instance_counts = [0] * num_classes
    num_images = 0
    for record in dataset_dicts:
        num_images += 1
        present = set()
        for anno in record.get("annotations", ()):
            category = anno["category_id"]
            if not 0 <= category < num_classes:
                raise ValueError(
                    f"image {record.get('image_id')!r}: category_id {category} is outside "
                    f"[0, {num_classes})"
                )
            instance_counts[category] += 1
            present.add(category)
        for category in present:
            image_counts[category] += 1
    return image_counts, instance_counts, num_images


def statistics_from_dataset_dicts(
    dataset_dicts: Sequence[dict], class_names: Sequence[str]
) -> CategoryStatistics:
    """:class:`CategoryStatistics` counted from detectron2 dataset dicts."""
    image_counts, instance_counts, num_images = count_categories(dataset_dicts, len(class_names))
    return CategoryStatistics(
        class_names=tuple(class_names),
        image_counts=tuple(image_counts),
        instance_counts=tuple(instance_counts),
        frequency_groups=tuple(frequency_groups(image_counts)),
        num_images=num_images,
    )


def set_statistics_metadata(dataset_name: str, stats: CategoryStatistics) -> None:
    """Set the keys of :meth:`CategoryStatistics.to_metadata` (and ``thing_classes`` if absent)."""
    meta = MetadataCatalog.get(dataset_name)
    values = stats.to_metadata()
    if not hasattr(meta, "thing_classes"):
        values["thing_classes"] = list(stats.class_names)
    meta.set(**values)


_PROVIDERS: dict[str, Callable[[], CategoryStatistics]] = {}


def register_statistics_provider(
    dataset_name: str, provider: Callable[[], CategoryStatistics] | None
) -> None:
    """Register how to compute the statistics of ``dataset_name`` when first asked for them.

    For datasets whose statistics are expensive (e.g. OpenImages, whose training counts need the
    12M-row box CSV). ``None`` removes a provider.
    """
    if provider is None:
        _PROVIDERS.pop(dataset_name, None)
    else:
        _PROVIDERS[dataset_name] = provider


def _statistics_from_metadata(meta: Any) -> CategoryStatistics | None:
    image_counts = getattr(meta, "category_image_counts", None)
    if image_counts is None:
        detectron2_counts = getattr(meta, "class_image_count", None)
        if detectron2_counts is None:
            return None
        image_counts = [
            entry["image_count"] for entry in sorted(detectron2_counts, key=lambda e: e["id"])
        ]
    class_names = getattr(meta, "thing_classes", None)
    if class_names is None:
        class_names = [f"class_{index}" for index in range(len(image_counts))]
    groups = getattr(meta, "frequency_groups", None) or frequency_groups(image_counts)
    instance_counts = getattr(meta, "category_instance_counts", None)
    num_images = getattr(meta, "num_train_images", None)
    if num_images is None:
        # Without the image total the best lower bound is the most frequent category's count.
        num_images = max(image_counts, default=0)
        logger.warning(
            "Metadata of %s has no num_train_images; using %d (largest category image count)",
            meta.name,
            num_images,
        )
    return CategoryStatistics(
        class_names=tuple(class_names),
        image_counts=tuple(int(count) for count in image_counts),
        instance_counts=None if instance_counts is None else tuple(instance_counts),
        frequency_groups=tuple(groups),
        num_images=int(num_images),
    )


def category_statistics(dataset_name: str) -> CategoryStatistics:
    """Training statistics of the categories of a registered dataset.

    Looks, in order, at the metadata of ``dataset_name`` (``category_image_counts`` or
    detectron2's ``class_image_count``, set at registration: for an evaluation split these are
    the statistics of its training split), at a provider registered with
    :func:`register_statistics_provider`, and finally counts the dataset dicts of
    ``DatasetCatalog.get(dataset_name)`` (for a dataset registered by other code). The two last
    ways store their result in the metadata, so later calls are free.

    Raises:
        KeyError: ``dataset_name`` is not registered.
    """
    meta = MetadataCatalog.get(dataset_name)
    stats = _statistics_from_metadata(meta)
    if stats is not None:
        return stats
    provider = _PROVIDERS.get(dataset_name)
    if provider is not None:
        stats = provider()
    else:
        if dataset_name not in DatasetCatalog:
            raise KeyError(f"dataset {dataset_name!r} is not registered")
        dicts = DatasetCatalog.get(dataset_name)
        class_names = getattr(meta, "thing_classes", None)
        if class_names is None:
            num_classes = 1 + max(
                (a["category_id"] for r in dicts for a in r.get("annotations", ())), default=-1
            )
            class_names = [f"class_{index}" for index in range(num_classes)]
        stats = statistics_from_dataset_dicts(dicts, class_names)
        logger.info(
            "Counted the category statistics of %s from its %d images", dataset_name, len(dicts)
        )
    set_statistics_metadata(dataset_name, stats)
    return stats
