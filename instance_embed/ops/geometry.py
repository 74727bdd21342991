"""Embedding geometry shared by the losses and the inference (paper 3.3).

The similarity of two pixels is `sigma(p, q) = 2 / (1 + exp(d2))` with `d2 = ||e_p -
e_q||^2`, so `sigma >= tau` is `d2 <= log(2 / tau - 1)` (`distance_thresholds`).
Distances of many pixels to many others are `|a|^2 + |b|^2 - 2 a.b`, one matrix
product, on embeddings centred on their image's mean (`centred_points`): distances do
not change, and centring shrinks the norms in that expansion, and with them its
rounding error.
"""

from __future__ import annotations

import math

import tensorflow as tf

from instance_embed.ops import checks


def dim(x: tf.Tensor, axis: int):
    """Static size of `axis` if known, else a scalar tensor."""
    static = x.shape[axis]
    return static if static is not None else tf.shape(x)[axis]


def flatten_spatial(x: tf.Tensor) -> tf.Tensor:
    """[B, h, w, ...] -> [B, h * w, ...], keeping static dimensions where known."""
    dims = [dim(x, i) for i in range(x.shape.rank)]
    h, w = dims[1], dims[2]
    hw = h * w if isinstance(h, int) and isinstance(w, int) else -1
    return tf.reshape(x, [dims[0], hw] + dims[3:])


def centred_points(embeddings: tf.Tensor) -> tf.Tensor:
    """`embeddings [B, h, w, d]` -> `[B, h * w, d]` minus each image's mean embedding."""
    points = flatten_spatial(embeddings)
    return points - tf.reduce_mean(points, axis=1, keepdims=True)


def pixel_geometry(embeddings: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The centred points `[B, N, d]` and their squared norms `[B, N]`, computed once
    for both seed selection and mask growing."""
    points = centred_points(embeddings)
    return points, tf.reduce_sum(tf.square(points), axis=-1)


def seed_points(pixels: tuple[tf.Tensor, tf.Tensor], seed_indices: tf.Tensor):
    """The seeds' indices with -1 read as pixel 0 [B, K], their centred points
    [B, K, d] and squared norms [B, K], from `pixel_geometry`'s (points, norms)."""
    points, norms = pixels
    safe_seeds = tf.maximum(seed_indices, 0)
    return (safe_seeds, tf.gather(points, safe_seeds, batch_dims=1),
            tf.gather(norms, safe_seeds, batch_dims=1))


def distance_thresholds(taus) -> tf.Tensor:
    """`log(2 / tau - 1)`: `sigma >= tau` iff `d2 <=` this. Float32, `taus`' shape.

    `taus` is a tensor (computed in float32) or a sequence of Python numbers (computed in
    float64, then rounded once).
    """
    if isinstance(taus, (tf.Tensor, tf.Variable)):
        return tf.math.log(2.0 / tf.cast(taus, tf.float32) - 1.0)
    return tf.constant([math.log(2.0 / float(t) - 1.0) for t in taus], tf.float32)


def squared_distances(a: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """[B, P, d] x [B, Q, d] -> [B, P, Q] squared distances, clamped at 0 (rounding)."""
    a_sq = tf.reduce_sum(tf.square(a), axis=-1)[:, :, None]
    b_sq = tf.reduce_sum(tf.square(b), axis=-1)[:, None, :]
    return tf.maximum(a_sq + b_sq - 2.0 * tf.linalg.matmul(a, b, transpose_b=True), 0.0)


def seed_squared_distances(embeddings: tf.Tensor, point_indices: tf.Tensor) -> tf.Tensor:
    """Squared embedding distance from each seed point to every pixel of its image.

    Args:
      embeddings: float [batch, h, w, d].
      point_indices: int [batch, P], flat seed indices into `h * w`.

    Returns:
      float32 [batch, P, h * w] (batch 8, P = 330 at 128 x 128: 173 MB).
    """
    embeddings = tf.cast(embeddings, tf.float32)
    point_indices = tf.convert_to_tensor(point_indices)
    checks.check_rank(embeddings, "embeddings", 4)
    checks.check_rank(point_indices, "point_indices", 2)
    checks.check_integer(point_indices, "point_indices")
    pixels = centred_points(embeddings)                                   # [B, n, d]
    seeds = tf.gather(pixels, point_indices, batch_dims=1)
    return squared_distances(seeds, pixels)
