"""Bilinear mask drawing from cell codes (ops.upsampling) against two references:
`tf.image.resize` (the TF kernel) thresholded at 0.5, and the implementation it
replaced (one seed at a time, rows gathered and columns interpolated by a matmul),
kept here as it was."""

import numpy as np
import pytest
import tensorflow as tf

from instance_embed import inference
from instance_embed.model.config import PAPER_TAUS as TAUS
from instance_embed.ops import masks as mask_ops
from instance_embed.ops import upsampling


def replaced_implementation(low_res_masks, size):
    """The masks and instance map of ops/upsampling.py before the cell codes (2026-12-07):
    bool [B, K, h, w] -> (bool [B, K, H, W], int32 [B, H, W]), any H, W."""
    low_res_masks = tf.constant(low_res_masks)
    shape = tf.shape(low_res_masks)

    def interpolation(in_size, out_size):
        scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
        source = (tf.cast(tf.range(out_size), tf.float32) + 0.5) * scale - 0.5
        source = tf.clip_by_value(source, 0.0, tf.cast(in_size - 1, tf.float32))
        low = tf.cast(tf.floor(source), tf.int32)
        return low, tf.minimum(low + 1, in_size - 1), source - tf.cast(low, tf.float32)

    row_low, row_high, row_frac = interpolation(shape[2], size[0])
    row_frac = row_frac[:, None]
    col_low, col_high, col_frac = interpolation(shape[3], size[1])
    columns = (tf.one_hot(col_low, shape[3]) * (1.0 - col_frac)[:, None]
               + tf.one_hot(col_high, shape[3]) * col_frac[:, None])
    masks, instance_map = [], tf.zeros([shape[0], size[0], size[1]], tf.int32)
    for k in range(low_res_masks.shape[1]):
        seed_mask = tf.cast(low_res_masks[:, k], tf.float32)
        rows = ((1.0 - row_frac) * tf.gather(seed_mask, row_low, axis=1)
                + row_frac * tf.gather(seed_mask, row_high, axis=1))
        full = tf.matmul(tf.reshape(rows, [-1, shape[3]]), columns, transpose_b=True)
        masks.append(tf.reshape(full, tf.shape(instance_map)) >= 0.5)
    for k in reversed(range(len(masks))):
        instance_map = tf.where(masks[k], k + 1, instance_map)
    return tf.stack(masks, axis=1).numpy(), instance_map.numpy()


def resized(low_res_masks, size):
    """`tf.image.resize` (bilinear, half-pixel centres) of the 0/1 masks, >= 0.5."""
    batch, k, h, w = low_res_masks.shape
    flat = low_res_masks.reshape(batch * k, h, w, 1).astype(np.float32)
    out = tf.image.resize(flat, size, method="bilinear").numpy()[..., 0] >= 0.5
    return out.reshape(batch, k, *size)


def new_implementation(low_res_masks, size, crop=None, dtype=tf.bool):
    def run(masks):
        stride = upsampling.strides(tf.shape(masks)[2:4], tf.constant(size))
        crop_size = tf.constant(crop or size)
        codes = upsampling.cell_codes(masks)
        tables = upsampling.BilinearTables.build(stride, dtype)
        drawn = upsampling.draw_masks(codes, tables, crop_size)
        return (drawn, upsampling.boxes_from_codes(codes, tables, crop_size),
                upsampling.instance_map(masks, stride, crop_size))

    return [x.numpy() for x in run(tf.constant(low_res_masks))]


def first_covering(masks):
    """NumPy instance map: 1 + the first k whose mask covers the pixel, 0 if none."""
    covered = masks.any(axis=1)
    return np.where(covered, masks.argmax(axis=1) + 1, 0).astype(np.int32)


def blobs(rng, batch, k, h, w):
    """Masks of discs of random sizes, with salt: many boundary shapes."""
    yy, xx = np.mgrid[:h, :w]
    centres = rng.uniform(0, [h, w], (batch, k, 2))
    radii = rng.uniform(0.5, max(h, w) / 2, (batch, k))
    discs = ((yy - centres[..., 0, None, None]) ** 2 + (xx - centres[..., 1, None, None]) ** 2
             < radii[..., None, None] ** 2)
    return discs ^ (rng.random(discs.shape) < 0.1)


@pytest.mark.parametrize("stride_y, stride_x, h, w", [
    (8, 8, 9, 11), (4, 4, 6, 5), (3, 3, 4, 6), (5, 2, 3, 4), (16, 16, 2, 3), (1, 1, 5, 4),
    (2, 4, 1, 1), (32, 32, 1, 2)])
def test_drawn_masks_equal_both_references(stride_y, stride_x, h, w):
    rng = np.random.default_rng(stride_y * 100 + stride_x * 10 + h)
    low = blobs(rng, 2, 7, h, w)
    low[0, 6] = False  # an empty mask
    size = (h * stride_y, w * stride_x)
    masks, boxes, instance_map = new_implementation(low, size)
    old_masks, old_map = replaced_implementation(low, size)
    np.testing.assert_array_equal(masks, resized(low, size))
    np.testing.assert_array_equal(masks, old_masks)
    np.testing.assert_array_equal(instance_map, old_map)
    np.testing.assert_array_equal(instance_map, first_covering(masks))
    np.testing.assert_array_equal(boxes, mask_ops.mask_boxes(masks).numpy())
    assert masks.any() and not masks.all()


