"""Dilated ResNet-50/101 v1 backbones (DeepLab-v2 arrangement).

The layers follow `keras.applications.ResNet50/ResNet101` one for one and carry the
same names ("conv1_conv", "conv2_block1_1_conv", ..., "conv5_block3_out"), so Keras'
ImageNet weights load by layer name. To reach output stride 8 or 16, the last stages
keep their resolution and dilate their 3x3 convolutions instead (atrous convolution):

| output stride | conv4 (stride, dilation) | conv5 (stride, dilation) |
| --- | --- | --- |
| 32 | 2, 1 | 2, 1 (= the classification network) |
| 16 | 2, 1 | 1, 2 |
| 8  | 1, 2 | 1, 4 (DeepLab-v2, paper 3.5) |

Keras' v1 block strides its first 1x1 convolution and its 1x1 shortcut; removing the
stride there and dilating every 3x3 convolution of the stage changes no kernel shape.
"""

from typing import Sequence

import keras

from instance_embed.model import backbones
from instance_embed.model import layers as model_layers
from instance_embed.model import weights as weights_lib

# Blocks per stage conv2..conv5, as in keras.applications.
_STAGE_BLOCKS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
}
_KERAS_APPLICATION = {"resnet50": "ResNet50", "resnet101": "ResNet101"}
# Keras' ResNet v1 BatchNorm epsilon; the ImageNet statistics were fitted with it.
_BN_EPSILON = 1.001e-5


def stage_strides_and_dilations(output_stride: int):
    """(stride, dilation) of stages conv2..conv5 for a given output stride.

    Raises:
      ValueError: for an output stride other than 8, 16 or 32.
    """
    table = {
        32: ((1, 1), (2, 1), (2, 1), (2, 1)),
        16: ((1, 1), (2, 1), (2, 1), (1, 2)),
        8: ((1, 1), (2, 1), (1, 2), (1, 4)),
    }
    if output_stride not in table:
        raise ValueError(f"output_stride must be 8, 16 or 32 for ResNet, got {output_stride}.")
    return table[output_stride]


def _bottleneck(
    x, filters: int, stride: int, dilation: int, conv_shortcut: bool, momentum: float, name: str
):
    """ResNet v1 bottleneck `[b, h, w, c] -> [b, h / stride, w / stride, 4 * filters]`."""

    def batchnorm(suffix):
        return keras.layers.BatchNormalization(
            momentum=momentum, epsilon=_BN_EPSILON, name=f"{name}_{suffix}"
        )

    if conv_shortcut:
        shortcut = keras.layers.Conv2D(4 * filters, 1, strides=stride, name=f"{name}_0_conv")(x)
        shortcut = batchnorm("0_bn")(shortcut)
    else:
        shortcut = x
    x = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_1_conv")(x)
    x = batchnorm("1_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(x)
    x = keras.layers.Conv2D(
        filters, 3, padding="same", dilation_rate=dilation, name=f"{name}_2_conv"
    )(x)
    x = batchnorm("2_bn")(x)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(x)
    x = keras.layers.Conv2D(4 * filters, 1, name=f"{name}_3_conv")(x)
    x = batchnorm("3_bn")(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def dilated_resnet(
    stage_blocks: Sequence[int],
    output_stride: int = 8,
    batchnorm_momentum: float = 0.99,
    name: str = "backbone",
) -> keras.Model:
    """A ResNet v1 feature extractor with atrous convolutions in its last stages.

    Args:
      stage_blocks: Number of bottleneck blocks in conv2..conv5, e.g. (3, 4, 6, 3).
      output_stride: 8, 16 or 32.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics (they only move
        when the BatchNorm layers are trained).
      name: Name of the returned model.

    Returns:
      A functional model: RGB images `[batch, H, W, 3]` in [0, 255] ->
      features `[batch, ceil(H / output_stride), ceil(W / output_stride), 2048]`.
    """
    image = keras.Input(shape=(None, None, 3), name="image")
    # Caffe-style normalisation in float32, whatever the policy: it is cheap and the
    # first convolution casts its input anyway.
    x = model_layers.CaffePreprocessing(name="caffe_preprocessing", dtype="float32")(image)
    x = keras.layers.ZeroPadding2D(padding=((3, 3), (3, 3)), name="conv1_pad")(x)
    x = keras.layers.Conv2D(64, 7, strides=2, name="conv1_conv")(x)
    x = keras.layers.BatchNormalization(
        momentum=batchnorm_momentum, epsilon=_BN_EPSILON, name="conv1_bn"
    )(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.ZeroPadding2D(padding=((1, 1), (1, 1)), name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)

    schedule = stage_strides_and_dilations(output_stride)
    for stage, (blocks, filters, (stride, dilation)) in enumerate(
        zip(stage_blocks, (64, 128, 256, 512), schedule), start=2
    ):
        for block in range(1, blocks + 1):
            x = _bottleneck(
                x,
                filters,
                stride=stride if block == 1 else 1,
                dilation=dilation,
                conv_shortcut=block == 1,
                momentum=batchnorm_momentum,
                name=f"conv{stage}_block{block}",
            )
    return keras.Model(image, x, name=name)


def _keras_reference(variant: str, weights) -> keras.Model:
    """The `keras.applications` classification network without its top."""
    application = getattr(keras.applications, _KERAS_APPLICATION[variant])
    return application(include_top=False, weights=weights, input_shape=(None, None, 3))


def load_resnet_weights(backbone: keras.Model, variant: str, backbone_weights: str) -> list:
    """Loads ImageNet ("imagenet") or file weights into a dilated ResNet by layer name.

    Returns:
      Sorted names of the layers that received weights.
    """
    required = [layer.name for layer in backbone.layers if layer.weights]
    if backbone_weights == "imagenet":
        # Downloads Keras' notop ImageNet file (needs internet, cached afterwards).
        weights = weights_lib.weights_of_model(_keras_reference(variant, "imagenet"))
        return weights_lib.assign_weights_by_name(
            backbone, weights, required, source=f"'imagenet' ({variant})"
        )
    return weights_lib.resolve_weights(
        backbone,
        backbone_weights,
        required,
        reference_factory=lambda path: _keras_reference(variant, path),
    )


def _build(variant: str, config) -> keras.Model:
    return dilated_resnet(
        _STAGE_BLOCKS[variant], config.output_stride, config.batchnorm_momentum
    )


@backbones.register_backbone(
    "resnet50", output_strides=(8, 16, 32),
    load_weights=lambda backbone, weights: load_resnet_weights(backbone, "resnet50", weights))
def build_resnet50(config) -> keras.Model:
    """Dilated ResNet-50 backbone, 2048 channels, see `dilated_resnet`."""
    return _build("resnet50", config)


@backbones.register_backbone(
    "resnet101", output_strides=(8, 16, 32),
    load_weights=lambda backbone, weights: load_resnet_weights(backbone, "resnet101", weights))
def build_resnet101(config) -> keras.Model:
    """Dilated ResNet-101 backbone, 2048 channels, see `dilated_resnet`."""
    return _build("resnet101", config)
