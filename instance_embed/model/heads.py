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
    features, embedding_dim: int, channels: int, depth: int, batchnorm_momentum: float = 0.99
):
    """Per-pixel embeddings.

    Args:
      features: `[batch, h, w, F]`.
      embedding_dim: Output channels `d`.
      channels: Width of the 3x3 convolutions.
      depth: Number of 3x3 conv layers.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics.

    Returns:
      float32 `[batch, h, w, embedding_dim]`, from the layer named "embeddings".
    """
    x = _tower(features, channels, depth, batchnorm_momentum, "embedding_head")
    return keras.layers.Conv2D(embedding_dim, 1, dtype="float32", name="embeddings")(x)


def classification_head(
    features,
    num_taus: int,
    num_classes: int,
    channels: int,
    depth: int,
    batchnorm_momentum: float = 0.99,
):
    """Per-pixel, per-threshold logits of the class of the mask grown from the pixel.

    Args:
      features: `[batch, h, w, F]`.
      num_taus: Number of similarity thresholds |T|.
      num_classes: Number of foreground classes C.
      channels: Width of the 3x3 convolutions.
      depth: Number of 3x3 conv layers.
      batchnorm_momentum: Momentum of the BatchNorm moving statistics.

    Returns:
      float32 `[batch, h, w, num_taus, num_classes + 1]` logits (class 0 = background),
      from the layer named "class_logits".
    """
    x = _tower(features, channels, depth, batchnorm_momentum, "classification_head")
    x = keras.layers.Conv2D(
        num_taus * (num_classes + 1), 1, dtype="float32", name="classification_head_output"
    )(x)
    return model_layers.SplitChannels(
        num_taus, num_classes + 1, dtype="float32", name="class_logits"
    )(x)
