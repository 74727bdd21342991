"""Training augmentation of paper section 4.2, as pure TensorFlow ops.

Rotation, resize, crop and horizontal flip are all affine maps of the plane, so they are
composed into one output-to-input transform and applied in a single resampling pass
(`tf.raw_ops.ImageProjectiveTransformV3`, which has CPU and GPU kernels): bilinear for
the image, nearest neighbour for the instance map. One pass is cheaper than four and
blurs the image once instead of up to three times; only the `S x S` output pixels are
computed, however large the resized image would have been.

Geometry, in continuous pixel coordinates (pixel `i` covers `[i, i + 1)`):

1. rotate the input by `angle` about its centre (positive = counter-clockwise as
   displayed) and resize it by `scale` about its centre, onto a "canvas" of
   `round(scale * H) x round(scale * W)` pixels;
2. take the window `[y0, y0 + S_h) x [x0, x0 + S_w)` of the canvas; `y0, x0` may be
   negative or the window may extend past the canvas when the canvas is smaller than
   the window, which pads;
3. flip the window horizontally (with probability `flip_probability`).

Output pixels with no source pixel (corners uncovered by the rotation, padding) are
`-1` (ignore) in the instance map and 0 in the image; instance ids are never invented
or changed, so `instance_classes` stays valid. Where the window extends past the
canvas but the rotated image does not end there, the window shows real pixels rather
than padding: cutting them off would only invent more ignore pixels.

Crop window sampling (paper: "we randomly crop 100 windows [and] sample one weighted
towards cropped windows that have more object instances inside"):
`num_crop_candidates` offsets are drawn uniformly among the windows inside the canvas
(along an axis where the canvas is smaller than the window: among the windows that
contain it, so the padding is placed at random); window `k` gets the weight
`1 + crop_instance_bonus * n_k`, where `n_k` counts the instances with at least
`crop_inside_fraction` (default: half) of their pixels inside the window; one window is
drawn with probability proportional to its weight. Pixels are counted on the canvas
sampled every `crop_count_stride` pixels, through per-instance integral images, so
all candidates cost one lookup each; instances smaller than the stride may be missed
by the count (they still appear in the output).

Randomness is stateless: every random choice derives from a `seed` tensor of shape
[2], so the same seed gives the same augmentation on any machine and in any order.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run, and their parameters (defaults: paper section 4.2).

    Attributes:
      rotate: rotate by an angle uniform in [-max_rotation_degrees, max_rotation_degrees].
      max_rotation_degrees: bound of the rotation angle, in degrees.
      resize: resize by a ratio uniform in [min_scale, max_scale].
      min_scale: lower bound of the resize ratio.
      max_scale: upper bound of the resize ratio.
      crop: choose the output window among random candidates; when False the window
        is centred on the (rotated, resized) image, cropping or padding it.
      num_crop_candidates: number of candidate windows drawn per example.
      crop_instance_bonus: a candidate's weight is `1 + crop_instance_bonus * n`, with
        `n` the number of instances mostly inside it; 0 samples windows uniformly.
      crop_inside_fraction: fraction of an instance's pixels that must fall inside a
        window for the instance to count as inside it.
      crop_count_stride: pixels are counted every `crop_count_stride` canvas pixels
        in each direction (cost falls with its square).
      flip: flip horizontally with probability `flip_probability`.
      flip_probability: probability of a horizontal flip.
    """

    rotate: bool = True
    max_rotation_degrees: float = 10.0
    resize: bool = True
    min_scale: float = 0.7
    max_scale: float = 1.5
    crop: bool = True
    num_crop_candidates: int = 100
    crop_instance_bonus: float = 1.0
    crop_inside_fraction: float = 0.5
    crop_count_stride: int = 4
    flip: bool = True
    flip_probability: float = 0.5

    def __post_init__(self):
        if self.max_rotation_degrees < 0:
            raise ValueError("AugmentConfig.max_rotation_degrees must be >= 0, got "
                             f"{self.max_rotation_degrees}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError("AugmentConfig needs 0 < min_scale <= max_scale, got "
                             f"min_scale={self.min_scale}, max_scale={self.max_scale}")
        if self.num_crop_candidates < 1:
            raise ValueError("AugmentConfig.num_crop_candidates must be >= 1, got "
                             f"{self.num_crop_candidates}")
        if self.crop_instance_bonus < 0:
            raise ValueError("AugmentConfig.crop_instance_bonus must be >= 0, got "
                             f"{self.crop_instance_bonus}")
        if not 0 < self.crop_inside_fraction <= 1:
            raise ValueError("AugmentConfig.crop_inside_fraction must be in (0, 1], got "
                             f"{self.crop_inside_fraction}")
        if self.crop_count_stride < 1:
            raise ValueError("AugmentConfig.crop_count_stride must be >= 1, got "
                             f"{self.crop_count_stride}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError("AugmentConfig.flip_probability must be in [0, 1], got "
                             f"{self.flip_probability}")


