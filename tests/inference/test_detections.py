"""Tests of `instance_embed.inference.detections`: the paper's inference from heads
outputs to instances (`heads_resolution_detections`, `predict_instances`) against the
NumPy references of conftest.py (`numpy_inference`), and `InferenceConfig`.

Masks are compared away from the threshold boundary, where float32 and float64
distances may legitimately disagree.
"""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from instance_embed import inference
from instance_embed.model.config import PAPER_TAUS as TAUS
from instance_embed.ops import seeds as seed_ops

BOUNDARY = 1e-4


def to_numpy(outputs):
    return {k: v.numpy() for k, v in outputs.items()}


def test_config_defaults_follow_the_paper():
    config = inference.InferenceConfig()
    assert config.num_seeds == 100
    assert config.alpha == 0.3
    assert config.score_threshold == 0.0
    assert config.nms_iou_threshold is None
    assert config.jit_compile is False
    assert config.support_rescoring == 0.0
    with pytest.raises(ValueError, match="set nms_iou_threshold too"):
        inference.InferenceConfig(support_rescoring=5.0)


@pytest.mark.parametrize("field, value", [
    ("num_seeds", 0), ("num_seeds", 2.5), ("num_seeds", True),
    ("alpha", -0.1), ("alpha", float("inf")), ("alpha", "0.3"),
    ("score_threshold", -0.5), ("score_threshold", 2.0), ("jit_compile", "yes"),
    ("flip_tta", 1),
    ("support_rescoring", -1.0), ("support_rescoring", float("nan")),
    ("nms_iou_threshold", 1.5), ("nms_iou_threshold", -0.1),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        inference.InferenceConfig(**{field: value})


def reference_detections(embeddings, logits, config, numpy_inference):
    """Per image: (seeds, classes, scores) of the kept detections, in output order."""
    results = []
    for b in range(embeddings.shape[0]):
        probs = numpy_inference.softmax(logits[b])
        seeds = numpy_inference.select_seeds(embeddings[b], numpy_inference.seediness(probs),
                                             config.num_seeds, config.alpha)
        tau_index, classes, scores = numpy_inference.classes_and_scores(probs, seeds)
        taus = [TAUS[t] for t in tau_index]
        low_masks = numpy_inference.margins(embeddings[b], seeds, taus) >= 0
        kept = numpy_inference.select_detections(scores, seeds, low_masks,
                                                 config.score_threshold,
                                                 config.nms_iou_threshold)
        results.append(([seeds[k] for k in kept], [classes[k] for k in kept],
                        [scores[k] for k in kept], [taus[k] for k in kept]))
    return results


@pytest.mark.parametrize("num_seeds, with_valid", [(16, False), (20, True)])
def test_heads_resolution_detections_match_numpy(num_seeds, with_valid, numpy_inference):
    """Steps 1-4 in one call: the NumPy greedy's seeds, classes, scores and masks,
    sorted by descending score (ties in seed order), missing seeds last."""
    rng = np.random.default_rng(8)
    embeddings, logits = numpy_inference.clustered_inputs(rng, h=5, w=6)
    valid = None
    if with_valid:  # 16 and 14 pixels may seed, fewer than K: the rest are -1
        valid = np.zeros((2, 5, 6), bool)
        valid[0, :4, :4] = True
        valid[1, 1:3] = True
        valid[1, 4, :2] = True
    config = inference.InferenceConfig(num_seeds=num_seeds)
    probs = numpy_inference.softmax(logits).astype(np.float32)
    out = to_numpy(inference.heads_resolution_detections(embeddings, probs, TAUS, config, valid))
    assert out["masks"].shape == (2, num_seeds, 5, 6) and out["masks"].dtype == bool
    for b in range(2):
        seeds = numpy_inference.select_seeds(embeddings[b], numpy_inference.seediness(probs[b]),
                                             num_seeds, config.alpha,
                                             None if valid is None else valid[b])
        tau_index, classes, scores = numpy_inference.classes_and_scores(probs[b], seeds)
        keys = [score if seed >= 0 else -1.0 for seed, score in zip(seeds, scores)]
        order = sorted(range(num_seeds), key=lambda k: (-keys[k], k))
        assert out["seed_indices"][b].tolist() == [seeds[k] for k in order]
        assert out["classes"][b].tolist() == [classes[k] for k in order]
        np.testing.assert_allclose(out["scores"][b], [scores[k] for k in order],
                                   rtol=1e-5, atol=1e-6)
        taus = [TAUS[tau_index[k]] if seeds[k] >= 0 else TAUS[0]
                for k in order]
        np.testing.assert_allclose(out["taus"][b], taus)
        margins = numpy_inference.margins(embeddings[b], out["seed_indices"][b], taus)
        for k, seed in enumerate(out["seed_indices"][b]):
            if seed < 0:
                assert not out["masks"][b, k].any()
            else:
                np.testing.assert_array_equal(out["masks"][b, k], margins[k] >= 0)
        missing = (out["seed_indices"][b] < 0).sum()
        assert missing == (max(0, num_seeds - valid[b].sum()) if with_valid else 0)
        assert (np.diff(out["scores"][b][:num_seeds - missing]) <= 0).all()


@pytest.mark.parametrize("score_threshold, nms_iou_threshold", [
    (0.0, None), (0.97, None), (0.0, 0.5), (0.96, 0.3)])
def test_predict_instances_matches_numpy(score_threshold, nms_iou_threshold, numpy_inference):
    rng = np.random.default_rng(5)
    embeddings, logits = numpy_inference.clustered_inputs(rng)
    config = inference.InferenceConfig(num_seeds=16, score_threshold=score_threshold,
                                       nms_iou_threshold=nms_iou_threshold)
    out = to_numpy(inference.predict_instances(embeddings, logits, (12, 12), TAUS, config))
    reference = reference_detections(embeddings, logits, config, numpy_inference)
    for b, (seeds, classes, scores, taus) in enumerate(reference):
        n = len(seeds)
        assert out["num_detections"][b] == n
        assert out["seed_indices"][b].tolist() == seeds + [-1] * (16 - n)
        assert out["detection_classes"][b].tolist() == classes + [0] * (16 - n)
        np.testing.assert_allclose(out["detection_scores"][b], scores + [0] * (16 - n),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out["detection_taus"][b], taus + [0] * (16 - n))
        assert not out["detection_masks"][b, n:].any()
    counts = out["num_detections"]
    if score_threshold == 0 and nms_iou_threshold is None:
        assert counts.tolist() == [16, 16]
    else:
        assert counts.max() < 16  # the option did drop something
    if nms_iou_threshold is not None:
        assert counts.min() > 1


def test_suppression_of_partially_overlapping_masks_matches_numpy(numpy_inference):
    rng = np.random.default_rng(12)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=10, w=12, d=3)
    embeddings *= 0.4  # masks of many sizes that overlap partially
    config = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=0.4)
    out = to_numpy(inference.predict_instances(embeddings, logits, (10, 12), TAUS, config))
    reference = reference_detections(embeddings, logits, config, numpy_inference)
    ious = []
    for b, (seeds, classes, _, _) in enumerate(reference):
        n = len(seeds)
        assert out["num_detections"][b] == n
        assert out["seed_indices"][b, :n].tolist() == seeds
        masks = out["detection_masks"][b]
        ious += [numpy_inference.iou(masks[i], masks[j]) for i in range(n) for j in range(i)]
    # Suppression had real decisions to make: kept pairs overlap, below the threshold.
    assert max(ious) <= 0.4 and sum(0.1 < iou for iou in ious) >= 3
    assert out["num_detections"].max() < 20


