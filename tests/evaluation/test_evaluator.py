"""Tests of `instance_embed.evaluation`.

Hand-worked cases state their arithmetic in comments; random cases are checked against
pycocotools' COCOeval and against plain reference implementations written below, which
compute every IoU with boolean operations on one mask pair at a time and sort with
Python's (stable) `sorted`.
"""

import contextlib
import io
import json
import math

import numpy as np
import pytest

from instance_embed import evaluation
from instance_embed.evaluation import matching

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _box(shape, y0, y1, x0, x1):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _evaluator(num_classes=1, **kwargs):
    return evaluation.InstanceEvaluator(num_classes, **kwargs)


# ---------------------------------------------------------------------------------------
# Hand-worked cases.


def test_perfect_predictions_score_one():
    evaluator = _evaluator(2, proposal_counts=(1, 2, 10))
    gt = np.zeros((10, 12), np.int32)
    gt[1:4, 1:5] = 1
    gt[5:9, 2:11] = 2
    gt[0, :] = -1
    masks = np.stack([gt == 1, gt == 2])
    evaluator.add(gt, [1, 2], masks, [1, 2], [0.9, 0.3])
    gt2 = np.zeros((6, 6), np.int32)
    gt2[2:5, 2:5] = 1
    evaluator.add(gt2, [2], (gt2 == 1)[None], [2], [0.5])
    result = evaluator.result()
    for t in ("0.5", "0.6", "0.7"):
        assert result[f"mAP_r@{t}"] == 1.0
        assert result[f"AP_r@{t}/class_1"] == 1.0
        assert result[f"AP_r@{t}/class_2"] == 1.0
    # Top-1 of the first image recalls 1 of its 2 instances, the second image's 1 of 1.
    assert result["AR@0.5@1"] == pytest.approx(2 / 3)
    assert result["AR@0.5@2"] == 1.0
    assert result["AR@0.5@10"] == 1.0
    for key in ("coco_mask_AP", "coco_mask_AP50", "coco_mask_AP75"):
        assert result[key] == pytest.approx(1.0, abs=1e-12)
    assert result["num_images"] == 2
    assert result["num_instances"] == 3


def _duplicate_case(**kwargs):
    """Image A: instance + exact duplicate; image B: one instance, found once."""
    evaluator = _evaluator(1, **kwargs)
    gt_a = np.zeros((8, 8), np.int32)
    gt_a[1:5, 2:6] = 1
    evaluator.add(gt_a, [1], np.stack([gt_a == 1, gt_a == 1]), [1, 1], [0.9, 0.8])
    gt_b = np.zeros((8, 8), np.int32)
    gt_b[3:7, 0:3] = 1
    evaluator.add(gt_b, [1], (gt_b == 1)[None], [1], [0.7])
    return evaluator.result()


def test_duplicate_prediction_is_a_false_positive():
    result = _duplicate_case()
    # Sorted: TP (0.9), FP duplicate (0.8), TP (0.7); 2 instances.
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3; monotone precision 1, 2/3, 2/3.
    # AP = 1/2 * 1 + (1 - 1/2) * 2/3 = 5/6 at every threshold (IoUs are 1).
    for t in ("0.5", "0.6", "0.7"):
        assert result[f"mAP_r@{t}"] == pytest.approx(5 / 6, abs=1e-12)
    # COCO: the 51 recall points 0.00..0.50 read precision 1, the 50 points 0.51..1.00
    # read 2/3, at every one of the 10 thresholds.
    expected_coco = (51 * 1.0 + 50 * 2 / 3) / 101
    for key in ("coco_mask_AP", "coco_mask_AP50", "coco_mask_AP75"):
        assert result[key] == pytest.approx(expected_coco, abs=1e-12)


def test_voc07_eleven_point_on_duplicate_case():
    result = _duplicate_case(use_07_metric=True)
    # Recall thresholds 0, .1, .2, .3, .4, .5 see max precision 1 (recall 1/2 reached
    # at precision 1); .6 .. 1.0 see 2/3. AP = (6 * 1 + 5 * 2/3) / 11 = 28/33.
    assert result["mAP_r@0.5"] == pytest.approx(28 / 33, abs=1e-12)
    assert "VOC07" in result["protocol"]


