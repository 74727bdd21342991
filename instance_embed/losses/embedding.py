"""The embedding loss of paper eq. (1)-(2): pull an instance's pixels together, push
other instances' away.

`sigma(p, q) = 2 / (1 + exp(d2))` with `d2 = ||e_p - e_q||^2`; the loss uses
`log sigma = log 2 - softplus(d2)` and `1 - sigma = tanh(d2 / 2)`, which stay finite
where the embeddings coincide or are far apart.
"""

from __future__ import annotations

import math

import tensorflow as tf

from instance_embed.ops import checks
from instance_embed.ops import geometry


# Lower bound on `1 - sigma = tanh(d2 / 2)` before its log: the loss of a pair of
# different instances whose embeddings coincide is then -log(1e-6) ~ 13.8 instead of inf.
_MIN_DISSIMILARITY = 1e-6


_LOG_2 = math.log(2.0)


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
    checks.check_rank(embeddings, "point_embeddings", 3)
    checks.check_rank(ids, "point_instance_ids", 2)
    checks.check_integer(ids, "point_instance_ids")
    ids = tf.cast(ids, tf.int32)
    valid = ids >= 0
    weights = tf.cast(valid, tf.float32)
    if point_weights is not None:
        point_weights = tf.cast(point_weights, tf.float32)
        checks.check_rank(point_weights, "point_weights", 2)
        weights = weights * point_weights

    # Padding rows are zeroed so whatever they hold never reaches a gradient.
    embeddings = tf.where(valid[:, :, None], embeddings, 0.0)
    count = tf.reduce_sum(tf.cast(valid, tf.float32), axis=1)[:, None, None]
    centre = tf.reduce_sum(embeddings, axis=1, keepdims=True) / tf.maximum(count, 1.0)
    embeddings = tf.where(valid[:, :, None], embeddings - tf.stop_gradient(centre), 0.0)
    d2 = geometry.squared_distances(embeddings, embeddings)                      # [B, P, P]

    num_points = geometry.dim(ids, 1)
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
