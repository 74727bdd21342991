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
import tensorflow as tf

from instance_embed import losses
from instance_embed.losses import classification
from instance_embed.losses import embedding
from instance_embed.losses import sampling

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


def _embedding_loss(point_embeddings, point_instance_ids, point_weights=None):
    """The embedding loss' mean over images with a pair of points."""
    return losses.masked_mean(*embedding.embedding_loss_per_image(
        point_embeddings, point_instance_ids, point_weights))


def _classification_loss(point_logits, targets, point_valid):
    """The classification loss' mean over images with a valid point."""
    return losses.masked_mean(*classification.classification_loss_per_image(
        point_logits, targets, point_valid))


# ---------------------------------------------------------------------------------------
# Configuration and schedule.
# ---------------------------------------------------------------------------------------


def test_loss_config_defaults():
    config = losses.LossConfig()
    assert config.points_per_instance == 10
    assert config.instance_size_weighting is True
    assert config.cls_iou_threshold == 0.5
    assert config.cls_weight_max == 0.2


@pytest.mark.parametrize("field, value", [
    ("points_per_instance", 0),
    ("points_per_instance", 2.5),
    ("instance_size_weighting", "yes"),
    ("cls_iou_threshold", 1.0),
    ("cls_iou_threshold", -0.1),
    ("cls_warmup_steps", -1),
    ("cls_ramp_steps", 1.5),
    ("cls_weight_max", -0.2),
])
def test_loss_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        losses.LossConfig(**{field: value})


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (99, 0.0), (100, 0.0), (110, 0.04), (125, 0.1), (149, 0.196),
    (150, 0.2), (10_000, 0.2),
])
def test_cls_loss_weight_schedule(step, expected):
    config = losses.LossConfig(cls_warmup_steps=100, cls_ramp_steps=50, cls_weight_max=0.2)
    value = classification.cls_loss_weight(tf.constant(step, tf.int64), config)
    assert value.dtype == tf.float32 and value.shape == ()
    np.testing.assert_allclose(value.numpy(), expected, atol=1e-7)


def test_cls_loss_weight_without_ramp_jumps_at_end_of_warmup():
    config = losses.LossConfig(cls_warmup_steps=10, cls_ramp_steps=0, cls_weight_max=0.5)
    values = [float(classification.cls_loss_weight(s, config)) for s in (0, 9, 10, 11)]
    assert values == [0.0, 0.0, 0.5, 0.5]


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
    per_image, valid = embedding.embedding_loss_per_image(emb, ids, weights)
    ref_per_image, ref_valid = np_embedding_loss_per_image(emb, ids, weights)
    np.testing.assert_array_equal(valid.numpy(), ref_valid)
    assert list(ref_valid) == [True, True, False, False, True]
    np.testing.assert_allclose(per_image.numpy(), ref_per_image, rtol=1e-5, atol=1e-6)
    value = _embedding_loss(emb, ids, weights)
    assert value.dtype == tf.float32 and value.shape == ()
    np.testing.assert_allclose(value.numpy(), np_embedding_loss(emb, ids, weights), rtol=1e-5)


def test_embedding_loss_uniform_weights_and_large_offsets():
    emb, ids, _ = _random_embedding_inputs(seed=1)
    # Distances are translation invariant; a large common offset must not cost precision.
    shifted = emb + np.float32(300.0)
    np.testing.assert_allclose(_embedding_loss(shifted, ids).numpy(),
                               np_embedding_loss(emb, ids), rtol=1e-5)


def test_embedding_loss_is_zero_without_pairs():
    emb = np.ones((3, 4, 2), np.float32)
    ids = np.array([[-1, -1, -1, -1], [-1, 2, -1, -1], [-1, -1, -1, -1]], np.int32)
    assert float(_embedding_loss(emb, ids)) == 0.0
    per_image, valid = embedding.embedding_loss_per_image(emb, ids)
    assert not valid.numpy().any() and not per_image.numpy().any()


