"""The two training losses of the paper: embedding (eq. 1-2) and mask classification (3.4).

Everything here works at the resolution of the network's heads `[h, w]`: the label map is
brought there by nearest neighbour (`labels_at_resolution`), points are sampled there
(`sample_points`), and the masks grown from them to build classification targets live
there (`classification_targets`).

Conventions:

* Similarity (paper eq. 1): `sigma(p, q) = 2 / (1 + exp(d2))` with `d2 = ||e_p - e_q||^2`,
  so `sigma >= tau` is `d2 <= log(2 / tau - 1)` (`similarity_thresholds`),
  `log sigma = log 2 - softplus(d2)` and `1 - sigma = tanh(d2 / 2)`.
* Instance slots: the `M` ground-truth instances of a batch (ids `1..M`, index `id - 1` in
  `instance_classes` / `instance_valid`) plus the background (id 0), which the paper
  counts as one more instance: slot `j` holds id `j`, `j = 0..M`.
* Sampled points are laid out slot-major: points `[j * K, (j + 1) * K)` of an image
  belong to slot `j`, so `P = K * (M + 1)` is static. A slot that is invalid or absent at
  the heads' resolution gives `K` padding points (`point_instance_ids == -1`).

All functions are pure tensor code (no Python-side randomness: sampling is driven by a
seed tensor through stateless random ops), with static output shapes, so they run
eagerly, in `tf.function`, under XLA and in any `tf.distribute` replica context. Inputs
in bfloat16/float16 are cast to float32 before any arithmetic.

Typical use in a training step:

```python
loss_fn = InstanceLoss(LossConfig(cls_warmup_steps=500, cls_ramp_steps=500))
outputs = model(batch["image"], training=True)
values = loss_fn(outputs, batch, step=step, seed=tf.stack([run_seed, step]))
values["total"]  # L_e + lambda(step) * L_cls
```
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

# Lower bound on `1 - sigma = tanh(d2 / 2)` before its log: the loss of a pair of
# different instances whose embeddings coincide is then -log(1e-6) ~ 13.8 instead of inf.
_MIN_DISSIMILARITY = 1e-6
_LOG_2 = math.log(2.0)


@dataclasses.dataclass
class LossConfig:
    """Configuration of `InstanceLoss`.

    Attributes:
      points_per_instance: K, points sampled per instance (background counts as one).
      cls_points_per_instance: how many of each instance's K points also serve as
        seeds for the classification loss (None: all K). Growing a mask from every
        seed over the whole image is the costliest part of the losses (a
        [points, pixels] distance matrix per threshold), so fewer seeds than embedding
        points make a step cheaper, most of all at fine output strides.
      instance_size_weighting: weight each point by the inverse of its instance's size
        at the heads' resolution (the paper's choice); False = uniform weights.
      cls_iou_threshold: a mask grown from a seed is labelled with the class of its best
        matching ground-truth instance when their IoU exceeds this, else background.
      cls_warmup_steps: steps during which the classification loss weight is 0 (the
        paper first lets the embedding settle).
      cls_ramp_steps: steps over which the weight then rises linearly to
        `cls_weight_max` (0 = jump straight to it).
      cls_weight_max: final weight lambda of the classification loss (paper: 0.2).
      cls_semantic_warmup: not in the paper, off by default. The paper's targets (the
        class of the mask a seed grows) mean little while the embeddings are young, so
        the head idles through the warm-up. With this on, it learns each point's
        semantic class (its instance's class at every tau, 0 on the background) from
        step 0 with weight `cls_weight_max - lambda(step)`: all of it during the
        warm-up, handed over to the paper's targets as lambda ramps up, none after.
      taus: similarity thresholds, one classification head per tau; must match the
        model's `taus` (same values, same order).
    """

    points_per_instance: int = 10
    cls_points_per_instance: int | None = None
    instance_size_weighting: bool = True
    cls_iou_threshold: float = 0.5
    cls_warmup_steps: int = 1000
    cls_ramp_steps: int = 1000
    cls_weight_max: float = 0.2
    cls_semantic_warmup: bool = False
    taus: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9)

    def __post_init__(self):
        self.taus = _validate_taus(self.taus, "LossConfig.taus")
        _require(_is_int(self.points_per_instance) and self.points_per_instance >= 1,
                 "points_per_instance", self.points_per_instance, "must be an int >= 1")
        _require(self.cls_points_per_instance is None
                 or (_is_int(self.cls_points_per_instance)
                     and 1 <= self.cls_points_per_instance <= self.points_per_instance),
                 "cls_points_per_instance", self.cls_points_per_instance,
                 "must be None or an int in [1, points_per_instance]")
        _require(isinstance(self.instance_size_weighting, (bool, np.bool_)),
                 "instance_size_weighting", self.instance_size_weighting, "must be a bool")
        _require(_is_number(self.cls_iou_threshold) and 0.0 <= self.cls_iou_threshold < 1.0,
                 "cls_iou_threshold", self.cls_iou_threshold, "must be in [0, 1)")
        for name in ("cls_warmup_steps", "cls_ramp_steps"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, name, value, "must be an int >= 0")
        _require(_is_number(self.cls_weight_max) and self.cls_weight_max >= 0.0,
                 "cls_weight_max", self.cls_weight_max, "must be a number >= 0")
        _require(isinstance(self.cls_semantic_warmup, (bool, np.bool_)),
                 "cls_semantic_warmup", self.cls_semantic_warmup, "must be a bool")


# ---------------------------------------------------------------------------------------
# Labels and point sampling.
# ---------------------------------------------------------------------------------------


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
    _check_rank(instances, 3, "instances")
    _check_integer(instances, "instances")
    instances = tf.cast(instances, tf.int32)
    if len(size) != 2:
        raise ValueError(f"size must be (height, width), got {size!r}")
    out_h, out_w = (int(v) for v in size)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    rows = _cell_centres(_dim(instances, 1), out_h)
    cols = _cell_centres(_dim(instances, 2), out_w)
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
    _check_rank(labels, 3, "labels")
    _check_integer(labels, "labels")
    _check_rank(instance_valid, 2, "instance_valid")
    if not _is_int(points_per_instance) or points_per_instance < 1:
        raise ValueError(f"points_per_instance must be an int >= 1, got {points_per_instance!r}")
    num_instances = _static_dim(instance_valid, 1, "instance_valid")
    k = int(points_per_instance)
    seed = _check_seed(seed)

    flat = _flatten_spatial(tf.cast(labels, tf.int32))                    # [B, n]
    batch, n = _dim(flat, 0), _dim(flat, 1)
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
    _check_rank(ids, 2, "point_instance_ids")
    _check_rank(instance_sizes, 2, "instance_sizes")
    sizes = tf.gather(instance_sizes, tf.maximum(ids, 0), batch_dims=1)
    valid = tf.logical_and(ids >= 0, sizes > 0)
    return tf.where(valid, 1.0 / tf.maximum(sizes, 1.0), 0.0)


def first_points_per_slot(values: tf.Tensor, points_per_instance: int, count: int
                          ) -> tf.Tensor:
    """The first `count` of each slot's points, from `[batch, (M + 1) * K]` slot-major.

    Args:
      values: [batch, (M + 1) * K], laid out as `sample_points` returns them.
      points_per_instance: K.
      count: how many to keep per slot, 1..K.

    Returns:
      [batch, (M + 1) * count], same dtype, still slot-major.
    """
    values = tf.convert_to_tensor(values)
    slots = _static_dim(values, 1, "values") // points_per_instance
    per_slot = tf.reshape(values, [-1, slots, points_per_instance])[:, :, :count]
    return tf.reshape(per_slot, [-1, slots * count])


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
    _check_rank(point_indices, 2, "point_indices")
    _check_integer(point_indices, "point_indices")
    return tf.gather(_flatten_spatial(feature_map), point_indices, batch_dims=1)


# ---------------------------------------------------------------------------------------
# Embedding loss (paper eq. 1-2).
# ---------------------------------------------------------------------------------------


def embedding_loss_per_image(point_embeddings: tf.Tensor,
                             point_instance_ids: tf.Tensor,
                             point_weights: tf.Tensor | None = None
                             ) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image embedding loss of paper eq. (2), for callers that reduce it themselves.

    For each image, over all ordered pairs `p != q` of valid points (id >= 0):
    `w_pq = w_p * w_q`, normalised to sum to 1 over the image's pairs, and
    `loss = -sum_pq w_pq [1{y_p = y_q} log sigma(p, q) + 1{y_p != y_q} log(1 - sigma(p, q))]`.
    `log sigma = log 2 - softplus(d2)` and `1 - sigma = tanh(d2 / 2)`, clipped below at
    1e-6 before the log, keep value and gradient finite when embeddings coincide or are
    very far apart. `d2` comes from one Gram matrix per image on embeddings centred on
    their mean (distances are translation invariant; centring keeps `|a|^2 + |b|^2 - 2ab`
    from cancelling catastrophically when embeddings are large).

    Args:
      point_embeddings: float [batch, P, d].
      point_instance_ids: int [batch, P], instance id per point, -1 = padding.
      point_weights: float [batch, P], non-negative, or None for all ones.

    Returns:
      losses: float32 [batch], 0 where not valid.
      valid: bool [batch], whether the image has a pair of valid points with positive
        weight (with positive weights: at least two valid points).
    """
    embeddings = tf.cast(point_embeddings, tf.float32)
    ids = tf.convert_to_tensor(point_instance_ids)
    _check_rank(embeddings, 3, "point_embeddings")
    _check_rank(ids, 2, "point_instance_ids")
    _check_integer(ids, "point_instance_ids")
    ids = tf.cast(ids, tf.int32)
    valid = ids >= 0
    weights = tf.cast(valid, tf.float32)
    if point_weights is not None:
        point_weights = tf.cast(point_weights, tf.float32)
        _check_rank(point_weights, 2, "point_weights")
        weights = weights * point_weights

    # Padding rows are zeroed so whatever they hold never reaches a gradient.
    embeddings = tf.where(valid[:, :, None], embeddings, 0.0)
    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)[:, None, None]
    centre = tf.reduce_sum(embeddings, axis=1, keepdims=True) / tf.maximum(count, 1.0)
    embeddings = tf.where(valid[:, :, None], embeddings - tf.stop_gradient(centre), 0.0)
    d2 = _squared_distances(embeddings, embeddings)                      # [B, P, P]

    num_points = _dim(ids, 1)
    not_self = tf.logical_not(tf.cast(tf.eye(num_points), tf.bool))[None]
    pair_valid = tf.logical_and(tf.logical_and(valid[:, :, None], valid[:, None, :]), not_self)
    pair_weights = tf.where(pair_valid, weights[:, :, None] * weights[:, None, :], 0.0)
    total_weight = tf.reduce_sum(pair_weights, axis=[1, 2])             # [B]

    log_similar = _LOG_2 - tf.math.softplus(d2)
    log_dissimilar = tf.math.log(tf.maximum(tf.math.tanh(0.5 * d2), _MIN_DISSIMILARITY))
    same = tf.equal(ids[:, :, None], ids[:, None, :])
    log_likelihood = tf.where(same, log_similar, log_dissimilar)
    image_valid = total_weight > 0.0
    losses = -tf.reduce_sum(pair_weights * log_likelihood, axis=[1, 2]) / tf.where(
        image_valid, total_weight, 1.0)
    return tf.where(image_valid, losses, 0.0), image_valid