class AugmentParams(NamedTuple):
    """One draw of the geometric augmentation (all scalar tensors except `offset`).

    Attributes:
      angle: float32 rotation in radians, counter-clockwise as displayed.
      scale: float32 resize ratio.
      offset: int32 [2], (y0, x0) top-left corner of the window on the canvas.
      flip: bool, whether the window is flipped horizontally.
    """

    angle: tf.Tensor
    scale: tf.Tensor
    offset: tf.Tensor
    flip: tf.Tensor


def _as_size(size: int | Sequence[int]) -> tuple[int, int]:
    """Returns (height, width) from an int or a pair, checking both are positive."""
    if isinstance(size, numbers.Integral):
        size = (size, size)
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"output_size must be positive, got {size}")
    return height, width


def canvas_size(image_size: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """Size of the image after resizing by `scale`.

    Args:
      image_size: int32 [2], (height, width).
      scale: float32 scalar resize ratio.

    Returns:
      int32 [2], `max(1, round(scale * size))` per axis.
    """
    scaled = tf.round(tf.cast(image_size, tf.float32) * scale)
    return tf.maximum(tf.cast(scaled, tf.int32), 1)


def _canvas_to_input_transform(image_size, canvas, angle, ky, my, kx, mx):
    """Transform vector mapping output indices to input indices, through the canvas.

    An output pixel index `(i, j)` sits at the canvas point `(ky * i + my, kx * j + mx)`
    in continuous coordinates; the canvas is the input rotated by `angle` and resized
    to `canvas`, both about the centre.

    Returns:
      float32 [8], the `transforms` row of `ImageProjectiveTransformV3`, which maps an
      output point `(x, y)` (indices) to the input point
      `(a0 x + a1 y + a2, b0 x + b1 y + b2)` (indices; pixel centres at integers).
    """
    in_h, in_w = tf.unstack(tf.cast(image_size, tf.float32))
    canvas_h, canvas_w = tf.unstack(tf.cast(canvas, tf.float32))
    # Per-axis ratios, not `scale` itself: rounding the canvas to whole pixels makes the
    # two axes differ slightly, and the canvas edges must land on the image edges.
    scale_y = canvas_h / in_h
    scale_x = canvas_w / in_w
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Output index -> canvas point relative to the canvas centre, undone the resize.
    qx_gain, qx_bias = kx / scale_x, (mx - canvas_w / 2) / scale_x
    qy_gain, qy_bias = ky / scale_y, (my - canvas_h / 2) / scale_y
    # Undo the counter-clockwise (as displayed, y pointing down) rotation, then move to
    # input indices (continuous coordinate minus one half).
    a0 = cos * qx_gain
    a1 = -sin * qy_gain
    a2 = cos * qx_bias - sin * qy_bias + in_w / 2 - 0.5
    b0 = sin * qx_gain
    b1 = cos * qy_gain
    b2 = sin * qx_bias + cos * qy_bias + in_h / 2 - 0.5
    zero = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero])


def output_to_input_transform(image_size: tf.Tensor, params: AugmentParams,
                              output_size: int | Sequence[int]) -> tf.Tensor:
    """The `ImageProjectiveTransformV3` transform of one augmentation draw.

    Args:
      image_size: int32 [2], input (height, width).
      params: the draw.
      output_size: (height, width) of the window, or one int for a square.

    Returns:
      float32 [8] mapping output pixel indices to input pixel indices.
    """
    out_h, out_w = _as_size(output_size)
    canvas = canvas_size(image_size, params.scale)
    offset = tf.cast(params.offset, tf.float32)
    # Pixel j's centre (j + 1/2) lands on the canvas at x0 + j + 1/2, or flipped at
    # x0 + out_w - (j + 1/2).
    kx = tf.where(params.flip, -1.0, 1.0)
    mx = offset[1] + tf.where(params.flip, out_w - 0.5, 0.5)
    return _canvas_to_input_transform(
        image_size, canvas, tf.cast(params.angle, tf.float32),
        ky=1.0, my=offset[0] + 0.5, kx=kx, mx=mx)