def test_support_rescoring_matches_numpy(numpy_inference):
    # All detections without suppression (image size = heads size: the masks are the
    # heads' masks), then greedy suppression, support counts and rescoring in NumPy.
    rng = np.random.default_rng(12)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=10, w=12, d=3)
    embeddings *= 0.4
    threshold, support_seeds = 0.4, 3.0
    config = inference.InferenceConfig(num_seeds=20, nms_iou_threshold=threshold,
                                       support_rescoring=support_seeds)
    everything = to_numpy(inference.predict_instances(
        embeddings, logits, (10, 12), TAUS, dataclasses.replace(
            config, nms_iou_threshold=None, support_rescoring=0.0)))
    out = to_numpy(inference.predict_instances(embeddings, logits, (10, 12), TAUS, config))
    reordered = 0
    for b in range(2):
        masks, scores = everything["detection_masks"][b], everything["detection_scores"][b]
        seeds = everything["seed_indices"][b]
        kept, support = [], {}
        for j in range(20):
            owners = [i for i in kept if numpy_inference.iou(masks[i], masks[j]) > threshold]
            if owners:
                support[owners[0]] += 1
            else:
                kept.append(j)
                support[j] = 1
        rescored = {i: scores[i] * min(1.0, support[i] / support_seeds) for i in kept}
        order = sorted(kept, key=lambda i: (-rescored[i], i))
        n = len(kept)
        assert out["num_detections"][b] == n
        assert out["seed_indices"][b, :n].tolist() == [seeds[i] for i in order]
        np.testing.assert_allclose(out["detection_scores"][b, :n],
                                   [rescored[i] for i in order], rtol=1e-5)
        np.testing.assert_array_equal(out["detection_masks"][b, :n], masks[order])
        reordered += order != kept
        assert 1 < max(support.values()) and min(support.values()) < support_seeds
    assert reordered  # the rescoring changed the ranking somewhere