def embedding_loss(point_embeddings: tf.Tensor,
                   point_instance_ids: tf.Tensor,
                   point_weights: tf.Tensor | None = None) -> tf.Tensor:
    """Embedding loss of paper eq. (2): mean over images of `embedding_loss_per_image`.

    Args:
      point_embeddings: float [batch, P, d].
      point_instance_ids: int [batch, P], -1 = padding.
      point_weights: float [batch, P] or None (all ones).

    Returns:
      float32 scalar: mean over images with at least two valid points; 0.0 when none has.
    """
    losses, valid = embedding_loss_per_image(point_embeddings, point_instance_ids,
                                             point_weights)
    return masked_mean(losses, valid)


# ---------------------------------------------------------------------------------------
# Mask growing and classification targets (paper 3.3-3.4).
# ---------------------------------------------------------------------------------------


def similarity_thresholds(taus: Sequence[float]) -> tf.Tensor:
    """Squared-distance thresholds: `sigma >= tau` iff `d2 <= log(2 / tau - 1)`.

    Args:
      taus: similarity thresholds, each in (0, 1).

    Returns:
      float32 [T].
    """
    taus = _validate_taus(taus, "taus")
    return tf.constant([math.log(2.0 / t - 1.0) for t in taus], tf.float32)


def seed_squared_distances(embeddings: tf.Tensor, point_indices: tf.Tensor) -> tf.Tensor:
    """Squared embedding distance from each seed point to every pixel of its image.

    One matrix product per image (`|a|^2 + |b|^2 - 2ab`, paper 3.3) on embeddings centred
    on the image mean, clamped at 0.

    Args:
      embeddings: float [batch, h, w, d].
      point_indices: int [batch, P], flat seed indices into `h * w`.

    Returns:
      float32 [batch, P, h * w] (batch 8, P = 330 at 128 x 128: 173 MB).
    """
    embeddings = tf.cast(embeddings, tf.float32)
    point_indices = tf.convert_to_tensor(point_indices)
    _check_rank(embeddings, 4, "embeddings")
    _check_rank(point_indices, 2, "point_indices")
    _check_integer(point_indices, "point_indices")
    pixels = _flatten_spatial(embeddings)                                # [B, n, d]
    pixels = pixels - tf.reduce_mean(pixels, axis=1, keepdims=True)
    seeds = tf.gather(pixels, point_indices, batch_dims=1)
    return _squared_distances(seeds, pixels)


