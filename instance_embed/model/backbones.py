"""Registry of backbones: feature extractors chosen by name.

A backbone builder is a function `build(config: ModelConfig) -> keras.Model` that returns
a functional model named "backbone", mapping an RGB image `[batch, H, W, 3]` in [0, 255]
(it normalises its input itself) to features `[batch, ceil(H / s), ceil(W / s), channels]`
with `s = config.output_stride`, and that has already loaded `config.backbone_weights`.

Register a new backbone with the decorator:

    @register_backbone("mynet", output_strides=(8, 16))
    def build_mynet(config):
        ...
        return keras.Model(image, features, name="backbone")

and select it with `ModelConfig(backbone="mynet")`.
"""

import dataclasses
import importlib
from typing import Callable, Dict, Sequence, Tuple

# Modules whose import registers the built-in backbones. Imported lazily so that this
# registry (and ModelConfig validation) works whichever module is imported first.
_BUILTIN_MODULES = (
    "instance_embed.model.light",
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
      coord_channels_default: Whether `ModelConfig.coord_channels=None` means on.
    """

    name: str
    build: Callable
    output_strides: Tuple[int, ...]
    coord_channels_default: bool = False


_REGISTRY: Dict[str, BackboneSpec] = {}
_builtins_loaded = False


def register_backbone(
    name: str,
    *,
    output_strides: Sequence[int] = (8, 16, 32),
    coord_channels_default: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator registering a backbone builder under `name`.

    Args:
      name: Registry name, used as `ModelConfig.backbone`.
      output_strides: Output strides the builder supports.
      coord_channels_default: Default of `ModelConfig.coord_channels` for this backbone.

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
            coord_channels_default=coord_channels_default,
        )
        return build

    return decorator


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