def warp(image: tf.Tensor, instances: tf.Tensor, transform: tf.Tensor,
         output_size: int | Sequence[int]) -> tuple[tf.Tensor, tf.Tensor]:
    """Resamples an image and its instance map with one output-to-input transform.

    Args:
      image: [height, width, 3] any real dtype.
      instances: int32 [height, width].
      transform: float32 [8], as returned by `output_to_input_transform`.
      output_size: (out_height, out_width) or one int for a square.

    Returns:
      image: float32 [out_height, out_width, 3], bilinear, 0 where there is no source.
      instances: int32 [out_height, out_width], nearest, -1 where there is no source.
    """
    out_h, out_w = _as_size(output_size)
    transforms = tf.reshape(tf.cast(transform, tf.float32), [1, 8])
    output_shape = tf.constant([out_h, out_w], tf.int32)
    warped_image = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[tf.newaxis], transforms=transforms,
        output_shape=output_shape, fill_value=0.0, interpolation="BILINEAR",
        fill_mode="CONSTANT")[0]
    warped_instances = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(instances, tf.int32)[tf.newaxis, :, :, tf.newaxis],
        transforms=transforms, output_shape=output_shape, fill_value=-1.0,
        interpolation="NEAREST", fill_mode="CONSTANT")[0, :, :, 0]
    warped_image.set_shape([out_h, out_w, 3])
    warped_instances.set_shape([out_h, out_w])
    return warped_image, warped_instances


def _ceil_div(a: tf.Tensor, b: int) -> tf.Tensor:
    """Integer ceil(a / b) for any sign of `a` and b > 0."""
    return -tf.math.floordiv(-a, b)


def count_instances_in_windows(grid_labels: tf.Tensor, offsets: tf.Tensor,
                               window_size: int | Sequence[int], stride: int,
                               inside_fraction: float) -> tf.Tensor:
    """Number of instances mostly inside each window, counted on a subsampled grid.

    Grid cell `(i, j)` is the canvas pixel `(stride * i, stride * j)`. An instance is
    inside a window when at least `inside_fraction` of its grid cells are.

    Args:
      grid_labels: int32 [grid_h, grid_w] instance ids (-1, 0, 1..N) on the grid.
      offsets: int32 [K, 2] window top-left corners (y0, x0) in canvas pixels; may be
        negative.
      window_size: (height, width) of the windows in canvas pixels, or one int.
      stride: canvas pixels between grid cells.
      inside_fraction: in (0, 1].

    Returns:
      int32 [K].
    """
    win_h, win_w = _as_size(window_size)
    grid_h, grid_w = tf.shape(grid_labels)[0], tf.shape(grid_labels)[1]
    # At least one channel: gathers from an empty axis fail, and an all-zero channel
    # (total 0) never counts. one_hot maps -1 and 0 (index -2, -1) to all-zero rows.
    num_ids = tf.maximum(tf.reduce_max(grid_labels), 1)
    one_hot = tf.one_hot(grid_labels - 1, num_ids, dtype=tf.int32)
    integral = tf.cumsum(tf.cumsum(one_hot, axis=0), axis=1)
    integral = tf.pad(integral, [[1, 0], [1, 0], [0, 0]])  # [grid_h+1, grid_w+1, N]
    # Cells inside [y0, y0 + win_h): ceil(y0 / stride) <= i < ceil((y0 + win_h) / stride).
    y0, x0 = offsets[:, 0], offsets[:, 1]
    i0 = tf.clip_by_value(_ceil_div(y0, stride), 0, grid_h)
    i1 = tf.clip_by_value(_ceil_div(y0 + win_h, stride), 0, grid_h)
    j0 = tf.clip_by_value(_ceil_div(x0, stride), 0, grid_w)
    j1 = tf.clip_by_value(_ceil_div(x0 + win_w, stride), 0, grid_w)
    corner = lambda i, j: tf.gather_nd(integral, tf.stack([i, j], axis=-1))
    inside_count = corner(i1, j1) - corner(i0, j1) - corner(i1, j0) + corner(i0, j0)
    total = integral[-1, -1]  # [N]
    inside = (total > 0) & (tf.cast(inside_count, tf.float32)
                            >= inside_fraction * tf.cast(total, tf.float32))
    return tf.reduce_sum(tf.cast(inside, tf.int32), axis=-1)


