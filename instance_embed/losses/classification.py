"""The classification loss of paper 3.4: which pixels make good seeds, and of what class.

For each sampled seed and each tau, the mask grown from it (`{q : sigma(seed, q) >=
tau}`) is matched to the ground truth; its target is the class of the instance it
matches at IoU > `cls_iou_threshold`, else background (`classification_targets`). The
loss is the softmax cross-entropy of the seeds' class logits against those targets,
weighted by lambda(step) (`cls_loss_weight`), which ramps up once the embedding has
settled.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from instance_embed.losses.config import LossConfig
from instance_embed.ops import checks
from instance_embed.ops import geometry


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
    checks.check_rank(embeddings, "embeddings", 4)
    checks.check_rank(point_indices, "point_indices", 2)
    checks.check_integer(point_indices, "point_indices")
    checks.check_rank(labels, "labels", 3)
    checks.check_integer(labels, "labels")
    checks.check_rank(instance_classes, "instance_classes", 2)
    checks.check_rank(instance_valid, "instance_valid", 2)
    checks.check_rank(point_ids, "point_instance_ids", 2)
    if not embeddings.shape[1:3].is_compatible_with(labels.shape[1:3]):
        raise ValueError(f"labels {labels.shape} and embeddings {embeddings.shape} must have "
                         "the same spatial size (use labels_at_resolution)")
    if not checks.is_number(iou_threshold) or not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold!r}")
    taus = checks.check_taus(taus)
    thresholds = geometry.distance_thresholds(taus)
    num_instances = checks.static_dim(instance_valid, 1, "instance_valid")
    if num_instances == 0:
        return tf.zeros([geometry.dim(point_ids, 0), geometry.dim(point_ids, 1), len(taus)], tf.int32)

    flat = geometry.flatten_spatial(tf.cast(labels, tf.int32))                    # [B, n]
    ids = tf.range(1, num_instances + 1, dtype=tf.int32)
    gt = tf.logical_and(tf.equal(flat[:, :, None], ids[None, None, :]),
                        tf.cast(instance_valid, tf.bool)[:, None, :])    # [B, n, M]
    gt_sizes = tf.reduce_sum(tf.cast(gt, tf.float32), axis=1)            # [B, M]
    # One product per tau gives both the intersections (columns 0..M-1, ignore pixels
    # belong to no instance) and the mask size without ignore pixels (column M).
    columns = tf.cast(tf.concat([gt, (flat >= 0)[:, :, None]], axis=-1), tf.float32)

    d2 = geometry.seed_squared_distances(embeddings, point_indices)               # [B, P, n]
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
    checks.check_rank(logits, "point_logits", 4)
    checks.check_rank(targets, "targets", 3)
    checks.check_rank(point_valid, "point_valid", 2)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(targets, tf.int32), logits=logits)                # [B, P, T]
    cross_entropy = tf.where(point_valid[:, :, None], cross_entropy, 0.0)
    num_taus = tf.cast(geometry.dim(logits, 2), tf.float32)
    terms = tf.reduce_sum(tf.cast(point_valid, tf.float32), axis=1) * num_taus
    valid = terms > 0.0
    losses = tf.reduce_sum(cross_entropy, axis=[1, 2]) / tf.maximum(terms, 1.0)
    return losses, valid


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