def test_embedding_loss_accepts_half_precision():
    emb, ids, weights = _random_embedding_inputs(seed=2)
    for dtype in (tf.bfloat16, tf.float16):
        low = tf.cast(emb, dtype)
        expected = np_embedding_loss(tf.cast(low, tf.float32).numpy(), ids, weights)
        value = _embedding_loss(low, ids, weights)
        assert value.dtype == tf.float32
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)


def test_embedding_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(1, 5, 3))
    ids = np.array([[0, 0, 1, 1, 2]], np.int32)
    weights = rng.uniform(0.5, 1.5, size=(1, 5))
    x = tf.Variable(emb.astype(np.float32))
    with tf.GradientTape() as tape:
        value = _embedding_loss(x, ids, weights.astype(np.float32))
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
        value = _embedding_loss(x, ids, np.full((2, 6), 0.3, np.float32))
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
        value = _embedding_loss(x, ids)
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
    targets = classification.classification_targets(emb, labels, classes, valid, indices, ids, TAUS,
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
    targets = classification.classification_targets(emb, labels, classes, valid, indices, ids, TAUS,
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
    targets = classification.classification_targets(*inputs, taus=TAUS,
                                                    iou_threshold=iou_threshold)
    expected = np_classification_targets(*inputs, TAUS, iou_threshold)
    np.testing.assert_array_equal(targets.numpy(), expected)
    assert (expected > 0).any() and (expected[:, :-3] == 0).any()


def test_classification_loss_matches_numpy_reference():
    rng = np.random.default_rng(7)
    logits = rng.normal(scale=2.0, size=(3, 6, 4, 3)).astype(np.float32)
    targets = rng.integers(0, 3, size=(3, 6, 4)).astype(np.int32)
    point_valid = rng.random((3, 6)) < 0.6
    point_valid[1] = False
    point_valid[0, 0] = True
    value = _classification_loss(logits, targets, point_valid)
    np.testing.assert_allclose(value.numpy(),
                               np_classification_loss(logits, targets, point_valid), rtol=1e-5)
    _, valid = classification.classification_loss_per_image(logits, targets, point_valid)
    assert list(valid.numpy()) == [True, False, point_valid[2].any()]
    assert float(_classification_loss(logits, targets, np.zeros((3, 6), bool))) == 0.0


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
    values = losses.InstanceLoss(config, TAUS)(outputs, batch, step=20, seed=seed)
    assert set(values) == {"total", "embedding", "classification", "cls_weight",
                           "embedding_per_image", "embedding_valid",
                           "classification_per_image", "classification_valid"}
    for key in ("total", "embedding", "classification", "cls_weight"):
        assert values[key].dtype == tf.float32 and values[key].shape == ()

    # Recompute from the sampled points with the NumPy references.
    labels = batch["instances"][:, 2::4, 2::4]
    points = sampling.sample_points(labels, batch["instance_valid"], 4, seed)
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
    targets = classification.semantic_targets(ids, classes, num_taus=3).numpy()
    assert targets.shape == (2, 4, 3)
    np.testing.assert_array_equal(targets[..., 0], [[1, 0, 0, 3], [2, 2, 0, 0]])
    assert (targets == targets[..., :1]).all()


@pytest.mark.parametrize("step, weight", [(0, 0.0), (20, 0.1), (30, 0.2), (100, 0.2)])
def test_semantic_warmup_hands_over_to_the_paper_targets(step, weight):
    outputs, batch = _instance_loss_inputs(seed=2)
    config = losses.LossConfig(points_per_instance=4, cls_warmup_steps=10, cls_ramp_steps=20,
                               cls_semantic_warmup=True)
    seed = tf.constant([7, 1], tf.int64)
    values = losses.InstanceLoss(config, TAUS)(outputs, batch, step=step, seed=seed)
    plain = losses.InstanceLoss(dataclasses.replace(config, cls_semantic_warmup=False), TAUS)(
        outputs, batch, step=step, seed=seed)

    # The semantic loss from the NumPy cross-entropy on the same points: each point's
    # target is its instance's class at every tau, 0 on the background.
    labels = batch["instances"][:, 2::4, 2::4]
    points = sampling.sample_points(labels, batch["instance_valid"], 4, seed)
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


def test_instance_loss_tf_function_equals_eager_and_targets_carry_no_gradient():
    outputs, batch = _instance_loss_inputs(seed=1)
    loss_fn = losses.InstanceLoss(losses.LossConfig(cls_warmup_steps=0, cls_ramp_steps=0), TAUS)
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
    loss_fn = losses.InstanceLoss(None, TAUS)
    seed = tf.constant([4, 4])
    a = loss_fn(low, batch, step=0, seed=seed)
    b = loss_fn(as_float, batch, step=0, seed=seed)
    assert a["total"].dtype == tf.float32
    np.testing.assert_allclose(a["total"].numpy(), b["total"].numpy(), rtol=1e-6)


def test_instance_loss_rejects_mismatched_inputs():
    outputs, batch = _instance_loss_inputs()
    loss_fn = losses.InstanceLoss(losses.LossConfig(), (0.5, 0.75))
    with pytest.raises(ValueError, match="taus"):
        loss_fn(outputs, batch, step=0, seed=tf.constant([1, 2]))
    with pytest.raises(ValueError, match="instance_valid"):
        losses.InstanceLoss(None, TAUS)(outputs, {"instances": batch["instances"]}, step=0,
                                        seed=tf.constant([1, 2]))


def test_losses_compile_with_xla():
    outputs, batch = _instance_loss_inputs(seed=3)
    loss_fn = losses.InstanceLoss(losses.LossConfig(cls_warmup_steps=0, cls_ramp_steps=0), TAUS)
    compiled = tf.function(loss_fn, jit_compile=True)
    values = compiled(outputs, batch, step=tf.constant(1), seed=tf.constant([1, 2]))
    assert all(np.all(np.isfinite(v.numpy())) for v in values.values())
    # XLA draws other random numbers; the deterministic parts must agree with eager.
    inputs = _random_classification_inputs(4)
    xla_targets = tf.function(classification.classification_targets, jit_compile=True)(
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
    from instance_embed import losses
    from instance_embed.losses import classification
    from instance_embed.losses import embedding
    from instance_embed.losses import sampling

    TAUS = __TAUS__
    with np.load(__INPUTS__) as arrays:
        outputs = {k[4:]: arrays[k] for k in arrays.files if k.startswith("out_")}
        batch = {k[6:]: arrays[k] for k in arrays.files if k.startswith("batch_")}
    config = losses.LossConfig(points_per_instance=4, cls_warmup_steps=0, cls_ramp_steps=0)
    local_fn = losses.InstanceLoss(config, TAUS)
    global_fn = losses.InstanceLoss(config, TAUS, global_batch_reduction=True)
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
        labels = sampling.labels_at_resolution(shard(batch, i)["instances"], (8, 8))
        pts = sampling.sample_points(labels, shard(batch, i)["instance_valid"], 4, seed)
        point_emb.append(sampling.gather_points(shard(outputs, i)["embeddings"],
                                              pts["point_indices"]))
        ids.append(pts["point_instance_ids"])
        weights.append(pts["point_weights"])
    global_embedding = losses.masked_mean(*embedding.embedding_loss_per_image(
        tf.concat(point_emb, 0), tf.concat(ids, 0), tf.concat(weights, 0)))
    per_image = tf.concat([e["embedding_per_image"] for e in eager], 0)
    valid = tf.concat([e["embedding_valid"] for e in eager], 0)
    cls = tf.concat([e["classification_per_image"] for e in eager], 0)
    cls_valid = tf.concat([e["classification_valid"] for e in eager], 0)
    global_total = (losses.masked_mean(per_image, valid)
                    + classification.cls_loss_weight(step, config)
                    * losses.masked_mean(cls, cls_valid))
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


def test_mirrored_strategy_matches_eager(tmp_path):
    outputs, batch = _instance_loss_inputs(seed=5, batch=4)
    inputs = str(tmp_path / "inputs.npz")
    np.savez(inputs, **{f"out_{k}": v for k, v in outputs.items()},
             **{f"batch_{k}": v for k, v in batch.items()})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    script = _MIRRORED_SCRIPT.replace("__TAUS__", repr(TAUS)).replace("__INPUTS__",
                                                                       repr(inputs))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
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
