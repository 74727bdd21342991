"""Tests of `instance_embed.losses.sampling`: labels at the heads' resolution and the
sampled points, against NumPy and hand-worked cases."""

import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

from instance_embed.losses import sampling


def test_labels_at_resolution_takes_cell_centres():
    rng = np.random.default_rng(0)
    labels = rng.integers(-1, 5, size=(2, 16, 24)).astype(np.int32)
    out = sampling.labels_at_resolution(labels, (4, 6)).numpy()
    # Stride 4: the centre of cell i is pixel 4 i + 2.
    np.testing.assert_array_equal(out, labels[:, 2::4, 2::4])
    assert out.dtype == np.int32 and (out == -1).any()


def test_labels_at_resolution_non_integer_stride():
    labels = np.arange(10 * 10, dtype=np.int32).reshape(1, 10, 10) - 1
    out = sampling.labels_at_resolution(labels, (4, 3)).numpy()
    rows = [1, 3, 6, 8]  # floor((i + 0.5) * 10 / 4)
    cols = [1, 5, 8]     # floor((j + 0.5) * 10 / 3)
    np.testing.assert_array_equal(out[0], labels[0][np.ix_(rows, cols)])


def test_labels_at_resolution_rejects_float_labels():
    with pytest.raises(TypeError, match="instances"):
        sampling.labels_at_resolution(np.zeros((1, 8, 8), np.float32), (2, 2))


def test_gather_points_matches_numpy():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(2, 5, 6, 3, 4)).astype(np.float32)
    indices = rng.integers(0, 30, size=(2, 7)).astype(np.int32)
    out = sampling.gather_points(features, indices).numpy()
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
    points = sampling.sample_points(labels, valid, k, tf.constant([3, 4]),
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
    first = sampling.sample_points(labels, valid, 5, tf.constant([1, 2], tf.int64))
    again = sampling.sample_points(labels, valid, 5, tf.constant([1, 2], tf.int64))
    other = sampling.sample_points(labels, valid, 5, tf.constant([1, 3], tf.int64))
    np.testing.assert_array_equal(first["point_indices"], again["point_indices"])
    assert np.any(first["point_indices"].numpy() != other["point_indices"].numpy())
    np.testing.assert_array_equal(first["point_instance_ids"], other["point_instance_ids"])


def test_per_image_seeds_make_sampling_independent_of_batch_split():
    labels, valid = _sampling_fixture()
    seeds = tf.constant([[7, 0], [7, 1], [7, 2]], tf.int64)
    whole = sampling.sample_points(labels, valid, 5, seeds)
    for b in range(3):
        alone = sampling.sample_points(labels[b:b + 1], valid[b:b + 1], 5, seeds[b:b + 1])
        for key in ("point_indices", "point_instance_ids", "point_weights"):
            np.testing.assert_array_equal(whole[key].numpy()[b], alone[key].numpy()[0])
    # A different seed for one image changes that image's points only.
    moved = sampling.sample_points(labels, valid, 5, tf.constant([[7, 0], [7, 9], [7, 2]],
                                                               tf.int64))
    np.testing.assert_array_equal(whole["point_indices"][0], moved["point_indices"][0])
    assert np.any(whole["point_indices"].numpy()[1] != moved["point_indices"].numpy()[1])


def test_sample_points_is_uniform_within_an_instance():
    # 400 copies of one image: instance 1 has 12 pixels, K = 4 per draw.
    labels = np.full((400, 4, 5), -1, np.int32)
    labels[:, 1:4, 1:5] = 1
    labels[:, 0, :] = 0
    valid = np.ones((400, 1), bool)
    points = sampling.sample_points(labels, valid, 4, tf.constant([5, 6]))
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
        sampling.sample_points(labels, valid, 5, tf.constant([1, 2, 3]))
    with pytest.raises(ValueError, match="points_per_instance"):
        sampling.sample_points(labels, valid, 0, tf.constant([1, 2]))


def test_instance_size_weights():
    ids = np.array([[0, 0, 1, 2, -1]], np.int32)
    sizes = np.array([[50, 4, 0]], np.int32)
    np.testing.assert_allclose(sampling.instance_size_weights(ids, sizes).numpy(),
                               [[1 / 50, 1 / 50, 1 / 4, 0.0, 0.0]], rtol=1e-6)
