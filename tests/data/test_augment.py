"""Tests of instance_embed.data.augment against NumPy references and hand-worked cases."""

import math

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from instance_embed.data import augment

OFF = augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=False)

# Colour of each label in the "colour encodes the id" images: -1 (invented) must be
# black because invented image pixels are 0; 0 (background) is grey.
PALETTE = {
    -1: (0, 0, 0),
    0: (128, 128, 128),
    1: (255, 0, 0),
    2: (0, 255, 0),
    3: (0, 0, 255),
    4: (255, 255, 0),
    5: (255, 0, 255),
    6: (0, 255, 255),
}


def _params(angle=0.0, scale=1.0, offset=(0, 0), flip=False):
    return augment.AugmentParams(
        angle=tf.constant(angle, tf.float32), scale=tf.constant(scale, tf.float32),
        offset=tf.constant(offset, tf.int32), flip=tf.constant(flip))


def _apply(image, instances, params, output_size):
    transform = augment.output_to_input_transform(
        tf.constant(instances.shape[:2], tf.int32), params, output_size)
    out_image, out_instances = augment.warp(image, instances, transform, output_size)
    return out_image.numpy(), out_instances.numpy()


def _random_example(rng, height, width, num_ids=5):
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    instances = rng.integers(-1, num_ids + 1, (height, width)).astype(np.int32)
    return image, instances


def _blob_example(height=96, width=128):
    """Large blobs whose flat colour encodes their id (see PALETTE)."""
    instances = np.zeros((height, width), np.int32)
    yy, xx = np.mgrid[:height, :width]
    instances[8:40, 10:60] = 1
    instances[(yy - 65) ** 2 + (xx - 40) ** 2 < 20 ** 2] = 2
    instances[20:80, 75:95] = 3
    instances[(yy - 30) ** 2 + (xx - 110) ** 2 < 14 ** 2] = 4
    instances[70:92, 98:126] = 5
    image = np.zeros((height, width, 3), np.uint8)
    for label, colour in PALETTE.items():
        image[instances == label] = colour
    return image, instances


def _decode_colours(image):
    """Label of the nearest PALETTE colour of each pixel of a float [H, W, 3] image."""
    labels = np.array(list(PALETTE))
    colours = np.array(list(PALETTE.values()), np.float32)
    dist = ((image[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    return labels[dist.argmin(-1)]


def _reference_warp(image, instances, angle, scale, offset, flip, output_size):
    """Independent NumPy warp: builds the forward map as 3x3 matrices and inverts it."""
    in_h, in_w = instances.shape
    out_h, out_w = output_size
    canvas_h = max(1, int(np.round(np.float32(in_h) * np.float32(scale))))
    canvas_w = max(1, int(np.round(np.float32(in_w) * np.float32(scale))))

    def translate(tx, ty):
        return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)

    c, s = math.cos(angle), math.sin(angle)
    # Counter-clockwise as displayed, with y pointing down.
    rotation = np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])
    resize = np.diag([canvas_w / in_w, canvas_h / in_h, 1.0])
    forward = (translate(-offset[1], -offset[0]) @ translate(canvas_w / 2, canvas_h / 2)
               @ resize @ rotation @ translate(-in_w / 2, -in_h / 2))
    if flip:
        forward = np.array([[-1, 0, out_w], [0, 1, 0], [0, 0, 1]]) @ forward
    inverse = np.linalg.inv(forward)
    yy, xx = np.mgrid[:out_h, :out_w]
    points = np.stack([xx + 0.5, yy + 0.5, np.ones_like(xx, np.float64)], 0).reshape(3, -1)
    x, y, _ = inverse @ points
    x, y = (x - 0.5).reshape(out_h, out_w), (y - 0.5).reshape(out_h, out_w)

    def read(arr, yi, xi, fill):
        ok = (yi >= 0) & (yi < in_h) & (xi >= 0) & (xi < in_w)
        values = arr[np.clip(yi, 0, in_h - 1), np.clip(xi, 0, in_w - 1)]
        return np.where(ok.reshape(ok.shape + (1,) * (arr.ndim - 2)), values, fill)

    # Half away from zero, as the op rounds.
    near_y = (np.sign(y) * np.floor(np.abs(y) + 0.5)).astype(int)
    near_x = (np.sign(x) * np.floor(np.abs(x) + 0.5)).astype(int)
    labels = read(instances, near_y, near_x, -1)
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    wy, wx = (y - y0)[..., None], (x - x0)[..., None]
    img = image.astype(np.float64)
    bilinear = ((1 - wy) * (1 - wx) * read(img, y0, x0, 0.0)
                + (1 - wy) * wx * read(img, y0, x0 + 1, 0.0)
                + wy * (1 - wx) * read(img, y0 + 1, x0, 0.0)
                + wy * wx * read(img, y0 + 1, x0 + 1, 0.0))
    # Pixels whose nearest-neighbour choice is a near-tie may round either way in float32.
    tie = (np.abs(np.abs(y - np.floor(y)) - 0.5) < 1e-3) | (
        np.abs(np.abs(x - np.floor(x)) - 0.5) < 1e-3)
    return bilinear, labels, ~tie