def test_voc07_thresholds_are_those_mnc_and_fcis_used():
    # 10 instances in 10 images, 3 found first, then 2 misses: recall tops out at 3/10.
    # MNC/FCIS loop over np.arange(0., 1.1, 0.1), whose fourth value is
    # 0.30000000000000004 > 3/10: only t = 0, .1, .2 see precision 1 -> AP = 3/11
    # (exact tenths would give 4/11).
    evaluator = _evaluator(1, use_07_metric=True)
    gt = np.zeros((4, 4), np.int32)
    gt[0:2, 0:2] = 1
    for i in range(10):
        masks = (gt == 1)[None] if i < 3 else _box((4, 4), 2, 4, 2, 4)[None]
        evaluator.add(gt, [1], masks if i < 5 else masks[:0], [1] if i < 5 else [],
                      [1.0 - i / 10] if i < 5 else [])
    assert evaluator.result()["mAP_r@0.5"] == pytest.approx(3 / 11, abs=1e-12)


def test_thresholds_are_inclusive():
    gt = np.zeros((4, 4), np.int32)
    gt[0:2, 0:2] = 1
    evaluator = _evaluator(1)
    evaluator.add(gt, [1], _box((4, 4), 0, 2, 0, 4)[None], [1], [1.0])  # IoU 4/8
    result = evaluator.result()
    assert result["mAP_r@0.5"] == 1.0
    assert result["mAP_r@0.6"] == 0.0
    assert result["AR@0.5@10"] == 1.0
    assert result["coco_mask_AP50"] == pytest.approx(1.0, abs=1e-12)
    assert result["coco_mask_AP"] == pytest.approx(0.1, abs=1e-12)


def test_wrong_class_is_a_false_positive():
    evaluator = _evaluator(2, proposal_counts=(1, 2, 3))
    gt = np.zeros((8, 10), np.int32)
    gt[0:3, 0:4] = 1  # instance a, class 1
    gt[4:8, 5:10] = 2  # instance b, class 2
    masks = np.stack([gt == 1, gt == 2, gt == 1])
    evaluator.add(gt, [1, 2], masks, [2, 2, 1], [0.9, 0.8, 0.7])
    result = evaluator.result()
    # Class 2: mask of a (no overlap with b) is FP, then b is TP: recall 0, 1;
    # precision 0, 1/2 -> AP = 1 * 1/2. Class 1: one TP -> 1. mAP = 3/4.
    assert result["AP_r@0.5/class_2"] == pytest.approx(0.5)
    assert result["AP_r@0.5/class_1"] == pytest.approx(1.0)
    assert result["mAP_r@0.5"] == pytest.approx(0.75)
    # Recall is class-agnostic: the top prediction (mask of a, class 2) recalls a.
    assert result["AR@0.5@1"] == pytest.approx(0.5)
    assert result["AR@0.5@2"] == pytest.approx(1.0)


def _void_case():
    gt = np.zeros((4, 6), np.int32)
    gt[0:2, 0:2] = 1  # 4 instance pixels
    gt[0:2, 2:4] = -1  # 4 void pixels
    pred = np.zeros((4, 6), bool)
    pred[0:2, 0:4] = True  # instance + void
    pred[2, 0:2] = True  # 2 background pixels
    return gt, pred


def test_void_pixels_in_iou_both_options():
    gt, pred = _void_case()
    overlaps = matching.mask_overlaps(gt, pred[None], 1)
    assert overlaps.intersections.tolist() == [[4]]
    assert overlaps.pred_areas.tolist() == [10]
    assert overlaps.pred_void_areas.tolist() == [4]
    assert overlaps.gt_areas.tolist() == [4]
    # Excluded: union = 4 instance + 2 background = 6. As background: union = 10.
    np.testing.assert_allclose(matching.ious_from_overlaps(overlaps), [[4 / 6]])
    np.testing.assert_allclose(
        matching.ious_from_overlaps(overlaps, ignore_as_background=True), [[0.4]])