def sample_crop_offset(seed: tf.Tensor, instances: tf.Tensor, angle: tf.Tensor,
                       scale: tf.Tensor, output_size: int | Sequence[int],
                       config: AugmentConfig) -> tf.Tensor:
    """Draws the window's top-left corner, weighted towards windows with more instances.

    Args:
      seed: int32/int64 [2] stateless seed.
      instances: int32 [height, width] of the input (before rotation and resize).
      angle: float32 rotation of the draw, in radians.
      scale: float32 resize ratio of the draw.
      output_size: (height, width) of the window, or one int.
      config: its crop fields are used.

    Returns:
      int32 [2], (y0, x0) on the canvas.
    """
    out_h, out_w = _as_size(output_size)
    image_size = tf.shape(instances)[:2]
    canvas = canvas_size(image_size, scale)
    # Offsets range over every window overlapping the canvas fully in each axis: inside
    # it when it is larger than the window, around it (padding) when smaller.
    slack = canvas - tf.constant([out_h, out_w])
    low, high = tf.minimum(slack, 0), tf.maximum(slack, 0)
    candidates_seed, choice_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    num = config.num_crop_candidates
    unit = tf.random.stateless_uniform([num, 2], candidates_seed)
    # floor(low + u * (high - low + 1)) is uniform over the integers low..high.
    span = tf.cast(high - low + 1, tf.float32)
    offsets = low + tf.minimum(tf.cast(tf.floor(unit * span), tf.int32), high - low)
    if config.crop_instance_bonus == 0:
        return offsets[0]
    stride = config.crop_count_stride
    grid = _ceil_div(canvas, stride)
    transform = _canvas_to_input_transform(
        image_size, canvas, tf.cast(angle, tf.float32),
        ky=float(stride), my=0.5, kx=float(stride), mx=0.5)
    grid_labels = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(instances, tf.int32)[tf.newaxis, :, :, tf.newaxis],
        transforms=transform[tf.newaxis], output_shape=grid, fill_value=-1.0,
        interpolation="NEAREST", fill_mode="CONSTANT")[0, :, :, 0]
    counts = count_instances_in_windows(grid_labels, offsets, (out_h, out_w), stride,
                                        config.crop_inside_fraction)
    weights = 1.0 + config.crop_instance_bonus * tf.cast(counts, tf.float32)
    choice = tf.random.stateless_categorical(
        tf.math.log(weights)[tf.newaxis], 1, choice_seed, dtype=tf.int32)[0, 0]
    return offsets[choice]


def sample_params(seed: tf.Tensor, instances: tf.Tensor,
                  output_size: int | Sequence[int],
                  config: AugmentConfig) -> AugmentParams:
    """Draws one augmentation for an example; disabled steps get their identity value.

    Args:
      seed: int32/int64 [2] stateless seed; equal seeds give equal draws.
      instances: int32 [height, width] of the input (the crop sampler counts them).
      output_size: (height, width) of the output, or one int.
      config: what to draw.

    Returns:
      The draw.
    """
    out_h, out_w = _as_size(output_size)
    angle_seed, scale_seed, crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 4))
    if config.rotate and config.max_rotation_degrees > 0:
        bound = math.radians(config.max_rotation_degrees)
        angle = tf.random.stateless_uniform([], angle_seed, -bound, bound)
    else:
        angle = tf.constant(0.0)
    if config.resize:
        scale = tf.random.stateless_uniform([], scale_seed, config.min_scale,
                                            config.max_scale)
    else:
        scale = tf.constant(1.0)
    if config.crop:
        offset = sample_crop_offset(crop_seed, instances, angle, scale, (out_h, out_w),
                                    config)
    else:
        slack = canvas_size(tf.shape(instances)[:2], scale) - tf.constant([out_h, out_w])
        offset = tf.math.floordiv(slack, 2)
    if config.flip:
        flip = tf.random.stateless_uniform([], flip_seed) < config.flip_probability
    else:
        flip = tf.constant(False)
    return AugmentParams(angle=angle, scale=scale, offset=offset, flip=flip)


def augment(image: tf.Tensor, instances: tf.Tensor, seed: tf.Tensor,
            output_size: int | Sequence[int],
            config: AugmentConfig = AugmentConfig()) -> tuple[tf.Tensor, tf.Tensor]:
    """Randomly rotates, resizes, crops (or pads) and flips an image and its labels.

    Args:
      image: uint8 or float [height, width, 3] RGB.
      instances: int32 [height, width], -1 ignore, 0 background, 1..N instance ids.
      seed: int32/int64 [2] stateless seed.
      output_size: (out_height, out_width) or one int for a square.
      config: which augmentations run, and their ranges.

    Returns:
      image: float32 [out_height, out_width, 3] in the input's value range, 0 where
        invented.
      instances: int32 [out_height, out_width] with the input's ids (instances cut by
        the crop are simply absent), -1 where invented.
    """
    instances = tf.convert_to_tensor(instances)
    params = sample_params(seed, instances, output_size, config)
    transform = output_to_input_transform(tf.shape(instances)[:2], params, output_size)
    return warp(image, instances, transform, output_size)
