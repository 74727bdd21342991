"""Argument checks shared by the tensor ops, the inference and the losses.

Each raises `TypeError` or `ValueError` with a message that names the argument, and
checks only what is known statically (ranks, dtypes, static dimensions), so it costs
nothing inside a traced function.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf


def as_float(x, name: str, rank: int) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if not (x.dtype.is_floating):
        raise TypeError(f"{name} must be a float tensor, got {x.dtype.name}")
    check_rank(x, name, rank)
    return tf.cast(x, tf.float32)


def as_int(x, name: str, rank: int) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype.name}")
    check_rank(x, name, rank)
    return tf.cast(x, tf.int32)


def check_rank(x, name: str, rank: int) -> None:
    """`x` (a tensor or an array) has rank `rank`, where its rank is known."""
    shape = x.shape if isinstance(x.shape, tf.TensorShape) else tf.TensorShape(np.shape(x))
    if shape.rank is not None and shape.rank != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {shape}")


def check_has_foreground(class_probs: tf.Tensor) -> None:
    if class_probs.shape[-1] is not None and class_probs.shape[-1] < 2:
        raise ValueError(
            f"class_probs/class_logits needs num_classes + 1 >= 2 entries on its last axis "
            f"(background + at least one class), got shape {class_probs.shape}")


def check_same_spatial(a: tf.Tensor, a_name: str, b: tf.Tensor, b_name: str) -> None:
    for axis in range(3):
        da, db = a.shape[axis], b.shape[axis]
        if da is not None and db is not None and da != db:
            raise ValueError(f"{a_name} {a.shape} and {b_name} {b.shape} disagree on the "
                             "batch and heads-resolution dimensions")


def check_valid_pixels(valid_pixels, seediness: tf.Tensor):
    """None, or `valid_pixels` as a bool tensor on seediness's [B, h, w] grid."""
    if valid_pixels is None:
        return None
    valid_pixels = tf.convert_to_tensor(valid_pixels)
    if valid_pixels.dtype != tf.bool:
        raise TypeError(f"valid_pixels must be a bool tensor, got {valid_pixels.dtype.name}")
    check_rank(valid_pixels, "valid_pixels", 3)
    check_same_spatial(seediness, "seediness", valid_pixels, "valid_pixels")
    return valid_pixels


def check_num_seeds(num_seeds) -> int:
    if (isinstance(num_seeds, bool) or not isinstance(num_seeds, numbers.Integral)
            or num_seeds < 1):
        raise ValueError(f"num_seeds={num_seeds!r}: must be a positive Python integer")
    return int(num_seeds)


def check_image_size(image_size, name: str = "image_size") -> tf.Tensor:
    """int32 `[2]` from (height, width) as ints, a TensorShape or an int tensor."""
    if isinstance(image_size, tf.TensorShape):
        image_size = tuple(image_size.as_list())
    if isinstance(image_size, (tf.Tensor, tf.Variable)):
        if image_size.shape.rank is not None and image_size.shape != (2,):
            raise ValueError(f"{name} must hold (height, width), got shape {image_size.shape}")
        return tf.cast(image_size, tf.int32)
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or not all(isinstance(s, numbers.Integral) and s > 0 for s in image_size)):
        raise ValueError(f"{name}={image_size!r}: must be (height, width), two positive ints")
    return tf.constant([int(s) for s in image_size], tf.int32)


def is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_taus(taus, name: str = "taus") -> tuple[float, ...]:
    """`taus` as a tuple of floats: non-empty, distinct, each in (0, 1)."""
    try:
        values = tuple(float(t) for t in taus)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers, got {taus!r}") from None
    if (isinstance(taus, (str, bytes)) or not values or any(not 0.0 < t < 1.0 for t in values)
            or len(set(values)) != len(values)):
        raise ValueError(f"{name} must be distinct numbers in (0, 1), got {taus!r}")
    return values


def check_integer(x: tf.Tensor, name: str) -> None:
    if not x.dtype.is_integer:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype.name}")


def static_dim(x: tf.Tensor, axis: int, name: str) -> int:
    """The static size of `axis` of `x`; ValueError naming `x` if it is unknown."""
    static = x.shape[axis]
    if static is None:
        raise ValueError(f"{name} must have a static dimension {axis}, got shape {x.shape}")
    return int(static)


def require_keys(mapping: Mapping, keys: Sequence[str], name: str) -> None:
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"{name} lacks {missing}; it has {sorted(mapping)}")


def is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))
