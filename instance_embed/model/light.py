"""A small residual backbone that trains from scratch on a CPU.

Design goals: learn in minutes on 2 CPU cores, yet see whole objects (an instance may
span the image, and the embedding of every pixel must agree with the rest of its
object). The network is a small ResNet encoder down to stride 16 whose last stage uses
dilated convolutions (receptive field about 500 pixels) plus an image-level context
vector, followed by a light FPN-style decoder back to stride 8 (or 4):

| stage | stride | layers | channels |
| --- | --- | --- | --- |
| stem | 2 | 3x3 conv | 24 |
| stage1 | 4 | residual block | 48 |
| stage2 | 8 | 2 residual blocks | 96 |
| stage3 | 16 | 3 residual blocks, dilations 1, 2, 4, + global context | 128 |
| decoder | 8 (4) | upsample, concat skip, 1x1 + 3x3 conv | 128 (64) |

About 1.4M parameters and 0.72 GMAC (multiply-adds) per 256x256 image at output
stride 8 (0.92 GMAC at stride 4; the heads then cost more than the backbone, so
consider `head_channels=64`). Residual
blocks end in a BatchNorm whose scale starts at zero, so each block starts as the
identity, which makes training from scratch fast and stable.
"""

import keras

from instance_embed.model import backbones
from instance_embed.model import blocks
from instance_embed.model import weights as weights_lib

_STEM = 24
_STAGE_CHANNELS = (48, 96, 128)
_CONTEXT_DILATIONS = (1, 2, 4)
_DECODER_CHANNELS = {8: 128, 4: 64}


def _residual_block(x, filters, name, momentum, strides=1, dilation=1):
    """Basic residual block `[b, h, w, c] -> [b, h / strides, w / strides, filters]`."""
    if strides != 1 or x.shape[-1] != filters:
        shortcut = blocks.conv_bn(
            x, filters, 1, f"{name}_shortcut", momentum, strides=strides, relu=False
        )
    else:
        shortcut = x
    y = blocks.conv_bn(x, filters, 3, f"{name}_a", momentum, strides=strides, dilation=dilation)
    y = blocks.conv_bn(
        y, filters, 3, f"{name}_b", momentum, dilation=dilation, relu=False, zero_gamma=True
    )
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def _global_context(x, name):
    """Adds an image-level vector (global average pool -> 1x1 conv) to every position."""
    context = keras.layers.GlobalAveragePooling2D(keepdims=True, name=f"{name}_pool")(x)
    context = keras.layers.Conv2D(
        x.shape[-1], 1, kernel_initializer="he_normal", name=f"{name}_conv"
    )(context)
    context = keras.layers.ReLU(name=f"{name}_relu")(context)
    return keras.layers.Add(name=f"{name}_add")([x, context])


def light_backbone(
    output_stride: int = 8, batchnorm_momentum: float = 0.9, name: str = "backbone"
) -> keras.Model:
    """Builds the light backbone.

    Args:
      output_stride: 8 or 4.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics.
      name: Name of the returned model.

    Returns:
      A functional model: RGB images `[batch, H, W, 3]` in [0, 255] -> features
      `[batch, ceil(H / s), ceil(W / s), 128]` for s = 8, or 64 channels for s = 4.

    Raises:
      ValueError: for another output stride.
    """
    if output_stride not in _DECODER_CHANNELS:
        raise ValueError(
            f"output_stride must be 4 or 8 for the light backbone, got {output_stride}."
        )
    image = keras.Input(shape=(None, None, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="rescale", dtype="float32")(image)
    m = batchnorm_momentum
    x = blocks.conv_bn(x, _STEM, 3, "stem", m, strides=2)
    stage1 = _residual_block(x, _STAGE_CHANNELS[0], "stage1_block1", m, strides=2)
    x = _residual_block(stage1, _STAGE_CHANNELS[1], "stage2_block1", m, strides=2)
    stage2 = _residual_block(x, _STAGE_CHANNELS[1], "stage2_block2", m)
    x = stage2
    for i, dilation in enumerate(_CONTEXT_DILATIONS, start=1):
        x = _residual_block(
            x, _STAGE_CHANNELS[2], f"stage3_block{i}", m, strides=2 if i == 1 else 1,
            dilation=dilation,
        )
    x = _global_context(x, "stage3_context")
    x = blocks.decoder_merge(x, stage2, _DECODER_CHANNELS[8], "decoder8", m)
    if output_stride == 4:
        x = blocks.decoder_merge(x, stage1, _DECODER_CHANNELS[4], "decoder4", m)
    return keras.Model(image, x, name=name)


def load_light_weights(backbone: keras.Model, backbone_weights: str) -> list:
    """Loads a weights file saved from a light backbone (there are no pretrained ones)."""
    if backbone_weights == "imagenet":
        raise ValueError(
            "ModelConfig.backbone_weights='imagenet' is not available for the light "
            "backbone (it has no pretrained weights); use None or a weights file saved "
            "from a light backbone."
        )
    return weights_lib.resolve_weights(
        backbone,
        backbone_weights,
        required=[layer.name for layer in backbone.layers if layer.weights],
    )


@backbones.register_backbone("light", output_strides=(4, 8), coord_channels=True,
                             load_weights=load_light_weights)
def build_light(config) -> keras.Model:
    """The light backbone (random weights; `load_light_weights` loads a saved file)."""
    return light_backbone(config.output_stride, config.batchnorm_momentum)