@pytest.mark.parametrize("without_bitwise_count", [False, True])
def test_mask_overlaps_against_pairwise_counts(monkeypatch, without_bitwise_count):
    if without_bitwise_count and hasattr(np, "bitwise_count"):
        monkeypatch.delattr(np, "bitwise_count")  # the NumPy < 2 path
    rng = np.random.default_rng(1)
    for shape in [(1, 1), (7, 9), (13, 67), (64, 65)]:  # sizes off the 64-bit words
        gt = rng.integers(-1, 5, size=shape).astype(np.int32)
        masks = rng.random((6,) + shape) < 0.4
        overlaps = matching.mask_overlaps(gt, masks, 5)
        for k, mask in enumerate(masks):
            assert overlaps.pred_areas[k] == mask.sum()
            assert overlaps.pred_void_areas[k] == (mask & (gt == -1)).sum()
            for n in range(5):
                assert overlaps.intersections[k, n] == (mask & (gt == n + 1)).sum()
        assert overlaps.gt_areas.tolist() == [(gt == n + 1).sum() for n in range(5)]


@pytest.mark.parametrize("ignore_as_background", [False, True])
def test_void_pixels_change_metrics(ignore_as_background):
    gt, pred = _void_case()
    evaluator = _evaluator(1, ignore_as_background=ignore_as_background)
    evaluator.add(gt, [1], pred[None], [1], [0.5])
    result = evaluator.result()
    if ignore_as_background:
        # IoU 0.4 is below every threshold.
        expected = {"0.5": 0.0, "0.6": 0.0, "0.7": 0.0}
        assert "background" in result["protocol"]
    else:
        # IoU 2/3: a TP at 0.5 and 0.6, a FP at 0.7.
        expected = {"0.5": 1.0, "0.6": 1.0, "0.7": 0.0}
        assert "excluded" in result["protocol"]
    for t, value in expected.items():
        assert result[f"mAP_r@{t}"] == pytest.approx(value)
    assert result["AR@0.5@10"] == (0.0 if ignore_as_background else 1.0)
    # COCO always drops void pixels from the masks: IoU 2/3 passes 0.50, 0.55, 0.60 and
    # 0.65 of its 10 thresholds, each with precision 1 everywhere -> 4/10.
    assert result["coco_mask_AP"] == pytest.approx(0.4, abs=1e-12)
    assert result["coco_mask_AP50"] == pytest.approx(1.0, abs=1e-12)
    assert result["coco_mask_AP75"] == 0.0


def test_classes_without_ground_truth_are_left_out_of_the_mean():
    evaluator = _evaluator(3)
    gt = np.zeros((8, 8), np.int32)
    gt[0:3, 0:3] = 1  # class 1
    gt[5:8, 5:8] = 2  # class 3, never predicted
    masks = np.stack([gt == 1, _box((8, 8), 4, 6, 0, 3)])
    evaluator.add(gt, [1, 3], masks, [1, 2], [0.9, 0.8])
    result = evaluator.result()
    # Class 1: AP 1; class 3: AP 0; class 2 has no ground truth: mean of two classes.
    assert result["AP_r@0.5/class_1"] == 1.0
    assert result["AP_r@0.5/class_3"] == 0.0
    assert math.isnan(result["AP_r@0.5/class_2"])
    assert result["mAP_r@0.5"] == pytest.approx(0.5)
    assert result["coco_mask_AP"] == pytest.approx(0.5, abs=1e-12)


def test_no_fall_back_to_the_next_best_instance():
    gt = np.zeros((4, 10), np.int32)
    gt[0, 0:10] = 1  # A: 10 pixels
    gt[1:3, 0:6] = 2  # B: 12 pixels
    second = gt == 1
    second[1, 0:6] = True
    second[2, 0:4] = True  # A plus 10 pixels of B
    masks = np.stack([gt == 1, second])
    # IoU(second, A) = 10 / 20 = 0.5; IoU(second, B) = 10 / (20 + 12 - 10) = 10/22.
    evaluator = _evaluator(1, iou_thresholds=(0.4,))
    evaluator.add(gt, [1, 1], masks, [1, 1], [0.9, 0.8])
    # The second mask's best instance, A, is already detected: a false positive even
    # though B (IoU 0.45 >= 0.4) is free. recall 1/2, 1/2; precision 1, 1/2 -> AP 1/2.
    # Falling back to B would have given AP 1.
    assert evaluator.result()["mAP_r@0.4"] == pytest.approx(0.5)
    ious = np.array([[1.0, 0.0], [0.5, 10 / 22]])
    assert matching.sds_true_positives(ious, [0.4]).tolist() == [[True, False]]
    # COCO's greedy matching, by contrast, does fall back.
    assert matching.coco_greedy_match(ious, np.array([0.4])).tolist() == [[True, True]]