def test_identity_with_zero_rotation_unit_scale_full_crop():
    rng = np.random.default_rng(0)
    image, instances = _random_example(rng, 48, 64)
    config = augment.AugmentConfig(max_rotation_degrees=0.0, min_scale=1.0, max_scale=1.0,
                                   flip=False)
    out_image, out_instances = augment.augment(image, instances, tf.constant([3, 4]),
                                               (48, 64), config)
    np.testing.assert_array_equal(out_image.numpy(), image.astype(np.float32))
    np.testing.assert_array_equal(out_instances.numpy(), instances)
    assert out_image.dtype == tf.float32 and out_instances.dtype == tf.int32


def test_flip_matches_numpy_and_twice_is_identity():
    rng = np.random.default_rng(1)
    image, instances = _random_example(rng, 40, 56)
    config = augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=True,
                                   flip_probability=1.0)
    once_image, once_instances = augment.augment(image, instances, tf.constant([0, 1]),
                                                 (40, 56), config)
    np.testing.assert_array_equal(once_instances.numpy(), instances[:, ::-1])
    np.testing.assert_array_equal(once_image.numpy(), image[:, ::-1].astype(np.float32))
    twice_image, twice_instances = augment.augment(
        once_image, once_instances, tf.constant([5, 6]), (40, 56), config)
    np.testing.assert_array_equal(twice_instances.numpy(), instances)
    np.testing.assert_array_equal(twice_image.numpy(), image.astype(np.float32))


def test_rotation_by_90_degrees_matches_rot90():
    rng = np.random.default_rng(2)
    image, instances = _random_example(rng, 32, 32)
    out_image, out_instances = _apply(image, instances, _params(angle=math.pi / 2), 32)
    # np.rot90 turns counter-clockwise as displayed, the documented sign convention.
    np.testing.assert_array_equal(out_instances, np.rot90(instances))
    np.testing.assert_allclose(out_image, np.rot90(image).astype(np.float32), atol=0.01)


def test_upscale_by_two_repeats_labels():
    rng = np.random.default_rng(3)
    image, instances = _random_example(rng, 12, 10)
    _, out_instances = _apply(image, instances, _params(scale=2.0), (24, 20))
    np.testing.assert_array_equal(out_instances,
                                  np.repeat(np.repeat(instances, 2, axis=0), 2, axis=1))


@pytest.mark.parametrize("trial", range(6))
def test_warp_matches_numpy_reference(trial):
    rng = np.random.default_rng(10 + trial)
    image, instances = _random_example(rng, 30, 41)
    angle = float(rng.uniform(-0.6, 0.6))
    scale = float(rng.uniform(0.6, 1.8))
    offset = (int(rng.integers(-10, 20)), int(rng.integers(-10, 20)))
    flip = bool(trial % 2)
    output_size = (36, 28)
    out_image, out_instances = _apply(image, instances,
                                      _params(angle, scale, offset, flip), output_size)
    ref_image, ref_instances, safe = _reference_warp(image, instances, angle, scale,
                                                     offset, flip, output_size)
    assert safe.mean() > 0.9
    np.testing.assert_array_equal(out_instances[safe], ref_instances[safe])
    np.testing.assert_allclose(out_image, ref_image, atol=0.1)
    assert (out_instances == -1).any()  # The draw does invent pixels here.


