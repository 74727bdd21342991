"""Builds the instance embedding network from a `ModelConfig`.

    image [B, H, W, 3] RGB in [0, 255]
      -> backbone (shared weights) on each pyramid scale, resized to the scale-1.0 map
         and averaged (paper 3.6)                         [B, h, w, F]
      -> neck (1x1 conv)                                   [B, h, w, head_channels]
      -> + coordinate channels (backbones that ask for them)
      -> embedding head        -> "embeddings"    float32 [B, h, w, d]
      -> classification head   -> "class_logits"  float32 [B, h, w, |T|, C + 1]

with h = ceil(H / output_stride).

Mixed precision: the config's dtype policy is made the global Keras policy only while
the layers are constructed, then the previous global policy is restored. Every layer
thus records the mixed policy (float32 variables, bfloat16/float16 computation) without
threading `dtype=` through every backbone builder, and building a model never changes
the policy of code that runs afterwards. Layers that must stay in float32 (input
normalisation, pyramid resizing and averaging, the heads' output layers) say so with an
explicit `dtype="float32"`. With "mixed_float16" the trainer must scale the loss
(`keras.optimizers.LossScaleOptimizer`); "mixed_bfloat16" needs no loss scaling.
"""

import contextlib

import keras

from instance_embed.model import backbones
from instance_embed.model import heads
from instance_embed.model import layers as model_layers
from instance_embed.model.config import ModelConfig


