"""Tests of `instance_embed.losses` against NumPy references written here, independently.

The references use the plain formulas of the paper in float64 with Python loops
(sigma = 2 / (1 + exp(d2)), log(sigma), log(1 - sigma), masks by `sigma >= tau`, IoU by
set counting), not the stable rewrites the library uses.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from instance_embed import losses

TAUS = (0.25, 0.5, 0.75, 0.9)


# ---------------------------------------------------------------------------------------
# NumPy references.
# ---------------------------------------------------------------------------------------


def np_embedding_loss_per_image(emb, ids, weights=None):
    emb = np.asarray(emb, np.float64)
    batch, num_points, _ = emb.shape
    weights = np.ones(ids.shape) if weights is None else np.asarray(weights, np.float64)
    losses_, valid = np.zeros(batch), np.zeros(batch, bool)
    for b in range(batch):
        total, norm = 0.0, 0.0
        for p in range(num_points):
            for q in range(num_points):
                if p == q or ids[b, p] < 0 or ids[b, q] < 0:
                    continue
                w = weights[b, p] * weights[b, q]
                d2 = np.sum((emb[b, p] - emb[b, q]) ** 2)
                sigma = 2.0 / (1.0 + np.exp(d2))
                if ids[b, p] == ids[b, q]:
                    total += w * np.log(sigma)
                else:
                    total += w * np.log(1.0 - sigma)
                norm += w
        if norm > 0:
            losses_[b], valid[b] = -total / norm, True
    return losses_, valid


def np_embedding_loss(emb, ids, weights=None):
    per_image, valid = np_embedding_loss_per_image(emb, ids, weights)
    return per_image[valid].mean() if valid.any() else 0.0


def np_classification_targets(emb, labels, classes, valid, indices, ids, taus, threshold):
    batch, h, w, d = emb.shape
    flat_emb = np.asarray(emb, np.float64).reshape(batch, h * w, d)
    flat_lab = labels.reshape(batch, h * w)
    out = np.zeros(indices.shape + (len(taus),), np.int64)
    for b in range(batch):
        for p in range(indices.shape[1]):
            if ids[b, p] < 0:
                continue
            d2 = np.sum((flat_emb[b] - flat_emb[b, indices[b, p]]) ** 2, axis=-1)
            sim = 2.0 / (1.0 + np.exp(d2))
            for t, tau in enumerate(taus):
                mask = (sim >= tau) & (flat_lab[b] >= 0)
                best_iou, best_class = 0.0, 0
                for m in range(valid.shape[1]):
                    if not valid[b, m]:
                        continue
                    gt = flat_lab[b] == m + 1
                    union = np.sum(mask | gt)
                    iou = np.sum(mask & gt) / union if union else 0.0
                    if iou > best_iou:
                        best_iou, best_class = iou, classes[b, m]
                out[b, p, t] = best_class if best_iou > threshold else 0
    return out


def np_classification_loss(logits, targets, point_valid):
    logits = np.asarray(logits, np.float64)
    per_image = []
    for b in range(logits.shape[0]):
        terms = []
        for p in range(logits.shape[1]):
            if not point_valid[b, p]:
                continue
            for t in range(logits.shape[2]):
                z = logits[b, p, t]
                log_probs = z - np.log(np.sum(np.exp(z)))
                terms.append(-log_probs[targets[b, p, t]])
        if terms:
            per_image.append(np.mean(terms))
    return np.mean(per_image) if per_image else 0.0


# ---------------------------------------------------------------------------------------
# Configuration and schedule.
# ---------------------------------------------------------------------------------------


def test_loss_config_defaults():
    config = losses.LossConfig()
    assert config.points_per_instance == 10
    assert config.instance_size_weighting is True
    assert config.cls_iou_threshold == 0.5
    assert config.cls_weight_max == 0.2
    assert config.taus == TAUS


@pytest.mark.parametrize("field, value", [
    ("points_per_instance", 0),
    ("points_per_instance", 2.5),
    ("instance_size_weighting", "yes"),
    ("cls_points_per_instance", 0),
    ("cls_points_per_instance", 11),  # more than points_per_instance (10)
    ("cls_iou_threshold", 1.0),
    ("cls_iou_threshold", -0.1),
    ("cls_warmup_steps", -1),
    ("cls_ramp_steps", 1.5),
    ("cls_weight_max", -0.2),
    ("taus", ()),
    ("taus", (0.5, 1.0)),
    ("taus", (0.0, 0.5)),
    ("taus", (0.5, 0.5)),
])
def test_loss_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        losses.LossConfig(**{field: value})


def test_loss_config_taus_from_list_become_tuple():
    assert losses.LossConfig(taus=[0.5, 0.75]).taus == (0.5, 0.75)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (99, 0.0), (100, 0.0), (110, 0.04), (125, 0.1), (149, 0.196),
    (150, 0.2), (10_000, 0.2),
])
def test_cls_loss_weight_schedule(step, expected):
    config = losses.LossConfig(cls_warmup_steps=100, cls_ramp_steps=50, cls_weight_max=0.2)
    value = losses.cls_loss_weight(tf.constant(step, tf.int64), config)
    assert value.dtype == tf.float32 and value.shape == ()
    np.testing.assert_allclose(value.numpy(), expected, atol=1e-7)


def test_cls_loss_weight_without_ramp_jumps_at_end_of_warmup():
    config = losses.LossConfig(cls_warmup_steps=10, cls_ramp_steps=0, cls_weight_max=0.5)
    values = [float(losses.cls_loss_weight(s, config)) for s in (0, 9, 10, 11)]
    assert values == [0.0, 0.0, 0.5, 0.5]


# ---------------------------------------------------------------------------------------
# Labels, sampling and gathering.
# ---------------------------------------------------------------------------------------


def test_labels_at_resolution_takes_cell_centres():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 5, size=(2, 16, 24)).astype(np.int32)
    out = losses.labels_at_resolution(labels, (4, 6)).numpy()
    # Stride 4: the centre of cell i is pixel 4 i + 2.
    np.testing.assert_array_equal(out, labels[:, 2::4, 2::4])
    assert out.dtype == np.int32 and (out == -1).any()


def test_labels_at_resolution_non_integer_stride():
    labels = np.arange(10 * 10, dtype=np.int32).reshape(1, 10, 10) - 1
    out = losses.labels_at_resolution(labels, (4, 3)).numpy()
    rows = [1, 3, 6, 8]  # floor((i + 0.5) * 10 / 4)
    cols = [1, 5, 8]     # floor((j + 0.5) * 10 / 3)
    np.testing.assert_array_equal(out[0], labels[0][np.ix_(rows, cols)])


def test_labels_at_resolution_rejects_float_labels():
    with pytest.raises(TypeError, match="instances"):
        losses.labels_at_resolution(np.zeros((1, 8, 8), np.float32), (2, 2))


def test_gather_points_matches_numpy():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 5, 6, 3, 4)).astype(np.float32)
    indices = rng.integers(0, 30, size=(2, 7)).astype(np.int32)
    out = losses.gather_points(features, indices).numpy()
    flat = features.reshape(2, 30, 3, 4)
    np.testing.assert_array_equal(out, np.stack([flat[b, indices[b]] for b in range(2)]))


def _sampling_fixture():
    """Three 12 x 12 images, M = 5, with every case sample_points must handle."""
    labels = np.zeros((3, 12, 12), np.int32)
    valid = np.zeros((3, 5), bool)
    # Image 0: a large instance, one smaller than K, a valid but absent one, pixels of an
    # invalid id (4), ignore pixels.
    labels[0, 0:5, 0:6] = 1
    labels[0, 8, 8:11] = 2
    labels[0, 10:12, 0:3] = 4
    labels[0, :, 11] = -1
    valid[0, [0, 1, 2]] = True
    # Image 1: no background at all.
    labels[1] = 1
    labels[1, 6:, :] = 5
    labels[1, 0, :] = -1
    valid[1, [0, 4]] = True
    # Image 2: everything ignored.
    labels[2] = -1
    valid[2, 0] = True
    return labels, valid


@pytest.mark.parametrize("weighting", [True, False])
def test_sample_points_properties(weighting):
    labels, valid = _sampling_fixture()
    k = 5
    points = losses.sample_points(labels, valid, k, tf.constant([3, 4]),
                                  instance_size_weighting=weighting)
    indices = points["point_indices"].numpy()
    ids = points["point_instance_ids"].numpy()
    weights = points["point_weights"].numpy()
    assert indices.shape == ids.shape == weights.shape == (3, k * 6)
    assert indices.dtype == np.int32 and ids.dtype == np.int32 and weights.dtype == np.float32

    sampled_cases = set()
    for b in range(3):
        flat = labels[b].ravel()
        # Ignore pixels are never sampled.
        assert np.all(flat[indices[b][ids[b] >= 0]] >= 0)
        for slot in range(6):
            span = slice(slot * k, (slot + 1) * k)
            slot_valid = slot == 0 or valid[b, slot - 1]
            pixels = np.flatnonzero(flat == slot) if slot_valid else np.array([], int)
            size = pixels.size
            assert points["instance_sizes"].numpy()[b, slot] == size
            if size == 0:
                np.testing.assert_array_equal(ids[b, span], -1)
                np.testing.assert_array_equal(weights[b, span], 0.0)
                np.testing.assert_array_equal(indices[b, span], 0)
                sampled_cases.add("padding")
                continue
            np.testing.assert_array_equal(ids[b, span], slot)
            assert np.all(flat[indices[b, span]] == slot)
            expected_weight = 1.0 / size if weighting else 1.0
            np.testing.assert_allclose(weights[b, span], expected_weight, rtol=1e-6)
            chosen = indices[b, span]
            if size >= k:
                assert len(set(chosen)) == k  # without replacement
                sampled_cases.add("large")
            else:
                # Every pixel of the instance, each floor(K / c) or ceil(K / c) times.
                assert set(chosen) == set(pixels)
                counts = np.bincount(chosen, minlength=flat.size)[pixels]
                assert counts.min() >= k // size and counts.max() <= -(-k // size)
                sampled_cases.add("small")
    # The fixture did exercise every case, including background and absent instances.
    assert sampled_cases == {"padding", "large", "small"}
    assert ids[0, 0] == 0 and ids[1, 0] == -1 and np.all(ids[2] == -1)
    # The invalid id 4 of image 0 is never sampled.
    assert not np.any(labels[0].ravel()[indices[0][ids[0] >= 0]] == 4)


def test_sample_points_is_deterministic_for_a_seed():
    labels, valid = _sampling_fixture()
    first = losses.sample_points(labels, valid, 5, tf.constant([1, 2], tf.int64))
    again = losses.sample_points(labels, valid, 5, tf.constant([1, 2], tf.int64))
    other = losses.sample_points(labels, valid, 5, tf.constant([1, 3], tf.int64))
    np.testing.assert_array_equal(first["point_indices"], again["point_indices"])
    assert np.any(first["point_indices"].numpy() != other["point_indices"].numpy())
    np.testing.assert_array_equal(first["point_instance_ids"], other["point_instance_ids"])


def test_per_image_seeds_make_sampling_independent_of_batch_split():
    labels, valid = _sampling_fixture()
    seeds = tf.constant([[7, 0], [7, 1], [7, 2]], tf.int64)
    whole = losses.sample_points(labels, valid, 5, seeds)
    for b in range(3):
        alone = losses.sample_points(labels[b:b + 1], valid[b:b + 1], 5, seeds[b:b + 1])
        for key in ("point_indices", "point_instance_ids", "point_weights"):
            np.testing.assert_array_equal(whole[key].numpy()[b], alone[key].numpy()[0])
    # A different seed for one image changes that image's points only.
    moved = losses.sample_points(labels, valid, 5, tf.constant([[7, 0], [7, 9], [7, 2]],
                                                               tf.int64))
    np.testing.assert_array_equal(whole["point_indices"][0], moved["point_indices"][0])
    assert np.any(whole["point_indices"].numpy()[1] != moved["point_indices"].numpy()[1])


def test_sample_points_is_uniform_within_an_instance():
    # 400 copies of one image: instance 1 has 12 pixels, K = 4 per draw.
    labels = np.full((400, 4, 5), -1, np.int32)
    labels[:, 1:4, 1:5] = 1
    labels[:, 0, :] = 0
    valid = np.ones((400, 1), bool)
    points = losses.sample_points(labels, valid, 4, tf.constant([5, 6]))
    chosen = points["point_indices"].numpy()[:, 4:8]
    assert all(len(set(row)) == 4 for row in chosen)
    pixels = np.flatnonzero(labels[0].ravel() == 1)
    counts = np.bincount(chosen.ravel(), minlength=20)
    assert counts.sum() == counts[pixels].sum() == 1600
    _, p_value = scipy.stats.chisquare(counts[pixels])
    assert p_value > 1e-3, counts[pixels]


def test_sample_points_rejects_bad_seed_and_k():
    labels, valid = _sampling_fixture()
    with pytest.raises(ValueError, match="seed"):
        losses.sample_points(labels, valid, 5, tf.constant([1, 2, 3]))
    with pytest.raises(ValueError, match="points_per_instance"):
        losses.sample_points(labels, valid, 0, tf.constant([1, 2]))


def test_instance_size_weights():
    ids = np.array([[0, 0, 1, 2, -1]], np.int32)
    sizes = np.array([[50, 4, 0]], np.int32)
    np.testing.assert_allclose(losses.instance_size_weights(ids, sizes).numpy(),
                               [[1 / 50, 1 / 50, 1 / 4, 0.0, 0.0]], rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Embedding loss.
# ---------------------------------------------------------------------------------------


def _random_embedding_inputs(seed=0, batch=5, num_points=12, dim=6):
    rng = np.random.default_rng(seed)
    emb = rng.normal(scale=0.8, size=(batch, num_points, dim)).astype(np.float32)
    ids = rng.integers(-1, 3, size=(batch, num_points)).astype(np.int32)
    ids[2] = -1
    ids[2, 4] = 1          # a single valid point: not counted
    ids[3] = -1            # all padding: not counted
    ids[4, :3] = [0, 0, 2]  # make sure image 4 has both kinds of pairs
    weights = rng.uniform(0.1, 2.0, size=(batch, num_points)).astype(np.float32)
    return emb, ids, weights


def test_embedding_loss_matches_numpy_reference():
    emb, ids, weights = _random_embedding_inputs()
    per_image, valid = losses.embedding_loss_per_image(emb, ids, weights)
    ref_per_image, ref_valid = np_embedding_loss_per_image(emb, ids, weights)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert list(ref_valid) == [True, True, False, False, True]
    np.testing.assert_allclose(per_image.numpy(), ref_per_image, rtol=1e-5, atol=1e-6)
    value = losses.embedding_loss(emb, ids, weights)
    assert value.dtype == tf.float32 and value.shape == ()
    np.testing.assert_allclose(value.numpy(), np_embedding_loss(emb, ids, weights), rtol=1e-5)


def test_embedding_loss_uniform_weights_and_large_offsets():
    emb, ids, _ = _random_embedding_inputs(seed=1)
    # Distances are translation invariant; a large common offset must not cost precision.
    shifted = emb + np.float32(300.0)
    np.testing.assert_allclose(losses.embedding_loss(shifted, ids).numpy(),
                               np_embedding_loss(emb, ids), rtol=1e-5)


def test_embedding_loss_is_zero_without_pairs():
    emb = np.ones((3, 4, 2), np.float32)
    ids = np.array([[-1, -1, -1, -1], [-1, 2, -1, -1], [-1, -1, -1, -1]], np.int32)
    assert float(losses.embedding_loss(emb, ids)) == 0.0
    per_image, valid = losses.embedding_loss_per_image(emb, ids)
    assert not valid.numpy().any() and not per_image.numpy().any()


def test_embedding_loss_accepts_half_precision():
    emb, ids, weights = _random_embedding_inputs(seed=2)
    for dtype in (tf.bfloat16, tf.float16):
        low = tf.cast(emb, dtype)
        expected = np_embedding_loss(tf.cast(low, tf.float32).numpy(), ids, weights)
        value = losses.embedding_loss(low, ids, weights)
        assert value.dtype == tf.float32
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)


def test_embedding_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(1, 5, 3))
    ids = np.array([[0, 0, 1, 1, 2]], np.int32)
    weights = rng.uniform(0.5, 1.5, size=(1, 5))
    x = tf.Variable(emb.astype(np.float32))
    with tf.GradientTape() as tape:
        value = losses.embedding_loss(x, ids, weights.astype(np.float32))
    grad = tape.gradient(value, x).numpy()
    numeric = np.zeros_like(emb)
    step = 1e-6
    for index in np.ndindex(emb.shape):
        plus, minus = emb.copy(), emb.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (np_embedding_loss(plus, ids, weights)
                          - np_embedding_loss(minus, ids, weights)) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("offset", [0.0, 1e-6])
def test_embedding_loss_finite_at_coincident_embeddings(offset):
    emb = np.full((2, 6, 4), 3.0, np.float32)
    emb[:, 1, 0] += offset
    ids = np.array([[0, 0, 1, 1, 2, -1], [0, 1, 0, 1, 0, 1]], np.int32)
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        value = losses.embedding_loss(x, ids, np.full((2, 6), 0.3, np.float32))
    grad = tape.gradient(value, x)
    assert np.isfinite(value.numpy()) and value.numpy() > 0.0
    assert np.all(np.isfinite(grad.numpy()))


def test_embedding_loss_finite_at_distant_embeddings():
    # Points 0 and 1 (same instance) are 100 apart (d2 = 1e4); point 2 is far from both.
    emb = np.zeros((1, 3, 2), np.float32)
    emb[0, 1, 0] = 100.0
    emb[0, 2, 1] = 100.0
    ids = np.array([[1, 1, 0]], np.int32)
    x = tf.Variable(emb)
    with tf.GradientTape() as tape:
        value = losses.embedding_loss(x, ids)
    grad = tape.gradient(value, x)
    # Hand-worked: 6 ordered pairs of weight 1/6; the two same-instance pairs cost
    # -log sigma = softplus(1e4) - log 2 = 1e4 - log 2 each, the others ~0.
    np.testing.assert_allclose(value.numpy(), 2 * (1e4 - math.log(2)) / 6, rtol=1e-5)
    assert np.all(np.isfinite(grad.numpy()))
    # d(loss)/d(e_1) = (2 / 6) * 2 * (e_1 - e_0) pulls point 1 towards point 0.
    np.testing.assert_allclose(grad.numpy()[0, 1], [2 / 6 * 2 * 100.0, 0.0], rtol=1e-4,
                               atol=1e-3)


# ---------------------------------------------------------------------------------------
# Mask growing and classification targets.
# ---------------------------------------------------------------------------------------


def _hand_made_example():
    """An 8 x 8 image whose masks are known by construction (see the test below).

    Groups of pixels, their labels and 2-d embeddings:
      A    rows 0-1, cols 0-3   instance 1 (class 2)   (0.0, 0)
      B    rows 2-3, cols 0-3   instance 1 (class 2)   (0.6, 0)
      IGN  row 0,    cols 4-7   ignore                 (0.0, 0)  (as A, but excluded)
      G1   rows 1-2, cols 4-7   background             (1.2, 0)
      I3   row 3,    cols 4-7   instance 3 (class 3)   (1.8, 0)
      I2   rows 4-7, cols 4-7   instance 2 (class 1)   (0, 10)
      FAR  rows 4-7, cols 0-3   background             (10, 0)
    Slot 4 is an invalid (padding) instance.
    """
    labels = np.zeros((8, 8), np.int32)
    emb = np.zeros((8, 8, 2), np.float32)
    labels[0:4, 0:4] = 1
    emb[2:4, 0:4, 0] = 0.6
    labels[0, 4:8] = -1
    emb[1:3, 4:8, 0] = 1.2
    labels[3, 4:8] = 3
    emb[3, 4:8, 0] = 1.8
    labels[4:8, 4:8] = 2
    emb[4:8, 4:8, 1] = 10.0
    emb[4:8, 0:4, 0] = 10.0
    classes = np.array([[2, 1, 3, 0]], np.int32)
    valid = np.array([[True, True, True, False]])
    # Seeds: A, B, G1, I3, I2, FAR, and a padding point (index 0 is an A pixel).
    indices = np.array([[0, 16, 12, 28, 45, 40, 0]], np.int32)
    ids = np.array([[1, 1, 0, 3, 2, 0, -1]], np.int32)
    return emb[None], labels[None], classes, valid, indices, ids


def test_classification_targets_hand_made_example():
    emb, labels, classes, valid, indices, ids = _hand_made_example()
    # Squared distances along x: A-B = B-G1 = G1-I3 = 0.36, A-G1 = B-I3 = 1.44,
    # A-I3 = 3.24; thresholds log(2/tau - 1) = 1.946, 1.099, 0.511, 0.201.
    # Seed A: tau .25 -> A+B+G1 (24 px, IGN excluded), IoU(inst 1) = 16/24 -> class 2;
    #   .5, .75 -> A+B = inst 1 -> 2; .9 -> A only, IoU 8/16 = 0.5, not > 0.5 -> 0.
    # Seed B: .25 -> A+B+G1+I3 (28), IoU 16/28 = .57 -> 2; .5, .75 -> A+B+G1, 16/24 -> 2;
    #   .9 -> B, 0.5 -> 0.
    # Seed G1 (background): .25 -> A+B+G1+I3, 16/28 -> 2 (a background seed that grows
    #   a good mask takes its class); .5, .75 -> B+G1+I3, 8/28 and 4/20 -> 0; .9 -> 0.
    # Seed I3: .25 -> B+G1+I3, 8/28 and 4/20 -> 0; .5, .75 -> G1+I3, 4/12 -> 0;
    #   .9 -> I3 alone = inst 3 -> class 3.
    # Seed I2: its mask is instance 2 at every tau -> class 1. Seed FAR: no overlap -> 0.
    expected = np.array([[[2, 2, 2, 0],
                          [2, 2, 2, 0],
                          [2, 0, 0, 0],
                          [0, 0, 0, 3],
                          [1, 1, 1, 1],
                          [0, 0, 0, 0],
                          [0, 0, 0, 0]]])
    targets = losses.classification_targets(emb, labels, classes, valid, indices, ids, TAUS,
                                            iou_threshold=0.5)
    assert targets.dtype == tf.int32 and targets.shape == (1, 7, 4)
    np.testing.assert_array_equal(targets.numpy(), expected)

    # At IoU threshold 0.6 only IoUs of 16/24 and above survive. Seed A at tau .25 keeps
    # class 2 only because the ignore pixels (as close as A) are left out: with them the
    # mask would have 28 pixels and IoU 16/28 < 0.6.
    expected_06 = np.array([[[2, 2, 2, 0],
                             [0, 2, 2, 0],
                             [0, 0, 0, 0],
                             [0, 0, 0, 3],
                             [1, 1, 1, 1],
                             [0, 0, 0, 0],
                             [0, 0, 0, 0]]])
    targets = losses.classification_targets(emb, labels, classes, valid, indices, ids, TAUS,
                                            iou_threshold=0.6)
    np.testing.assert_array_equal(targets.numpy(), expected_06)
    np.testing.assert_array_equal(
        np_classification_targets(emb, labels, classes, valid, indices, ids, TAUS, 0.6),
        expected_06)


def _random_classification_inputs(seed, batch=2, size=10, num_instances=4, dim=3):
    """Random label maps with embeddings on a 0.5 grid.

    Squared distances are then multiples of 0.25, at least 0.01 away from every
    threshold log(2/tau - 1), so float32 and float64 agree on every mask.
    """
    rng = np.random.default_rng(seed)
    labels = np.zeros((batch, size, size), np.int32)
    valid = np.zeros((batch, num_instances), bool)
    for b in range(batch):
        for m in range(rng.integers(1, num_instances + 1)):
            r, c = rng.integers(0, size - 2, size=2)
            hh, ww = rng.integers(2, 6, size=2)
            labels[b, r:r + hh, c:c + ww] = m + 1
            valid[b, m] = True
        valid[b] &= np.isin(np.arange(1, num_instances + 1), labels[b])
    labels[rng.random(labels.shape) < 0.1] = -1
    classes = np.where(valid, rng.integers(1, 4, size=valid.shape), 0).astype(np.int32)
    # Pixels of an id marked invalid (with a class, against the contract) must match nothing.
    labels[0, 6:9, 6:9] = num_instances
    valid[0, -1] = False
    classes[0, -1] = 3
    centres = rng.integers(-2, 3, size=(batch, num_instances + 2, dim)) * 1.0
    emb = np.take_along_axis(centres, (labels + 1).reshape(batch, -1, 1), axis=1)
    noise = 0.5 * rng.choice([-1, 0, 0, 0, 1], size=emb.shape)
    emb = (emb + noise).reshape(batch, size, size, dim).astype(np.float32)
    indices = rng.integers(0, size * size, size=(batch, 16)).astype(np.int32)
    indices[0, 0] = 7 * size + 7  # a seed inside the invalid id's pixels
    ids = np.take_along_axis(labels.reshape(batch, -1), indices, axis=1)
    ids[:, -3:] = -1
    return emb, labels, classes, valid, indices, ids


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_threshold", [0.5, 0.3])
def test_classification_targets_match_numpy_reference(seed, iou_threshold):
    inputs = _random_classification_inputs(seed)
    targets = losses.classification_targets(*inputs, taus=TAUS, iou_threshold=iou_threshold)
    expected = np_classification_targets(*inputs, TAUS, iou_threshold)
    np.testing.assert_array_equal(targets.numpy(), expected)
    assert (expected > 0).any() and (expected[:, :-3] == 0).any()


def test_grow_masks_from_points_matches_numpy():
    emb, _, _, _, indices, _ = _random_classification_inputs(5)
    masks = losses.grow_masks_from_points(emb, indices, TAUS).numpy()
    batch, h, w, d = emb.shape
    assert masks.shape == (batch, indices.shape[1], len(TAUS), h * w) and masks.dtype == bool
    flat = emb.reshape(batch, h * w, d).astype(np.float64)
    for b in range(batch):
        for p in range(indices.shape[1]):
            d2 = np.sum((flat[b] - flat[b, indices[b, p]]) ** 2, axis=-1)
            for t, tau in enumerate(TAUS):
                np.testing.assert_array_equal(masks[b, p, t], 2 / (1 + np.exp(d2)) >= tau)


def test_similarity_thresholds():
    np.testing.assert_allclose(losses.similarity_thresholds([0.5, 0.9]).numpy(),
                               [math.log(3.0), math.log(2 / 0.9 - 1)], rtol=1e-6)
    with pytest.raises(ValueError, match="taus"):
        losses.similarity_thresholds([0.5, 1.5])


def test_classification_loss_matches_numpy_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=2.0, size=(3, 6, 4, 3)).astype(np.float32)
    targets = rng.integers(0, 3, size=(3, 6, 4)).astype(np.int32)
    point_valid = rng.random((3, 6)) < 0.6
    point_valid[1] = False
    point_valid[0, 0] = True
    value = losses.classification_loss(logits, targets, point_valid)
    np.testing.assert_allclose(value.numpy(),
                               np_classification_loss(logits, targets, point_valid), rtol=1e-5)
    _, valid = losses.classification_loss_per_image(logits, targets, point_valid)
    assert list(valid.numpy()) == [True, False, point_valid[2].any()]
    assert float(losses.classification_loss(logits, targets, np.zeros((3, 6), bool))) == 0.0


# ---------------------------------------------------------------------------------------
# The total loss.
# ---------------------------------------------------------------------------------------


def _instance_loss_inputs(seed=0, batch=2, image=32, stride=4, dim=5, num_classes=2):
    rng = np.random.default_rng(seed)
    h = image // stride
    instances = np.zeros((batch, image, image), np.int32)
    instances[:, 2:14, 3:20] = 1
    instances[:, 16:30, 10:28] = 2
    instances[1, 20:26, 0:6] = 3
    instances[:, :, 30:] = -1
    valid = np.zeros((batch, 4), bool)
    valid[:, :2] = True
    valid[1, 2] = True
    classes = np.where(valid, rng.integers(1, num_classes + 1, size=valid.shape), 0)
    batch_dict = {
        "image": np.zeros((batch, image, image, 3), np.float32),
        "instances": instances,
        "instance_classes": classes.astype(np.int32),
        "instance_valid": valid,
    }
    # Embeddings cluster by instance at the heads' resolution, so masks match sometimes.
    small = instances[:, stride // 2::stride, stride // 2::stride]
    centres = rng.normal(scale=1.5, size=(batch, 6, dim))
    emb = np.take_along_axis(centres, (small + 1).reshape(batch, -1, 1), axis=1)
    emb = emb.reshape(batch, h, h, dim) + rng.normal(scale=0.3, size=(batch, h, h, dim))
    outputs = {
        "embeddings": emb.astype(np.float32),
        "class_logits": rng.normal(size=(batch, h, h, len(TAUS), num_classes + 1)
                                   ).astype(np.float32),
    }
    return outputs, batch_dict


def test_instance_loss_matches_numpy_pipeline():
    outputs, batch = _instance_loss_inputs()
    config = losses.LossConfig(points_per_instance=4, cls_warmup_steps=10, cls_ramp_steps=20)
    seed = tf.constant([3, 9], tf.int64)
    values = losses.InstanceLoss(config)(outputs, batch, step=20, seed=seed)
    assert set(values) == {"total", "embedding", "classification", "cls_weight",
                           "embedding_per_image", "embedding_valid",
                           "classification_per_image", "classification_valid"}
    for key in ("total", "embedding", "classification", "cls_weight"):
        assert values[key].dtype == tf.float32 and values[key].shape == ()

    # Recompute from the sampled points with the NumPy references.
    labels = batch["instances"][:, 2::4, 2::4]
    points = losses.sample_points(labels, batch["instance_valid"], 4, seed)
    indices = points["point_indices"].numpy()
    ids = points["point_instance_ids"].numpy()
    sizes = np.array([[np.sum(labels[b] == i) for i in range(5)] for b in range(2)])
    weights = np.where(ids >= 0, 1.0 / np.take_along_axis(sizes, np.maximum(ids, 0), 1), 0.0)
    emb = outputs["embeddings"].reshape(2, 64, -1)
    point_emb = np.stack([emb[b, indices[b]] for b in range(2)])
    expected_embedding = np_embedding_loss(point_emb, ids, weights)
    targets = np_classification_targets(outputs["embeddings"], labels,
                                        batch["instance_classes"], batch["instance_valid"],
                                        indices, ids, TAUS, 0.5)
    assert (targets > 0).any()
    logits = outputs["class_logits"].reshape(2, 64, len(TAUS), -1)
    point_logits = np.stack([logits[b, indices[b]] for b in range(2)])
    expected_cls = np_classification_loss(point_logits, targets, ids >= 0)
    np.testing.assert_allclose(values["embedding"].numpy(), expected_embedding, rtol=1e-5)
    np.testing.assert_allclose(values["classification"].numpy(), expected_cls, rtol=1e-5)
    np.testing.assert_allclose(values["cls_weight"].numpy(), 0.2 * 10 / 20, rtol=1e-6)
    np.testing.assert_allclose(values["total"].numpy(),
                               expected_embedding + 0.1 * expected_cls, rtol=1e-5)


def test_semantic_targets_hand_worked():
    ids = tf.constant([[2, 0, -1, 1], [1, 1, 0, -1]])
    classes = tf.constant([[3, 1], [2, 0]])
    targets = losses.semantic_targets(ids, classes, num_taus=3).numpy()
    assert targets.shape == (2, 4, 3)
    np.testing.assert_array_equal(targets[..., 0], [[1, 0, 0, 3], [2, 2, 0, 0]])
    assert (targets == targets[..., :1]).all()


@pytest.mark.parametrize("step, weight", [(0, 0.0), (20, 0.1), (30, 0.2), (100, 0.2)])
def test_semantic_warmup_hands_over_to_the_paper_targets(step, weight):
    outputs, batch = _instance_loss_inputs(seed=2)
    config = losses.LossConfig(points_per_instance=4, cls_warmup_steps=10, cls_ramp_steps=20,
                               cls_semantic_warmup=True)
    seed = tf.constant([7, 1], tf.int64)
    values = losses.InstanceLoss(config)(outputs, batch, step=step, seed=seed)
    plain = losses.InstanceLoss(dataclasses.replace(config, cls_semantic_warmup=False))(
        outputs, batch, step=step, seed=seed)

    # The semantic loss from the NumPy cross-entropy on the same points: each point's
    # target is its instance's class at every tau, 0 on the background.
    labels = batch["instances"][:, 2::4, 2::4]
    points = losses.sample_points(labels, batch["instance_valid"], 4, seed)
    indices = points["point_indices"].numpy()
    ids = points["point_instance_ids"].numpy()
    own_class = np.array([[batch["instance_classes"][b, i - 1] if i >= 1 else 0
                           for i in ids[b]] for b in range(2)])
    targets = np.repeat(own_class[:, :, None], len(TAUS), axis=2)
    logits = outputs["class_logits"].reshape(2, 64, len(TAUS), -1)
    point_logits = np.stack([logits[b, indices[b]] for b in range(2)])
    expected_semantic = np_classification_loss(point_logits, targets, ids >= 0)
    np.testing.assert_allclose(values["semantic"].numpy(), expected_semantic, rtol=1e-5)
    np.testing.assert_allclose(values["cls_weight"].numpy(), weight, rtol=1e-6)
    np.testing.assert_allclose(
        values["total"].numpy(),
        plain["total"].numpy() + (0.2 - weight) * expected_semantic, rtol=1e-5, atol=1e-7)


def test_first_points_per_slot_keeps_the_head_of_each_slot():
    values = tf.constant([[0, 1, 2, 10, 11, 12], [20, 21, 22, 30, 31, 32]])
    np.testing.assert_array_equal(losses.first_points_per_slot(values, 3, 2),
                                  [[0, 1, 10, 11], [20, 21, 30, 31]])
    np.testing.assert_array_equal(losses.first_points_per_slot(values, 3, 3), values)


def test_instance_loss_classifies_a_subset_of_the_points():
    outputs, batch = _instance_loss_inputs(seed=4)
    seed = tf.constant([5, 6], tf.int64)
    config = losses.LossConfig(points_per_instance=6, cls_points_per_instance=2,
                               cls_warmup_steps=0, cls_ramp_steps=0)
    values = losses.InstanceLoss(config)(outputs, batch, step=1, seed=seed)
    full = losses.InstanceLoss(dataclasses.replace(config, cls_points_per_instance=None))(
        outputs, batch, step=1, seed=seed)
    # The embedding loss uses all 6 points either way.
    np.testing.assert_allclose(values["embedding"], full["embedding"], rtol=1e-6)

    # The classification loss, recomputed by the NumPy references on the first 2 of
    # each slot's 6 points (slot-major layout: slot j holds points [6j, 6j + 6)).
    labels = batch["instances"][:, 2::4, 2::4]
    points = losses.sample_points(labels, batch["instance_valid"], 6, seed)
    head = np.arange(points["point_indices"].shape[1]) % 6 < 2
    indices = points["point_indices"].numpy()[:, head]
    ids = points["point_instance_ids"].numpy()[:, head]
    targets = np_classification_targets(outputs["embeddings"], labels,
                                        batch["instance_classes"], batch["instance_valid"],
                                        indices, ids, TAUS, 0.5)
    logits = outputs["class_logits"].reshape(2, 64, len(TAUS), -1)
    point_logits = np.stack([logits[b, indices[b]] for b in range(2)])
    expected = np_classification_loss(point_logits, targets, ids >= 0)
    np.testing.assert_allclose(values["classification"].numpy(), expected, rtol=1e-5)
    assert abs(float(values["classification"]) - float(full["classification"])) > 1e-4


def test_instance_loss_tf_function_equals_eager_and_targets_carry_no_gradient():
    outputs, batch = _instance_loss_inputs(seed=1)
    loss_fn = losses.InstanceLoss(losses.LossConfig(cls_warmup_steps=0, cls_ramp_steps=0))
    seed = tf.constant([1, 2], tf.int64)
    eager = loss_fn(outputs, batch, step=5, seed=seed)
    graph = tf.function(loss_fn)(outputs, batch, step=tf.constant(5, tf.int64), seed=seed)
    for key in eager:
        np.testing.assert_allclose(graph[key].numpy(), eager[key].numpy(), rtol=1e-6)

    embeddings = tf.Variable(outputs["embeddings"])
    logits = tf.Variable(outputs["class_logits"])
    with tf.GradientTape(persistent=True) as tape:
        values = loss_fn({"embeddings": embeddings, "class_logits": logits}, batch, step=5,
                         seed=seed)
    assert tape.gradient(values["classification"], embeddings) is None
    grads = tape.gradient(values["total"], [embeddings, logits])
    assert all(np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0) for g in grads)


def test_instance_loss_accepts_bfloat16_outputs():
    outputs, batch = _instance_loss_inputs(seed=2)
    low = {k: tf.cast(v, tf.bfloat16) for k, v in outputs.items()}
    as_float = {k: tf.cast(v, tf.float32) for k, v in low.items()}
    loss_fn = losses.InstanceLoss()
    seed = tf.constant([4, 4])
    a = loss_fn(low, batch, step=0, seed=seed)
    b = loss_fn(as_float, batch, step=0, seed=seed)
    assert a["total"].dtype == tf.float32
    np.testing.assert_allclose(a["total"].numpy(), b["total"].numpy(), rtol=1e-6)


def test_instance_loss_rejects_mismatched_inputs():
    outputs, batch = _instance_loss_inputs()
    loss_fn = losses.InstanceLoss(losses.LossConfig(taus=(0.5, 0.75)))
    with pytest.raises(ValueError, match="taus"):
        loss_fn(outputs, batch, step=0, seed=tf.constant([1, 2]))
    with pytest.raises(ValueError, match="instance_valid"):
        losses.InstanceLoss()(outputs, {"instances": batch["instances"]}, step=0,
                              seed=tf.constant([1, 2]))


def test_losses_compile_with_xla():
    outputs, batch = _instance_loss_inputs(seed=3)
    loss_fn = losses.InstanceLoss(losses.LossConfig(cls_warmup_steps=0, cls_ramp_steps=0))
    compiled = tf.function(loss_fn, jit_compile=True)
    values = compiled(outputs, batch, step=tf.constant(1), seed=tf.constant([1, 2]))
    assert all(np.all(np.isfinite(v.numpy())) for v in values.values())
    # XLA draws other random numbers; the deterministic parts must agree with eager.
    inputs = _random_classification_inputs(4)
    xla_targets = tf.function(losses.classification_targets, jit_compile=True)(
        *[tf.constant(x) for x in inputs], taus=TAUS, iou_threshold=0.5)
    np.testing.assert_array_equal(xla_targets.numpy(),
                                  np_classification_targets(*inputs, TAUS, 0.5))


# ---------------------------------------------------------------------------------------
# tf.distribute: a subprocess, because logical devices must be set before TF starts.
# ---------------------------------------------------------------------------------------

_MIRRORED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, os.environ["TESTS_DIR"])
    import test_losses as t
    from instance_embed import losses

    outputs, batch = t._instance_loss_inputs(seed=5, batch=4)
    config = losses.LossConfig(points_per_instance=4, cls_warmup_steps=0, cls_ramp_steps=0)
    local_fn = losses.InstanceLoss(config)
    global_fn = losses.InstanceLoss(config, global_batch_reduction=True)
    seed = tf.constant([7, 11], tf.int64)
    step = tf.constant(3, tf.int64)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def shard(tree, i):
        return {k: v[2 * i:2 * i + 2] for k, v in tree.items()}

    def values_fn(ctx):
        i = ctx.replica_id_in_sync_group
        return shard(outputs, i), shard(batch, i)

    dist_outputs, dist_batch = strategy.experimental_distribute_values_from_function(
        values_fn)

    @tf.function
    def replica_fn(out, bat):
        a = local_fn(out, bat, step=step, seed=seed)
        b = global_fn(out, bat, step=step, seed=seed)
        return a["total"], a["embedding_per_image"], b["embedding"], b["total"]

    results = strategy.run(replica_fn, args=(dist_outputs, dist_batch))
    local = [[float(x) if x.shape.rank == 0 else x.numpy().tolist()
              for x in strategy.experimental_local_results(r)] for r in results]

    # Eager, without a strategy, on each replica's shard with the same seed.
    eager = [local_fn(shard(outputs, i), shard(batch, i), step=step, seed=seed)
             for i in range(2)]
    # The global-batch embedding loss, eagerly, from the points each replica sampled.
    point_emb, ids, weights = [], [], []
    for i in range(2):
        labels = losses.labels_at_resolution(shard(batch, i)["instances"], (8, 8))
        pts = losses.sample_points(labels, shard(batch, i)["instance_valid"], 4, seed)
        point_emb.append(losses.gather_points(shard(outputs, i)["embeddings"],
                                              pts["point_indices"]))
        ids.append(pts["point_instance_ids"])
        weights.append(pts["point_weights"])
    global_embedding = losses.embedding_loss(
        tf.concat(point_emb, 0), tf.concat(ids, 0), tf.concat(weights, 0))
    per_image = tf.concat([e["embedding_per_image"] for e in eager], 0)
    valid = tf.concat([e["embedding_valid"] for e in eager], 0)
    cls = tf.concat([e["classification_per_image"] for e in eager], 0)
    cls_valid = tf.concat([e["classification_valid"] for e in eager], 0)
    global_total = (losses.masked_mean(per_image, valid)
                    + losses.cls_loss_weight(step, config) * losses.masked_mean(cls, cls_valid))
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "local_total": local[0],
        "local_per_image": local[1],
        "global_embedding_shares": local[2],
        "global_total_shares": local[3],
        "eager_total": [float(e["total"]) for e in eager],
        "eager_per_image": [e["embedding_per_image"].numpy().tolist() for e in eager],
        "eager_global_embedding": float(global_embedding),
        "eager_global_total": float(global_total),
    }))
""")


def test_mirrored_strategy_matches_eager():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               TESTS_DIR=os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _MIRRORED_SCRIPT], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    np.testing.assert_allclose(result["local_total"], result["eager_total"], rtol=1e-5)
    np.testing.assert_allclose(result["local_per_image"], result["eager_per_image"], rtol=1e-5)
    # With global-batch reduction the replicas' shares add up to the global-batch mean.
    np.testing.assert_allclose(sum(result["global_embedding_shares"]),
                               result["eager_global_embedding"], rtol=1e-5)
    np.testing.assert_allclose(sum(result["global_total_shares"]),
                               result["eager_global_total"], rtol=1e-5)