def test_predict_instances_instance_map_is_the_best_covering_mask(numpy_inference):
    rng = np.random.default_rng(6)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=8, w=8, d=3)
    embeddings *= 1.0
    config = inference.InferenceConfig(num_seeds=12, score_threshold=0.95)
    out = to_numpy(inference.predict_instances(embeddings, logits, (24, 32), TAUS, config,
                                               crop_size=(20, 28)))
    masks, scores, counts = out["detection_masks"], out["detection_scores"], out["num_detections"]
    assert out["instance_map"].dtype == np.int32 and out["instance_map"].shape == (2, 20, 28)
    for b in range(2):
        n = counts[b]
        assert 0 < n < 12
        assert np.all(np.diff(scores[b, :n]) <= 0) and np.all(scores[b, n:] == 0)
        want = np.zeros((20, 28), np.int32)
        for i in range(20):
            for j in range(28):
                covering = [k for k in range(12) if masks[b, k, i, j]]
                if covering:
                    # Highest score; on equal scores the earlier detection.
                    best = max(covering, key=lambda k: (scores[b, k], -k))
                    want[i, j] = best + 1
        np.testing.assert_array_equal(out["instance_map"][b], want)
        assert (want > 0).any() and (want == 0).any()


def test_full_resolution_masks_agree_with_heads_resolution_masks(numpy_inference):
    rng = np.random.default_rng(7)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=1, h=9, w=7, d=3)
    embeddings *= 0.35
    config = inference.InferenceConfig(num_seeds=10)
    factor = 4
    out = to_numpy(inference.predict_instances(
        embeddings, logits, (9 * factor, 7 * factor), TAUS, config))
    low = to_numpy(inference.predict_instances(embeddings, logits, (9, 7), TAUS, config))
    np.testing.assert_array_equal(out["seed_indices"], low["seed_indices"])

    margins = numpy_inference.margins(embeddings[0], out["seed_indices"][0],
                                      out["detection_taus"][0])
    # Heads-resolution output equals the masks grown at that resolution.
    clear = np.abs(margins) > BOUNDARY
    np.testing.assert_array_equal(low["detection_masks"][0][clear], margins[clear] >= 0)

    # Away from boundaries (all 3x3 neighbours clearly on one side), every full-resolution
    # pixel of a heads pixel's block (nearest-neighbour downsampling) has its value.
    padded = np.pad(margins, ((0, 0), (1, 1), (1, 1)), mode="edge")
    windows = np.stack([padded[:, di:di + 9, dj:dj + 7] for di in range(3) for dj in range(3)])
    inside, outside = (windows > BOUNDARY).all(0), (windows < -BOUNDARY).all(0)
    blocks = out["detection_masks"][0].reshape(10, 9, factor, 7, factor)
    assert inside.sum() > 20 and outside.sum() > 20
    assert blocks.all(axis=(2, 4))[inside].all()
    assert not blocks.any(axis=(2, 4))[outside].any()
    # Near boundaries the two resolutions may differ, but not by much.
    downsampled = out["detection_masks"][0][:, factor // 2::factor, factor // 2::factor]
    assert (downsampled != low["detection_masks"][0]).mean() < 0.1


def test_more_seeds_than_pixels_gives_invalid_detections(numpy_inference):
    rng = np.random.default_rng(8)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=1, h=2, w=3)
    out = to_numpy(inference.predict_instances(
        embeddings, logits, (4, 6), TAUS, inference.InferenceConfig(num_seeds=10)))
    assert out["num_detections"].tolist() == [6]
    assert sorted(out["seed_indices"][0, :6].tolist()) == list(range(6))
    assert out["seed_indices"][0, 6:].tolist() == [-1] * 4
    assert not out["detection_masks"][0, 6:].any()
    assert out["detection_classes"][0, 6:].tolist() == [0] * 4


