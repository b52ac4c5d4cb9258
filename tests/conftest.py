"""Shared pytest fixtures: a handful of generated images in LVIS v1 format."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# MLflow telemetry's background thread edits the environment while requests reads it (a rare KeyError).
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

#: Categories of the hand-made dataset: (name, colour, image_count class) — 4 categories whose
#: training image counts make one rare, two common and one frequent under thresholds scaled down.
HANDFUL_CATEGORIES = [
    ("red_square", (220, 40, 40)),
    ("green_square", (40, 200, 60)),
    ("blue_square", (40, 60, 220)),
    ("yellow_square", (230, 220, 40)),
]


def write_handful_lvis(root: Path, split: str, num_images: int, seed: int) -> tuple[Path, Path]:
    """Writes ``num_images`` 96x96 images with 1-3 coloured squares each, and an LVIS v1 JSON.

    Returns:
        (json_file, image_root) in the layout detectron2's ``load_lvis_json`` resolves
        (``image_root/<split>/<file_name>`` from ``coco_url``).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    image_counts = np.zeros(len(HANDFUL_CATEGORIES), dtype=int)
    instance_counts = np.zeros(len(HANDFUL_CATEGORIES), dtype=int)
    for image_id in range(1, num_images + 1):
        pixels = np.full((96, 96, 3), 128, dtype=np.uint8)
        present: set[int] = set()
        for _ in range(int(rng.integers(1, 4))):
            category = int(rng.integers(0, len(HANDFUL_CATEGORIES)))
            size = int(rng.integers(16, 40))
            x0, y0 = (int(v) for v in rng.integers(0, 96 - size, size=2))
            pixels[y0 : y0 + size, x0 : x0 + size] = HANDFUL_CATEGORIES[category][1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category + 1,
                    "bbox": [x0, y0, size, size],
                    "area": float(size * size),
                    "segmentation": [[x0, y0, x0 + size, y0, x0 + size, y0 + size, x0, y0 + size]],
                }
            )
            present.add(category)
            instance_counts[category] += 1
        for category in present:
            image_counts[category] += 1
        absent = [c + 1 for c in range(len(HANDFUL_CATEGORIES)) if c not in present]
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=95)
        images.append(
            {
                "id": image_id,
                "height": 96,
                "width": 96,
                "coco_url": f"http://images.cocodataset.org/{split}/{file_name}",
                "neg_category_ids": absent[:1],
                "not_exhaustive_category_ids": [],
            }
        )
    categories = [
        {
            "id": index + 1,
            "name": name,
            "synonyms": [name],
            "def": f"a {name.replace('_', ' ')}",
            "synset": f"{name}.n.01",
            "image_count": int(image_counts[index]),
            "instance_count": int(instance_counts[index]),
            "frequency": "r" if image_counts[index] <= 10 else "c" if image_counts[index] <= 100 else "f",
        }
        for index, (name, _) in enumerate(HANDFUL_CATEGORIES)
    ]
    json_file = root / f"lvis_v1_{split}.json"
    json_file.write_text(
        json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories})
    )
    return json_file, Path(str(root / "images") + os.sep)


@pytest.fixture(scope="session")
def handful_lvis(tmp_path_factory) -> dict[str, str]:
    """A handful of generated images registered as ``handful_lvis_train`` / ``handful_lvis_val``."""
    from eqlv2.data.lvis import register_lvis_json

    root = tmp_path_factory.mktemp("handful_lvis")
    names = {}
    for split, count, seed in (("train", 12, 0), ("val", 6, 1)):
        json_file, image_root = write_handful_lvis(root, split, count, seed)
        name = f"handful_lvis_{split}"
        register_lvis_json(name, str(json_file), str(image_root) + os.sep)
        names[split] = name
    return names


@pytest.fixture()
def cleanup_names():
    """A list a test appends dataset names to; they are removed from detectron2's catalogs after."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names: list[str] = []
    yield names
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
