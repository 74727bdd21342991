"""Masks grown from seeds, their classes and scores, and near-duplicate suppression.

`grow_masks` is paper 3.3's `{q : sigma(seed, q) >= tau}` for all seeds at once (one
matrix product); `seed_classes_and_scores` is paper 3.4's class and score of a seed's
mask; `suppress_duplicates` (not in the paper) drops masks that nearly repeat a
higher-scored one. All work on batched tensors at the heads' resolution, with -1 marking
a missing seed.
"""

from __future__ import annotations

import math

import tensorflow as tf

from instance_embed.ops import checks
from instance_embed.ops import geometry
from instance_embed.ops.seeds import first_argmax
from instance_embed.ops.seeds import graph_ready


@graph_ready
def grow_masks(embeddings: tf.Tensor, seed_indices: tf.Tensor, taus: tf.Tensor) -> tf.Tensor:
    """Masks `{q : sigma(seed, q) >= tau}` of all seeds, from one matrix product (paper 3.3).

    `sigma >= tau` is `||e_q - e_seed||^2 <= log(2 / tau - 1)`, the distances expanded as
    `|q|^2 + |s|^2 - 2 q.s` on centred embeddings (`geometry.pixel_geometry`; the masks
    of the plain differences up to rounding at the threshold). A seed always belongs to
    its own mask (set explicitly: rounding in the expanded product would not guarantee
    it); a seed of -1 gives an empty mask.

    Args:
      embeddings: float [batch, height, width, dim].
      seed_indices: int [batch, K], flattened row-major indices or -1.
      taus: float [batch, K], each in (0, 1].

    Returns:
      bool [batch, K, height, width].
    """
    embeddings = checks.as_float(embeddings, "embeddings", rank=4)
    seed_indices = checks.as_int(seed_indices, "seed_indices", rank=2)
    taus = checks.as_float(taus, "taus", rank=2)
    return grow_masks_from_geometry(geometry.pixel_geometry(embeddings),
                                    tf.shape(embeddings)[1:3], seed_indices, taus)


def grow_masks_from_geometry(pixels: tuple[tf.Tensor, tf.Tensor], size: tf.Tensor,
                             seed_indices: tf.Tensor, taus: tf.Tensor) -> tf.Tensor:
    """`grow_masks` after its checks, from `geometry.pixel_geometry`'s (points, norms) and the
    heads' `size` (h, w)."""
    points, point_norms = pixels
    thresholds = geometry.distance_thresholds(taus)
    safe_seeds, seeds, seed_norms = geometry.seed_points(pixels, seed_indices)
    valid = seed_indices >= 0
    # `|q|^2 - 2 q.s <= log(2 / tau - 1) - |s|^2`: two [B, K, N] operations after the
    # product (-2 scales exactly), where signed margins would take six. An invalid
    # seed's limit is -inf: its mask is empty.
    cross = tf.matmul(-2.0 * seeds, points, transpose_b=True)  # [B, K, N]
    limit = tf.where(valid, thresholds - seed_norms, -math.inf)
    masks = cross + point_norms[:, None, :] <= limit[:, :, None]
    # The seed itself, whatever the rounding: one update per seed.
    shape = tf.shape(seed_indices)
    batch_index = tf.broadcast_to(tf.range(shape[0])[:, None], shape)
    seed_index = tf.broadcast_to(tf.range(shape[1])[None, :], shape)
    masks = tf.tensor_scatter_nd_update(
        masks, tf.stack([batch_index, seed_index, safe_seeds], axis=-1), valid)
    return tf.reshape(masks, [shape[0], shape[1], size[0], size[1]])


