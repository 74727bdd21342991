"""Labels at the heads' resolution and the points the losses are computed on.

Conventions (shared by the losses):

* Instance slots: the `M` ground-truth instances of a batch (ids `1..M`, index `id - 1` in
  `instance_classes` / `instance_valid`) plus the background (id 0), which the paper
  counts as one more instance: slot `j` holds id `j`, `j = 0..M`.
* Sampled points are laid out slot-major: points `[j * K, (j + 1) * K)` of an image
  belong to slot `j`, so `P = K * (M + 1)` is static. A slot that is invalid or absent at
  the heads' resolution gives `K` padding points (`point_instance_ids == -1`).

Sampling is driven by a seed tensor through stateless random ops (no Python-side
randomness), with static output shapes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from instance_embed.ops import checks
from instance_embed.ops import geometry


def labels_at_resolution(instances: tf.Tensor, size: Sequence[int]) -> tf.Tensor:
    """Nearest-neighbour resampling of instance label maps to the heads' resolution.

    Output pixel `(i, j)` takes the label of input pixel
    `(floor((i + 0.5) * H / h), floor((j + 0.5) * W / w))`: for an integer stride
    `s = H / h` that is pixel `s * i + s // 2`, the centre of the stride cell (the lower
    right of the four central pixels when `s` is even). Labels are copied, never mixed,
    so ignore pixels (-1) stay -1.

    Args:
      instances: int [batch, H, W] label maps (-1 ignore, 0 background, 1..M).
      size: (h, w), the output size.

    Returns:
      int32 [batch, h, w].
    """
    instances = tf.convert_to_tensor(instances)
    checks.check_rank(instances, "instances", 3)
    checks.check_integer(instances, "instances")
    instances = tf.cast(instances, tf.int32)
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    out_h, out_w = (int(v) for v in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    rows = cell_centres(geometry.dim(instances, 1), out_h)
    cols = cell_centres(geometry.dim(instances, 2), out_w)
    return tf.gather(tf.gather(instances, rows, axis=1), cols, axis=2)


def sample_points(labels: tf.Tensor,
                  instance_valid: tf.Tensor,
                  points_per_instance: int,
                  seed: tf.Tensor,
                  instance_size_weighting: bool = True) -> dict[str, tf.Tensor]:
    """Samples K points per instance present at the heads' resolution, plus K background.

    Each pixel draws one uniform random key; an instance's points are the pixels holding
    its K largest keys, i.e. a uniformly random K-subset of its pixels (without
    replacement). An instance with `c < K` pixels yields all its `c` pixels in random
    order, repeated cyclically up to K points (each pixel appears `floor(K / c)` or
    `ceil(K / c)` times). Ignore pixels (-1), invalid instances and ids outside `0..M`
    are never sampled; a valid instance with no pixel at this resolution (too small to
    survive the nearest-neighbour resampling) yields padding.

    Memory: the keys are masked per slot, a float32 [batch, M + 1, h * w] tensor
    (batch 8, M = 32 at 128 x 128: 17 MB).

    Args:
      labels: int [batch, h, w] label maps at the heads' resolution.
      instance_valid: bool [batch, M], whether instance id `i` (index `i - 1`) exists.
      points_per_instance: K (Python int >= 1).
      seed: int32/int64 [2], the seed of the stateless random ops (vary it per step,
        and per replica if replicas should draw independently), or [batch, 2], one seed
        per image. A seed gives the same points on the same kind of device;
        XLA-compiled code draws other numbers.
      instance_size_weighting: point weights 1 / (pixel count of the point's instance at
        this resolution) when True, else 1; padding points weigh 0.

    Returns:
      A dict with
        point_indices: int32 [batch, P], flat indices into `h * w` (0 for padding);
        point_instance_ids: int32 [batch, P], instance id (0 = background), -1 = padding;
        point_weights: float32 [batch, P];
        instance_sizes: int32 [batch, M + 1], pixels of each slot at this resolution;
      with P = K * (M + 1), points laid out slot-major (see the module docstring).
    """
    labels = tf.convert_to_tensor(labels)
    instance_valid = tf.convert_to_tensor(instance_valid)
    checks.check_rank(labels, "labels", 3)
    checks.check_integer(labels, "labels")
    checks.check_rank(instance_valid, "instance_valid", 2)
    if not checks.is_int(points_per_instance) or points_per_instance < 1:
        raise ValueError(f"points_per_instance must be an int >= 1, got {points_per_instance!r}")
    num_instances = checks.static_dim(instance_valid, 1, "instance_valid")
    k = int(points_per_instance)
    seed = check_seed(seed)

    flat = geometry.flatten_spatial(tf.cast(labels, tf.int32))                    # [B, n]
    batch, n = geometry.dim(flat, 0), geometry.dim(flat, 1)
    slots = tf.range(num_instances + 1, dtype=tf.int32)                 # [M + 1]
    slot_valid = tf.concat(
        [tf.ones_like(instance_valid[:, :1], tf.bool), tf.cast(instance_valid, tf.bool)],
        axis=1)                                                          # [B, M + 1]
    member = tf.logical_and(tf.equal(flat[:, None, :], slots[None, :, None]),
                            slot_valid[:, :, None])                      # [B, M + 1, n]
    sizes = tf.reduce_sum(tf.cast(member, tf.int32), axis=-1)            # [B, M + 1]

    # A pixel belongs to at most one slot, so one key per pixel serves every slot.
    if seed.shape.rank == 2:
        # One seed per image: an image's points do not depend on how the global batch
        # is split across replicas (a mirrored run samples what a single device would).
        keys = tf.map_fn(
            lambda image_seed: tf.random.stateless_uniform(tf.reshape(n, [1]), seed=image_seed,
                                                           dtype=tf.float32),
            seed, fn_output_signature=tf.TensorSpec([None], tf.float32))
    else:
        keys = tf.random.stateless_uniform(tf.stack([batch, n]), seed=seed, dtype=tf.float32)
    masked_keys = tf.where(member, keys[:, None, :], -1.0)
    top = min(k, n) if isinstance(n, int) else k
    _, ranked = tf.math.top_k(masked_keys, k=top, sorted=True)          # [B, M + 1, top]
    # Members hold keys >= 0 > -1, so the first `size` ranked pixels are the members.
    cycle = tf.range(k, dtype=tf.int32)[None, None, :] % tf.maximum(sizes, 1)[:, :, None]
    indices = tf.gather(ranked, cycle, batch_dims=2)                     # [B, M + 1, K]

    present = sizes > 0
    indices = tf.where(present[:, :, None], indices, 0)
    ids = tf.where(present, slots[None, :], -1)
    ids = tf.broadcast_to(ids[:, :, None], tf.shape(indices))
    num_points = k * (num_instances + 1)
    point_indices = tf.reshape(indices, [-1, num_points])
    point_ids = tf.reshape(ids, [-1, num_points])
    if instance_size_weighting:
        weights = instance_size_weights(point_ids, sizes)
    else:
        weights = tf.cast(point_ids >= 0, tf.float32)
    return {
        "point_indices": point_indices,
        "point_instance_ids": point_ids,
        "point_weights": weights,
        "instance_sizes": sizes,
    }


def instance_size_weights(point_instance_ids: tf.Tensor, instance_sizes: tf.Tensor) -> tf.Tensor:
    """Point weights inversely proportional to the size of the point's instance.

    Args:
      point_instance_ids: int [batch, P], slot of each point (-1 = padding).
      instance_sizes: int or float [batch, M + 1], pixel count of each slot (slot 0 =
        background), e.g. `sample_points(...)["instance_sizes"]`.

    Returns:
      float32 [batch, P]: 1 / size, and 0 for padding and for empty slots.
    """
    ids = tf.cast(point_instance_ids, tf.int32)
    instance_sizes = tf.cast(instance_sizes, tf.float32)
    checks.check_rank(ids, "point_instance_ids", 2)
    checks.check_rank(instance_sizes, "instance_sizes", 2)
    sizes = tf.gather(instance_sizes, tf.maximum(ids, 0), batch_dims=1)
    valid = tf.logical_and(ids >= 0, sizes > 0)
    return tf.where(valid, 1.0 / tf.maximum(sizes, 1.0), 0.0)


def gather_points(feature_map: tf.Tensor, point_indices: tf.Tensor) -> tf.Tensor:
    """Values of a per-pixel map at sampled points.

    Args:
      feature_map: [batch, h, w, ...] (any dtype, any trailing dimensions).
      point_indices: int [batch, P], flat indices into `h * w`.

    Returns:
      [batch, P, ...], same dtype as `feature_map`.
    """
    feature_map = tf.convert_to_tensor(feature_map)
    if feature_map.shape.rank is not None and feature_map.shape.rank < 3:
        raise ValueError(f"feature_map must be [batch, h, w, ...], got shape {feature_map.shape}")
    point_indices = tf.convert_to_tensor(point_indices)
    checks.check_rank(point_indices, "point_indices", 2)
    checks.check_integer(point_indices, "point_indices")
    return tf.gather(geometry.flatten_spatial(feature_map), point_indices, batch_dims=1)


def cell_centres(in_size, out_size: int):
    """Indices floor((i + 0.5) * in / out) for i < out, computed exactly in integers."""
    if isinstance(in_size, int):
        return tf.constant((2 * np.arange(out_size) + 1) * in_size // (2 * out_size), tf.int32)
    return (2 * tf.range(out_size, dtype=tf.int32) + 1) * in_size // (2 * out_size)


def check_seed(seed) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if (not seed.dtype.is_integer or seed.shape.rank not in (1, 2)
            or seed.shape[-1] not in (2, None)):
        raise ValueError(f"seed must be an int32/int64 tensor of shape [2] or [batch, 2], got "
                         f"{seed.dtype.name} {seed.shape}")
    return seed if seed.dtype in (tf.int32, tf.int64) else tf.cast(seed, tf.int64)