@pytest.mark.parametrize("seed,output_size", [(s, (64, 64)) for s in range(4)]
                         + [(s, (160, 144)) for s in range(4, 8)])
def test_colours_still_decode_to_their_ids_after_augmentation(seed, output_size):
    image, instances = _blob_example()
    out_image, out_instances = augment.augment(image, instances, tf.constant([seed, 7]),
                                               output_size, augment.AugmentConfig())
    out_image, out_instances = out_image.numpy(), out_instances.numpy()
    decoded = _decode_colours(out_image)
    # Compare away from boundaries: where a 5x5 neighbourhood holds a single label.
    interior = np.zeros(out_instances.shape, bool)
    for label in np.unique(out_instances):
        interior |= ndimage.binary_erosion(out_instances == label, np.ones((5, 5)),
                                           border_value=1)
    assert interior.mean() > 0.5
    np.testing.assert_array_equal(decoded[interior], out_instances[interior])
    present = set(np.unique(out_instances[out_instances > 0]).tolist())
    assert present <= {1, 2, 3, 4, 5}


def test_big_window_pads_with_minus_one_and_zero():
    rng = np.random.default_rng(4)
    image, instances = _random_example(rng, 20, 20)
    out_image, out_instances = augment.augment(image, instances, tf.constant([1, 1]), 32,
                                               OFF)
    # Centred: slack 20 - 32 = -12, offset floor(-12 / 2) = -6, so the input starts at 6.
    expected = -np.ones((32, 32), np.int32)
    expected[6:26, 6:26] = instances
    np.testing.assert_array_equal(out_instances.numpy(), expected)
    expected_image = np.zeros((32, 32, 3), np.float32)
    expected_image[6:26, 6:26] = image
    np.testing.assert_array_equal(out_image.numpy(), expected_image)


def test_rotation_invents_minus_one_in_the_corners():
    instances = np.ones((64, 64), np.int32)
    image = np.full((64, 64, 3), 200, np.uint8)
    out_image, out_instances = _apply(image, instances,
                                      _params(angle=math.radians(10)), 64)
    # The corner pixel (0, 0), 31.5 px from the centre on both axes, comes from
    # x = -31.5 cos10 + 31.5 sin10 = -25.6 and y = -31.5 sin10 - 31.5 cos10 = -36.5
    # relative to the centre: outside the 64 x 64 input; the other corners by symmetry.
    for y, x in [(0, 0), (0, 63), (63, 0), (63, 63)]:
        assert out_instances[y, x] == -1
        assert out_image[y, x].max() == 0
    assert out_instances[32, 32] == 1
    assert set(np.unique(out_instances).tolist()) == {-1, 1}
    # Pixels with a source keep a valid id: the invented area is only the corners.
    assert 0.02 < (out_instances == -1).mean() < 0.2


def _reference_counts(grid_labels, offsets, window, stride, fraction):
    counts = []
    ids = [i for i in np.unique(grid_labels) if i > 0]
    rows = np.arange(grid_labels.shape[0])[:, None] * stride
    cols = np.arange(grid_labels.shape[1])[None, :] * stride
    for y0, x0 in offsets:
        inside = ((rows >= y0) & (rows < y0 + window[0])
                  & (cols >= x0) & (cols < x0 + window[1]))
        n = 0
        for i in ids:
            mask = grid_labels == i
            n += int(mask[inside].sum() >= fraction * mask.sum())
        counts.append(n)
    return np.array(counts)


@pytest.mark.parametrize("stride,fraction", [(1, 0.5), (4, 0.5), (3, 1.0)])
def test_count_instances_in_windows_matches_brute_force(stride, fraction):
    rng = np.random.default_rng(stride)
    grid = np.zeros((30, 25), np.int32)
    for i in range(1, 9):
        y, x = rng.integers(0, 26), rng.integers(0, 21)
        grid[y:y + rng.integers(1, 6), x:x + rng.integers(1, 6)] = i
    grid[rng.random(grid.shape) < 0.05] = -1
    offsets = rng.integers(-40, 80, (50, 2)).astype(np.int32)
    window = (48, 36)
    counts = augment.count_instances_in_windows(tf.constant(grid), tf.constant(offsets),
                                                window, stride, fraction)
    np.testing.assert_array_equal(
        counts.numpy(), _reference_counts(grid, offsets, window, stride, fraction))


