"""The offline long-tailed detection benchmark: generator, writers and command line.

``ensure_synthetic(root, fmt)`` writes (once) a small detection dataset whose class frequencies
follow LVIS v1 (see :mod:`eqlv2.data.synthetic_plan`), drawn by
:mod:`eqlv2.data.synthetic_render`, in the file format of LVIS v1 or of the OpenImages Challenge
2019, so that training, evaluation and the search run with no download.

Layout of ``<root>/lvis`` (loads with detectron2's ``load_lvis_json(json, "<root>/lvis/")``)::

    lvis_v1_train.json  lvis_v1_val.json     LVIS v1 JSON (images, annotations, categories)
    train2017/000000000001.jpg ...           coco_url ".../train2017/<file>"
    val2017/000000000801.jpg ...
    eqlv2-synthetic.json                     generation parameters (marker)

Layout of ``<root>/openimages`` (the official file names, see :mod:`eqlv2.data.openimages`)::

    challenge-2019-classes-description-500.csv
    challenge-2019-label500-hierarchy.json   /m/0bl9f -> one node per shape -> categories
    challenge-2019-{train,validation}-detection-bbox.csv
    challenge-2019-{train,validation}-detection-human-imagelabels.csv
    images/{train,validation}/<ImageID>.jpg
    eqlv2-image-sizes-{train,validation}.json
    eqlv2-synthetic.json

The same parameters give byte-identical files. A finished dataset is reused while its marker
matches the parameters and regenerated otherwise; generation happens in a temporary folder next
to the target, renamed into place under a file lock, so concurrent processes (Ray workers) never
see half-written data.

Command line::

    python -m eqlv2.data.synthetic --format lvis --out datasets/eqlv2_synthetic/lvis
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .openimages import BBOX_COLUMNS, CLASSES_CSV, HIERARCHY_JSON, IMAGE_LABEL_COLUMNS, ROOT_LABEL
from .openimages import write_image_size_cache as _write_size_cache
from .synthetic_plan import (
    GENERATOR_VERSION,
    SHAPES,
    PlannedImage,
    SyntheticPlan,
    SyntheticSpec,
    make_plan,
    make_pretrain_plan,
    parent_mid,
)
from .synthetic_render import RenderedImage, render_image

logger = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "PRETRAIN_FORMATS",
    "MARKER_FILE",
    "LVIS_SPLIT_FOLDERS",
    "OPENIMAGES_SPLITS",
    "generate_synthetic",
    "PRETRAIN_DATASETS",
    "register_synthetic_pretrain",
    "ensure_synthetic",
    "synthetic_dir",
    "openimages_image_id",
    "main",
]

#: Dataset formats the generator writes.
FORMATS = ("lvis", "openimages")
#: The benchmark's pretraining images (:func:`~eqlv2.data.synthetic_plan.make_pretrain_plan`),
#: LVIS v1 files of a training split: folder name -> their categories.
PRETRAIN_FORMATS = {"lvis_pretrain": "benchmark", "lvis_pretrain_other": "other"}
_KINDS = (*FORMATS, *PRETRAIN_FORMATS)
#: Name of the marker file holding the generation parameters.
MARKER_FILE = "eqlv2-synthetic.json"
#: LVIS image folders per split (the COCO 2017 folder names LVIS v1 uses).
LVIS_SPLIT_FOLDERS = {"train": "train2017", "val": "val2017"}
#: OpenImages split names per split.
OPENIMAGES_SPLITS = {"train": "train", "val": "validation"}
_SPLIT_CODES = {"train": 1, "val": 2}
_JPEG_QUALITY = 92


def synthetic_dir(root: str | os.PathLike, fmt: str) -> Path:
    """Folder of format ``fmt`` under a benchmark root: ``<root>/lvis``, ``<root>/openimages`` or
    ``<root>/lvis_pretrain[_other]``."""
    if fmt not in _KINDS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {_KINDS}")
    return Path(root) / fmt


def openimages_image_id(seed: int, split: str, index: int) -> str:
    """16-hex-digit ImageID of image ``index`` of ``split``, like OpenImages' own ids."""
    return hashlib.sha1(f"eqlv2-synthetic-{seed}-{split}-{index}".encode()).hexdigest()[:16]


def _lvis_image_id(spec: SyntheticSpec, split: str, index: int) -> int:
    return index + 1 + (spec.num_train_images if split == "val" else 0)


def _render_split(
    plan: SyntheticPlan, split: str, progress: tqdm
) -> Iterator[tuple[PlannedImage, RenderedImage]]:
    spec = plan.spec
    for image in plan.split(split):
        rng = np.random.default_rng(
            [spec.seed, _SPLIT_CODES[split] + plan.render_stream, image.index, GENERATOR_VERSION]
        )
        rendered = render_image(
            image, plan.appearances, rng, spec.min_image_size, spec.max_image_size
        )
        progress.update(1)
        yield image, rendered