@contextlib.contextmanager
def dtype_policy_scope(policy: str):
    """Temporarily sets Keras' global dtype policy (restored on exit, even on error)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def pyramid_features(image, backbone: keras.Model, config: ModelConfig):
    """Backbone features, averaged over the image pyramid of `config.pyramid_scales`.

    Args:
      image: Keras tensor `[batch, H, W, 3]`.
      backbone: The backbone model, applied once per scale with shared weights.
      config: Gives the scales and the output stride.

    Returns:
      `[batch, ceil(H / s), ceil(W / s), F]` with s the output stride: the features of
      the image itself when the only scale is 1.0, otherwise the mean over scales of
      each scale's features bilinearly resized to that size.
    """
    if config.pyramid_scales == (1.0,):
        return backbone(image)
    stride = config.output_stride
    levels = []
    for scale in config.pyramid_scales:
        tag = f"{scale:g}".replace(".", "_")
        scaled = image
        if scale != 1.0:
            scaled = model_layers.ScaleImage(
                scale, multiple=stride, dtype="float32", name=f"pyramid_image_x{tag}"
            )(image)
        features = backbone(scaled)
        levels.append(
            model_layers.ResizeToReference(
                divisor=stride, dtype="float32", name=f"pyramid_features_x{tag}"
            )([features, image])
        )
    return keras.layers.Average(dtype="float32", name="pyramid_average")(levels)


def build_backbone(config: ModelConfig, load_weights: bool = True) -> keras.Model:
    """The backbone of `config`, with `config.backbone_weights` loaded if `load_weights`.

    Layers up to `config.freeze_backbone_until` are made non-trainable, and with
    `config.use_frozen_backbone_batchnorm` so are the BatchNorm layers of the pretrained
    network (those of the backbone's new layers keep learning).

    Raises:
      ValueError: if the builder breaks the registry's contract, the backbone has no
        pretrained weights to load, or `freeze_backbone_until` names no layer of it.
    """
    spec = backbones.get_backbone(config.backbone)
    backbone = spec.build(config)
    if not isinstance(backbone, keras.Model) or backbone.name != backbones.BACKBONE_NAME:
        raise ValueError(
            f"Backbone builder {config.backbone!r} must return a keras.Model named "
            f"{backbones.BACKBONE_NAME!r}, got {backbone!r}."
        )
    if load_weights and config.backbone_weights is not None:
        if spec.load_weights is None:
            raise ValueError(f"Backbone {config.backbone!r} has no pretrained weights; "
                             "ModelConfig.backbone_weights must be None.")
        spec.load_weights(backbone, config.backbone_weights)
    if config.use_frozen_backbone_batchnorm:
        # A frozen BatchNorm layer normalises with its moving statistics even in
        # training, and its variables get no updates.
        for layer in backbone.layers:
            if (isinstance(layer, keras.layers.BatchNormalization)
                    and not spec.is_new_layer(layer.name)):
                layer.trainable = False
    if config.freeze_backbone_until is not None:
        freeze_layers_until(backbone, config.freeze_backbone_until)
    return backbone


def split_trainable_variables(model: keras.Model, config: ModelConfig):
    """(pretrained backbone variables, all other variables) of a model from `build_model`.

    The first list trains at the backbone's learning rate; the second (the heads, and
    the layers a backbone adds to the pretrained network) at the heads'.
    """
    spec = backbones.get_backbone(config.backbone)
    backbone = model.get_layer(backbones.BACKBONE_NAME)
    pretrained = [v for layer in backbone.layers if not spec.is_new_layer(layer.name)
                  for v in layer.trainable_variables]
    pretrained_ids = {id(v) for v in pretrained}
    others = [v for v in model.trainable_variables if id(v) not in pretrained_ids]
    return pretrained, others


def freeze_layers_until(model: keras.Model, last_frozen: str) -> list:
    """Makes `model`'s layers up to and including `last_frozen` non-trainable.

    Layers are taken in `model.layers` order, which for a functional model is a
    topological order of its graph: every layer that feeds `last_frozen` comes before it.
    Frozen BatchNorm layers also normalise with their moving statistics.

    Returns:
      Names of the frozen layers.

    Raises:
      ValueError: naming the model's first layers, if `last_frozen` is not one of them.
    """
    names = [layer.name for layer in model.layers]
    if last_frozen not in names:
        shown = ", ".join(n for n in names if model.get_layer(n).weights)
        raise ValueError(
            f"ModelConfig.freeze_backbone_until={last_frozen!r} is not a layer of the "
            f"{model.name}; its weighted layers, in order: {shown[:600]}"
            f"{'...' if len(shown) > 600 else ''}")
    frozen = names[:names.index(last_frozen) + 1]
    for name in frozen:
        model.get_layer(name).trainable = False
    return frozen


def build_model(config: ModelConfig, load_backbone_weights: bool = True) -> keras.Model:
    """Builds the two-headed network described by `config`.

    Args:
      config: The model configuration.
      load_backbone_weights: Load `config.backbone_weights` (an initialisation for
        training). False when the weights come from a checkpoint anyway: a trained run
        is restored without the pretrained file or package.

    Returns:
      A functional `keras.Model` with input "image" (float32 `[batch, H, W, 3]`, RGB
      in [0, 255], any H, W; multiples of 32 give h = H / output_stride exactly) and
      outputs `{"embeddings": float32 [batch, h, w, embedding_dim],
      "class_logits": float32 [batch, h, w, len(taus), num_classes + 1]}`. The
      backbone is the nested model `model.get_layer("backbone")`.
    """
    if not isinstance(config, ModelConfig):
        raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}.")
    with dtype_policy_scope(config.dtype_policy):
        image = keras.Input(shape=(None, None, 3), name="image", dtype="float32")
        backbone = build_backbone(config, load_weights=load_backbone_weights)
        features = pyramid_features(image, backbone, config)
        momentum = config.batchnorm_momentum
        x = heads.neck(features, config.head_channels, momentum)
        if backbones.get_backbone(config.backbone).coord_channels:
            x = model_layers.AppendCoordinates(name="coordinates")(x)
        embeddings = heads.embedding_head(
            x, config.embedding_dim, config.head_channels, config.head_depth, momentum
        )
        class_logits = heads.classification_head(
            x, config.num_taus, config.num_classes, config.head_channels, config.head_depth,
            momentum,
        )
        model = keras.Model(
            image,
            {"embeddings": embeddings, "class_logits": class_logits},
            name=f"instance_embed_{config.backbone}",
        )
    if config.sync_batchnorm:
        # Set after construction so every backbone builder gets it without a parameter.
        for layer in _all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
    return model


def _all_layers(model: keras.Model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
