"""The benchmark's pretraining images: balanced, the benchmark's (or other) categories, other pixels."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from eqlv2.data import synthetic_root
from eqlv2.data.synthetic import PRETRAIN_DATASETS, ensure_synthetic, register_synthetic_pretrain
from eqlv2.data.synthetic_plan import MAX_CLASSES, SyntheticSpec, make_plan, make_pretrain_plan

TINY = SyntheticSpec(num_classes=8, seed=5, num_train_images=16, num_val_images=6)


def test_plan_is_balanced_over_the_chosen_categories():
    spec = SyntheticSpec()
    benchmark = make_plan(spec)
    same = make_pretrain_plan(spec, "benchmark")
    other = make_pretrain_plan(spec, "other")
    names = {a.name for a in benchmark.appearances}
    assert [a.name for a in same.appearances] == [a.name for a in benchmark.appearances]
    assert len(other.appearances) == spec.num_classes and not names & {a.name for a in other.appearances}
    for plan in (same, other):
        counts = plan.image_counts("train")
        assert max(counts) - min(counts) <= 1, counts  # no long tail: every category alike
        assert len(plan.train) == spec.num_train_images and plan.val == []
        # As many categories per image as the benchmark's training images, within rounding.
        per_image = sum(counts) / len(plan.train)
        assert abs(per_image - sum(benchmark.image_counts("train")) / len(benchmark.train)) < 0.1
    with pytest.raises(ValueError, match="unknown pretraining categories"):
        make_pretrain_plan(spec, "frequent")
    with pytest.raises(ValueError, match="leaves none"):
        make_pretrain_plan(SyntheticSpec(num_classes=MAX_CLASSES), "other")


def test_files_are_lvis_with_other_pixels_than_the_benchmark(tmp_path):
    benchmark = ensure_synthetic(tmp_path, "lvis", spec=TINY)
    pretrain = ensure_synthetic(tmp_path, "lvis_pretrain", spec=TINY)
    document = json.loads((pretrain / "lvis_v1_train.json").read_text())
    assert len(document["images"]) == TINY.num_train_images
    used = Counter(a["category_id"] for a in document["annotations"])
    assert set(used) == {c["id"] for c in document["categories"]}
    first = document["images"][0]["coco_url"].rsplit("/", 1)[-1]
    ours = np.asarray(Image.open(pretrain / "train2017" / first))
    theirs = np.asarray(Image.open(benchmark / "train2017" / first))
    assert ours.shape != theirs.shape or not np.array_equal(ours, theirs)
    again = ensure_synthetic(tmp_path, "lvis_pretrain", spec=TINY)  # reused, not rewritten
    assert again == pretrain


def test_registered_names_load_and_carry_their_identity(tmp_path):
    names = register_synthetic_pretrain(tmp_path, TINY)
    try:
        assert names == list(PRETRAIN_DATASETS)
        dicts = DatasetCatalog.get("synthetic_lvis_pretrain_other")
        assert len(dicts) == TINY.num_train_images and all(r["annotations"] for r in dicts)
        meta = MetadataCatalog.get("synthetic_lvis_pretrain")
        assert meta.synthetic_spec["images"] == "lvis_pretrain" and meta.synthetic_spec["seed"] == TINY.seed
        assert len(meta.thing_classes) == TINY.num_classes
    finally:
        register_synthetic_pretrain(synthetic_root())  # back to the default benchmark