@graph_ready
def seed_classes_and_scores(class_probs: tf.Tensor, seed_indices: tf.Tensor
                            ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Per seed, `(tau, c) = argmax over taus and classes c >= 1 of C[p, tau, c]` (paper 3.4).

    Ties go to the lower tau index, then the lower class. A seed of -1 gets tau index 0,
    class 0 and score 0. The tau value is `taus[tau_index]`.

    Args:
      class_probs: float [batch, height, width, num_taus, num_classes + 1].
      seed_indices: int [batch, K], flattened row-major indices or -1.

    Returns:
      (tau_index int32 [batch, K], classes int32 [batch, K] in 1..num_classes,
       scores float32 [batch, K]).
    """
    class_probs = checks.as_float(class_probs, "class_probs", rank=5)
    seed_indices = checks.as_int(seed_indices, "seed_indices", rank=2)
    checks.check_has_foreground(class_probs)
    shape = tf.shape(class_probs)
    num_taus, num_foreground = shape[3], shape[4] - 1
    # Gathered before the background is sliced off: the slice then copies K pixels,
    # not all of them.
    flat = tf.reshape(class_probs, [shape[0], shape[1] * shape[2], num_taus, shape[4]])
    at_seeds = tf.gather(flat, tf.maximum(seed_indices, 0), batch_dims=1)  # [B, K, T, C+1]
    at_seeds = tf.reshape(at_seeds[..., 1:], [shape[0], tf.shape(seed_indices)[1],
                                              num_taus * num_foreground])  # [B, K, T*C]
    best = first_argmax(at_seeds, tf.ones_like(at_seeds, tf.bool))
    scores = tf.gather(at_seeds, best, batch_dims=2)
    valid = seed_indices >= 0
    tau_index = tf.where(valid, best // num_foreground, 0)
    classes = tf.where(valid, best % num_foreground + 1, 0)
    scores = tf.where(valid, scores, 0.0)
    return tau_index, classes, scores


def suppress_duplicates(masks: tf.Tensor, candidate: tf.Tensor,
                         iou_threshold: float) -> tf.Tensor:
    """Greedy mask suppression in the given (score-descending) order.

    Args:
      masks: bool [batch, K, h, w].
      candidate: bool [batch, K]; only candidates are kept, and only kept masks suppress.
      iou_threshold: a mask is dropped when its IoU with a kept earlier one exceeds it.

    Returns:
      (bool [batch, K], the kept detections; int32 [batch, K], the support of each kept
      detection: 1 plus the candidates it suppressed, a suppressed candidate counting
      for the first kept mask that overlaps it; 0 for the others).
    """
    shape = tf.shape(masks)
    num_seeds = masks.shape[1]
    flat = tf.cast(tf.reshape(masks, [shape[0], shape[1], shape[2] * shape[3]]), tf.float32)
    # Integer pixel counts are exact in float32 below 2^24 pixels.
    intersection = tf.matmul(flat, flat, transpose_b=True)  # [B, K, K]
    area = tf.linalg.diag_part(intersection)  # a mask's intersection with itself
    union = area[:, :, None] + area[:, None, :] - intersection
    iou = tf.where(union > 0, intersection / tf.maximum(union, 1.0), 0.0)
    overlapping = iou > iou_threshold
    slots = tf.range(num_seeds)
    # The greedy decisions keep_i = candidate_i and no kept j < i overlaps i, solved by
    # repeating them all at once until nothing changes: after t rounds the first t
    # decisions are final, so this ends within K + 1 rounds (the last one changing
    # nothing), at the only fixed point, the greedy's; suppression chains are short, so
    # it takes a few rounds instead of K steps. (`overlapping` is symmetric: its counts
    # are exact integers.)
    by_earlier = tf.logical_and(overlapping, slots[None, :] < slots[:, None])  # j < i

    def decide(keep, _):
        suppressed = tf.reduce_any(tf.logical_and(by_earlier, keep[:, None, :]), axis=-1)
        decided = tf.logical_and(candidate, tf.logical_not(suppressed))
        return decided, tf.reduce_any(tf.not_equal(decided, keep))

    keep, _ = tf.while_loop(lambda _, changed: changed, decide,
                            (candidate, tf.constant(True)),
                            maximum_iterations=num_seeds + 1)
    # owns[i, j]: kept i overlaps suppressed candidate j; j counts for its first owner.
    owns = tf.logical_and(
        tf.logical_and(overlapping, keep[:, :, None]),
        tf.logical_and(candidate, tf.logical_not(keep))[:, None, :])  # [B, K, K]
    owns = tf.cast(owns, tf.int32)
    first_owner = owns * tf.cast(tf.math.cumsum(owns, axis=1) == 1, tf.int32)
    support = tf.where(keep, 1 + tf.reduce_sum(first_owner, axis=2), 0)
    return keep, support


def descending_order(keys: tf.Tensor) -> tf.Tensor:
    """Permutation sorting `keys [batch, K]` descending, ties in index order.

    Ranks come from all K x K comparisons, which is exact and identical eagerly and
    under XLA (K is small), where sort stability is not a documented guarantee.
    """
    keys = tf.where(tf.math.is_nan(keys), -math.inf, keys)
    num = keys.shape[-1]
    slots = tf.range(num)
    mine, other = keys[:, :, None], keys[:, None, :]
    ahead = tf.logical_or(
        other > mine, tf.logical_and(other == mine, slots[None, None, :] < slots[None, :, None]))
    rank = tf.reduce_sum(tf.cast(ahead, tf.int32), axis=2)  # [B, K]: where item i goes
    placed = rank[:, None, :] == slots[None, :, None]  # [B, rank r, item i]
    return tf.reduce_sum(tf.where(placed, slots[None, None, :], 0), axis=2)


def mask_boxes(masks: tf.Tensor) -> tf.Tensor:
    """The tightest box around each mask, in pixel edges: float32 `[..., 4]` from bool
    `[..., H, W]`.

    A box is (ymin, xmin, ymax, xmax) with ymin the first row holding a mask pixel and
    ymax one past the last (likewise for columns), so a one-pixel mask at (y, x) has the
    box (y, x, y + 1, x + 1) and dividing by (H, W, H, W) gives the normalised boxes of
    the TF Object Detection API. An empty mask's box is all zeros.
    """
    return boxes_from_projections(tf.reduce_any(masks, axis=-1), tf.reduce_any(masks, axis=-2))


def first_covering(masks: tf.Tensor) -> tf.Tensor:
    """The instance map of drawn masks: bool or 0/1 `[B, K, H, W]`, in detection order ->
    int32 `[B, H, W]`, 1 + the index of the first mask covering each pixel, 0 where none.
    """
    num_masks = tf.shape(masks)[1]
    weights = (num_masks - tf.range(num_masks))[None, :, None, None]  # the first weighs most
    best = tf.reduce_max(tf.where(tf.cast(masks, tf.bool), weights, 0), axis=1)
    return tf.where(best > 0, num_masks + 1 - best, 0)


def boxes_from_projections(rows: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """`mask_boxes` from the masks' non-empty rows, bool `[..., H]`, and columns,
    bool `[..., W]`."""
    def first_and_end(present: tf.Tensor):  # bool [..., n] -> int32 [...] twice
        size = tf.shape(present)[-1]
        first = tf.argmax(tf.cast(present, tf.int32), axis=-1, output_type=tf.int32)
        last = size - 1 - tf.argmax(tf.cast(tf.reverse(present, [-1]), tf.int32), axis=-1,
                                    output_type=tf.int32)
        return first, last + 1

    ymin, ymax = first_and_end(rows)
    xmin, xmax = first_and_end(columns)
    boxes = tf.cast(tf.stack([ymin, xmin, ymax, xmax], axis=-1), tf.float32)
    return tf.where(tf.reduce_any(rows, axis=-1)[..., tf.newaxis], boxes, 0.0)
