"""Property-based fuzzing of the inference ops and the evaluator (hypothesis).

Random shapes (including 1 x 1 maps, more seeds than pixels, images smaller than the
heads' maps), random values (tiny, huge and tied embeddings; saturated logits; zero and
NaN seediness) and random options. The properties are the documented contracts:
output shapes and dtypes, value ranges, the ordering and validity rules of the
detections, and that bad arguments raise exactly the documented exception types.
Example counts are modest so the file runs in well under a minute; the database is off
so runs leave no files behind.
"""

import math

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instance_embed import evaluation
from instance_embed import inference
from instance_embed import ops

FUZZ = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _embeddings(rng, batch, height, width, dim, scale, ties):
    embeddings = scale * rng.normal(size=(batch, height, width, dim))
    if ties:  # whole regions share one embedding: distance 0, tied scores
        flat = embeddings.reshape(batch, height * width, dim)
        flat[:, rng.random(height * width) < 0.5] = flat[:, :1]
    return embeddings.astype(np.float32)


@st.composite
def heads_outputs(draw):
    """Random heads outputs and inference settings."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    batch = draw(st.integers(1, 2))
    height, width = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    dim = draw(st.integers(1, 4))
    num_classes = draw(st.integers(1, 3))
    taus = draw(st.lists(st.floats(0.05, 1.0), min_size=1, max_size=3, unique=True))
    embeddings = _embeddings(rng, batch, height, width, dim,
                             draw(st.sampled_from([1e-4, 1.0, 1e3])), draw(st.booleans()))
    logit_scale = draw(st.sampled_from([0.1, 3.0, 200.0]))
    logits = (logit_scale * rng.normal(
        size=(batch, height, width, len(taus), num_classes + 1))).astype(np.float32)
    config = inference.InferenceConfig(
        num_seeds=draw(st.integers(1, 12)), alpha=draw(st.floats(0.0, 3.0)),
        score_threshold=draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
        nms_iou_threshold=draw(st.sampled_from([None, None, 0.0, 0.5, 1.0])))
    # Masks are drawn at a whole stride per axis, then cropped (as the predictor pads).
    image_size = (height * draw(st.integers(1, 4)), width * draw(st.integers(1, 4)))
    crop_size = draw(st.one_of(st.none(), st.tuples(st.integers(1, image_size[0]),
                                                    st.integers(1, image_size[1]))))
    return embeddings, logits, image_size, crop_size, taus, config


@FUZZ
@given(heads_outputs())
def test_predict_instances_outputs_keep_their_contract(case):
    embeddings, logits, image_size, crop_size, taus, config = case
    batch, height, width = embeddings.shape[:3]
    num_classes = logits.shape[-1] - 1
    k = config.num_seeds
    out = {key: v.numpy() for key, v in inference.predict_instances(
        tf.constant(embeddings), tf.constant(logits), image_size, taus, config,
        crop_size=crop_size).items()}
    big_h, big_w = crop_size or image_size
    assert out["detection_masks"].shape == (batch, k, big_h, big_w)
    assert out["detection_masks"].dtype == bool
    assert out["instance_map"].shape == (batch, big_h, big_w)
    for key in ("detection_classes", "detection_scores", "detection_taus", "seed_indices"):
        assert out[key].shape == (batch, k), key

    for b in range(batch):
        n = int(out["num_detections"][b])
        assert 0 <= n <= min(k, height * width)
        if config.score_threshold == 0 and config.nms_iou_threshold is None:
            # Only seeds that do not exist (K > h * w) are invalid.
            assert n == min(k, height * width)
        classes, scores = out["detection_classes"][b], out["detection_scores"][b]
        seeds, seed_taus = out["seed_indices"][b], out["detection_taus"][b]
        masks = out["detection_masks"][b]
        assert np.all((classes[:n] >= 1) & (classes[:n] <= num_classes))
        assert np.all(classes[n:] == 0)
        assert np.all(np.isfinite(scores))
        assert np.all((scores[:n] >= config.score_threshold) & (scores[:n] <= 1))
        assert np.all(np.diff(scores[:n]) <= 0)
        assert np.all(scores[n:] == 0)
        assert np.all(np.isin(seed_taus[:n], np.float32(taus))) and np.all(seed_taus[n:] == 0)
        assert np.all((seeds[:n] >= 0) & (seeds[:n] < height * width))
        assert len(set(seeds[:n].tolist())) == n
        assert np.all(seeds[n:] == -1)
        assert not masks[n:].any()
        instance_map = out["instance_map"][b]
        assert instance_map.min() >= 0 and instance_map.max() <= n
        covered = masks.any(axis=0)
        np.testing.assert_array_equal(instance_map > 0, covered)
        np.testing.assert_array_equal(instance_map[covered],
                                      np.argmax(masks, axis=0)[covered] + 1)
        for mask, box in zip(masks, out["detection_boxes"][b]):
            rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            want = ([rows[0], columns[0], rows[-1] + 1, columns[-1] + 1] if mask.any()
                    else [0, 0, 0, 0])
            np.testing.assert_array_equal(box, want)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 5), st.integers(1, 30),
       st.floats(0.0, 5.0), st.sampled_from(["uniform", "zeros", "nan", "binary"]),
       st.booleans())
def test_select_seeds_never_repeats_and_respects_valid_pixels(seed, height, width,
                                                              num_seeds, alpha, kind,
                                                              restrict):
    rng = np.random.default_rng(seed)
    batch = 2
    embeddings = _embeddings(rng, batch, height, width, 3, 1.0, ties=bool(seed % 2))
    seediness = {
        "uniform": rng.random((batch, height, width)),
        "zeros": np.zeros((batch, height, width)),
        "nan": np.where(rng.random((batch, height, width)) < 0.3, np.nan,
                        rng.random((batch, height, width))),
        "binary": (rng.random((batch, height, width)) < 0.5) * 1.0,
    }[kind].astype(np.float32)
    valid = rng.random((batch, height, width)) < 0.6 if restrict else None
    seeds = ops.select_seeds(tf.constant(embeddings), tf.constant(seediness),
                             num_seeds, alpha,
                             None if valid is None else tf.constant(valid)).numpy()
    assert seeds.shape == (batch, num_seeds) and seeds.dtype == np.int32
    for b in range(batch):
        allowed = (np.ones(height * width, bool) if valid is None
                   else valid[b].reshape(-1))
        count = min(num_seeds, int(allowed.sum()))
        chosen = seeds[b, :count]
        assert len(set(chosen.tolist())) == count
        assert np.all(allowed[chosen])
        np.testing.assert_array_equal(seeds[b, count:], -1)
        if count:
            # The first seed is the most seedy allowed pixel (NaN counts as -inf).
            values = np.where(allowed & ~np.isnan(seediness[b].reshape(-1)),
                              seediness[b].reshape(-1), -np.inf)
            assert values[chosen[0]] == values.max()


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 6), st.integers(1, 8),
       st.sampled_from([1e-4, 1.0, 1e3]))
def test_grow_masks_holds_its_seed_and_missing_seeds_are_empty(seed, height, width,
                                                               num_seeds, scale):
    rng = np.random.default_rng(seed)
    embeddings = _embeddings(rng, 1, height, width, 2, scale, ties=False)
    seeds = rng.integers(-1, height * width, (1, num_seeds)).astype(np.int32)
    taus = rng.uniform(0.01, 1.0, (1, num_seeds)).astype(np.float32)
    masks = ops.grow_masks(tf.constant(embeddings), tf.constant(seeds),
                           tf.constant(taus)).numpy()
    assert masks.shape == (1, num_seeds, height, width) and masks.dtype == bool
    flat = masks.reshape(num_seeds, -1)
    for k, index in enumerate(seeds[0]):
        if index < 0:
            assert not flat[k].any()
        else:
            assert flat[k, index]


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.sampled_from([0.1, 10.0, 300.0]))
def test_seediness_is_a_probability(seed, num_classes, scale):
    rng = np.random.default_rng(seed)
    logits = scale * rng.normal(size=(1, 3, 4, 2, num_classes + 1))
    probs = tf.nn.softmax(tf.constant(logits, tf.float32), axis=-1)
    values = ops.seediness(probs).numpy()
    assert values.shape == (1, 3, 4)
    assert np.all((values >= 0) & (values <= 1))
    np.testing.assert_allclose(values, probs.numpy()[..., 1:].max(axis=(-2, -1)))


_ANY_NUMBER = st.one_of(st.integers(-3, 200), st.floats(allow_nan=True, allow_infinity=True),
                        st.booleans(), st.just("5"))


@FUZZ
@given(_ANY_NUMBER, _ANY_NUMBER, _ANY_NUMBER, st.one_of(st.none(), _ANY_NUMBER))
def test_inference_config_accepts_exactly_the_documented_ranges(num_seeds, alpha,
                                                                score_threshold, nms):
    def real(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    ok = (isinstance(num_seeds, int) and not isinstance(num_seeds, bool) and num_seeds >= 1
          and real(alpha) and math.isfinite(alpha) and alpha >= 0
          and real(score_threshold) and 0 <= score_threshold <= 1
          and (nms is None or real(nms) and 0 <= nms <= 1))
    kwargs = dict(num_seeds=num_seeds, alpha=alpha, score_threshold=score_threshold,
                  nms_iou_threshold=nms)
    if ok:
        inference.InferenceConfig(**kwargs)
    else:
        with pytest.raises(ValueError, match="InferenceConfig"):
            inference.InferenceConfig(**kwargs)


# ---------------------------------------------------------------------------------------
# The evaluator.


def _random_image(rng, num_classes):
    """(gt_instances, gt_classes, pred_masks, pred_classes, pred_scores) of one image."""
    height, width = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    num_instances = int(rng.integers(0, 6))
    # Ids 1..N, some absent from the map; -1 void here and there.
    gt = rng.integers(-1, num_instances + 1, (height, width))
    if rng.random() < 0.5:  # blocky maps make real overlaps more likely
        gt = np.kron(rng.integers(-1, num_instances + 1, (4, 4)),
                     np.ones((4, 4), np.int64))[:height, :width]
    gt_classes = rng.integers(1, num_classes + 1, num_instances)
    num_preds = int(rng.integers(0, 7))
    masks = rng.random((num_preds, height, width)) < rng.random()
    for k in range(num_preds):  # some predictions copy or roughen a ground-truth mask
        if num_instances and rng.random() < 0.5:
            masks[k] = (gt == rng.integers(1, num_instances + 1)) ^ (
                rng.random((height, width)) < 0.1 * rng.random())
    classes = rng.integers(1, num_classes + 1, num_preds)
    scores = np.round(rng.random(num_preds), int(rng.integers(0, 3)))  # ties
    return gt.astype(np.int32), gt_classes, masks, classes, scores


def _options(rng):
    return dict(
        iou_thresholds=tuple(sorted(rng.choice([0.5, 0.6, 0.7, 0.9], int(rng.integers(1, 4)),
                                               replace=False))),
        proposal_counts=tuple(sorted(set(rng.integers(1, 12, 3).tolist()))),
        use_07_metric=bool(rng.random() < 0.5),
        ignore_as_background=bool(rng.random() < 0.5),
        coco_max_detections=int(rng.integers(1, 5)))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(0, 4))
def test_evaluator_results_are_fractions_with_nan_only_without_ground_truth(seed,
                                                                           num_classes,
                                                                           num_images):
    rng = np.random.default_rng(seed)
    options = _options(rng)
    evaluator = evaluation.InstanceEvaluator(num_classes, **options)
    present_per_class = np.zeros(num_classes + 1, int)
    for _ in range(num_images):
        image = _random_image(rng, num_classes)
        evaluator.add(*image)
        gt, gt_classes = image[0], image[1]
        for i, c in enumerate(gt_classes, start=1):
            present_per_class[c] += bool((gt == i).any())
    result = evaluator.result()
    assert result["num_images"] == num_images
    assert result["num_instances"] == present_per_class.sum()
    has_gt = present_per_class[1:] > 0
    for key, value in result.items():
        if key in ("num_images", "num_instances", "protocol"):
            continue
        assert math.isnan(value) or 0.0 <= value <= 1.0, (key, value)
    for t in options["iou_thresholds"]:
        assert math.isnan(result[f"mAP_r@{t:g}"]) == (not has_gt.any())
        for c in range(num_classes):
            assert math.isnan(result[f"AP_r@{t:g}/class_{c + 1}"]) == (not has_gt[c])
    for key in ("coco_mask_AP", "coco_mask_AP50", "coco_mask_AP75"):
        assert math.isnan(result[key]) == (not has_gt.any())
    if has_gt.any():
        # A stricter IoU can only lose true positives at every rank.
        maps = [result[f"mAP_r@{t:g}"] for t in options["iou_thresholds"]]
        assert all(a >= b - 1e-12 for a, b in zip(maps, maps[1:]))
        recalls = [result[f"AR@0.5@{n}"] for n in options["proposal_counts"]]
        assert all(a <= b + 1e-12 for a, b in zip(recalls, recalls[1:]))


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 4))
def test_evaluator_perfect_predictions_score_one(seed, num_classes, num_images):
    rng = np.random.default_rng(seed)
    options = _options(rng)
    options["coco_max_detections"] = 100
    evaluator = evaluation.InstanceEvaluator(num_classes, **options)
    most = 0
    for _ in range(num_images):
        gt, gt_classes, _, _, _ = _random_image(rng, num_classes)
        present = [i for i in range(1, len(gt_classes) + 1) if (gt == i).any()]
        most = max(most, len(present))
        masks = np.stack([gt == i for i in present]) if present else np.zeros(
            (0,) + gt.shape, bool)
        evaluator.add(gt, gt_classes, masks, gt_classes[np.array(present, int) - 1],
                      rng.random(len(present)))
    result = evaluator.result()
    if result["num_instances"] == 0:
        assert math.isnan(result["coco_mask_AP"])
        return
    for t in options["iou_thresholds"]:
        assert result[f"mAP_r@{t:g}"] == 1.0
    assert result["coco_mask_AP"] == pytest.approx(1.0)
    for n in options["proposal_counts"]:
        if n >= most:
            assert result[f"AR@0.5@{n}"] == 1.0


_CORRUPTIONS = ("nan_score", "inf_score", "class_zero", "class_too_big", "mask_shape",
                "gt_above_n", "gt_below_void", "float_gt", "scores_length",
                "classes_length", "float_masks", "gt_class_zero", "gt_3d")


@FUZZ
@given(st.integers(0, 2**32 - 1), st.sampled_from(_CORRUPTIONS))
def test_evaluator_bad_input_is_a_value_error_and_changes_nothing(seed, corruption):
    rng = np.random.default_rng(seed)
    num_classes = 2
    evaluator = evaluation.InstanceEvaluator(num_classes)
    evaluator.add(*_random_image(rng, num_classes))
    before = evaluator.result()
    gt, gt_classes, masks, classes, scores = _random_image(rng, num_classes)
    masks, classes, scores = masks[:1], classes[:1], scores[:1]
    if not len(scores):
        masks, classes, scores = np.ones((1,) + gt.shape, bool), np.array([1]), np.array([.5])
    gt_classes = gt_classes if len(gt_classes) else np.array([1])
    gt = np.where(gt > len(gt_classes), 0, gt).astype(np.int32)
    if corruption == "nan_score":
        scores = np.array([np.nan])
    elif corruption == "inf_score":
        scores = np.array([np.inf])
    elif corruption == "class_zero":
        classes = np.array([0])
    elif corruption == "class_too_big":
        classes = np.array([num_classes + 1])
    elif corruption == "mask_shape":
        masks = np.ones((1, gt.shape[0] + 1, gt.shape[1]), bool)
    elif corruption == "gt_above_n":
        gt = gt.copy()
        gt.flat[0] = len(gt_classes) + 1
    elif corruption == "gt_below_void":
        gt = gt.copy()
        gt.flat[0] = -2
    elif corruption == "float_gt":
        gt = gt.astype(np.float32)
    elif corruption == "scores_length":
        scores = np.array([0.5, 0.4])
    elif corruption == "classes_length":
        classes = np.array([1, 1])
    elif corruption == "float_masks":
        masks = masks.astype(np.float32)
    elif corruption == "gt_class_zero":
        gt_classes = np.zeros(len(gt_classes), int)
    else:
        gt = gt[None]
    with pytest.raises(ValueError):
        evaluator.add(gt, gt_classes, masks, classes, scores)
    after = evaluator.result()
    assert after.keys() == before.keys()
    for key in before:
        assert after[key] == before[key] or (
            isinstance(before[key], float) and math.isnan(before[key])
            and math.isnan(after[key])), key
