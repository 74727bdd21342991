"""Convolution blocks shared by backbones: conv + BatchNorm (+ ReLU), and the decoder merge.

Both take and return Keras tensors `[batch, height, width, channels]` and name their
layers after `name`, so backbones built from them have stable layer names.
"""

import keras

from instance_embed.model import layers as model_layers


def conv_bn(x, filters: int, kernel_size: int, name: str, momentum: float, strides: int = 1,
            dilation: int = 1, relu: bool = True, zero_gamma: bool = False,
            dtype: str | None = None):
    """`name`_conv (no bias, He-normal) -> `name`_bn -> `name`_relu.

    `zero_gamma` starts the BatchNorm scale at 0, so a residual branch ending here starts
    as the identity. `dtype="float32"` computes the block in float32 whatever the
    model's mixed-precision policy (None: the policy's).
    """
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
        dtype=dtype,
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=momentum, gamma_initializer="zeros" if zero_gamma else "ones", name=f"{name}_bn",
        dtype=dtype)(x)
    if relu:
        x = keras.layers.ReLU(name=f"{name}_relu", dtype=dtype)(x)
    return x


def decoder_merge(coarse, skip, filters: int, name: str, momentum: float):
    """FPN-style merge: upsample `coarse` to `skip`'s size, concat, 1x1 then 3x3 conv.

    `[b, h, w, c]` and `[b, H, W, c']` -> `[b, H, W, filters]`.

    The 1x1 reduction runs in float32 under a mixed policy: it reads backbone features
    that need not be normalised (MobileNetV2's linear bottlenecks), and in bfloat16
    training its output drifted to a mean some 100 times its spread, which bfloat16's
    8-bit mantissa cannot resolve: the BatchNorm after it normalised rounding noise and
    kept a moving mean a spread off (docs/results.md, "make demo").
    """
    up = model_layers.ResizeToReference(name=f"{name}_upsample")([coarse, skip])
    x = keras.layers.Concatenate(name=f"{name}_concat")([up, skip])
    x = conv_bn(x, filters, 1, f"{name}_reduce", momentum, dtype="float32")
    return conv_bn(x, filters, 3, f"{name}_fuse", momentum)