def test_coco_matching_ties_pick_the_last_instance():
    # Prediction 0 has IoU 0.6 with both instances: COCOeval keeps the last one, so
    # prediction 1 (IoU 0.6 with instance 0 only) still finds a match.
    ious = np.array([[0.6, 0.6], [0.6, 0.0]])
    assert matching.coco_greedy_match(ious, np.array([0.5])).tolist() == [[True, True]]
    # SDS takes the first best instance, so prediction 1 duplicates it.
    assert matching.sds_true_positives(ious, [0.5]).tolist() == [[True, False]]


def test_equal_scores_keep_image_order():
    # Two images, one instance each, one prediction each with the same score: image 1's
    # is a FP, image 2's a TP. Stable order: FP then TP -> precision 0, 1/2 at recall
    # 0, 1/2 -> AP = 1/2 * 1/2 = 1/4. The reverse order would give 1/2.
    evaluator = _evaluator(1)
    gt = np.zeros((6, 6), np.int32)
    gt[0:3, 0:3] = 1
    evaluator.add(gt, [1], _box((6, 6), 4, 6, 4, 6)[None], [1], [0.5])
    evaluator.add(gt, [1], (gt == 1)[None], [1], [0.5])
    # Two instances in total, only the second found.
    assert evaluator.result()["mAP_r@0.5"] == pytest.approx(0.25)


def test_instances_without_pixels_are_not_counted():
    evaluator = _evaluator(1)
    gt = np.zeros((5, 5), np.int32)
    gt[0:2, 0:2] = 2  # instance 1 has no pixel
    evaluator.add(gt, [1, 1], (gt == 2)[None], [1], [1.0])
    result = evaluator.result()
    assert result["num_instances"] == 1
    assert result["mAP_r@0.5"] == 1.0


def test_empty_evaluator_and_empty_images():
    evaluator = _evaluator(2)
    result = evaluator.result()
    assert result["num_images"] == 0
    assert math.isnan(result["mAP_r@0.5"]) and math.isnan(result["coco_mask_AP"])
    evaluator.add(np.zeros((4, 4), np.int32), np.zeros((0,), np.int32),
                  np.zeros((0, 4, 4), bool), np.zeros((0,), np.int32), np.zeros((0,)))
    assert evaluator.result()["num_images"] == 1


def test_integer_masks_equal_boolean_masks():
    gt = np.zeros((6, 7), np.int32)
    gt[1:4, 1:5] = 1
    masks = np.stack([_box((6, 7), 1, 4, 1, 4), _box((6, 7), 0, 5, 0, 6)])
    results = []
    for m in (masks, masks.astype(np.uint8) * 255):
        evaluator = _evaluator(1)
        evaluator.add(gt, [1], m, [1, 1], [0.4, 0.6])
        results.append(evaluator.result())
    assert results[0] == results[1]


def test_result_keys():
    evaluator = evaluation.InstanceEvaluator(2, class_names=["cat", "dog"],
                                             proposal_counts=(5, 50))
    evaluator.add(np.ones((3, 3), np.int32), [2], np.ones((1, 3, 3), bool), [2], [1.0])
    expected = {"mAP_r@0.5", "mAP_r@0.6", "mAP_r@0.7", "AR@0.5@5", "AR@0.5@50",
                "coco_mask_AP", "coco_mask_AP50", "coco_mask_AP75", "num_images",
                "num_instances", "protocol"}
    expected |= {f"AP_r@{t}/{c}" for t in ("0.5", "0.6", "0.7") for c in ("cat", "dog")}
    assert set(evaluator.result()) == expected


