"""Heads-resolution masks drawn at the input resolution (bilinear), and what follows.

The paper grows masks at the heads' resolution (a grid of stride s); the detections are
wanted at the image's. A pixel is in a mask when the bilinear interpolation of the 0/1
mask (`tf.image.resize`'s grid: half-pixel centres, edges clamped) is >= 0.5, so a
boundary falls half-way between an inside and an outside cell centre, on the edge of
the stride cell. (`ops.bilateral` draws the boundaries along the image's colour edges
instead.)

The output size is an integer multiple of the heads' size (the network's stride; the
predictor pads images to make it so). A pixel at offset (i, j) of heads cell (r, c) then
reads the four cells of its dual cell, which all lie in the 3 x 3 neighbourhood of
(r, c) (edges replicated: that is the clamping), with weights fixed by (i, j). So:

- `cell_codes` packs each cell's neighbourhood into 9 bits, once per mask;
- `BilinearTables` holds, for the stride, the answer for every code and offset;
- `draw_masks` draws K masks as one gather of s-pixel rows from the table, with no
  float intermediate, directly in the dtype wanted (bool, or uint8 for serving);
- `boxes_from_codes` gives each mask's box from the codes' cell extents, without drawing it;
- `instance_map` gives, for each pixel, the first (highest-scored) covering mask from
  each dual cell's 4-bit patterns, without drawing the masks either.

Exactness: the tables are computed in integers (weights times 2s per axis), so a vote of
exactly 1/2 counts as inside. With the same stride on both axes (the network's) no vote
is exactly 1/2 (the weights are odd multiples of 1/(2s), or multiples of 1/s for odd s),
so the masks are those of `tf.image.resize` + `>= 0.5` bit for bit; with different
strides a float resize may split such ties either way. tests/ops/test_upsampling.py
checks both.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from instance_embed.ops import masks as masks_lib

NUM_CODES = 512  # 3 x 3 neighbourhood bits
NUM_PATTERNS = 16  # the four cells of a dual cell


def strides(heads_size: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """int32 `[2]`: `size // heads_size`, checked to be exact and >= 1.

    Args:
      heads_size: int32 `[2]`, (h, w).
      size: int32 `[2]`, (H, W).
    """
    tf.debugging.assert_equal(
        size % heads_size, 0,
        message="masks are drawn at an integer multiple of the heads' size (the "
                "network's stride): pad the images as predictor.pad_images does and pass "
                "the unpadded size as crop_size")
    return size // heads_size


def cell_codes(masks: tf.Tensor) -> tf.Tensor:
    """Each cell's 3 x 3 neighbourhood as 9 bits: bool `[..., h, w]` -> int32 `[..., h, w]`.

    Bit `3 * (dy + 1) + (dx + 1)` is the mask at cell (r + dy, c + dx), with the
    nearest edge cell outside the grid (bilinear resizing clamps there).
    """
    bits = _edge_padded(masks)  # [..., h + 2, w + 2]
    rows = bits[..., :-2] + 2 * bits[..., 1:-1] + 4 * bits[..., 2:]  # [..., h + 2, w]
    return rows[..., :-2, :] + 8 * rows[..., 1:-1, :] + 64 * rows[..., 2:, :]


def _edge_padded(masks: tf.Tensor) -> tf.Tensor:
    """int32 0/1 `[..., h + 2, w + 2]`: the masks with their edge cells repeated once
    around them (bilinear resizing clamps there)."""
    bits = tf.cast(masks, tf.int32)
    bits = tf.concat([bits[..., :1, :], bits, bits[..., -1:, :]], axis=-2)
    return tf.concat([bits[..., :1], bits, bits[..., -1:]], axis=-1)


def _offset_weights(stride: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """For each pixel offset in a cell: the neighbour (-1 or 0) holding the lower centre
    around it, and 2s times the bilinear weight of the upper one (an integer).
    int32 `[s]`, float32 `[s]`."""
    position = 2 * tf.range(stride) + 1 - stride  # from the cell's centre, in 1 / (2s)
    before = position < 0  # above (left of) the centre
    return (tf.where(before, -1, 0),
            tf.cast(tf.where(before, position + 2 * stride, position), tf.float32))


def _bilinear_margins(low_y, weight_y, low_x, weight_x, stride, bits) -> tf.Tensor:
    """float32 `[P, sy, sx]`, >= 0 where the bilinear interpolation of P neighbourhoods
    `bits` `[P, n, n]` is >= 1/2 at each offset (the offsets' low neighbours index
    `bits`).

    Weights are given times 2s per axis, so every vote is an integer (times 4 sy sx)
    held exactly in float32 and compared exactly with 2 sy sx: ties are inside, whatever
    the strides. (Float margins also keep transposes in float: oneDNN logs an ERROR line
    for transposes of other dtypes on TF 2.21, and grappler moves casts across them.)
    """
    span = 2.0 * tf.cast(stride, tf.float32)
    votes = 0.0
    for dy, weights_y in ((0, span[0] - weight_y), (1, weight_y)):
        rows = tf.gather(bits, low_y + dy, axis=1)  # [P, sy, n]
        for dx, weights_x in ((0, span[1] - weight_x), (1, weight_x)):
            votes += tf.gather(rows, low_x + dx, axis=2) * (weights_y[:, None] * weights_x)
    return votes - span[0] * span[1] / 2


@dataclasses.dataclass(frozen=True)
class BilinearTables:
    """The answers of bilinear drawing for one stride (sy, sx).

    Attributes:
      inside: bool `[NUM_CODES, sy, sx]`, pixel (i, j) of a cell whose neighbourhood
        has that code (`cell_codes`) is in the mask.
      rows: the same as `[sy * NUM_CODES, sx]` (row `i * NUM_CODES + code`: pixels
        (i, 0..sx-1)) in the dtype the masks are drawn in, for `draw_masks`' gather.
      stride: int32 `[2]`, (sy, sx).
    """
    inside: tf.Tensor
    rows: tf.Tensor
    stride: tf.Tensor

    @classmethod
    def build(cls, stride: tf.Tensor, dtype: tf.DType = tf.bool) -> BilinearTables:
        """Tables for int32 `stride` `[2]`; masks drawn in `dtype` (bool or uint8)."""
        low_y, weight_y = _offset_weights(stride[0])
        low_x, weight_x = _offset_weights(stride[1])
        margins = _bilinear_margins(
            low_y + 1, weight_y, low_x + 1, weight_x, stride,
            tf.reshape(_bits(tf.range(NUM_CODES), 9), [NUM_CODES, 3, 3]))  # [512, sy, sx]
        rows = tf.transpose(margins, [1, 0, 2]) >= 0  # [sy, 512, sx]
        return cls(inside=margins >= 0, rows=tf.cast(tf.reshape(rows, [-1, stride[1]]), dtype),
                   stride=stride)


def _bits(values: tf.Tensor, count: int) -> tf.Tensor:
    """float32 `[n, count]`: the low `count` bits of int32 `values` `[n]`."""
    return tf.cast(tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(values[:, None], tf.range(count)), 1), tf.float32)


def draw_masks(codes: tf.Tensor, tables: BilinearTables, crop_size: tf.Tensor) -> tf.Tensor:
    """Masks at the input resolution: `[B, K, h, w]` codes -> `[B, K, H', W']`.

    Args:
      codes: int32 `[B, K, h, w]` from `cell_codes` (0 draws an empty mask).
      tables: for the stride (sy, sx).
      crop_size: int32 `[2]`, (H', W') <= (h * sy, w * sx): the top-left part drawn.

    Returns:
      `[B, K, H', W']` in the tables' dtype.
    """
    shape = tf.shape(codes)
    sy, sx = tables.stride[0], tables.stride[1]
    index = codes[:, :, :, None, :] + NUM_CODES * tf.range(sy)[:, None]  # [B, K, h, sy, w]
    index = tf.reshape(index, tf.stack([shape[0], shape[1], shape[2] * sy, shape[3]]))
    pixels = tf.gather(tables.rows, index[:, :, :crop_size[0]])  # [B, K, H', w, sx]
    pixels = tf.reshape(pixels, tf.stack([shape[0], shape[1], crop_size[0], shape[3] * sx]))
    return pixels[..., :crop_size[1]]  # no copy when nothing is cropped


def boxes_from_codes(codes: tf.Tensor, tables: BilinearTables, crop_size: tf.Tensor
                     ) -> tf.Tensor:
    """Each drawn mask's box, without drawing it: `ops.mask_boxes` of `draw_masks`' output.

    Args:
      codes: int32 `[B, K, h, w]` from `cell_codes`.
      tables: for the stride.
      crop_size: int32 `[2]`, (H', W'): only pixels of the top-left (H', W') count.

    Returns:
      float32 `[B, K, 4]`, (ymin, xmin, ymax, xmax) in pixel edges; zeros for an empty
      mask.
    """
    shape = tf.shape(codes)
    sy, sx = tables.stride[0], tables.stride[1]
    # A cell counts only through its pixels inside the crop: per axis, cells whole
    # inside it (kind 0), cut by it (1) or outside it (2); one extents table per pair.
    kind_y, kept_y = _crop_kinds(shape[2], sy, crop_size[0])
    kind_x, kept_x = _crop_kinds(shape[3], sx, crop_size[1])
    kept = tf.logical_and(kept_y[:, None, None, :, None], kept_x[None, :, None, None, :])
    extents = cell_extents(tf.logical_and(tables.inside, kept))  # [3, 3, 512, 4]
    kind = kind_y[:, None] * 3 + kind_x[None, :]  # [h, w]
    return boxes_from_cell_extents(
        tf.gather(tf.reshape(extents, [-1, 4]), codes + NUM_CODES * kind),
        tf.range(shape[2]) * sy, tf.range(shape[3]) * sx)


def _crop_kinds(cells: tf.Tensor, stride: tf.Tensor, crop: tf.Tensor
                ) -> tuple[tf.Tensor, tf.Tensor]:
    """Along one axis: int32 `[cells]`, each cell whole inside `crop` pixels (0), cut
    by it (1) or outside it (2); and bool `[3, stride]`, the offsets kept in each kind."""
    start = tf.range(cells) * stride
    kind = tf.where(start + stride <= crop, 0, tf.where(start < crop, 1, 2))
    offsets = tf.range(stride)
    kept = tf.stack([offsets >= 0, offsets < crop % stride, offsets < 0])
    return kind, kept


_NO_PIXEL = 1 << 30  # above any pixel coordinate plus offset


def cell_extents(inside: tf.Tensor) -> tf.Tensor:
    """Where the pixels of cells lie: bool `[..., sy, sx]` -> int32 `[..., 4]`.

    Per cell: (first row, first column, -(last row + 1), -(last column + 1)) of its
    pixels, offsets within the cell, so that a box is one `reduce_min`
    (`boxes_from_cell_extents`); `_NO_PIXEL` in all four for a cell without pixels.
    """
    return extents_from_projections(tf.reduce_any(inside, axis=-1),
                                    tf.reduce_any(inside, axis=-2))


def extents_from_projections(rows: tf.Tensor, columns: tf.Tensor, row_axis: int = -1,
                             column_axis: int = -1) -> tf.Tensor:
    """`cell_extents` from the cells' rows holding a pixel and their columns.

    Args:
      rows: bool `[..., sy]`, or with the offsets along `row_axis` (a middle axis
        reduces several times faster than the last when the offsets are few).
      columns: bool `[..., sx]`, or with the offsets along `column_axis`.

    Returns:
      int32 `[..., 4]`, the other axes of `rows` and `columns` (the same) in order.
    """
    def first_and_end(present, axis):  # -> int32 first, -(last + 1)
        shape = [1] * present.shape.rank
        shape[axis] = -1
        offsets = tf.reshape(tf.range(tf.shape(present)[axis]), shape)
        return (tf.reduce_min(tf.where(present, offsets, _NO_PIXEL), axis=axis),
                tf.reduce_min(tf.where(present, -offsets - 1, _NO_PIXEL), axis=axis))

    first_row, row_end = first_and_end(rows, row_axis)
    first_column, column_end = first_and_end(columns, column_axis)
    return tf.stack([first_row, first_column, row_end, column_end], axis=-1)


def boxes_from_cell_extents(extents: tf.Tensor, top: tf.Tensor, left: tf.Tensor
                            ) -> tf.Tensor:
    """Boxes of masks made of cells: the extents of each mask's cells, offset by where
    each cell starts, reduced.

    Args:
      extents: int32 `[B, K, m, n, 4]` from `cell_extents`, one per cell of each mask.
      top: int32 `[m]`, the image row of each row of cells' first pixel row.
      left: int32 `[n]`, the image column of each column of cells' first pixel column.

    Returns:
      float32 `[B, K, 4]`, (ymin, xmin, ymax, xmax) in pixel edges; zeros for a mask
      without pixels (as `ops.mask_boxes`).
    """
    top = tf.broadcast_to(top[:, None], tf.stack([tf.size(top), tf.size(left)]))
    left = tf.broadcast_to(left[None, :], tf.shape(top))
    shifted = extents + tf.stack([top, left, -top, -left], axis=-1)
    shape = tf.shape(extents)
    box = tf.reduce_min(
        tf.reshape(shifted, tf.stack([shape[0], shape[1], shape[2] * shape[3], 4])), axis=2)
    box = tf.cast(box * tf.constant([1, 1, -1, -1]), tf.float32)
    return tf.where(box[..., :1] < _NO_PIXEL // 2, box, 0.0)


def dual_patterns(masks: tf.Tensor) -> tf.Tensor:
    """The 4-bit pattern of every dual cell: bool `[..., h, w]` -> int32 `[..., h+1, w+1]`.

    Dual cell (a, b) lies between the centres of cells a - 1 and a (rows) and b - 1 and
    b (columns), edges replicated; bits 0..3 are its top-left, top-right, bottom-left
    and bottom-right cells.
    """
    bits = _edge_padded(masks)  # [..., h + 2, w + 2]
    return (bits[..., :-1, :-1] + 2 * bits[..., :-1, 1:] + 4 * bits[..., 1:, :-1]
            + 8 * bits[..., 1:, 1:])


def _dual_table(stride: tf.Tensor) -> tf.Tensor:
    """bool `[16, sy * sx]`: pixel (i, j) of a dual cell with pattern p is in the mask.

    A dual cell's pixels start s - s // 2 pixels before its bottom-right cell, so pixel
    i lies (2 (i + s // 2) + 1 - s) / (2s) cells below the top-left centre.
    """
    def weights(s):
        return tf.cast(2 * (tf.range(s) + s // 2) + 1 - s, tf.float32)

    margins = _bilinear_margins(tf.zeros(stride[0:1], tf.int32), weights(stride[0]),
                                tf.zeros(stride[1:2], tf.int32), weights(stride[1]), stride,
                                tf.reshape(_bits(tf.range(NUM_PATTERNS), 4),
                                           [NUM_PATTERNS, 2, 2]))  # [16, sy, sx]
    return tf.reshape(margins >= 0, [NUM_PATTERNS, -1])


def first_mask_per_pattern(patterns: tf.Tensor) -> tf.Tensor:
    """float32 `[B, h + 1, w + 1, 16]`: K - k for the first mask k with each pattern in
    each dual cell, 0 if none; from `dual_patterns` `[B, K, h + 1, w + 1]`.

    One segment maximum over all masks at once (segment: dual cell and pattern).
    float32: exact integers, and what the instance maps' reductions take.
    """
    shape = tf.shape(patterns)
    num_cells = shape[0] * shape[2] * shape[3]
    segments = patterns + tf.reshape(tf.range(num_cells) * NUM_PATTERNS,
                                     tf.stack([shape[0], 1, shape[2], shape[3]]))
    weights = tf.broadcast_to(
        tf.cast(shape[1] - tf.range(shape[1]), tf.float32)[None, :, None, None], shape)
    first = tf.math.unsorted_segment_max(tf.reshape(weights, [-1]), tf.reshape(segments, [-1]),
                                         num_cells * NUM_PATTERNS)
    # Segments no mask has are the lowest float32 there.
    return tf.reshape(tf.maximum(first, 0.0),
                      tf.stack([shape[0], shape[2], shape[3], NUM_PATTERNS]))


def instance_map(masks: tf.Tensor, stride: tf.Tensor, crop_size: tf.Tensor) -> tf.Tensor:
    """For each pixel, 1 + the index of the first mask covering it once drawn (0: none).

    Equal to the first-covering index over `draw_masks`' output, without drawing:
    per dual cell and pattern, the first mask having that pattern there (a max of
    weights K - k over the masks), then per pixel the first over the patterns that
    cover it. Plain TF only (`tf.unique`).

    Args:
      masks: bool `[B, K, h, w]`, in detection order; empty for invalid detections.
      stride: int32 `[2]`.
      crop_size: int32 `[2]`, (H', W') <= (h * sy, w * sx).

    Returns:
      int32 `[B, H', W']`.
    """
    num_masks = tf.shape(masks)[1]
    first = first_mask_per_pattern(dual_patterns(masks))  # [B, h + 1, w + 1, 16]
    # The pixels of a dual cell fall in a few classes by the patterns that cover them
    # (their columns of the table): the best of each class, then each pixel selects its
    # class's by a product with a one-hot matrix (exact in float32: one term per sum).
    covers = _dual_table(stride)  # [16, sy * sx]
    signatures = tf.reduce_sum(
        tf.where(covers, tf.bitwise.left_shift(1, tf.range(NUM_PATTERNS))[:, None], 0), axis=0)
    classes, pixel_class = tf.unique(signatures)  # [C], [sy * sx]
    class_covers = tf.bitwise.bitwise_and(
        tf.bitwise.right_shift(classes[:, None], tf.range(NUM_PATTERNS)), 1)  # [C, 16]
    best = tf.reduce_max(first[..., None, :] * tf.cast(class_covers, tf.float32), axis=4)
    shape = tf.shape(best)  # [B, h + 1, w + 1, C]
    select = tf.one_hot(pixel_class, shape[3])  # [sy * sx, C]
    best = tf.matmul(tf.reshape(best, tf.stack([-1, shape[3]])), select, transpose_b=True)
    # [B, h + 1, w + 1, sy, sx] -> [B, (h + 1) sy, (w + 1) sx], in float (see
    # `_bilinear_margins`).
    best = tf.transpose(
        tf.reshape(best, tf.stack([shape[0], shape[1], shape[2], stride[0], stride[1]])),
        [0, 1, 3, 2, 4])
    return indices_from_dual_grid(best, crop_size, num_masks)


def instance_map_of_few(masks: tf.Tensor, stride: tf.Tensor, crop_size: tf.Tensor,
                        drawn: tf.Tensor) -> tf.Tensor:
    """`instance_map`, or the same from the `drawn` masks when that is cheaper.

    `instance_map` costs in proportion to the dual cells, the drawn masks' instance
    map to the masks' pixels; the latter is cheaper while K times the cell's area is at
    most 256 (the break-even measured in docs/benchmarks.md, serving latency).

    Args:
      masks: bool `[B, K, h, w]`, in detection order.
      stride: int32 `[2]`.
      crop_size: int32 `[2]`, (H', W').
      drawn: `draw_masks` of `masks` at `crop_size` (bool or uint8).

    Returns:
      int32 `[B, H', W']`.
    """
    return tf.cond(tf.shape(masks)[1] * stride[0] * stride[1] <= 256,
                   lambda: masks_lib.first_covering(drawn),
                   lambda: instance_map(masks, stride, crop_size))


def dual_grid_start(stride: tf.Tensor) -> tf.Tensor:
    """How many pixels the dual-cell grid starts before the image: s - s // 2 per axis
    (see `_dual_table`)."""
    return stride - stride // 2


def indices_from_dual_grid(best: tf.Tensor, crop_size: tf.Tensor, num_masks: tf.Tensor
                           ) -> tf.Tensor:
    """The instance map from the best weight K - k per pixel of the dual-cell grid.

    Args:
      best: float32 `[B, h + 1, sy, w + 1, sx]`, 0 where no mask covers the pixel.
      crop_size: int32 `[2]`, (H', W').
      num_masks: K.

    Returns:
      int32 `[B, H', W']`, 1-based indices, 0 for no mask.
    """
    shape = tf.shape(best)
    best = tf.reshape(best, tf.stack([shape[0], shape[1] * shape[2], shape[3] * shape[4]]))
    start = dual_grid_start(tf.stack([shape[2], shape[4]]))
    best = tf.cast(best[:, start[0]:start[0] + crop_size[0], start[1]:start[1] + crop_size[1]],
                   tf.int32)
    return tf.where(best > 0, num_masks + 1 - best, 0)
