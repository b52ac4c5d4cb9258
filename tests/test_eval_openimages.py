"""OpenImages Challenge 2019 metric: each rule on a hand-computed case, the evaluator, and the
Kaggle submission round trip."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.structures import Boxes, Instances

from eqlv2.data import DatasetFormatError
from eqlv2.data.openimages_files import BBOX_COLUMNS, OpenImagesFiles
from eqlv2.evaluation import OpenImagesEvaluator, build_evaluator
from eqlv2.evaluation.openimages import (
    ClassHierarchy,
    OpenImagesDetections,
    OpenImagesGroundTruth,
    OpenImagesSubmissionWriter,
    average_precision,
    evaluate_openimages,
    evaluate_submission,
    instance_count_groups,
    match_detections,
    parse_submission,
    prediction_string,
    write_submission,
)

ROOT = "/m/0bl9f"
# Entity -> Animal -> {Cat, Dog}; Entity -> Vehicle -> Car; Entity -> Toy -> Car (two parents);
# Entity -> Person.
HIERARCHY = {
    "LabelName": ROOT,
    "Subcategory": [
        {
            "LabelName": "/m/animal",
            "Subcategory": [{"LabelName": "/m/cat"}, {"LabelName": "/m/dog"}],
        },
        {"LabelName": "/m/vehicle", "Subcategory": [{"LabelName": "/m/car"}]},
        {"LabelName": "/m/toy", "Subcategory": [{"LabelName": "/m/car"}]},
        {"LabelName": "/m/person"},
    ],
}
MIDS = ["/m/animal", "/m/cat", "/m/dog", "/m/vehicle", "/m/car", "/m/toy", "/m/person"]
ANIMAL, CAT, DOG, VEHICLE, CAR, TOY, PERSON = range(len(MIDS))
H = ClassHierarchy.from_dict(HIERARCHY)


def _gt(boxes=(), labels=()) -> OpenImagesGroundTruth:
    """boxes: (image, mid, xmin, ymin, xmax, ymax, group_of); labels: (image, mid, present)."""
    return OpenImagesGroundTruth.from_rows(MIDS, H, boxes, labels)


def _dets(*rows) -> OpenImagesDetections:
    """rows: (class, score, xmin, ymin, xmax, ymax)."""
    rows = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return OpenImagesDetections(rows[:, 2:], rows[:, 1], rows[:, 0].astype(int))


# --- hierarchy expansion ------------------------------------------------------------------------


def test_hierarchy_ancestors_and_descendants():
    assert H.ancestors["/m/cat"] == {"/m/animal"}
    assert H.ancestors["/m/car"] == {"/m/vehicle", "/m/toy"}  # both parents
    assert H.descendants["/m/animal"] == {"/m/cat", "/m/dog"}
    assert ROOT not in H.ancestors["/m/person"] and ROOT not in H.descendants


def test_boxes_expand_to_ancestors():
    gt = _gt(boxes=[("img", "/m/car", 0.1, 0.1, 0.5, 0.5, False)])
    image = gt.images["img"]
    assert sorted(image.classes.tolist()) == [VEHICLE, CAR, TOY]
    np.testing.assert_allclose(image.boxes, [[0.1, 0.1, 0.5, 0.5]] * 3)
    assert image.verified == {VEHICLE, CAR, TOY}
    assert gt.num_positives().tolist() == [0, 0, 0, 1, 1, 1, 0]


def test_positive_labels_expand_up_and_negative_labels_down():
    gt = _gt(labels=[("a", "/m/cat", True), ("b", "/m/animal", False), ("c", "/m/cat", False)])
    assert gt.images["a"].verified == {CAT, ANIMAL}  # a cat is an animal
    assert gt.images["b"].verified == {ANIMAL, CAT, DOG}  # no animal: no cat, no dog
    assert gt.images["c"].verified == {CAT}  # no cat says nothing about animals


# --- which detections count ---------------------------------------------------------------------


def test_unverified_class_is_ignored_and_negative_label_makes_false_positive():
    boxes = [("a", "/m/dog", 0.1, 0.1, 0.4, 0.4, False)]
    tp = (DOG, 0.5, 0.1, 0.1, 0.4, 0.4)
    fp_on_b = (DOG, 0.9, 0.5, 0.5, 0.9, 0.9)
    # Image b says nothing about dogs: its confident dog detection is ignored, AP(dog) = 1.
    gt = _gt(boxes, labels=[("b", "/m/person", True)])
    result = evaluate_openimages(gt, {"a": _dets(tp), "b": _dets(fp_on_b)})
    assert result.ap_per_class[DOG] == pytest.approx(100.0)
    # Image b is verified to have no dog: the detection is a false positive ranked first, so
    # precision is 1/2 at recall 1 and AP = 0.5 (50 %).
    gt = _gt(boxes, labels=[("b", "/m/dog", False)])
    result = evaluate_openimages(gt, {"a": _dets(tp), "b": _dets(fp_on_b)})
    assert result.ap_per_class[DOG] == pytest.approx(50.0)
    # A negative "animal" label also verifies dog (downward expansion).
    gt = _gt(boxes, labels=[("b", "/m/animal", False)])
    result = evaluate_openimages(gt, {"a": _dets(tp), "b": _dets(fp_on_b)})
    assert result.ap_per_class[DOG] == pytest.approx(50.0)


# --- matching -----------------------------------------------------------------------------------

GROUP = [0.0, 0.0, 0.6, 0.6]


def test_group_of_box_counts_once():
    # Three detections inside one group-of box (each covers it by < 0.5 IoU but lies >= 50 %
    # inside it): one true positive with the best score; the other two are ignored.
    dets = np.array([[0.0, 0.0, 0.2, 0.2], [0.3, 0.3, 0.5, 0.5], [0.1, 0.3, 0.3, 0.5]])
    scores, tp = match_detections(dets, [0.7, 0.9, 0.8], np.array([GROUP]), np.array([True]))
    assert scores.tolist() == [0.9] and tp.tolist() == [1.0]


def test_detection_matching_by_intersection_over_detection_area():
    # Half of the detection lies inside the group-of box: ignored (IoA = 0.5). A bit less: FP.
    inside_half = np.array([[0.5, 0.0, 0.7, 0.2]])
    assert match_detections(inside_half, [0.5], np.array([GROUP]), np.array([True]))[
        1
    ].tolist() == [1.0]
    inside_less = np.array([[0.51, 0.0, 0.71, 0.2]])
    scores, tp = match_detections(inside_less, [0.5], np.array([GROUP]), np.array([True]))
    assert scores.tolist() == [0.5] and tp.tolist() == [0.0]


def test_non_group_boxes_are_matched_first():
    gt = np.array([[0.1, 0.1, 0.3, 0.3], GROUP])  # an instance inside a group-of region
    group_of = np.array([False, True])
    # The best detection takes the instance; the second (same place) is a duplicate of it, so
    # it falls through to the group-of box and is absorbed there (its score counts once).
    dets = np.array([[0.1, 0.1, 0.3, 0.3], [0.1, 0.1, 0.3, 0.3], [0.8, 0.8, 0.9, 0.9]])
    scores, tp = match_detections(dets, [0.9, 0.6, 0.4], gt, group_of)
    assert list(zip(scores.tolist(), tp.tolist(), strict=True)) == [
        (0.9, 1.0),
        (0.4, 0.0),
        (0.6, 1.0),
    ]


def test_detection_takes_best_box_only():
    # Both detections overlap box A best; the second may not fall back to box B.
    gt = np.array([[0.0, 0.0, 0.4, 0.4], [0.1, 0.0, 0.5, 0.4]])
    dets = np.array([[0.0, 0.0, 0.4, 0.4], [0.02, 0.0, 0.42, 0.4]])
    _, tp = match_detections(dets, [0.9, 0.8], gt, np.array([False, False]))
    assert tp.tolist() == [1.0, 0.0]


def test_invalid_detection_boxes_are_dropped():
    dets = np.array([[0.3, 0.1, 0.3, 0.5], [0.1, 0.1, 0.3, 0.3]])
    scores, tp = match_detections(
        dets, [0.9, 0.5], np.array([[0.1, 0.1, 0.3, 0.3]]), np.array([False])
    )
    assert scores.tolist() == [0.5] and tp.tolist() == [1.0]


def test_group_of_ap_end_to_end():
    # cat: one instance and one group-of box on image a -> 2 positives. Detections:
    # 0.9 FP elsewhere, 0.8 TP on the instance, 0.7 and 0.6 inside the group (one TP at 0.7).
    gt = _gt(
        boxes=[
            ("a", "/m/cat", 0.7, 0.7, 0.9, 0.9, False),
            ("a", "/m/cat", 0.0, 0.0, 0.6, 0.6, True),
        ]
    )
    dets = _dets(
        (CAT, 0.9, 0.62, 0.0, 0.7, 0.1),
        (CAT, 0.8, 0.7, 0.7, 0.9, 0.9),
        (CAT, 0.7, 0.1, 0.1, 0.2, 0.2),
        (CAT, 0.6, 0.3, 0.3, 0.4, 0.4),
    )
    result = evaluate_openimages(gt, {"a": dets})
    # Ranking FP, TP, TP: precision 1/2 at recall 1/2 and 2/3 at recall 1; the envelope is 2/3
    # at both recall levels -> AP = 2/3.
    assert result.num_positives[CAT] == 2
    assert result.ap_per_class[CAT] == pytest.approx(100 * 2 / 3)
    # Animal has the same boxes (expansion) but no detections: AP 0; dog has no positives: NaN.
    assert result.ap_per_class[ANIMAL] == 0.0 and math.isnan(result.ap_per_class[DOG])


# --- AP and means -------------------------------------------------------------------------------


def test_average_precision_of_a_known_ranking():
    # TP FP TP FP FP TP with 4 positives: precision 1, 2/3, 1/2 at recall 1/4, 1/2, 3/4 (the 4th
    # positive is never found) -> AP = (1 + 2/3 + 1/2) / 4.
    tp = np.array([1, 0, 1, 0, 0, 1], dtype=float)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert average_precision(scores, tp, 4) == pytest.approx((1 + 2 / 3 + 1 / 2) / 4)
    # The envelope: a later higher precision lifts earlier recall levels (VOC 2010+, not 11-point).
    tp2 = np.array([0, 1, 1], dtype=float)
    assert average_precision(np.array([0.9, 0.8, 0.7]), tp2, 2) == pytest.approx(2 / 3)
    assert average_precision(np.zeros(0), np.zeros(0), 3) == 0.0
    assert math.isnan(average_precision(np.zeros(0), np.zeros(0), 0))


def test_instance_count_groups_split_sorted_classes():
    counts = [50, 3, 900, 7, 1, 300, 20, 5, 60, 2]
    groups = instance_count_groups(counts)
    assert [g.tolist() for g in groups] == [[4, 9], [1, 7], [3, 6], [0, 8], [5, 2]]
    assert [len(g) for g in instance_count_groups(list(range(7)))] == [2, 2, 1, 1, 1]
    assert [len(g) for g in instance_count_groups(list(range(500)))] == [100] * 5


def test_mean_and_group_means_use_classes_with_positives():
    # Positives: cat (AP 1), dog (AP 0), person (AP 0.5); animal has positives via expansion
    # (AP 0, no detections). Other classes have none.
    gt = _gt(
        boxes=[
            ("a", "/m/cat", 0.0, 0.0, 0.2, 0.2, False),
            ("a", "/m/dog", 0.5, 0.5, 0.7, 0.7, False),
            ("a", "/m/person", 0.3, 0.0, 0.5, 0.2, False),
        ],
        labels=[("a", "/m/person", True)],
    )
    dets = _dets(
        (CAT, 0.9, 0.0, 0.0, 0.2, 0.2),
        (PERSON, 0.8, 0.8, 0.8, 0.9, 0.9),
        (PERSON, 0.7, 0.3, 0.0, 0.5, 0.2),
    )
    counts = [10, 1, 2, 30, 40, 50, 3]  # rarest first: cat, dog, person, animal, vehicle, ...
    result = evaluate_openimages(gt, {"a": dets}, counts)
    ap = result.ap_per_class
    # One unit: ap_per_class is in percent, as metrics.
    assert (
        ap[CAT] == 100.0
        and ap[DOG] == 0.0
        and ap[PERSON] == pytest.approx(50.0)
        and ap[ANIMAL] == 0.0
    )
    assert result.metrics["AP"] == pytest.approx(100 * (1 + 0 + 0.5 + 0) / 4)
    assert result.metrics["AP"] == pytest.approx(np.nanmean(ap))
    # 7 classes in 5 groups: [cat, dog], [person, animal], [vehicle], [car], [toy].
    assert result.metrics["AP1"] == pytest.approx(50.0)
    assert result.metrics["AP2"] == pytest.approx(25.0)
    assert all(math.isnan(result.metrics[f"AP{g}"]) for g in (3, 4, 5))


def test_expand_detections_option():
    gt = _gt(boxes=[("a", "/m/cat", 0.0, 0.0, 0.2, 0.2, False)])
    dets = {"a": _dets((CAT, 0.9, 0.0, 0.0, 0.2, 0.2))}
    assert evaluate_openimages(gt, dets).ap_per_class[ANIMAL] == 0.0
    expanded = evaluate_openimages(gt, dets, hierarchy=H, expand_detections=True)
    assert expanded.ap_per_class[ANIMAL] == 100.0 and expanded.ap_per_class[CAT] == 100.0


# --- the detectron2 evaluator on files in the official formats ---------------------------------


BOX_ROWS = [
    ["img1", "xclick", "/m/cat", 1, 0.1, 0.3, 0.2, 0.4, 0, 0, 0, 0, 0],
    ["img1", "xclick", "/m/car", 1, 0.5, 1.0, 0.5, 1.0, 0, 0, 1, 0, 0],
    ["img2", "xclick", "/m/dog", 1, 0.0, 0.5, 0.0, 0.5, 0, 0, 0, 0, 0],
]


def _write_official_files(root, box_rows=BOX_ROWS) -> OpenImagesFiles:
    """The validation files of the small hierarchy above, under their official names."""
    files = OpenImagesFiles.at(root, "validation")
    with open(files.classes_csv, "w", newline="") as f:
        csv.writer(f).writerows([(m, m.split("/")[-1].title()) for m in MIDS])
    with open(files.hierarchy_json, "w") as f:
        json.dump(HIERARCHY, f)
    with open(files.bbox_csv, "w", newline="") as f:
        csv.writer(f).writerows([BBOX_COLUMNS, *box_rows])
    with open(files.image_labels_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageID", "Source", "LabelName", "Confidence"])
        w.writerows([["img1", "verification", "/m/cat", 1], ["img2", "verification", "/m/cat", 0]])
    return files


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> OpenImagesFiles:
    return _write_official_files(tmp_path_factory.mktemp("openimages"))


@pytest.fixture(scope="module")
def registered(official):
    name = "eqlv2_test_eval_openimages"
    MetadataCatalog.get(name).set(
        evaluator_type="openimages",
        thing_mids=MIDS,
        thing_classes=[m.split("/")[-1] for m in MIDS],
        category_instance_counts=[10, 1, 2, 30, 40, 50, 3],
        **official.metadata(),
    )
    return name


def _instances(height, width, rows) -> Instances:
    """rows: (class, score, xmin, ymin, xmax, ymax) in normalized coordinates."""
    rows = np.array(rows, dtype=np.float64).reshape(-1, 6)
    inst = Instances((height, width))
    inst.pred_boxes = Boxes(
        torch.tensor(rows[:, 2:] * [width, height, width, height], dtype=torch.float32)
    )
    inst.scores = torch.tensor(rows[:, 1], dtype=torch.float32)
    inst.pred_classes = torch.tensor(rows[:, 0], dtype=torch.int64)
    return inst


def test_evaluator_on_official_files(registered):
    evaluator = build_evaluator(get_cfg(), registered)
    assert isinstance(evaluator, OpenImagesEvaluator)
    evaluator.reset()
    evaluator.process(
        [
            {"image_id": "img1", "height": 200, "width": 400},
            {"image_id": "img2", "height": 100, "width": 100},
        ],
        [
            {
                "instances": _instances(
                    200, 400, [(CAT, 0.9, 0.1, 0.2, 0.3, 0.4), (CAR, 0.8, 0.6, 0.6, 0.8, 0.8)]
                )
            },
            # img2: the cat is verified absent (FP); dog found; person unverified (ignored).
            {
                "instances": _instances(
                    100,
                    100,
                    [
                        (CAT, 0.95, 0.6, 0.6, 0.9, 0.9),
                        (DOG, 0.5, 0.0, 0.0, 0.5, 0.5),
                        (PERSON, 0.9, 0.1, 0.1, 0.2, 0.2),
                    ],
                )
            },
        ],
    )
    out = evaluator.evaluate()
    assert list(out) == ["bbox"]
    # Classes with positives: animal (cat + dog boxes, no detections: 0), cat (FP 0.95 then TP
    # 0.9: AP 0.5), dog (1), vehicle / toy (expanded group-of car box, no detections: 0), car
    # (detection inside the group-of box: 1).
    assert out["bbox"]["AP"] == pytest.approx(100 * (0 + 0.5 + 1 + 0 + 1 + 0) / 6, abs=1e-6)
    assert set(out["bbox"]) == {"AP", "AP1", "AP2", "AP3", "AP4", "AP5"}
    assert out["bbox"]["AP1"] == pytest.approx(100 * (0.5 + 1) / 2, abs=1e-6)  # cat, dog


# --- Kaggle submission --------------------------------------------------------------------------


def test_submission_round_trip(tmp_path, registered):
    rng = np.random.default_rng(0)
    writer = OpenImagesSubmissionWriter(
        registered, str(tmp_path / "sub" / "submission.csv"), distributed=False
    )
    writer.reset()
    expected = {}
    for k, (h, w) in enumerate([(480, 640), (333, 500), (200, 300)]):
        n = 0 if k == 2 else 25
        xy = rng.uniform(0, 1, (n, 2)) * [w * 0.7, h * 0.7]
        wh = rng.uniform(1, 0.3 * min(h, w), (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        inst = Instances((h, w))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.tensor(rng.uniform(0, 1, n), dtype=torch.float32)
        inst.pred_classes = torch.tensor(rng.integers(0, len(MIDS), n), dtype=torch.int64)
        writer.process([{"image_id": f"im{k}", "height": h, "width": w}], [{"instances": inst}])
        expected[f"im{k}"] = (
            [MIDS[c] for c in inst.pred_classes.tolist()],
            inst.scores.numpy().astype(np.float64),
            inst.pred_boxes.tensor.numpy().astype(np.float64) / [w, h, w, h],
        )
    assert writer.evaluate() == {}
    text = (tmp_path / "sub" / "submission.csv").read_text().splitlines()
    assert text[0] == "ImageId,PredictionString" and text[-1] == "im2,"
    parsed = parse_submission(str(tmp_path / "sub" / "submission.csv"))
    assert set(parsed) == set(expected)
    for image_id, (labels, scores, boxes) in expected.items():
        got = parsed[image_id]
        assert got.labels == labels
        np.testing.assert_allclose(got.scores, scores, atol=1e-6)
        np.testing.assert_allclose(got.boxes, boxes, atol=1e-6)


def test_prediction_string_format(tmp_path):
    text = prediction_string(["/m/05s2s"], [0.9], np.array([[0.46, 0.08, 0.93, 1.2]]))
    assert text == "/m/05s2s 0.900000 0.460000 0.080000 0.930000 1.000000"  # clipped to [0, 1]
    write_submission(str(tmp_path / "s.csv"), {"b": "", "a": text})
    assert (tmp_path / "s.csv").read_text().splitlines() == [
        "ImageId,PredictionString",
        f"a,{text}",
        "b,",
    ]
    (tmp_path / "bad.csv").write_text("ImageId,PredictionString\nx,/m/a 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="multiple of 6"):
        parse_submission(str(tmp_path / "bad.csv"))


# --- bad input: one test per failure (see the "Input checks" of eqlv2.evaluation.openimages.metric)


def test_unknown_label_in_ground_truth_file_is_named(tmp_path):
    files = _write_official_files(
        tmp_path, [*BOX_ROWS, ["img3", "xclick", "/m/zebra", 1, 0, 0.5, 0, 0.5, 0, 0, 0, 0, 0]]
    )
    with pytest.raises(
        DatasetFormatError,
        match=r"detection-bbox.csv: line 5 \(ImageID img3\): unknown LabelName '/m/zebra'",
    ):
        OpenImagesGroundTruth.from_files(
            MIDS, files.hierarchy_json, files.bbox_csv, files.image_labels_csv
        )


def test_unknown_label_in_ground_truth_rows_is_counted():
    rows = [
        ("a", "/m/zebra", 0.1, 0.1, 0.2, 0.2, False),
        ("b", "/m/zebra", 0.1, 0.1, 0.2, 0.2, False),
    ]
    with pytest.raises(ValueError, match=r"2 ground-truth rows .* e\.g\. \['/m/zebra'\]"):
        _gt(boxes=rows)


def test_unknown_label_in_submission_is_counted(tmp_path, official):
    sub = tmp_path / "sub.csv"
    write_submission(
        str(sub), {"img1": "/m/cat 0.9 0.1 0.2 0.3 0.4 /m/zebra 0.5 0 0 1 1 /m/yak 0.5 0 0 1 1"}
    )
    with pytest.raises(
        ValueError,
        match=r"sub.csv: 2 detections have 2 LabelNames that are not in the class list, e\.g\. \['/m/yak', '/m/zebra'\]",
    ):
        evaluate_submission(str(sub), official.root)


@pytest.mark.parametrize("bad_class", [len(MIDS), 99, -1])
def test_class_index_out_of_range_is_an_error(bad_class):
    gt = _gt(boxes=[("a", "/m/cat", 0.0, 0.0, 0.2, 0.2, False)])
    dets = _dets((CAT, 0.9, 0.0, 0.0, 0.2, 0.2), (bad_class, 0.8, 0.0, 0.0, 0.2, 0.2))
    with pytest.raises(
        ValueError,
        match=rf"image a: 1 detections have class indices outside \[0, 7\), e\.g\. \[{bad_class}\]",
    ):
        evaluate_openimages(gt, {"a": dets})


def test_mismatched_lengths_are_an_error_at_construction():
    with pytest.raises(ValueError, match="differ in length: 3 boxes, 2 scores, 3 classes"):
        OpenImagesDetections(np.zeros((3, 4)), np.zeros(2), np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"boxes must be \(N, 4\), got shape \(6,\)"):
        OpenImagesDetections(np.zeros(6), np.zeros(2), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="class indices must be integers"):
        OpenImagesDetections(np.zeros((1, 4)), np.zeros(1), np.array([1.5]))


def test_image_ids_of_the_wrong_type_are_an_error():
    gt = _gt(boxes=[("1", "/m/cat", 0.0, 0.0, 0.2, 0.2, False)])
    with pytest.raises(TypeError, match="detections are keyed by int image ids .* strings"):
        evaluate_openimages(gt, {1: _dets((CAT, 0.9, 0.0, 0.0, 0.2, 0.2))})


def test_unknown_image_ids_are_counted_in_a_warning(caplog):
    gt = _gt(boxes=[("a", "/m/cat", 0.0, 0.0, 0.2, 0.2, False)])
    good = _dets((CAT, 0.9, 0.0, 0.0, 0.2, 0.2))
    stray = _dets((CAT, 0.9, 0.0, 0.0, 0.2, 0.2), (DOG, 0.5, 0.0, 0.0, 0.2, 0.2))
    with caplog.at_level("WARNING"):
        result = evaluate_openimages(gt, {"a": good, "x": stray, "y": stray})
    assert "2 of 3 images with detections (4 detections) have no ground truth" in caplog.text
    assert result.ap_per_class[CAT] == 100.0  # the stray images do not count, as officially
    with pytest.raises(ValueError, match="no detection is on an image of the ground truth"):
        evaluate_openimages(gt, {"x": stray})


@pytest.mark.parametrize(
    "box", [(10.0, 20.0, 200.0, 220.0), (0.1, 0.1, 1.2, 0.5), (-0.2, 0, 0.5, 0.5)]
)
def test_unnormalized_boxes_are_an_error(box):
    gt = _gt(boxes=[("a", "/m/cat", 0.0, 0.0, 0.2, 0.2, False)])
    with pytest.raises(
        ValueError, match=r"image a: 1 detection boxes are not normalized to \[0, 1\].*not pixels"
    ):
        evaluate_openimages(gt, {"a": _dets((CAT, 0.9, *box))})
    # Rounding in the last digits is tolerated.
    evaluate_openimages(gt, {"a": _dets((CAT, 0.9, -1e-4, 0.0, 1.0001, 0.2))})


# --- offline evaluation of a Kaggle submission --------------------------------------------------

SUBMISSION = {
    "img1": "/m/cat 0.9 0.1 0.2 0.3 0.4 /m/car 0.8 0.6 0.6 0.8 0.8",
    "img2": "/m/cat 0.95 0.6 0.6 0.9 0.9 /m/dog 0.5 0 0 0.5 0.5 /m/person 0.9 0.1 0.1 0.2 0.2",
    "img9": "",
}
# The same detections by hand, for the reference computed without the submission code.
HAND = {
    "img1": _dets((CAT, 0.9, 0.1, 0.2, 0.3, 0.4), (CAR, 0.8, 0.6, 0.6, 0.8, 0.8)),
    "img2": _dets(
        (CAT, 0.95, 0.6, 0.6, 0.9, 0.9),
        (DOG, 0.5, 0, 0, 0.5, 0.5),
        (PERSON, 0.9, 0.1, 0.1, 0.2, 0.2),
    ),
}


def test_submission_is_evaluated_with_the_official_class_list(tmp_path, official):
    sub = tmp_path / "sub.csv"
    write_submission(str(sub), SUBMISSION)
    result = evaluate_submission(str(sub), official.root)
    gt = _gt(
        boxes=[(r[0], r[2], r[4], r[6], r[5], r[7], bool(r[10])) for r in BOX_ROWS],
        labels=[("img1", "/m/cat", True), ("img2", "/m/cat", False)],
    )
    expected = evaluate_openimages(gt, HAND)
    np.testing.assert_allclose(result.ap_per_class, expected.ap_per_class)
    assert result.metrics["AP"] == pytest.approx(100 * (0 + 0.5 + 1 + 0 + 1 + 0) / 6)


def test_command_line_evaluates_a_submission(tmp_path, official):
    sub, out = tmp_path / "sub.csv", tmp_path / "metrics.json"
    write_submission(str(sub), SUBMISSION)
    command = [
        sys.executable, "-m", "eqlv2.evaluation.openimages",
        "--submission", str(sub), "--annotations-dir", official.root, "--output", str(out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    metrics = json.loads(out.read_text())
    assert metrics == {"AP": pytest.approx(100 * 2.5 / 6)}
    assert f"{metrics['AP']:.3f}" in done.stdout
    assert "RuntimeWarning" not in done.stderr


def test_max_images_scores_the_ground_truth_of_the_first_images_only(official):
    """TEST.EQLV2.MAX_IMAGES 1: the evaluator gets img1 only and scores img1's ground truth only."""
    from detectron2.data import DatasetCatalog

    from eqlv2.config import add_eqlv2_config

    name = "eqlv2_test_eval_openimages_first_images"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{"image_id": "img1", "height": 200, "width": 400},
                                               {"image_id": "img2", "height": 100, "width": 100}])  # fmt: skip
        MetadataCatalog.get(name).set(evaluator_type="openimages", thing_mids=MIDS, **official.metadata())
    cfg = get_cfg()
    add_eqlv2_config(cfg)
    cfg.TEST.EQLV2.MAX_IMAGES = 1
    evaluator = build_evaluator(cfg, name)
    detections = [(CAT, 0.9, 0.1, 0.2, 0.3, 0.4), (CAR, 0.8, 0.6, 0.6, 0.8, 0.8)]
    evaluator.process([{"image_id": "img1", "height": 200, "width": 400}], [{"instances": _instances(200, 400, detections)}])
    # img1's positives: its cat box (animal, cat) and its group-of car box (car, vehicle, toy);
    # the cat and the car are found. img2's dog box is not counted (it would add dog: 0).
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100 * (0 + 1 + 1 + 0 + 0) / 5, abs=1e-6)
    cfg.TEST.EQLV2.MAX_IMAGES = 2  # the whole set: img2's dog box counts, missed
    evaluator = build_evaluator(cfg, name)
    evaluator.process([{"image_id": "img1", "height": 200, "width": 400}], [{"instances": _instances(200, 400, detections)}])
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100 * (0 + 1 + 0 + 1 + 0 + 0) / 6, abs=1e-6)
