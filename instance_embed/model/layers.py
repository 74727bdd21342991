"""Small Keras layers shared by the backbones and the model builder.

Spatial sizes are computed with Python integers whenever the input's static shape is
known, so a model traced with a static input shape (TPU, XLA, export signatures) has
fully static intermediate and output shapes; unknown sizes fall back to `tf.shape`.
All resizing is plain bilinear with half-pixel centres (`tf.image.resize`), which XLA
compiles; the anti-aliased variant does not.
"""

from typing import Sequence, Tuple, Union

import keras
import tensorflow as tf

# ImageNet channel means in BGR order, as subtracted by Keras' "caffe" preprocessing
# (`keras.applications.imagenet_utils.preprocess_input(mode="caffe")`).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

_Length = Union[int, tf.Tensor]


def _spatial_size(x: tf.Tensor) -> Tuple[_Length, _Length]:
    """(height, width) of `[batch, height, width, channels]`, static where known."""
    dynamic = tf.shape(x)
    return tuple(
        x.shape[axis] if x.shape[axis] is not None else dynamic[axis] for axis in (1, 2)
    )


def _ceil_div(length: _Length, divisor: int) -> _Length:
    if isinstance(length, int):
        return -(-length // divisor)
    return (length + divisor - 1) // divisor


def scaled_length(length: _Length, scale: float, multiple: int) -> _Length:
    """`length * scale` rounded half up to a multiple of `multiple` (at least one).

    Works on Python ints (static shapes) and on int32 tensors alike.
    """
    if isinstance(length, int):
        return max(multiple, int(length * scale / multiple + 0.5) * multiple)
    units = tf.cast(tf.floor(tf.cast(length, tf.float32) * scale / multiple + 0.5), tf.int32)
    return tf.maximum(units, 1) * multiple


def _resize_bilinear(x: tf.Tensor, size: Sequence[_Length]) -> tf.Tensor:
    if all(isinstance(s, int) for s in size) and tuple(x.shape[1:3]) == tuple(size):
        return x
    if not all(isinstance(s, int) for s in size):
        size = tf.stack(size)
    resized = tf.image.resize(x, size, method="bilinear")
    # tf.image.resize returns float32 for bilinear; keep the layer's compute dtype.
    return tf.cast(resized, x.dtype)


@keras.saving.register_keras_serializable(package="instance_embed")
class CaffePreprocessing(keras.layers.Layer):
    """RGB in [0, 255] to BGR minus the ImageNet mean (Keras' "caffe" preprocessing).

    The ResNet and VGG weights that `keras.applications` distributes expect this input.
    Inputs and outputs are `[batch, height, width, 3]`.
    """

    def call(self, images):
        bgr = tf.reverse(images, axis=[-1])
        return bgr - tf.constant(CAFFE_BGR_MEAN, dtype=bgr.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="instance_embed")
class MeanStdNormalization(keras.layers.Layer):
    """RGB in [0, 255] to `(x / 255 - mean) / std` per channel (torchvision's input).

    Inputs and outputs are `[batch, height, width, 3]`.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], **kwargs):
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def call(self, images):
        mean = tf.constant(self.mean, dtype=images.dtype)
        std = tf.constant(self.std, dtype=images.dtype)
        return (images / 255.0 - mean) / std

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="instance_embed")
class ResizeToReference(keras.layers.Layer):
    """Bilinearly resizes a feature map to `ceil(reference size / divisor)`.

    Inputs `[features, reference]`: features `[batch, h, w, c]`, reference
    `[batch, H, W, *]`. Output `[batch, ceil(H / divisor), ceil(W / divisor), c]`.
    With `divisor=1` the features take the reference's size (decoder skip connections);
    with `divisor=output_stride` and the input image as reference they take the size of
    the scale-1.0 feature map (image pyramid).
    """

    def __init__(self, divisor: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(divisor) < 1:
            raise ValueError(f"divisor must be a positive integer, got {divisor!r}.")
        self.divisor = int(divisor)

    def call(self, inputs):
        features, reference = inputs
        size = tuple(_ceil_div(s, self.divisor) for s in _spatial_size(reference))
        return _resize_bilinear(features, size)

    def compute_output_shape(self, input_shapes):
        features_shape, reference_shape = input_shapes
        size = [
            None if s is None else -(-s // self.divisor) for s in reference_shape[1:3]
        ]
        return (features_shape[0], *size, features_shape[3])

    def get_config(self):
        return {**super().get_config(), "divisor": self.divisor}


@keras.saving.register_keras_serializable(package="instance_embed")
class ScaleImage(keras.layers.Layer):
    """Bilinearly rescales images by `scale`, to a size that is a multiple of `multiple`.

    Rounding each side to a multiple of the backbone's output stride makes every
    feature cell of the scaled image cover a whole number of input pixels, so the
    resized feature maps of all pyramid levels stay aligned with each other.
    Inputs `[batch, H, W, c]`; output `[batch, H', W', c]` with
    `H' = max(multiple, multiple * round(H * scale / multiple))`.
    """

    def __init__(self, scale: float, multiple: int = 1, **kwargs):
        super().__init__(**kwargs)
        if not float(scale) > 0:
            raise ValueError(f"scale must be positive, got {scale!r}.")
        if int(multiple) < 1:
            raise ValueError(f"multiple must be a positive integer, got {multiple!r}.")
        self.scale = float(scale)
        self.multiple = int(multiple)

    def call(self, images):
        size = tuple(scaled_length(s, self.scale, self.multiple) for s in _spatial_size(images))
        return _resize_bilinear(images, size)

    def compute_output_shape(self, input_shape):
        size = [
            None if s is None else scaled_length(s, self.scale, self.multiple)
            for s in input_shape[1:3]
        ]
        return (input_shape[0], *size, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "multiple": self.multiple}


def coordinate_grid(height: _Length, width: _Length, dtype=tf.float32) -> tf.Tensor:
    """Pixel-centre coordinates `[height, width, 2]` (x, then y), each in (-1, 1).

    Cell j of n has coordinate (2j + 1) / n - 1: symmetric about the image centre.
    """
    xs = (2.0 * tf.range(width, dtype=tf.float32) + 1.0) / tf.cast(width, tf.float32) - 1.0
    ys = (2.0 * tf.range(height, dtype=tf.float32) + 1.0) / tf.cast(height, tf.float32) - 1.0
    grid_y, grid_x = tf.meshgrid(ys, xs, indexing="ij")
    return tf.cast(tf.stack([grid_x, grid_y], axis=-1), dtype)


@keras.saving.register_keras_serializable(package="instance_embed")
class AppendCoordinates(keras.layers.Layer):
    """Concatenates two coordinate channels (CoordConv): `[b, h, w, c] -> [b, h, w, c + 2]`.

    See `BackboneSpec.coord_channels` for why the heads need them.
    """

    def call(self, features):
        height, width = _spatial_size(features)
        grid = coordinate_grid(height, width, features.dtype)
        batch = tf.shape(features)[0]
        grid = tf.broadcast_to(grid[tf.newaxis], tf.stack([batch, height, width, 2]))
        return tf.concat([features, grid], axis=-1)

    def compute_output_shape(self, input_shape):
        channels = None if input_shape[-1] is None else input_shape[-1] + 2
        return (*input_shape[:-1], channels)


@keras.saving.register_keras_serializable(package="instance_embed")
class SplitChannels(keras.layers.Layer):
    """Splits the channel axis into two: `[b, h, w, g * n] -> [b, h, w, g, n]`."""

    def __init__(self, groups: int, group_size: int, **kwargs):
        super().__init__(**kwargs)
        self.groups = int(groups)
        self.group_size = int(group_size)

    def call(self, x):
        height, width = _spatial_size(x)
        batch = x.shape[0] if x.shape[0] is not None else tf.shape(x)[0]
        shape = [batch, height, width, self.groups, self.group_size]
        if not all(isinstance(s, int) for s in shape):
            shape = tf.stack(shape)
        return tf.reshape(x, shape)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:3], self.groups, self.group_size)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "group_size": self.group_size}
