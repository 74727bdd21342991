"""The two output heads (paper 3.2 and 3.4) and the neck they share.

Each head is `depth` x (3x3 conv, BatchNorm, ReLU) followed by a 1x1 output convolution.
The output convolutions compute in float32 whatever the model's dtype policy, so the
embeddings and logits are float32 under mixed precision (their distances and softmax
are sensitive to rounding); the embedding head has no normalisation because the
similarity 2 / (1 + exp(||e_p - e_q||^2)) needs raw distances.
"""

import keras

from instance_embed.model import layers as model_layers


def neck(features, channels: int, batchnorm_momentum: float = 0.99, name: str = "neck"):
    """1x1 conv + BatchNorm + ReLU shared by both heads: `[b, h, w, F] -> [b, h, w, channels]`.

    It keeps the heads' 3x3 convolutions cheap on wide backbones (ResNet: F = 2048).
    """
    x = keras.layers.Conv2D(channels, 1, use_bias=False, name=f"{name}_conv")(features)
    x = keras.layers.BatchNormalization(momentum=batchnorm_momentum, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def _tower(x, channels: int, depth: int, momentum: float, name: str):
    for i in range(1, depth + 1):
        x = keras.layers.Conv2D(
            channels, 3, padding="same", use_bias=False, name=f"{name}_conv{i}"
        )(x)
        x = keras.layers.BatchNormalization(momentum=momentum, name=f"{name}_bn{i}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def embedding_head(
    features,
    embedding_dim: int,
    channels: int,
    depth: int,
    batchnorm_momentum: float = 0.99,
    detail=None,
):
    """Per-pixel embeddings.

    Args:
      features: `[batch, h, w, F]`.
      embedding_dim: Output channels `d`.
      channels: Width of the 3x3 convolutions.
      depth: Number of 3x3 conv layers.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics.
      detail: Optional `[batch, h', w', F']` from `detail_branch`, finer than
        `features`: the tower's output is then upsampled to its size and fused with
        it by one more 3x3 conv layer, so that embeddings follow object boundaries at
        the finer stride (thin parts of objects span few cells at the coarse one).

    Returns:
      float32 `[batch, h, w, embedding_dim]` (`[batch, h', w', embedding_dim]` with
      `detail`), from the layer named "embeddings".
    """
    x = _tower(features, channels, depth, batchnorm_momentum, "embedding_head")
    if detail is not None:
        x = model_layers.ResizeToReference(name="embedding_head_upsample")([x, detail])
        x = keras.layers.Concatenate(name="embedding_head_detail_concat")([x, detail])
        x = _tower(x, channels // 2, 1, batchnorm_momentum, "embedding_head_detail")
    return keras.layers.Conv2D(embedding_dim, 1, dtype="float32", name="embeddings")(x)


def detail_branch(image, stride: int, channels: int = 16, batchnorm_momentum: float = 0.99,
                  name: str = "detail"):
    """A shallow branch on the image at a fine stride: `[b, H, W, 3] -> [b, H/s, W/s, c]`.

    `log2(stride)` 3x3 convolutions with stride 2, then one more at that resolution,
    each with BatchNorm and ReLU: edges and colour at a resolution the backbone's
    output lacks, for `embedding_head(detail=...)`. The image is taken in [0, 255].
    """
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, dtype="float32",
                               name=f"{name}_rescale")(image)
    layer = 0
    for strides in [2] * (stride.bit_length() - 1) + [1]:
        layer += 1
        x = keras.layers.Conv2D(channels, 3, strides=strides, padding="same", use_bias=False,
                                name=f"{name}_conv{layer}")(x)
        x = keras.layers.BatchNormalization(momentum=batchnorm_momentum,
                                            name=f"{name}_bn{layer}")(x)
        x = keras.layers.ReLU(name=f"{name}_relu{layer}")(x)
    return x


def classification_head(
    features,
    num_taus: int,
    num_classes: int,
    channels: int,
    depth: int,
    batchnorm_momentum: float = 0.99,
    output_reference=None,
):
    """Per-pixel, per-threshold logits of the class of the mask grown from the pixel.

    Args:
      features: `[batch, h, w, F]`.
      num_taus: Number of similarity thresholds |T|.
      num_classes: Number of foreground classes C.
      channels: Width of the 3x3 convolutions.
      depth: Number of 3x3 conv layers.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics.
      output_reference: Optional tensor `[batch, h', w', *]`: the logits are resized
        bilinearly to its spatial size (to match embeddings refined at a finer stride;
        the class of a seed's mask needs context more than resolution).

    Returns:
      float32 `[batch, h, w, num_taus, num_classes + 1]` logits (class 0 = background),
      from the layer named "class_logits" (`h', w'` with `output_reference`).
    """
    x = _tower(features, channels, depth, batchnorm_momentum, "classification_head")
    x = keras.layers.Conv2D(
        num_taus * (num_classes + 1), 1, dtype="float32", name="classification_head_output"
    )(x)
    if output_reference is not None:
        x = model_layers.ResizeToReference(dtype="float32", name="classification_head_upsample")(
            [x, output_reference])
    return model_layers.SplitChannels(
        num_taus, num_classes + 1, dtype="float32", name="class_logits"
    )(x)