@pytest.mark.parametrize("args, match", [
    ((np.zeros((4, 4), np.float32), [], np.zeros((0, 4, 4), bool), [], []), "gt_instances"),
    ((np.full((4, 4), 2, np.int32), [1], np.zeros((0, 4, 4), bool), [], []), "gt_instances"),
    ((np.ones((4, 4), np.int32), [3], np.zeros((0, 4, 4), bool), [], []), "gt_classes"),
    ((np.ones((4, 4), np.int32), [1], np.zeros((1, 4, 5), bool), [1], [1.0]), "pred_masks"),
    ((np.ones((4, 4), np.int32), [1], np.zeros((1, 4, 4), np.float32), [1], [1.0]),
     "pred_masks"),
    ((np.ones((4, 4), np.int32), [1], np.zeros((1, 4, 4), bool), [0], [1.0]), "pred_classes"),
    ((np.ones((4, 4), np.int32), [1], np.zeros((1, 4, 4), bool), [1, 1], [1.0]),
     "pred_classes"),
    ((np.ones((4, 4), np.int32), [1], np.zeros((1, 4, 4), bool), [1], [np.nan]),
     "pred_scores"),
])
def test_bad_input_names_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        _evaluator(2).add(*args)


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="class_names"):
        evaluation.InstanceEvaluator(2, class_names=["a"])
    with pytest.raises(ValueError, match="iou_thresholds"):
        evaluation.InstanceEvaluator(2, iou_thresholds=(0.0,))
    with pytest.raises(ValueError, match="proposal_counts"):
        evaluation.InstanceEvaluator(2, proposal_counts=(0,))


# ---------------------------------------------------------------------------------------
# Random splits, pycocotools and reference implementations.


