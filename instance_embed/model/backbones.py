"""Registry of backbones: feature extractors chosen by name.

A backbone builder is a function `build(config: ModelConfig) -> keras.Model` that returns
a functional model named "backbone", mapping an RGB image `[batch, H, W, 3]` in [0, 255]
(it normalises its input itself) to features `[batch, ceil(H / s), ceil(W / s), channels]`
with `s = config.output_stride`. It builds the architecture only; pretrained weights are
an initialisation, loaded by the backbone's `load_weights(backbone, backbone_weights)`
when training starts, never when a trained run is restored (its checkpoint holds every
weight, so evaluation, export and serving never need the weights file). Where weight
sets differ in conventions (input normalisation, padding), `build` decides from the
name in `config.backbone_weights`, without reading the file.

Register a new backbone with the decorator:

    @register_backbone("mynet", output_strides=(8, 16), load_weights=load_mynet)
    def build_mynet(config):
        ...
        return keras.Model(image, features, name="backbone")

and select it with `ModelConfig(backbone="mynet")`.
"""

import dataclasses
import importlib
from typing import Callable, Dict, Optional, Sequence, Tuple

# Modules whose import registers the built-in backbones. Imported lazily so that this
# registry (and ModelConfig validation) works whichever module is imported first.
_BUILTIN_MODULES = (
    "instance_embed.model.light",
    "instance_embed.model.mobilenet",
    "instance_embed.model.resnet",
    "instance_embed.model.vgg",
)

BACKBONE_NAME = "backbone"


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A registered backbone.

    Attributes:
      name: Registry name.
      build: `build(config) -> keras.Model` as described in the module docstring.
      output_strides: Output strides the builder supports.
      coord_channels: Whether the heads get two coordinate channels (x, y in [-1, 1])
        beside the features. A translation-invariant network gives identical
        embeddings to the corresponding pixels of two identical, touching objects, so
        it cannot separate them; with coordinates the heads can map each pixel to,
        e.g., its object's centre (docs/design.md has the measurement).
      load_weights: `load_weights(backbone, backbone_weights) -> [layer names]` loading
        a pretrained weight set into a backbone from `build`; None if there are none.
      new_layer_prefixes: Name prefixes of the layers a backbone adds to the pretrained
        network (a decoder, DeepLab's fc6/fc7): they start from random weights, so they
        learn at the heads' rate and their BatchNorm is never frozen.
    """

    name: str
    build: Callable
    output_strides: Tuple[int, ...]
    coord_channels: bool = False
    load_weights: Optional[Callable] = None
    new_layer_prefixes: Tuple[str, ...] = ()

    def is_new_layer(self, layer_name: str) -> bool:
        """Whether the layer is one the backbone adds to the pretrained network."""
        return any(layer_name.startswith(prefix) for prefix in self.new_layer_prefixes)


_REGISTRY: Dict[str, BackboneSpec] = {}
_builtins_loaded = False


def register_backbone(
    name: str,
    *,
    output_strides: Sequence[int] = (8, 16, 32),
    coord_channels: bool = False,
    load_weights: Optional[Callable] = None,
    new_layer_prefixes: Sequence[str] = (),
) -> Callable[[Callable], Callable]:
    """Decorator registering a backbone builder under `name`.

    Args:
      name: Registry name, used as `ModelConfig.backbone`.
      output_strides: Output strides the builder supports.
      coord_channels: See `BackboneSpec.coord_channels`.
      load_weights: See `BackboneSpec.load_weights`.
      new_layer_prefixes: See `BackboneSpec.new_layer_prefixes`.

    Returns:
      A decorator that registers the builder and returns it unchanged.

    Raises:
      ValueError: if `name` is already registered or `output_strides` is empty.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Backbone name must be a non-empty string, got {name!r}.")
    strides = tuple(int(s) for s in output_strides)
    if not strides:
        raise ValueError(f"Backbone {name!r} must support at least one output stride.")

    def decorator(build: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"Backbone {name!r} is already registered.")
        _REGISTRY[name] = BackboneSpec(
            name=name,
            build=build,
            output_strides=strides,
            coord_channels=coord_channels,
            load_weights=load_weights,
            new_layer_prefixes=tuple(new_layer_prefixes),
        )
        return build

    return decorator


def unregister_backbone(name: str) -> None:
    """Removes a backbone registered with `register_backbone` (e.g. one a test made).

    Raises:
      ValueError: if `name` is not registered.
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"Backbone {name!r} is not registered.")
    del _REGISTRY[name]


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    # Set first: the modules being imported call `register_backbone` re-entrantly.
    _builtins_loaded = True
    try:
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)
    except Exception:
        _builtins_loaded = False
        raise


def get_backbone(name: str) -> BackboneSpec:
    """The registered backbone called `name`.

    Raises:
      ValueError: naming the available backbones, if `name` is not registered.
    """
    _load_builtins()
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown backbone {name!r}; available backbones: "
            f"{', '.join(available_backbones())}."
        ) from None


def available_backbones() -> Tuple[str, ...]:
    """Sorted names of all registered backbones."""
    _load_builtins()
    return tuple(sorted(_REGISTRY))