@pytest.mark.parametrize("crop", [(37, 53), (1, 1), (3, 70), (60, 5), (64, 72)])
def test_cropped_outputs_are_the_top_left_of_the_whole(crop):
    rng = np.random.default_rng(sum(crop))
    low = blobs(rng, 2, 6, 8, 9)
    size = (64, 72)
    whole_masks, _, whole_map = new_implementation(low, size)
    masks, boxes, instance_map = new_implementation(low, size, crop=crop, dtype=tf.uint8)
    assert masks.dtype == np.uint8 and masks.shape == (2, 6) + crop
    np.testing.assert_array_equal(masks, whole_masks[:, :, :crop[0], :crop[1]])
    np.testing.assert_array_equal(instance_map, whole_map[:, :crop[0], :crop[1]])
    # Boxes of the cropped masks, not the whole ones clipped: a mask may leave the crop
    # and come back.
    np.testing.assert_array_equal(boxes, mask_ops.mask_boxes(masks.astype(bool)).numpy())


def test_hundreds_of_masks_keep_exact_indices():
    # Masks 281 and 291 (1-based) are the first to cover some pixels.
    low = np.zeros((1, 300, 3, 4), bool)
    low[0, :270, :, 0] = True
    low[0, 280, :, 3] = True
    low[0, 290, 1, 1:3] = True
    masks, _, instance_map = new_implementation(low, (12, 16))
    np.testing.assert_array_equal(instance_map, first_covering(masks))
    assert {281, 291} <= set(np.unique(instance_map).tolist())
    np.testing.assert_array_equal(masks, resized(low, (12, 16)))


def test_sizes_that_are_not_a_multiple_of_the_heads_are_refused():
    embeddings = np.zeros((1, 4, 4, 3), np.float32)
    logits = np.zeros((1, 4, 4, len(TAUS), 2), np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="integer multiple"):
        inference.predict_instances(embeddings, logits, (10, 12), TAUS)
    with pytest.raises(tf.errors.InvalidArgumentError, match="crop_size"):
        inference.predict_instances(embeddings, logits, (8, 8), TAUS, crop_size=(9, 8))
    with pytest.raises(ValueError, match="mask_dtype"):
        inference.predict_instances(embeddings, logits, (8, 8), TAUS, mask_dtype=tf.int32)


@pytest.mark.parametrize("stride_y, stride_x", [(2, 3), (3, 2), (1, 3), (4, 4)])
def test_every_small_mask_agrees_across_masks_boxes_and_map(stride_y, stride_x):
    # All 2^6 masks of a 3 x 2 grid, with strides that make exact ties (3/4 * 2/3 = 1/2
    # at (2, 3)): the three outputs decide them the same way, ties inside.
    h, w = 3, 2
    low = ((np.arange(2 ** (h * w))[:, None] >> np.arange(h * w)) & 1).astype(bool)
    low = low.reshape(-1, 1, h, w)
    size = (h * stride_y, w * stride_x)
    masks, boxes, instance_map = new_implementation(low, size)
    np.testing.assert_array_equal(instance_map, first_covering(masks))
    np.testing.assert_array_equal(boxes, mask_ops.mask_boxes(masks).numpy())
    if stride_y == stride_x:  # no ties: the float resize agrees
        np.testing.assert_array_equal(masks, resized(low, size))
    # A lone bottom-right cell at strides (2, 3): the pixel 3/4 and 2/3 of a cell from
    # its neighbours' centres gets exactly 1/2 and is inside.
    if (stride_y, stride_x) == (2, 3):
        lone = masks[32, 0]  # bit 5: cell (2, 1)
        assert lone[4, 3] and not lone[3, 3]


@pytest.mark.parametrize("stride, num_masks", [(4, 5), (4, 40), (8, 3), (8, 30), (2, 70)])
def test_instance_map_of_few_masks_equals_the_first_covering(stride, num_masks):
    # K x stride^2 on both sides of the switch to the drawn masks (256).
    rng = np.random.default_rng(stride * 100 + num_masks)
    low = blobs(rng, 2, num_masks, 6, 7)
    crop = tf.constant([6 * stride - 1, 7 * stride - 3])
    drawn = upsampling.draw_masks(upsampling.cell_codes(tf.constant(low)),
                                  upsampling.BilinearTables.build(tf.constant([stride] * 2),
                                                                  tf.uint8), crop)
    instance_map = upsampling.instance_map_of_few(tf.constant(low), tf.constant([stride] * 2),
                                                  crop, drawn)
    np.testing.assert_array_equal(instance_map.numpy(), first_covering(drawn.numpy() > 0))
    np.testing.assert_array_equal(mask_ops.first_covering(drawn).numpy(),
                                  first_covering(drawn.numpy() > 0))
    assert len(np.unique(instance_map.numpy())) > 2