def _random_shape(rng, shape):
    height, width = shape
    y0, x0 = rng.integers(0, height - 2), rng.integers(0, width - 2)
    y1 = rng.integers(y0 + 1, min(height, y0 + height // 2) + 1)
    x1 = rng.integers(x0 + 1, min(width, x0 + width // 2) + 1)
    if rng.random() < 0.5:
        return _box(shape, y0, y1, x0, x1)
    yy, xx = np.mgrid[:height, :width]
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    ry, rx = max((y1 - y0) / 2, 1.0), max((x1 - x0) / 2, 1.0)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _random_image(rng, num_classes, max_instances, max_preds):
    shape = (int(rng.integers(20, 36)), int(rng.integers(20, 36)))
    num_instances = int(rng.integers(0, max_instances + 1))
    gt = np.zeros(shape, np.int32)
    classes = rng.integers(1, num_classes + 1, size=num_instances).astype(np.int32)
    for i in range(num_instances):
        gt[_random_shape(rng, shape)] = i + 1  # later instances occlude earlier ones
    if rng.random() < 0.6:
        gt[_random_shape(rng, shape)] = -1
    num_preds = int(rng.integers(0, max_preds + 1))
    masks, pred_classes, derived = [], [], []
    for _ in range(num_preds):
        derived.append(num_instances > 0 and rng.random() < 0.6)
        if derived[-1]:
            i = int(rng.integers(num_instances))
            mask = gt == i + 1
            if rng.random() < 0.5:
                mask = np.roll(mask, tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
            if rng.random() < 0.5:
                mask = mask | (_random_shape(rng, shape) & (rng.random(shape) < 0.2))
            c = classes[i] if rng.random() < 0.8 else rng.integers(1, num_classes + 1)
        else:
            mask = _random_shape(rng, shape)
            c = rng.integers(1, num_classes + 1)
        masks.append(mask)
        pred_classes.append(int(c))
    masks = np.array(masks, bool).reshape((num_preds,) + shape)
    # Scores on a coarse grid so that ties within and across images are common; masks
    # derived from an instance tend to score higher, as a useful model's do.
    scores = np.round(0.6 * rng.random(num_preds) + 0.4 * np.array(derived, float), 1)
    return gt, classes, masks, np.array(pred_classes, np.int32), scores


def _random_split(seed, num_images=12, num_classes=3, max_instances=5, max_preds=12):
    rng = np.random.default_rng(seed)
    return [_random_image(rng, num_classes, max_instances, max_preds)
            for _ in range(num_images)]


def _run_pycocotools(images, num_classes):
    mask_util = pytest.importorskip("pycocotools.mask")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = {"images": [], "annotations": [],
               "categories": [{"id": c, "name": str(c)} for c in range(1, num_classes + 1)]}
    results = []
    for index, (gt, classes, masks, pred_classes, scores) in enumerate(images):
        image_id = index + 1
        dataset["images"].append({"id": image_id, "height": gt.shape[0],
                                  "width": gt.shape[1]})
        for i, c in enumerate(classes):
            mask = gt == i + 1
            if not mask.any():
                continue
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image_id,
                "category_id": int(c), "segmentation": rle, "area": float(mask.sum()),
                "bbox": mask_util.toBbox(rle).tolist(), "iscrowd": 0})
        for mask, c, score in zip(masks, pred_classes, scores):
            clipped = mask & (gt != -1)
            results.append({"image_id": image_id, "category_id": int(c), "score": float(score),
                            "segmentation": mask_util.encode(
                                np.asfortranarray(clipped.astype(np.uint8)))})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = dataset
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval.stats


def _evaluate(images, num_classes, **kwargs):
    evaluator = evaluation.InstanceEvaluator(num_classes, **kwargs)
    for image in images:
        evaluator.add(*image)
    return evaluator.result()


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("ignore_as_background", [False, True])
def test_coco_ap_agrees_with_pycocotools(seed, ignore_as_background):
    images = _random_split(seed)
    stats = _run_pycocotools(images, 3)
    result = _evaluate(images, 3, ignore_as_background=ignore_as_background)
    assert stats[0] > 0.05  # the split has real matches, not only misses
    assert result["coco_mask_AP"] == pytest.approx(stats[0], abs=1e-9)
    assert result["coco_mask_AP50"] == pytest.approx(stats[1], abs=1e-9)
    assert result["coco_mask_AP75"] == pytest.approx(stats[2], abs=1e-9)


def test_coco_max_detections_cut_per_image_and_class():
    rng = np.random.default_rng(7)
    images = []
    for _ in range(3):
        gt = np.zeros((24, 24), np.int32)
        gt[2:10, 2:10] = 1
        gt[12:20, 4:22] = 2
        # 110 high-scored misses of class 1 push the exact class-1 masks past rank 100;
        # class 2's exact mask stays within its own top 100.
        noise = [_random_shape(rng, gt.shape) & (gt == 0) for _ in range(110)]
        masks = np.array(noise + [gt == 1, gt == 2])
        classes = np.array([1] * 111 + [2], np.int32)
        scores = np.concatenate([0.5 + 0.5 * rng.random(110), [0.1, 0.05]])
        images.append((gt, np.array([1, 2], np.int32), masks, classes, scores))
    stats = _run_pycocotools(images, 2)
    result = _evaluate(images, 2)
    # Class 1 is never matched within its top 100; class 2 is perfect: mean 0.5.
    assert stats[0] == pytest.approx(0.5, abs=1e-12)
    assert result["coco_mask_AP"] == pytest.approx(stats[0], abs=1e-9)
    # mAP^r has no cap: class 1 is found, after 3 * 110 false positives.
    assert result["AP_r@0.5/class_1"] > 0.0


def _pair_iou(gt, instance_id, mask, ignore_as_background):
    instance = gt == instance_id
    if not ignore_as_background:
        mask = mask & (gt != -1)
    union = np.logical_or(instance, mask).sum()
    return np.logical_and(instance, mask).sum() / union if union else 0.0


def _reference_voc_ap(tp, num_positives, use_07_metric):
    tp = np.asarray(tp, float)
    fp = 1.0 - tp
    recall = np.cumsum(tp) / num_positives
    precision = np.cumsum(tp) / np.maximum(np.cumsum(tp) + np.cumsum(fp), 1e-300)
    if use_07_metric:
        total = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            total += (precision[recall >= t].max() if (recall >= t).any() else 0.0) / 11
        return total
    mrec = [0.0] + list(recall) + [1.0]
    mpre = [0.0] + list(precision) + [0.0]
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    return sum((mrec[i + 1] - mrec[i]) * mpre[i + 1] for i in range(len(mrec) - 1)
               if mrec[i + 1] != mrec[i])


def _reference_sds(images, num_classes, threshold, ignore_as_background, use_07_metric):
    """Per-class AP (NaN without ground truth), one detection at a time as in MNC/FCIS."""
    aps = []
    for c in range(1, num_classes + 1):
        detections = []
        num_positives = 0
        for index, (gt, classes, masks, pred_classes, scores) in enumerate(images):
            num_positives += sum(1 for i, k in enumerate(classes)
                                 if k == c and (gt == i + 1).any())
            detections += [(s, index, m) for m, k, s in zip(masks, pred_classes, scores)
                           if k == c]
        if num_positives == 0:
            aps.append(math.nan)
            continue
        detections = sorted(detections, key=lambda d: -d[0])
        detected = set()
        tp = []
        for _, index, mask in detections:
            gt, classes = images[index][0], images[index][1]
            best_iou, best = -1.0, None
            for i, k in enumerate(classes):
                if k != c:
                    continue
                iou = _pair_iou(gt, i + 1, mask, ignore_as_background)
                if iou > best_iou:
                    best_iou, best = iou, i
            hit = best is not None and best_iou >= threshold and (index, best) not in detected
            if hit:
                detected.add((index, best))
            tp.append(hit)
        aps.append(_reference_voc_ap(tp, num_positives, use_07_metric))
    return aps


@pytest.mark.parametrize("seed, ignore_as_background, use_07_metric", [
    (10, False, False), (11, True, False), (12, False, True), (13, True, True)])
def test_map_r_agrees_with_reference(seed, ignore_as_background, use_07_metric):
    images = _random_split(seed, num_classes=4)
    result = _evaluate(images, 4, ignore_as_background=ignore_as_background,
                       use_07_metric=use_07_metric)
    for threshold in (0.5, 0.6, 0.7):
        expected = _reference_sds(images, 4, threshold, ignore_as_background, use_07_metric)
        got = [result[f"AP_r@{threshold:g}/class_{c}"] for c in range(1, 5)]
        np.testing.assert_allclose(got, expected, atol=1e-12)
        assert result[f"mAP_r@{threshold:g}"] == pytest.approx(np.nanmean(expected),
                                                               abs=1e-12)
    assert any(0 < v < 1 for v in got)  # not a degenerate split


def _reference_recall(images, counts, ignore_as_background):
    recalled = {n: 0 for n in counts}
    total = 0
    for gt, classes, masks, _, scores in images:
        ranked = [masks[k] for k in sorted(range(len(scores)), key=lambda k: -scores[k])]
        for i in range(len(classes)):
            if not (gt == i + 1).any():
                continue
            total += 1
            ious = [_pair_iou(gt, i + 1, m, ignore_as_background) for m in ranked]
            for n in counts:
                recalled[n] += any(iou >= 0.5 for iou in ious[:n])
    return {n: recalled[n] / total for n in counts}


@pytest.mark.parametrize("seed, ignore_as_background", [(20, False), (21, True)])
def test_recall_counts_agree_with_reference(seed, ignore_as_background):
    counts = (1, 2, 3, 5, 10, 20, 100)
    images = _random_split(seed, max_preds=30)
    result = _evaluate(images, 3, proposal_counts=counts,
                       ignore_as_background=ignore_as_background)
    expected = _reference_recall(images, counts, ignore_as_background)
    for n in counts:
        assert result[f"AR@0.5@{n}"] == pytest.approx(expected[n], abs=1e-12)
    assert expected[1] < expected[100]  # more proposals recall more here


def _state_nbytes(value, seen=None):
    """Bytes of all NumPy arrays reachable from an object's attributes."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_state_nbytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_state_nbytes(v, seen) for v in value)
    if hasattr(value, "__dict__"):
        return _state_nbytes(vars(value), seen)
    return 0


def test_state_does_not_hold_masks():
    rng = np.random.default_rng(3)
    small, large = _evaluator(3), _evaluator(3)
    mask_bytes = 0
    for _ in range(20):
        gt, classes, masks, pred_classes, scores = _random_image(rng, 3, 5, 40)
        small.add(gt, classes, masks, pred_classes, scores)
        # The same image at 8x the resolution in each direction: same matches.
        big_masks = np.kron(masks, np.ones((1, 8, 8), bool))
        large.add(np.kron(gt, np.ones((8, 8), np.int32)), classes, big_masks,
                  pred_classes, scores)
        mask_bytes += big_masks.nbytes
    # NaN-safe comparison of the two results.
    assert json.dumps(small.result()) == json.dumps(large.result())
    state = _state_nbytes(large)
    assert state == _state_nbytes(small)
    assert state < mask_bytes / 100


# ---------------------------------------------------------------------------------------
# Writers.


def test_write_metrics_json(tmp_path):
    result = _duplicate_case()
    result["AP_r@0.5/unseen"] = math.nan
    path = evaluation.write_metrics_json(result, str(tmp_path / "run" / "metrics.json"))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert "NaN" not in text
    loaded = json.loads(text)
    assert loaded["AP_r@0.5/unseen"] is None
    assert loaded["mAP_r@0.5"] == pytest.approx(5 / 6)
    assert loaded["num_images"] == 2
    assert set(loaded) == set(result)
    # A directory gets metrics.json inside it.
    assert evaluation.write_metrics_json(result, str(tmp_path)).endswith("metrics.json")


def test_format_table_matches_table_1_layout():
    result = {
        "mAP_r@0.5": 0.621, "mAP_r@0.7": 0.415,
        "AP_r@0.5/plane": 0.697, "AP_r@0.5/bike": math.nan,
        "AP_r@0.7/plane": 0.53, "AP_r@0.7/bike": math.nan,
        "AR@0.5@10": 0.558, "AR@0.5@100": 0.719,
        "coco_mask_AP": 0.3, "coco_mask_AP50": 0.5, "coco_mask_AP75": 0.25,
        "num_images": 1449, "num_instances": 3438, "protocol": "the protocol line",
    }
    table = evaluation.format_table(result)
    lines = table.splitlines()
    assert "1449 images" in lines[0] and "3438 instances" in lines[0]
    assert "the protocol line" in lines[1]
    assert lines[2].split() == ["IoU", "plane", "bike", "average"]
    assert lines[3].split() == ["0.5", "69.7", "-", "62.1"]
    assert lines[4].split() == ["0.7", "53.0", "-", "41.5"]
    assert "10: 55.8" in table and "100: 71.9" in table
    assert "AP 30.0" in table and "AP50 50.0" in table and "AP75 25.0" in table
    # Columns in a caller's order.
    assert evaluation.format_table(result, ["bike", "plane"]).splitlines()[3].split() == [
        "0.5", "-", "69.7", "62.1"]
    with pytest.raises(ValueError, match="class_names"):
        evaluation.format_table(result, ["cat"])


def test_save_plots_writes_pngs(tmp_path):
    evaluator = evaluation.InstanceEvaluator(3, class_names=["a", "b", "c"])
    for image in _random_split(5, num_images=4):
        evaluator.add(*image)
    paths = evaluation.save_plots(evaluator, str(tmp_path / "plots"))
    paths += evaluation.save_plots(evaluator.curves(0.7), str(tmp_path / "plots07"))
    assert len(paths) == 4
    assert any(p.endswith("precision_recall_iou0.7.png") for p in paths)
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
    with pytest.raises(TypeError, match="evaluator_or_curves"):
        evaluation.save_plots({}, str(tmp_path))


def test_curves_match_result():
    evaluator = evaluation.InstanceEvaluator(3, proposal_counts=(1, 5))
    for image in _random_split(6):
        evaluator.add(*image)
    result = evaluator.result()
    curves = evaluator.curves()
    assert curves.iou_threshold == 0.5
    for name, curve in curves.precision_recall.items():
        assert curve.average_precision == result[f"AP_r@0.5/{name}"]
        assert curve.recall.shape == curve.precision.shape
    assert curves.recall[0] == result["AR@0.5@1"]
    assert curves.recall[4] == result["AR@0.5@5"]
    with pytest.raises(ValueError, match="iou_threshold"):
        evaluator.curves(0.55)