def _save_jpeg(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(pixels).save(path, format="JPEG", quality=_JPEG_QUALITY)


def _dump_json(value: object, path: Path) -> None:
    # json.dumps (C encoder) is several times faster than streaming with json.dump.
    path.write_text(json.dumps(value, separators=(",", ":")), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# LVIS v1 format


def _lvis_split(plan: SyntheticPlan, split: str, out: Path, progress: tqdm) -> dict:
    spec = plan.spec
    folder = LVIS_SPLIT_FOLDERS[split]
    (out / folder).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for planned, rendered in _render_split(plan, split, progress):
        image_id = _lvis_image_id(spec, split, planned.index)
        file_name = f"{image_id:012d}.jpg"
        _save_jpeg(rendered.pixels, out / folder / file_name)
        images.append(
            {
                "id": image_id,
                "width": rendered.width,
                "height": rendered.height,
                "coco_url": f"https://eqlv2-synthetic.invalid/{folder}/{file_name}",
                "license": 1,
                "neg_category_ids": [c + 1 for c in planned.neg_categories],
                "not_exhaustive_category_ids": [c + 1 for c in planned.not_exhaustive_categories],
            }
        )
        annotated = {i: 0 for i in range(len(planned.groups))}
        for instance in rendered.instances:
            group = planned.groups[instance.group]
            if annotated[instance.group] >= group.num_lvis_annotated:
                continue  # left unannotated: the category is "not exhaustive" on this image
            annotated[instance.group] += 1
            x0, y0, x1, y1 = instance.box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": instance.category + 1,
                    "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                    "area": float(instance.area),
                    "segmentation": instance.polygons,
                }
            )
    return {"images": images, "annotations": annotations}


def _lvis_categories(plan: SyntheticPlan, split_data: dict, groups: list[str]) -> list[dict]:
    num = len(plan.appearances)
    instance_counts = [0] * num
    image_sets: list[set[int]] = [set() for _ in range(num)]
    for anno in split_data["annotations"]:
        instance_counts[anno["category_id"] - 1] += 1
        image_sets[anno["category_id"] - 1].add(anno["image_id"])
    categories = []
    for index, appearance in enumerate(plan.appearances):
        texture = "" if appearance.texture == "plain" else f"{appearance.texture} "
        categories.append(
            {
                "id": index + 1,
                "name": appearance.name,
                "synonyms": [appearance.name],
                "def": f"a {texture}{appearance.colour} {appearance.shape.replace('_', ' ')}",
                "synset": f"{appearance.name}.n.01",
                "frequency": groups[index],
                "image_count": len(image_sets[index]),
                "instance_count": instance_counts[index],
            }
        )
    return categories


def _write_lvis(plan: SyntheticPlan, out: Path, progress: tqdm) -> None:
    groups = plan.statistics("lvis").frequency_groups
    for split in ("train", "val"):
        data = _lvis_split(plan, split, out, progress)
        document = {
            "info": {
                "description": "eqlv2 offline long-tailed benchmark, LVIS v1 format",
                "version": "1.0",
                "eqlv2_synthetic": plan.spec.as_dict(),
            },
            "licenses": [{"id": 1, "name": "generated data, no restrictions", "url": ""}],
            "images": data["images"],
            "annotations": data["annotations"],
            "categories": _lvis_categories(plan, data, list(groups)),
        }
        _dump_json(document, out / f"lvis_v1_{split}.json")


# ---------------------------------------------------------------------------------------------
# OpenImages Challenge 2019 format


def _norm(value: float, size: int) -> str:
    return f"{value / size:.6f}"


def _box_rows(cluster: bool, drawn: list) -> list[tuple]:
    """``(box, occluded, truncated, group_of)`` rows of one planned group's drawn instances: one
    IsGroupOf box around them all for a cluster, else one box per instance."""
    if not cluster:
        return [(i.box, i.occluded, i.truncated, 0) for i in drawn]
    box = (
        min(i.box[0] for i in drawn), min(i.box[1] for i in drawn),
        max(i.box[2] for i in drawn), max(i.box[3] for i in drawn),
    )  # fmt: skip
    return [(box, any(i.occluded for i in drawn), any(i.truncated for i in drawn), 1)]