def grow_masks_from_points(embeddings: tf.Tensor,
                           point_indices: tf.Tensor,
                           taus: Sequence[float]) -> tf.Tensor:
    """Masks `m(p, tau) = {q : sigma(p, q) >= tau}` grown from seed points (paper 3.3).

    Args:
      embeddings: float [batch, h, w, d].
      point_indices: int [batch, P], flat seed indices into `h * w`.
      taus: T similarity thresholds in (0, 1).

    Returns:
      bool [batch, P, T, h * w].
    """
    d2 = seed_squared_distances(embeddings, point_indices)
    thresholds = similarity_thresholds(taus)
    return d2[:, :, None, :] <= thresholds[None, None, :, None]


def classification_targets(embeddings: tf.Tensor,
                           labels: tf.Tensor,
                           instance_classes: tf.Tensor,
                           instance_valid: tf.Tensor,
                           point_indices: tf.Tensor,
                           point_instance_ids: tf.Tensor,
                           taus: Sequence[float],
                           iou_threshold: float = 0.5) -> tf.Tensor:
    """Class of the mask grown from each seed at each tau (paper 3.4); no gradient.

    For seed p and threshold tau the mask `m(p, tau)` is grown over the whole image at
    the heads' resolution, without its ignore pixels (they count in neither intersection
    nor union). Its IoU with every valid ground-truth instance comes from one matrix
    product with their one-hot masks; the target is the class of the best match if that
    IoU exceeds `iou_threshold` (strictly), else 0 (background). With a threshold >= 0.5
    at most one instance can exceed it; below 0.5 ties go to the lower instance id.

    Following the paper literally, every sampled seed gets a target, background seeds
    included: a background seed whose mask happens to match an instance is labelled
    with that instance's class. Padding points get 0.

    Memory: float32 [batch, P, h * w] distances plus one [batch, P, h * w] mask at a time
    (thresholds are handled one after the other).

    Args:
      embeddings: float [batch, h, w, d].
      labels: int [batch, h, w] at the same resolution (-1 ignore, 0 background, 1..M).
      instance_classes: int [batch, M], class (1..C) of instance id `i` at index `i - 1`.
      instance_valid: bool [batch, M].
      point_indices: int [batch, P], flat seed indices into `h * w`.
      point_instance_ids: int [batch, P], -1 = padding.
      taus: T similarity thresholds in (0, 1).
      iou_threshold: minimum IoU (exclusive) for a mask to take an instance's class.

    Returns:
      int32 [batch, P, T].
    """
    embeddings = tf.stop_gradient(tf.cast(embeddings, tf.float32))
    labels = tf.convert_to_tensor(labels)
    instance_classes = tf.convert_to_tensor(instance_classes)
    instance_valid = tf.convert_to_tensor(instance_valid)
    point_ids = tf.convert_to_tensor(point_instance_ids)
    point_indices = tf.convert_to_tensor(point_indices)
    _check_rank(embeddings, 4, "embeddings")
    _check_rank(point_indices, 2, "point_indices")
    _check_integer(point_indices, "point_indices")
    _check_rank(labels, 3, "labels")
    _check_integer(labels, "labels")
    _check_rank(instance_classes, 2, "instance_classes")
    _check_rank(instance_valid, 2, "instance_valid")
    _check_rank(point_ids, 2, "point_instance_ids")
    if not embeddings.shape[1:3].is_compatible_with(labels.shape[1:3]):
        raise ValueError(f"labels {labels.shape} and embeddings {embeddings.shape} must have "
                         "the same spatial size (use labels_at_resolution)")
    if not _is_number(iou_threshold) or not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold!r}")
    thresholds = similarity_thresholds(taus)
    num_instances = _static_dim(instance_valid, 1, "instance_valid")
    if num_instances == 0:
        return tf.zeros([_dim(point_ids, 0), _dim(point_ids, 1), len(taus)], tf.int32)

    flat = _flatten_spatial(tf.cast(labels, tf.int32))                    # [B, n]
    ids = tf.range(1, num_instances + 1, dtype=tf.int32)
    gt = tf.logical_and(tf.equal(flat[:, :, None], ids[None, None, :]),
                        tf.cast(instance_valid, tf.bool)[:, None, :])    # [B, n, M]
    gt_sizes = tf.reduce_sum(tf.cast(gt, tf.float32), axis=1)            # [B, M]
    # One product per tau gives both the intersections (columns 0..M-1, ignore pixels
    # belong to no instance) and the mask size without ignore pixels (column M).
    columns = tf.cast(tf.concat([gt, (flat >= 0)[:, :, None]], axis=-1), tf.float32)

    d2 = seed_squared_distances(embeddings, point_indices)               # [B, P, n]
    classes = tf.cast(instance_classes, tf.int32)
    targets = []
    for t in range(thresholds.shape[0]):
        counts = tf.linalg.matmul(tf.cast(d2 <= thresholds[t], tf.float32), columns)
        intersection, mask_size = counts[..., :num_instances], counts[..., num_instances:]
        union = mask_size + gt_sizes[:, None, :] - intersection         # [B, P, M]
        iou = intersection / tf.maximum(union, 1.0)
        best = tf.argmax(iou, axis=-1, output_type=tf.int32)            # [B, P]
        best_iou = tf.reduce_max(iou, axis=-1)
        best_class = tf.gather(classes, best, batch_dims=1)
        targets.append(tf.where(best_iou > iou_threshold, best_class, 0))
    targets = tf.stack(targets, axis=-1)                                 # [B, P, T]
    targets = tf.where(tf.cast(point_ids, tf.int32)[:, :, None] >= 0, targets, 0)
    return tf.stop_gradient(targets)


