"""Joint bilateral mask upsampling: heads-resolution masks drawn along the image's edges.

Kopf et al., "Joint bilateral upsampling", SIGGRAPH 2007. For each output pixel x, the
four heads cells whose centres surround x (its "dual cell": rows `low, high =
min(low + 1, h - 1)` of `interpolation`, and the same for columns) vote with their
bilinear weight multiplied by how close the colour of x is to the cell's mean colour,
`exp(-(||I(x) - mean_c||^2 - min_c' ||I(x) - mean_c'||^2) / (2 sigma^2))` (the
subtracted minimum only rescales the four weights, so the closest cell keeps weight 1
and nothing underflows), and x is in the mask when the normalised weights of the inside
cells reach 0.5. A boundary inside a cell then follows the colour edge of the image
instead of the cell grid: thin bars and ring walls one or two cells wide get their true
width. This is the same use of colour that DeepLab's dense CRF makes, at the cost of a
per-pixel table. `sigma -> inf` gives the bilinear masks of `ops.upsampling`.

Since masks are binary, the answer at x is a function of four bits. `bilateral_tables`
computes once per image, for every pixel, the 16 answers as the bits of an int32 (bit
p is the answer when the four cells' mask values are the bits of p); drawing one mask
(`draw_mask`) is then a 4-bit pattern per cell at the heads' resolution, one gather to
the input resolution and a shift. `masks_and_instance_map` draws the K masks of an
image one after another and builds the instance map.
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf


def interpolation(in_size, out_size) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Source cells (low, high) and the weight of `high` for each output pixel of an axis.

    `tf.image.resize`'s bilinear grid (half-pixel centres, edges clamped).

    Returns:
      (low int32 [out_size], high int32 [out_size], frac float32 [out_size]).
    """
    scale = tf.cast(in_size, tf.float32) / tf.cast(out_size, tf.float32)
    source = (tf.cast(tf.range(out_size), tf.float32) + 0.5) * scale - 0.5
    source = tf.clip_by_value(source, 0.0, tf.cast(in_size - 1, tf.float32))
    low = tf.cast(tf.floor(source), tf.int32)
    high = tf.minimum(low + 1, in_size - 1)
    return low, high, source - tf.cast(low, tf.float32)