def _openimages_split(plan: SyntheticPlan, split: str, out: Path, progress: tqdm) -> None:
    spec = plan.spec
    oi_split = OPENIMAGES_SPLITS[split]
    image_dir = out / "images" / oi_split
    image_dir.mkdir(parents=True, exist_ok=True)
    mids = plan.mids()
    boxes = io.StringIO(newline="")
    labels = io.StringIO(newline="")
    box_writer = csv.writer(boxes, lineterminator="\n")
    label_writer = csv.writer(labels, lineterminator="\n")
    box_writer.writerow(BBOX_COLUMNS)
    label_writer.writerow(IMAGE_LABEL_COLUMNS)
    sizes: dict[str, tuple[int, int]] = {}
    seen: set[str] = set()
    for planned, rendered in _render_split(plan, split, progress):
        image_id = openimages_image_id(spec.seed, split, planned.index)
        if image_id in seen:
            raise RuntimeError(f"ImageID collision for {split} image {planned.index}")
        seen.add(image_id)
        _save_jpeg(rendered.pixels, image_dir / f"{image_id}.jpg")
        width, height = rendered.width, rendered.height
        sizes[image_id] = (width, height)
        members: dict[int, list] = {}
        for instance in rendered.instances:
            members.setdefault(instance.group, []).append(instance)
        for group_index in sorted(members):
            group = planned.groups[group_index]
            for (x0, y0, x1, y1), occluded, truncated, group_of in _box_rows(group.cluster, members[group_index]):
                box_writer.writerow(
                    [
                        image_id, "xclick", mids[group.category], "1",
                        _norm(x0, width), _norm(x1, width), _norm(y0, height), _norm(y1, height),
                        int(occluded), int(truncated), group_of, 0, 0,
                    ]
                )  # fmt: skip
        present = sorted(g.category for g in planned.groups)
        for category in present:
            label_writer.writerow([image_id, "verification", mids[category], "1"])
        for category in planned.neg_categories:
            label_writer.writerow([image_id, "verification", mids[category], "0"])
    (out / f"challenge-2019-{oi_split}-detection-bbox.csv").write_text(
        boxes.getvalue(), encoding="utf-8"
    )
    (out / f"challenge-2019-{oi_split}-detection-human-imagelabels.csv").write_text(
        labels.getvalue(), encoding="utf-8"
    )
    _write_size_cache(out, oi_split, sizes)


def _openimages_hierarchy(plan: SyntheticPlan) -> dict:
    mids = plan.mids()
    by_shape: dict[str, list[dict]] = {}
    for index, appearance in enumerate(plan.appearances):
        by_shape.setdefault(appearance.shape, []).append({"LabelName": mids[index]})
    return {
        "LabelName": ROOT_LABEL,
        "Subcategory": [
            {"LabelName": parent_mid(shape), "Subcategory": by_shape[shape]}
            for shape in SHAPES
            if shape in by_shape
        ],
    }


