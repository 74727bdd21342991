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

Since masks are binary, the answer at x is a function of four bits: the pattern of its
dual cell (`upsampling.dual_patterns`). `bilateral_planes` computes once per image, for
every pixel, the answers for all 16 patterns, laid out by dual cell so that drawing K
masks (`draw_masks`) is one gather of s-pixel rows, as for bilinear masks; the
instance map (`instance_map`) takes, per pixel, the first mask over the patterns that
cover it; the boxes (`boxes_from_patterns`) come from where each pattern's pixels lie in
each dual cell, without drawing the masks.
"""

from __future__ import annotations

import tensorflow as tf

from instance_embed.ops import masks as masks_lib
from instance_embed.ops import upsampling


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


def bilateral_planes(images: tf.Tensor, heads_size, sigma: float | tf.Tensor,
                     crop_size: tf.Tensor | None = None) -> tf.Tensor:
    """Every pixel's answers for the 16 patterns of its dual cell, laid out by dual cell.

    Args:
      images: `[B, H, W, 3]` RGB in [0, 255] (uint8 or float), H and W multiples of the
        heads' size.
      heads_size: (h, w), ints or int32 scalars.
      sigma: the colour distance (RGB, 0-255 scale) at which a cell's weight falls to
        exp(-1/2) of the closest cell's.
      crop_size: optional int32 `[2]`, (H', W') <= (H, W): pixels beyond the top-left
        (H', W') answer False, as those outside the image (so that `boxes_from_patterns`
        counts only the crop); default (H, W).

    Returns:
      bool `[B, h + 1, sy, w + 1, 16, sx]`: pixel (i, j) of dual cell (a, b) of
      `upsampling.dual_patterns` is in a mask whose dual-cell pattern there is p.
      The grid starts s - s // 2 pixels before the image (as `upsampling`'s); pixels
      outside the image answer False.
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    height, width = shape[1], shape[2]
    h, w = heads_size[0], heads_size[1]
    means = cell_mean_colours(images, heads_size)  # [B, h, w, 3]
    row_low, row_high, row_frac = interpolation(h, height)
    col_low, col_high, col_frac = interpolation(w, width)

    # The four cells' mean colours at every pixel, in bit order 0..3: (low, low),
    # (low, high), (high, low), (high, high); one gather: [B, H, W, 4, 3].
    # (Broadcast explicitly: TF's implicit broadcasts are 2-3 times slower here.)
    size = tf.stack([height, width, 4])
    cell_rows = tf.broadcast_to(
        tf.stack([row_low, row_low, row_high, row_high], axis=-1)[:, None] * w, size)
    cell_columns = tf.broadcast_to(
        tf.stack([col_low, col_high, col_low, col_high], axis=-1)[None], size)
    colours = tf.gather(tf.reshape(means, tf.stack([shape[0], h * w, 3])),
                        cell_rows + cell_columns, axis=1)
    distances = tf.reduce_sum(tf.square(images[..., None, :] - colours), axis=-1)  # [B, H, W, 4]
    # The bilinear weights of the four cells, [1, H, W, 4].
    row_weights = tf.broadcast_to(
        tf.stack([1.0 - row_frac, 1.0 - row_frac, row_frac, row_frac], axis=-1)[:, None], size)
    column_weights = tf.broadcast_to(
        tf.stack([1.0 - col_frac, col_frac, 1.0 - col_frac, col_frac], axis=-1)[None], size)
    spatial = (row_weights * column_weights)[None]
    sigma = tf.cast(sigma, tf.float32)
    closest = tf.reduce_min(distances, axis=-1, keepdims=True)
    weights = spatial * tf.exp(-(distances - closest) / (2.0 * tf.square(sigma)))
    # A pixel whose nearest cells all have zero bilinear weight cannot occur (the
    # weights sum to 1), but keep the division safe.
    weights = weights / tf.maximum(tf.reduce_sum(weights, axis=-1, keepdims=True), 1e-30)

    # Into the dual-cell grid (zero weights outside the image). A pixel's low cell is
    # its dual cell's top-left one; at the image's edges, where the grid replicates the
    # edge cells, the pixel's other cells have zero weight, so the answers agree.
    sy, sx = height // h, width // w
    top, left = tf.unstack(upsampling.dual_grid_start(tf.stack([sy, sx])))
    if crop_size is not None:
        weights = weights[:, :crop_size[0], :crop_size[1]]
    weights = tf.pad(weights, [[0, 0], [top, sy // 2 + height - tf.shape(weights)[1]],
                               [left, sx // 2 + width - tf.shape(weights)[2]], [0, 0]])
    weights = tf.reshape(weights, tf.stack([shape[0], (h + 1) * sy, w + 1, sx, 4]))
    # The vote of pattern p sums the weights of its bits, in bit order; compared at once
    # so that only booleans are kept for the 16 patterns.
    inside = []
    for pattern in range(16):
        corners = [weights[..., c] for c in range(4) if pattern >> c & 1]
        vote = corners[0] if corners else tf.zeros_like(weights[..., 0])
        for corner in corners[1:]:
            vote += corner
        inside.append(vote >= 0.5)
    inside = tf.stack(inside, axis=-2)  # [B, (h + 1) sy, w + 1, 16, sx]
    return tf.reshape(inside, tf.stack([shape[0], h + 1, sy, w + 1, 16, sx]))


def draw_masks(patterns: tf.Tensor, planes: tf.Tensor, crop_size: tf.Tensor,
               dtype: tf.DType = tf.bool) -> tf.Tensor:
    """Masks at the input resolution from their dual-cell patterns: one gather.

    Args:
      patterns: int32 `[B, K, h + 1, w + 1]` from `upsampling.dual_patterns`.
      planes: from `bilateral_planes` for the same images (and a crop containing this
        one: pixels beyond the planes' crop are drawn empty).
      crop_size: int32 `[2]`, (H', W') <= (H, W): the top-left part drawn.
      dtype: tf.bool or tf.uint8.

    Returns:
      `[B, K, H', W']` of `dtype`.
    """
    shape = tf.shape(planes)  # [B, h + 1, sy, w + 1, 16, sx]
    rows = tf.reshape(tf.cast(planes, dtype), tf.stack([-1, shape[5]]))
    first_row = tf.reshape(tf.range(shape[0] * shape[1] * shape[2] * shape[3]) * 16,
                           shape[:4])  # [B, h + 1, sy, w + 1]
    index = first_row[:, None] + patterns[:, :, :, None, :]  # [B, K, h + 1, sy, w + 1]
    count = tf.shape(patterns)[1]
    index = tf.reshape(index, tf.stack([shape[0], count, shape[1] * shape[2], shape[3]]))
    top, left = tf.unstack(upsampling.dual_grid_start(tf.stack([shape[2], shape[5]])))
    pixels = tf.gather(rows, index[:, :, top:top + crop_size[0]])  # [B, K, H', w + 1, sx]
    pixels = tf.reshape(pixels, tf.stack([shape[0], count, crop_size[0], shape[3] * shape[5]]))
    return pixels[..., left:left + crop_size[1]]


def boxes_and_instance_map(patterns: tf.Tensor, planes: tf.Tensor, crop_size: tf.Tensor,
                           masks: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """The boxes and the instance map of the masks `draw_masks` draws, the cheaper way.

    From drawn masks both cost in proportion to the masks; from the patterns
    (`boxes_from_patterns`, `instance_map`) about as much as 16 masks' worth of planes,
    several times more at small strides (the boxes' reductions run over the stride's few
    offsets). Hence from the drawn masks while K times the stride is at most 256 when
    they are drawn anyway, 128 when they would be drawn only for this: near the
    break-even points measured in docs/benchmarks.md (serving latency).

    Args:
      patterns: int32 `[B, K, h + 1, w + 1]` from `upsampling.dual_patterns`.
      planes: from `bilateral_planes` for the same images and `crop_size`.
      crop_size: int32 `[2]`, (H', W').
      masks: `draw_masks(patterns, planes, crop_size)` if already drawn (any dtype),
        else None.

    Returns:
      (float32 `[B, K, 4]` boxes as `ops.mask_boxes`, int32 `[B, H', W']` instance map).
    """
    def from_masks():
        drawn = masks if masks is not None else draw_masks(patterns, planes, crop_size)
        return (masks_lib.mask_boxes(tf.cast(drawn, tf.bool)),
                masks_lib.first_covering(drawn))

    def from_patterns():
        return (boxes_from_patterns(patterns, planes),
                instance_map(patterns, planes, crop_size))

    budget = 256 if masks is not None else 128
    return tf.cond(tf.shape(patterns)[1] * tf.shape(planes)[5] <= budget, from_masks,
                   from_patterns)


def boxes_from_patterns(patterns: tf.Tensor, planes: tf.Tensor) -> tf.Tensor:
    """Each mask's box, without drawing it: `ops.mask_boxes` of `draw_masks`' output.

    Args:
      patterns: int32 `[B, K, h + 1, w + 1]` from `upsampling.dual_patterns`.
      planes: from `bilateral_planes` for the same images and `crop_size` (only the
        pixels of the crop count).

    Returns:
      float32 `[B, K, 4]`, (ymin, xmin, ymax, xmax) in pixel edges; zeros for an empty
      mask.
    """
    shape = tf.shape(planes)  # [B, h + 1, sy, w + 1, 16, sx]
    top, left = tf.unstack(upsampling.dual_grid_start(tf.stack([shape[2], shape[5]])))
    # Image row (column) of each dual cell's first pixel row (column).
    cell_top = tf.range(shape[1]) * shape[2] - top
    cell_left = tf.range(shape[3]) * shape[5] - left
    # Rows [B, h + 1, sy, w + 1, 16] and columns [B, h + 1, w + 1, 16, sx] of each dual
    # cell and pattern holding a pixel (not transposed: oneDNN logs an ERROR line for
    # boolean transposes).
    extents = upsampling.extents_from_projections(
        tf.reduce_any(planes, axis=5), tf.reduce_any(planes, axis=2), row_axis=2)
    extents = tf.reshape(extents, [-1, 4])
    cells = tf.reshape(tf.range(shape[0] * shape[1] * shape[3]) * upsampling.NUM_PATTERNS,
                       tf.stack([shape[0], 1, shape[1], shape[3]]))
    return upsampling.boxes_from_cell_extents(tf.gather(extents, cells + patterns),
                                              cell_top, cell_left)


def instance_map(patterns: tf.Tensor, planes: tf.Tensor, crop_size: tf.Tensor) -> tf.Tensor:
    """For each pixel, 1 + the index of the first mask covering it once drawn (0: none).

    Args:
      patterns: int32 `[B, K, h + 1, w + 1]` in detection order.
      planes: from `bilateral_planes`.
      crop_size: int32 `[2]`, (H', W').

    Returns:
      int32 `[B, H', W']`.
    """
    first = upsampling.first_mask_per_pattern(patterns)  # [B, h + 1, w + 1, 16]
    best = 0.0  # one pattern at a time: no float copy of the planes
    for p in range(16):
        best = tf.maximum(best, tf.where(planes[:, :, :, :, p],
                                         first[:, :, None, :, None, p], 0.0))
    return upsampling.indices_from_dual_grid(best, crop_size, tf.shape(patterns)[1])