# ---------------------------------------------------------------------------------------
# Classification loss and schedule.
# ---------------------------------------------------------------------------------------


def classification_loss_per_image(point_logits: tf.Tensor,
                                  targets: tf.Tensor,
                                  point_valid: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-image softmax cross-entropy of the seeds' class logits (paper 3.4).

    Args:
      point_logits: float [batch, P, T, C + 1], logits of each point for each tau.
      targets: int [batch, P, T] in 0..C (from `classification_targets`).
      point_valid: bool [batch, P] (e.g. `point_instance_ids >= 0`).

    Returns:
      losses: float32 [batch], mean over the image's valid points and the T taus
        (the paper's 1/|S| normalisation), 0 where not valid.
      valid: bool [batch], whether the image has a valid point.
    """
    logits = tf.cast(point_logits, tf.float32)
    targets = tf.convert_to_tensor(targets)
    point_valid = tf.cast(point_valid, tf.bool)
    _check_rank(logits, 4, "point_logits")
    _check_rank(targets, 3, "targets")
    _check_rank(point_valid, 2, "point_valid")
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.int32), logits=logits)                # [B, P, T]
    cross_entropy = tf.where(point_valid[:, :, None], cross_entropy, 0.0)
    num_taus = tf.cast(_dim(logits, 2), tf.float32)
    terms = tf.reduce_sum(tf.cast(point_valid, tf.float32), axis=1) * num_taus
    valid = terms > 0.0
    losses = tf.reduce_sum(cross_entropy, axis=[1, 2]) / tf.maximum(terms, 1.0)
    return losses, valid


def classification_loss(point_logits: tf.Tensor,
                        targets: tf.Tensor,
                        point_valid: tf.Tensor) -> tf.Tensor:
    """Mean over images (with a valid point) of `classification_loss_per_image`.

    Returns:
      float32 scalar, 0.0 when no image has a valid point.
    """
    return masked_mean(*classification_loss_per_image(point_logits, targets, point_valid))


def semantic_targets(point_instance_ids: tf.Tensor, instance_classes: tf.Tensor,
                     num_taus: int) -> tf.Tensor:
    """Each point's own class at every tau (`LossConfig.cls_semantic_warmup`).

    Args:
      point_instance_ids: int [batch, P]: 1..M an instance, 0 background, -1 padding.
      instance_classes: int [batch, M], class of instance id `i` at index `i - 1`.
      num_taus: T.

    Returns:
      int32 [batch, P, T]: the class of the point's instance, 0 for background and
      padding points.
    """
    ids = tf.cast(point_instance_ids, tf.int32)
    classes = tf.gather(tf.cast(instance_classes, tf.int32), tf.maximum(ids - 1, 0),
                        batch_dims=1)
    classes = tf.where(ids >= 1, classes, 0)
    return tf.repeat(classes[:, :, None], num_taus, axis=2)


def cls_loss_weight(step: tf.Tensor | int, config: LossConfig) -> tf.Tensor:
    """lambda(step): 0 for `cls_warmup_steps`, linear to `cls_weight_max`, then constant.

    `lambda = cls_weight_max * clip((step - cls_warmup_steps) / cls_ramp_steps, 0, 1)`;
    with `cls_ramp_steps == 0` it jumps to `cls_weight_max` at `step == cls_warmup_steps`.

    Returns:
      float32 scalar.
    """
    step = tf.cast(step, tf.float32)
    warmup = float(config.cls_warmup_steps)
    if config.cls_ramp_steps == 0:
        fraction = tf.cast(step >= warmup, tf.float32)
    else:
        fraction = tf.clip_by_value((step - warmup) / float(config.cls_ramp_steps), 0.0, 1.0)
    return tf.constant(config.cls_weight_max, tf.float32) * fraction


# ---------------------------------------------------------------------------------------
# Reductions.
# ---------------------------------------------------------------------------------------


def masked_mean(values: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """Mean of `values [batch]` over `valid [batch]` entries; 0.0 when none is valid."""
    valid = tf.cast(valid, tf.float32)
    return tf.reduce_sum(tf.cast(values, tf.float32) * valid) / tf.maximum(
        tf.reduce_sum(valid), 1.0)


def global_batch_mean(values: tf.Tensor, valid: tf.Tensor) -> tf.Tensor:
    """This replica's share of the mean of `values` over the valid images of the global batch.

    The denominator is the number of valid images summed over all replicas of the
    current `tf.distribute` replica context, so the sum of the replicas' results is the
    global-batch mean (what an optimizer that sums gradients across replicas needs).
    Without a strategy (or in cross-replica context) it is `masked_mean`.

    Args:
      values: float [batch] per-image losses (this replica's images).
      valid: bool [batch].

    Returns:
      float32 scalar.
    """
    valid = tf.cast(valid, tf.float32)
    local_sum = tf.reduce_sum(tf.cast(values, tf.float32) * valid)
    count = tf.reduce_sum(valid)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return local_sum / tf.maximum(count, 1.0)


# ---------------------------------------------------------------------------------------
# The total loss.
# ---------------------------------------------------------------------------------------


class InstanceLoss:
    """Total training loss `L = L_e + lambda(step) * L_cls` from model outputs and a batch.

    Args:
      config: a `LossConfig` (None = defaults).
      global_batch_reduction: False (default): the losses are means over this replica's
        images (average them over replicas, e.g. divide by `num_replicas_in_sync` before
        summing gradients). True: each is this replica's share of the global-batch mean
        (`global_batch_mean`; the replicas' values sum to the mean over all valid images).

    Call arguments:
      outputs: {"embeddings": float [B, h, w, d], "class_logits": float [B, h, w, T, C + 1]}.
      batch: {"instances": int [B, S, S], "instance_classes": int [B, M],
        "instance_valid": bool [B, M], ...} (extra keys ignored).
      step: int scalar, the optimizer step (drives lambda).
      seed: int32/int64 [2] or [B, 2] (one per image), seed of the point sampling.

    Returns:
      A dict of float32 scalars "total", "embedding", "classification", "cls_weight",
      and per-image vectors "embedding_per_image" float32 [B], "embedding_valid" bool [B],
      "classification_per_image" float32 [B], "classification_valid" bool [B].
    """

    def __init__(self, config: LossConfig | None = None, global_batch_reduction: bool = False):
        self.config = config if config is not None else LossConfig()
        if not isinstance(self.config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(self.config).__name__}")
        self.global_batch_reduction = bool(global_batch_reduction)

    def __call__(self, outputs: Mapping[str, tf.Tensor], batch: Mapping[str, tf.Tensor],
                 step: tf.Tensor | int, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        config = self.config
        _require_keys(outputs, ("embeddings", "class_logits"), "outputs")
        _require_keys(batch, ("instances", "instance_classes", "instance_valid"), "batch")
        embeddings = tf.cast(outputs["embeddings"], tf.float32)
        logits = tf.cast(outputs["class_logits"], tf.float32)
        _check_rank(embeddings, 4, 'outputs["embeddings"]')
        _check_rank(logits, 5, 'outputs["class_logits"]')
        num_taus = logits.shape[3]
        if num_taus is not None and num_taus != len(config.taus):
            raise ValueError(f'outputs["class_logits"] has {num_taus} thresholds, but '
                             f"LossConfig.taus has {len(config.taus)}: {config.taus}")
        size = (_static_dim(embeddings, 1, 'outputs["embeddings"]'),
                _static_dim(embeddings, 2, 'outputs["embeddings"]'))

        labels = labels_at_resolution(batch["instances"], size)
        points = sample_points(labels, batch["instance_valid"], config.points_per_instance,
                               seed, config.instance_size_weighting)
        indices, ids = points["point_indices"], points["point_instance_ids"]

        embedding_losses, embedding_valid = embedding_loss_per_image(
            gather_points(embeddings, indices), ids, points["point_weights"])
        cls_points = config.cls_points_per_instance or config.points_per_instance
        if cls_points < config.points_per_instance:
            # Each slot's points are a random sample in random order: its first ones are
            # a smaller random sample.
            indices, ids = (first_points_per_slot(x, config.points_per_instance, cls_points)
                            for x in (indices, ids))
        targets = classification_targets(
            embeddings, labels, batch["instance_classes"], batch["instance_valid"],
            indices, ids, config.taus, config.cls_iou_threshold)
        point_logits = gather_points(logits, indices)
        cls_losses, cls_valid = classification_loss_per_image(point_logits, targets, ids >= 0)

        reduce = global_batch_mean if self.global_batch_reduction else masked_mean
        embedding = reduce(embedding_losses, embedding_valid)
        classification = reduce(cls_losses, cls_valid)
        weight = cls_loss_weight(step, config)
        total = embedding + weight * classification
        extra = {}
        if config.cls_semantic_warmup:
            semantic_losses, _ = classification_loss_per_image(
                point_logits, semantic_targets(ids, batch["instance_classes"],
                                               len(config.taus)), ids >= 0)
            extra["semantic"] = reduce(semantic_losses, cls_valid)
            total += (config.cls_weight_max - weight) * extra["semantic"]
        return {
            "total": total,
            "embedding": embedding,
            "classification": classification,
            "cls_weight": weight,
            **extra,
            "embedding_per_image": embedding_losses,
            "embedding_valid": embedding_valid,
            "classification_per_image": cls_losses,
            "classification_valid": cls_valid,
        }


# ---------------------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------------------


def _squared_distances(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """[B, P, d] x [B, Q, d] -> [B, P, Q] squared distances, clamped at 0 (rounding)."""
    a_sq = tf.reduce_sum(tf.square(a), axis=-1)[:, :, None]
    b_sq = tf.reduce_sum(tf.square(b), axis=-1)[:, None, :]
    return tf.maximum(a_sq + b_sq - 2.0 * tf.linalg.matmul(a, b, transpose_b=True), 0.0)


def _cell_centres(in_size, out_size: int):
    """Indices floor((i + 0.5) * in / out) for i < out, computed exactly in integers."""
    if isinstance(in_size, int):
        return tf.constant((2 * np.arange(out_size) + 1) * in_size // (2 * out_size), tf.int32)
    return (2 * tf.range(out_size, dtype=tf.int32) + 1) * in_size // (2 * out_size)


def _flatten_spatial(x: tf.Tensor) -> tf.Tensor:
    """[B, h, w, ...] -> [B, h * w, ...], keeping static dimensions where known."""
    dims = [_dim(x, i) for i in range(x.shape.rank)]
    h, w = dims[1], dims[2]
    hw = h * w if isinstance(h, int) and isinstance(w, int) else -1
    return tf.reshape(x, [dims[0], hw] + dims[3:])


def _dim(x: tf.Tensor, axis: int):
    """Static size of `axis` if known, else a scalar tensor."""
    static = x.shape[axis]
    return static if static is not None else tf.shape(x)[axis]


def _static_dim(x: tf.Tensor, axis: int, name: str) -> int:
    static = x.shape[axis]
    if static is None:
        raise ValueError(f"{name} must have a static dimension {axis}, got shape {x.shape}")
    return int(static)


def _check_rank(x, rank: int, name: str) -> None:
    shape = x.shape if isinstance(x.shape, tf.TensorShape) else tf.TensorShape(np.shape(x))
    if shape.rank is not None and shape.rank != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {shape}")


def _check_integer(x: tf.Tensor, name: str) -> None:
    if not x.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype.name}")


def _check_seed(seed) -> tf.Tensor:
    seed = tf.convert_to_tensor(seed)
    if (not seed.dtype.is_integer or seed.shape.rank not in (1, 2)
            or seed.shape[-1] not in (2, None)):
        raise ValueError(f"seed must be an int32/int64 tensor of shape [2] or [batch, 2], got "
                         f"{seed.dtype.name} {seed.shape}")
    return seed if seed.dtype in (tf.int32, tf.int64) else tf.cast(seed, tf.int64)


def _validate_taus(taus, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in taus)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {taus!r}") from None
    if not values or any(not 0.0 < t < 1.0 for t in values) or len(set(values)) != len(values):
        raise ValueError(f"{name} must be distinct numbers in (0, 1), got {taus!r}")
    return values


def _require_keys(mapping: Mapping, keys: Sequence[str], name: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{name} lacks {missing}; it has {sorted(mapping)}")


def _require(ok: bool, field: str, value, why: str) -> None:
    if not ok:
        raise ValueError(f"LossConfig.{field}={value!r}: {why}")


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