def _write_openimages(plan: SyntheticPlan, out: Path, progress: tqdm) -> None:
    with open(out / CLASSES_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for mid, name in zip(plan.mids(), plan.class_names("openimages"), strict=True):
            writer.writerow([mid, name])
    _dump_json(_openimages_hierarchy(plan), out / HIERARCHY_JSON)
    for split in ("train", "val"):
        _openimages_split(plan, split, out, progress)


# ---------------------------------------------------------------------------------------------
# Generation with reuse, lock and atomic rename


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (``filelock`` if installed, else ``fcntl``)."""
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock comes with torch
        import fcntl

        with open(path, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return
    with FileLock(str(path)):
        yield


def _marker(fmt: str, spec: SyntheticSpec) -> dict:
    return {"format": fmt, **spec.as_dict()}


def _read_marker(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_in_place(out_dir: Path, fmt: str, spec: SyntheticSpec, marker: dict) -> None:
    """Writes the dataset into a temporary sibling folder, then renames it to ``out_dir``."""
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename
        plan = make_pretrain_plan(spec, PRETRAIN_FORMATS[fmt]) if fmt in PRETRAIN_FORMATS else make_plan(spec)
        total = len(plan.train) + len(plan.val)
        with tqdm(total=total, desc=f"eqlv2 synthetic {fmt}", unit="img", disable=None) as progress:
            (_write_openimages if fmt == "openimages" else _write_lvis)(plan, tmp, progress)
        (tmp / MARKER_FILE).write_text(json.dumps(marker, sort_keys=True, indent=1), encoding="utf-8")
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info(
        "Generated the synthetic %s benchmark (%d classes, %d+%d images) in %s in %.1f s",
        fmt, len(plan.appearances), len(plan.train), len(plan.val), out_dir, time.perf_counter() - start,
    )  # fmt: skip


def generate_synthetic(
    out_dir: str | os.PathLike, fmt: str, spec: SyntheticSpec | None = None, force: bool = False
) -> Path:
    """Write the benchmark of ``spec`` in format ``fmt`` into ``out_dir`` (unless already there).

    Args:
        out_dir: the dataset folder (its content is described in the module docstring).
        fmt: "lvis", "openimages", or a key of :data:`PRETRAIN_FORMATS` (pretraining images).
        spec: generation parameters (default :class:`SyntheticSpec`).
        force: regenerate even if ``out_dir`` holds this very dataset.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and was not written by this generator.
    """
    if fmt not in _KINDS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {_KINDS}")
    spec = spec or SyntheticSpec()
    out_dir = Path(out_dir).absolute()
    expected = _marker(fmt, spec)
    if not force and _read_marker(out_dir) == expected:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        current = _read_marker(out_dir)
        if not force and current == expected:
            return out_dir  # another process finished it while we waited
        if out_dir.exists() and current is None and any(out_dir.iterdir()):
            raise FileExistsError(
                f"{out_dir} is not empty and holds no {MARKER_FILE}: refusing to replace it "
                "with the synthetic benchmark"
            )
        _write_in_place(out_dir, fmt, spec, expected)
    return out_dir


def ensure_synthetic(
    root: str | os.PathLike,
    fmt: str,
    num_classes: int = 60,
    seed: int = 0,
    num_train_images: int = 800,
    num_val_images: int = 200,
    spec: SyntheticSpec | None = None,
) -> Path:
    """The folder ``<root>/<fmt>`` holding the benchmark, generated first if missing or stale.

    ``spec``, when given, replaces the four size and seed arguments.
    """
    if spec is None:
        spec = SyntheticSpec(
            num_classes=num_classes,
            seed=seed,
            num_train_images=num_train_images,
            num_val_images=num_val_images,
        )
    return generate_synthetic(synthetic_dir(root, fmt), fmt, spec)


#: Registered names of the benchmark's pretraining images -> their folder (a PRETRAIN_FORMATS key).
PRETRAIN_DATASETS = {
    "synthetic_lvis_pretrain": "lvis_pretrain",
    "synthetic_lvis_pretrain_other": "lvis_pretrain_other",
}
_registered_pretrain: dict[str, tuple[str, SyntheticSpec]] = {}


def _load_pretrain(root: str, fmt: str, spec: SyntheticSpec, name: str) -> list[dict]:
    from .lvis import load_lvis_dataset

    folder = ensure_synthetic(root, fmt, spec=spec)
    return load_lvis_dataset(folder / "lvis_v1_train.json", str(folder) + os.sep, name)


def register_synthetic_pretrain(root: str | os.PathLike, spec: SyntheticSpec | None = None) -> list[str]:
    """Register the pretraining images of the benchmark ``spec`` under ``root`` as the names of
    :data:`PRETRAIN_DATASETS` (generated on first use); re-registering the same does nothing.

    Returns:
        The registered names.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from .lvis import register_lvis_json

    spec = spec or SyntheticSpec()
    key = (str(Path(root).absolute()), spec)
    for name, fmt in PRETRAIN_DATASETS.items():
        if _registered_pretrain.get(name) == key and name in DatasetCatalog:
            continue
        folder = synthetic_dir(key[0], fmt)
        register_lvis_json(
            name,
            folder / "lvis_v1_train.json",
            str(folder) + os.sep,
            statistics=make_pretrain_plan(spec, PRETRAIN_FORMATS[fmt]).statistics("lvis"),
            loader=functools.partial(_load_pretrain, key[0], fmt, spec, name),
        )
        MetadataCatalog.get(name).set(synthetic_root=key[0], synthetic_spec={**spec.as_dict(), "images": fmt})
        _registered_pretrain[name] = key
    return list(PRETRAIN_DATASETS)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SyntheticSpec()
    parser = argparse.ArgumentParser(
        prog="python -m eqlv2.data.synthetic",
        description="Write the offline long-tailed detection benchmark (LVIS v1 or OpenImages "
        "Challenge 2019 files) into a folder. Equal parameters give identical files; an existing "
        "dataset with the same parameters is reused.",
    )
    parser.add_argument("--format", choices=FORMATS, required=True, help="file format to write")
    parser.add_argument("--out", required=True, help="dataset folder to write")
    parser.add_argument("--num-classes", type=int, default=defaults.num_classes)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--num-train-images", type=int, default=defaults.num_train_images)
    parser.add_argument("--num-val-images", type=int, default=defaults.num_val_images)
    parser.add_argument("--min-image-size", type=int, default=defaults.min_image_size)
    parser.add_argument("--max-image-size", type=int, default=defaults.max_image_size)
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = SyntheticSpec(
            num_classes=args.num_classes,
            seed=args.seed,
            num_train_images=args.num_train_images,
            num_val_images=args.num_val_images,
            min_image_size=args.min_image_size,
            max_image_size=args.max_image_size,
        )
        out = generate_synthetic(args.out, args.format, spec, force=args.force)
    except (ValueError, FileExistsError) as error:
        logger.error("%s", error)
        return 2
    stats = make_plan(spec).statistics(args.format)
    logger.info("Wrote %s; categories per frequency group: %s", out, stats.group_sizes())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