def test_jit_compiled_equals_plain(numpy_inference):
    rng = np.random.default_rng(9)
    embeddings, logits = numpy_inference.clustered_inputs(rng)
    embeddings[1] = 0.5 * rng.normal(size=embeddings.shape[1:])  # boundaries in image 1
    config = inference.InferenceConfig(num_seeds=16, nms_iou_threshold=0.5,
                                       support_rescoring=4.0)

    def run(e, l, jit_compile):
        size = tf.constant([24, 36])
        return inference.predict_from_outputs(
            {"embeddings": e, "class_logits": l}, size, size, TAUS,
            dataclasses.replace(config, jit_compile=jit_compile))

    plain = to_numpy(tf.function(run)(embeddings, logits, False))
    jitted = to_numpy(tf.function(run)(embeddings, logits, True))
    assert plain.keys() >= {"detection_masks", "detection_boxes", "instance_map"}
    for key in plain:
        if plain[key].dtype == np.float32:
            np.testing.assert_allclose(jitted[key], plain[key], rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(jitted[key], plain[key], err_msg=key)

    seed_map = seed_ops.seediness(numpy_inference.softmax(logits).astype(np.float32))
    plain_seeds = seed_ops.select_seeds(embeddings, seed_map, 16, 0.3)
    jit_seeds = tf.function(seed_ops.select_seeds, jit_compile=True)(
        embeddings, seed_map, 16, 0.3)
    np.testing.assert_array_equal(jit_seeds.numpy(), plain_seeds.numpy())


def test_batch_of_two_equals_two_batches_of_one(numpy_inference):
    rng = np.random.default_rng(10)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=8, w=10, d=4)
    embeddings *= 0.5
    config = inference.InferenceConfig(num_seeds=12, nms_iou_threshold=0.6)
    both = to_numpy(inference.predict_instances(embeddings, logits, (16, 20), TAUS, config))
    for b in range(2):
        one = to_numpy(inference.predict_instances(
            embeddings[b:b + 1], logits[b:b + 1], (16, 20), TAUS, config))
        for key in both:
            np.testing.assert_array_equal(both[key][b:b + 1], one[key], err_msg=key)