def test_count_instances_without_instances_is_zero():
    counts = augment.count_instances_in_windows(
        tf.zeros([8, 8], tf.int32), tf.constant([[0, 0], [3, -2]]), 4, 2, 0.5)
    np.testing.assert_array_equal(counts.numpy(), [0, 0])


def test_crop_offsets_cover_the_valid_range():
    instances = tf.zeros([50, 40], tf.int32)
    config = augment.AugmentConfig(crop_instance_bonus=0.0)
    sample = tf.function(lambda seed: augment.sample_crop_offset(
        seed, instances, tf.constant(0.0), tf.constant(1.0), (30, 64), config))
    offsets = np.array([sample(tf.constant([s, 0])).numpy() for s in range(400)])
    # Rows: canvas 50 > window 30, so y0 in 0..20; columns: 40 < 64, so x0 in -24..0.
    assert offsets[:, 0].min() == 0 and offsets[:, 0].max() == 20
    assert offsets[:, 1].min() == -24 and offsets[:, 1].max() == 0


def test_crop_sampler_prefers_windows_with_more_instances():
    # 12 instances of 10 x 10 pixels, all in the top-left 80 x 80 corner of 256 x 256.
    instances = np.zeros((256, 256), np.int32)
    for k in range(12):
        y, x = 4 + 25 * (k // 3), 4 + 25 * (k % 3)
        instances[y:y + 10, x:x + 10] = k + 1
    window = 64

    def chosen_counts(bonus):
        config = augment.AugmentConfig(crop_instance_bonus=bonus)
        sample = tf.function(lambda seed: augment.sample_crop_offset(
            seed, tf.constant(instances), tf.constant(0.0), tf.constant(1.0), window,
            config))
        counts = []
        for s in range(300):
            y0, x0 = sample(tf.constant([s, 99])).numpy()
            crop = instances[y0:y0 + window, x0:x0 + window]
            # Independent count: instances with at least half of their 100 pixels inside.
            counts.append(sum(int((crop == k).sum() >= 50) for k in range(1, 13)))
        return np.array(counts, np.float64)

    weighted, uniform = chosen_counts(1.0), chosen_counts(0.0)
    std_err = math.sqrt(weighted.var() / len(weighted) + uniform.var() / len(uniform))
    assert weighted.mean() - uniform.mean() > 4 * std_err, (weighted.mean(),
                                                            uniform.mean(), std_err)


def test_same_seed_same_output_different_seed_different_output():
    image, instances = _blob_example()
    config = augment.AugmentConfig()
    first = augment.augment(image, instances, tf.constant([5, 5]), 64, config)
    again = augment.augment(image, instances, tf.constant([5, 5]), 64, config)
    other = augment.augment(image, instances, tf.constant([6, 5]), 64, config)
    np.testing.assert_array_equal(first[0].numpy(), again[0].numpy())
    np.testing.assert_array_equal(first[1].numpy(), again[1].numpy())
    assert not np.array_equal(first[0].numpy(), other[0].numpy())


def test_sampled_parameters_stay_in_their_ranges():
    instances = tf.zeros([100, 100], tf.int32)
    config = augment.AugmentConfig()
    sample = tf.function(lambda seed: augment.sample_params(seed, instances, 64, config))
    draws = [sample(tf.constant([s, 3])) for s in range(200)]
    angles = np.degrees([d.angle.numpy() for d in draws])
    scales = np.array([d.scale.numpy() for d in draws])
    flips = np.array([d.flip.numpy() for d in draws])
    assert angles.min() >= -10 and angles.max() <= 10 and np.ptp(angles) > 15
    assert scales.min() >= 0.7 and scales.max() <= 1.5 and np.ptp(scales) > 0.6
    assert 0.35 < flips.mean() < 0.65


@pytest.mark.parametrize("field,value", [("min_scale", 0.0), ("max_scale", 0.5),
                                         ("num_crop_candidates", 0),
                                         ("flip_probability", 1.5),
                                         ("crop_inside_fraction", 0.0),
                                         ("crop_count_stride", 0),
                                         ("max_rotation_degrees", -1.0)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        augment.AugmentConfig(**{field: value})