def cell_mean_colours(images: tf.Tensor, heads_size) -> tf.Tensor:
    """Mean colour of each heads cell: `[B, H, W, 3]` -> float32 `[B, h, w, 3]`.

    H and W must be multiples of h and w (the predictor pads images so that they are).
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    h, w = heads_size[0], heads_size[1]
    tf.debugging.assert_equal(
        tf.stack([shape[1] % h, shape[2] % w]), 0,
        message="joint bilateral upsampling needs an image size that is a multiple of "
                "the heads' size (pad the image, as predictor.pad_images does)")
    cells = tf.reshape(images, tf.stack([shape[0], h, shape[1] // h, w, shape[2] // w, 3]))
    return tf.reduce_mean(cells, axis=[2, 4])


def bilateral_tables(images: tf.Tensor, heads_size, sigma: float | tf.Tensor
                     ) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-pixel answer tables of joint bilateral upsampling, and each pixel's dual cell.

    Args:
      images: `[B, H, W, 3]` RGB in [0, 255] (uint8 or float), H and W multiples of the
        heads' size.
      heads_size: (h, w), ints or int32 scalars.
      sigma: the colour distance (RGB, 0-255 scale) at which a cell's weight falls to
        exp(-1/2) of the closest cell's.

    Returns:
      (tables int32 `[B, H * W]`: bit p of pixel x's entry says whether x is in a mask
       whose four surrounding cells (low-low, low-high, high-low, high-high, as bits
       0..3) hold the bits of p;
       cells int32 `[H * W]`: the flattened index `low_row * w + low_col` of each
       pixel's dual cell).
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    h, w = heads_size[0], heads_size[1]
    means = cell_mean_colours(images, heads_size)  # [B, h, w, 3]
    row_low, row_high, row_frac = interpolation(h, height)
    col_low, col_high, col_frac = interpolation(w, width)

    corners = []  # bit order 0..3: (low, low), (low, high), (high, low), (high, high)
    for rows, row_weight in ((row_low, 1.0 - row_frac), (row_high, row_frac)):
        for cols, col_weight in ((col_low, 1.0 - col_frac), (col_high, col_frac)):
            colour = tf.gather(tf.gather(means, rows, axis=1), cols, axis=2)  # [B, H, W, 3]
            distance = tf.reduce_sum(tf.square(images - colour), axis=-1)  # [B, H, W]
            corners.append((row_weight[:, None] * col_weight[None, :], distance))
    distances = tf.stack([d for _, d in corners], axis=-1)  # [B, H, W, 4]
    spatial = tf.stack([s for s, _ in corners], axis=-1)[None]  # [1, H, W, 4]
    sigma = tf.cast(sigma, tf.float32)
    closest = tf.reduce_min(distances, axis=-1, keepdims=True)
    weights = spatial * tf.exp(-(distances - closest) / (2.0 * tf.square(sigma)))
    # A pixel whose nearest cells all have zero bilinear weight cannot occur (the
    # weights sum to 1), but keep the division safe.
    weights = weights / tf.maximum(tf.reduce_sum(weights, axis=-1, keepdims=True), 1e-30)

    patterns = tf.range(16)
    bits = tf.cast(tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(patterns[:, None], tf.range(4)[None, :]), 1), tf.float32)
    inside = tf.linalg.matmul(weights, bits, transpose_b=True) >= 0.5  # [B, H, W, 16]
    tables = tf.reduce_sum(tf.where(inside, tf.bitwise.left_shift(1, patterns), 0), axis=-1)
    cells = row_low[:, None] * w + col_low[None, :]  # [H, W]
    return (tf.reshape(tables, tf.stack([shape[0], height * width])),
            tf.reshape(cells, [-1]))


def draw_mask(mask: tf.Tensor, tables: tf.Tensor, cells: tf.Tensor, size) -> tf.Tensor:
    """One heads-resolution mask per image at the input resolution, from the tables.

    Args:
      mask: bool `[B, h, w]`.
      tables, cells: from `bilateral_tables` for the same images.
      size: (H, W).

    Returns:
      bool `[B, H, W]`.
    """
    bits = tf.cast(mask, tf.int32)
    right = tf.concat([bits[:, :, 1:], bits[:, :, -1:]], axis=2)  # cell (i, min(j + 1, w - 1))
    below = tf.concat([bits[:, 1:], bits[:, -1:]], axis=1)
    below_right = tf.concat([right[:, 1:], right[:, -1:]], axis=1)
    pattern = bits + 2 * right + 4 * below + 8 * below_right  # [B, h, w] in 0..15
    shape = tf.shape(mask)
    pattern = tf.gather(tf.reshape(pattern, tf.stack([shape[0], shape[1] * shape[2]])),
                        cells, axis=1)  # [B, H * W]
    inside = tf.bitwise.bitwise_and(tf.bitwise.right_shift(tables, pattern), 1) > 0
    return tf.reshape(inside, tf.stack([shape[0], size[0], size[1]]))


def masks_and_instance_map(low_res_masks: tf.Tensor, size,
                           draw: Callable[[tf.Tensor], tf.Tensor]
                           ) -> tuple[tf.Tensor, tf.Tensor]:
    """Masks at `size = (H, W)` drawn one at a time by `draw`, and the instance map.

    One mask at a time, last to first, in a loop: the instance map is the mask index
    written last, i.e. the first (highest-scored) covering mask.

    Args:
      low_res_masks: bool [batch, K, h, w], K >= 1, in detection order.
      size: (H, W), ints or int32 tensors.
      draw: `bool [batch, h, w] -> bool [batch, H, W]`, one mask at the input
        resolution (`draw_mask` with the image's tables).

    Returns:
      (bool [batch, K, H, W], int32 [batch, H, W] with 1-based detection indices).
    """
    shape = tf.shape(low_res_masks)
    instance_map = tf.zeros(tf.stack([shape[0], size[0], size[1]]), tf.int32)

    def step(k, masks, instance_map):
        mask = draw(tf.gather(low_res_masks, k, axis=1))
        return k - 1, masks.write(k, mask), tf.where(mask, k + 1, instance_map)

    masks = tf.TensorArray(tf.bool, size=shape[1], element_shape=instance_map.shape)
    _, masks, instance_map = tf.while_loop(
        lambda k, *_: k >= 0, step, (shape[1] - 1, masks, instance_map))
    # [K, B, H, W] -> [B, K, H, W] as a gather of rows k * B + b: oneDNN's Transpose
    # logs an ERROR line for boolean and 8-bit tensors (TF 2.21).
    stacked = tf.reshape(masks.stack(), tf.concat([[-1], tf.shape(instance_map)[1:]], 0))
    order = tf.range(shape[1])[tf.newaxis] * shape[0] + tf.range(shape[0])[:, tf.newaxis]
    return tf.gather(stacked, order), instance_map