def test_unknown_shapes_inside_tf_function(numpy_inference):
    """The way export uses it: any batch and image size, the output size as a tensor,
    and AutoGraph off (as in the exported signatures)."""
    rng = np.random.default_rng(11)
    embeddings, logits = numpy_inference.random_inputs(rng, batch=2, h=6, w=5, d=4, num_taus=4,
                                                       num_classes=2)
    config = inference.InferenceConfig(num_seeds=8)
    fn = tf.function(
        lambda e, l: inference.predict_instances(e, l, tf.shape(e)[1:3] * 3, TAUS, config),
        input_signature=[tf.TensorSpec([None, None, None, 4], tf.float32),
                         tf.TensorSpec([None, None, None, 4, 3], tf.float32)],
        autograph=False)
    got = to_numpy(fn(embeddings, logits))
    want = to_numpy(inference.predict_instances(embeddings, logits, (18, 15), TAUS, config))
    assert fn.get_concrete_function().structured_outputs["detection_masks"].shape.as_list() == [
        None, 8, None, None]
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_predict_instances_rejects_bad_arguments():
    embeddings = np.zeros((1, 4, 4, 3), np.float32)
    logits = np.zeros((1, 4, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match="taus"):
        inference.predict_instances(embeddings, logits[..., :3, :], (8, 8), TAUS)
    with pytest.raises(ValueError, match="class_logits"):
        inference.predict_instances(embeddings, logits[:, :3], (8, 8), TAUS)
    with pytest.raises(ValueError, match="image_size"):
        inference.predict_instances(embeddings, logits, (8, 0), TAUS)
    with pytest.raises(ValueError, match="num_classes"):
        inference.predict_instances(embeddings, logits[..., :1], (8, 8), TAUS)
    with pytest.raises(TypeError, match="embeddings"):
        inference.predict_instances(embeddings.astype(np.int32), logits, (8, 8), TAUS)


def test_heads_resolution_detections_rejects_bad_arguments():
    embeddings = np.zeros((1, 4, 4, 3), np.float32)
    probs = np.full((1, 4, 4, 4, 2), 0.5, np.float32)
    def detect(embeddings, probs, **kwargs):
        return inference.heads_resolution_detections(embeddings, probs, TAUS, **kwargs)
    with pytest.raises(ValueError, match="class_probs has 3 tau slices"):
        detect(embeddings, probs[..., :3, :])
    with pytest.raises(ValueError, match="class_probs .* disagree"):
        detect(embeddings, probs[:, :3])
    with pytest.raises(TypeError, match="InferenceConfig"):
        detect(embeddings, probs, config={"num_seeds": 3})
    with pytest.raises(TypeError, match="valid_pixels must be a bool"):
        detect(embeddings, probs, valid_pixels=np.ones((1, 4, 4), np.int32))
    with pytest.raises(ValueError, match="valid_pixels .* disagree"):
        detect(embeddings, probs, valid_pixels=np.ones((1, 4, 3), bool))


def test_full_resolution_masks_follow_the_stride_cells():
    # One instance of 4x4 heads pixels, far from the background in embedding space: at
    # stride 4 its full-resolution mask is the 16x16 block of those cells (the labels
    # were sampled at cell centres), not a block shrunk towards the cell centres.
    labels = np.zeros((8, 8), int)
    labels[2:6, 3:7] = 1
    embeddings = np.zeros((1, 8, 8, 2), np.float32)
    embeddings[0, labels == 1, 1] = 3.0
    embeddings[0, labels == 0, 0] = 3.0
    logits = np.zeros((1, 8, 8, 1, 2), np.float32)
    logits[0, labels == 1, 0, 1] = 10.0
    for tau in (0.25, 0.5, 0.9):
        config = inference.InferenceConfig(num_seeds=1)
        out = to_numpy(inference.predict_instances(embeddings, logits, (32, 32), (tau,), config))
        mask = out["detection_masks"][0, 0]
        block = np.kron(labels, np.ones((4, 4), int)).astype(bool)
        iou = (mask & block).sum() / (mask | block).sum()
        assert iou > 0.97, (tau, iou)
        # Only the block's corner pixels may differ.
        assert (mask != block).sum() <= 4


def test_flip_tta_averages_the_class_maps_of_the_image_and_its_mirror():
    # A stand-in network: 8x8 average pooling, then fixed per-pixel maps. Its class
    # logits depend on the column (not mirror-symmetric), so the mirror changes them.
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(4, 2 * 3)).astype(np.float32)

    def heads(images):  # numpy [B, Hp, Wp, 3] -> (embeddings, logits [B, h, w, 2, 3])
        b, hp, wp, _ = images.shape
        pooled = images.reshape(b, hp // 8, 8, wp // 8, 8, 3).mean(axis=(2, 4)) / 255
        column = np.broadcast_to(np.arange(wp // 8, dtype=np.float32)[None, None, :, None],
                                 pooled.shape[:3] + (1,))
        features = np.concatenate([pooled, column], axis=-1)
        logits = (features @ weights).reshape(b, hp // 8, wp // 8, 2, 3)
        return features[..., :2], logits

    seen = []

    def network(images):
        seen.append(images.shape)
        embeddings, logits = tf.numpy_function(heads, [images], [tf.float32, tf.float32])
        return {"embeddings": embeddings, "class_logits": logits}

    image = rng.integers(0, 256, (1, 40, 70, 3)).astype(np.float32)
    config = inference.InferenceConfig(num_seeds=4, flip_tta=True)
    outputs = inference.predict_images(network, tf.constant(image), (0.5, 0.75), config)
    assert seen == [(2, 64, 96, 3)]  # the padded image and its mirror, in one batch
    padded = np.pad(image, [[0, 0], [0, 24], [0, 26], [0, 0]])
    embeddings, logits = heads(padded)
    _, mirror_logits = heads(padded[:, :, ::-1])
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
        x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
    expected = (softmax(logits) + softmax(mirror_logits)[:, :, ::-1]) / 2
    # The padding's heads pixels are masked (background) after averaging, as without TTA.
    inside = np.zeros((8, 12), bool)
    inside[:5, :9] = True
    np.testing.assert_allclose(outputs["class_probs"].numpy()[0][inside], expected[0][inside],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs["embeddings"].numpy(), embeddings)
    plain = inference.predict_images(network, tf.constant(image), (0.5, 0.75),
                                     inference.InferenceConfig(num_seeds=4))
    assert not np.allclose(plain["class_probs"].numpy(), outputs["class_probs"].numpy())


@pytest.mark.parametrize("mask_upsampling", ["bilinear", "joint_bilateral"])
def test_an_empty_batch_gives_empty_outputs(mask_upsampling):
    config = inference.InferenceConfig(num_seeds=5, mask_upsampling=mask_upsampling)
    out = inference.predict_instances(tf.zeros([0, 8, 10, 4]), tf.zeros([0, 8, 10, 4, 3]),
                                      (32, 40), TAUS, config, images=tf.zeros([0, 32, 40, 3]))
    assert out["detection_masks"].shape == (0, 5, 32, 40)
    assert out["detection_boxes"].shape == (0, 5, 4)
    assert out["instance_map"].shape == (0, 32, 40)
