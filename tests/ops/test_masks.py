"""Tests of `instance_embed.ops.masks` and `ops.geometry` against the NumPy references
of conftest.py (`numpy_inference`) and hand-worked cases.

Masks are compared away from the threshold boundary, where float32 and float64
distances may legitimately disagree.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from instance_embed.ops import checks
from instance_embed.ops import geometry
from instance_embed.ops import masks

BOUNDARY = 1e-4


def test_distance_thresholds():
    np.testing.assert_allclose(geometry.distance_thresholds([0.5, 0.9]).numpy(),
                               [math.log(3.0), math.log(2 / 0.9 - 1)], rtol=1e-6)
    np.testing.assert_allclose(geometry.distance_thresholds(tf.constant([0.5, 0.9])).numpy(),
                               [math.log(3.0), math.log(2 / 0.9 - 1)], rtol=1e-6)


@pytest.mark.parametrize("taus", [(), (0.5, 1.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.5), "0.5"])
def test_bad_taus_are_refused(taus):
    with pytest.raises(ValueError, match="taus"):
        checks.check_taus(taus)


def test_grow_masks_matches_numpy(numpy_inference):
    rng = np.random.default_rng(3)
    embeddings, _ = numpy_inference.random_inputs(rng, batch=2, h=8, w=9, d=3)
    embeddings *= 0.6  # distances comparable with the thresholds: masks are non-trivial
    seeds = rng.integers(0, 72, size=(2, 12)).astype(np.int32)
    seeds[1, 4] = -1
    taus = rng.choice([0.25, 0.5, 0.75, 0.9, 1.0], size=(2, 12)).astype(np.float32)
    got = masks.grow_masks(embeddings, seeds, taus).numpy()
    assert got.dtype == bool and got.shape == (2, 12, 8, 9)
    checked = 0
    for b in range(2):
        margins = numpy_inference.margins(embeddings[b], seeds[b], taus[b])
        for k in range(12):
            if seeds[b, k] < 0:
                assert not got[b, k].any()
                continue
            assert got[b, k].reshape(-1)[seeds[b, k]]  # a seed is always in its mask
            clear = np.abs(margins[k]) > BOUNDARY
            np.testing.assert_array_equal(got[b, k][clear], margins[k][clear] >= 0)
            checked += clear.sum()
    assert 0 < got.mean() < 1 and checked > 0.9 * got.size


def test_seed_classes_and_scores_matches_numpy(numpy_inference):
    rng = np.random.default_rng(4)
    _, logits = numpy_inference.random_inputs(rng, batch=2, h=4, w=5, num_taus=3,
                                              num_classes=4)
    probs = numpy_inference.softmax(logits).astype(np.float32)
    # A tie across taus and classes at pixel 7 of image 0: lowest tau, then lowest class.
    probs[0, 1, 2] = [[0.1, 0.3, 0.6, 0.0, 0.0], [0.1, 0.0, 0.6, 0.0, 0.3], [0.4, 0.6, 0, 0, 0]]
    seeds = np.array([[7, 0, 19, -1], [3, 3, 12, 5]], np.int32)
    tau_index, classes, scores = (x.numpy() for x in
                                  masks.seed_classes_and_scores(probs, seeds))
    assert tau_index.dtype == classes.dtype == np.int32 and scores.dtype == np.float32
    assert (tau_index[0, 0], classes[0, 0]) == (0, 2)
    for b in range(2):
        want_taus, want_classes, want_scores = numpy_inference.classes_and_scores(probs[b],
                                                                                  seeds[b])
        assert tau_index[b].tolist() == want_taus
        assert classes[b].tolist() == want_classes
        np.testing.assert_array_equal(scores[b], np.float32(want_scores))


def greedy_suppression(masks, candidate, threshold):
    """NumPy: one detection at a time in order, kept when a candidate and no kept
    earlier mask overlaps it above `threshold` IoU; with the supports."""
    flat = masks.reshape(len(masks), -1)
    kept = []
    support = np.zeros(len(masks), np.int32)
    for i in range(len(masks)):
        owners = [j for j in kept
                  if (flat[i] & flat[j]).sum() / max((flat[i] | flat[j]).sum(), 1) > threshold]
        if candidate[i] and not owners:
            kept.append(i)
            support[i] = 1
        elif candidate[i]:
            support[owners[0]] += 1
    keep = np.zeros(len(masks), bool)
    keep[kept] = True
    return keep, support


def test_suppression_of_long_chains_matches_the_greedy():
    # Bars shifted one column at a time: each overlaps the next (IoU 2/3), so the greedy
    # keeps every other one and each decision depends on the one before it; in random
    # order, and with some non-candidates, whose removal flips the rest of a chain.
    rng = np.random.default_rng(3)
    num, width = 40, 5
    bars = np.zeros((num, 4, num + width), bool)
    for k in range(num):
        bars[k, :, k:k + width] = True
    order = np.concatenate([np.arange(30), rng.permutation(np.arange(30, num))])
    batch = np.stack([bars, bars[order]])
    candidate = rng.random((2, num)) > 0.1
    eager = masks.suppress_duplicates(tf.constant(batch), tf.constant(candidate), 0.5)
    for jit_compile in (False, True):  # the graph's while loop, and under XLA
        graph = tf.function(masks.suppress_duplicates, jit_compile=jit_compile)(
            tf.constant(batch), tf.constant(candidate), 0.5)
        for x, y in zip(graph, eager):
            np.testing.assert_array_equal(x.numpy(), y.numpy())
    keep, support = eager
    for b in range(2):
        want_keep, want_support = greedy_suppression(batch[b], candidate[b], 0.5)
        np.testing.assert_array_equal(keep.numpy()[b], want_keep)
        np.testing.assert_array_equal(support.numpy()[b], want_support)
    assert 5 < keep.numpy()[0].sum() < 30  # chains: neither all kept nor all suppressed
