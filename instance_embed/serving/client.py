"""Using an exported model: finding its version, loading a signature, building requests.

    predict, path = load_signature("runs/demo/export")   # the highest version
    outputs = predict(tf.constant([open("photo.jpg", "rb").read()]))
    class_names = load_class_names(path)

`rest_request_body` builds the JSON body of a TF Serving REST request.
"""

from __future__ import annotations

import base64
import os
from typing import Sequence

import tensorflow as tf

from instance_embed.serving.images import BYTES_INPUT
from instance_embed.serving.signatures import SERVING_COMPACT
from instance_embed.serving.signatures import SERVING_DEFAULT
from instance_embed.serving.signatures import SERVING_IMAGES

ASSETS_EXTRA = "assets.extra"
CLASS_NAMES_FILENAME = "class_names.txt"


def resolve_saved_model_dir(path: str) -> str:
    """A SavedModel directory: `path` itself, or its highest version directory.

    Raises:
      FileNotFoundError: naming `path`, when neither holds a `saved_model.pb`.
    """
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for version in sorted(saved_model_versions(path), reverse=True):
        candidate = os.path.join(path, str(version))
        if os.path.isfile(os.path.join(candidate, "saved_model.pb")):
            return candidate
    raise FileNotFoundError(
        f"No SavedModel in {path!r}: expected saved_model.pb there or in a version "
        "subdirectory <N>/ (write one with `python -m instance_embed.export_main`)")


def load_class_names(saved_model_dir: str) -> list[str]:
    """The class names exported with a SavedModel (`path` as `resolve_saved_model_dir`)."""
    path = os.path.join(resolve_saved_model_dir(saved_model_dir), ASSETS_EXTRA,
                        CLASS_NAMES_FILENAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: was this SavedModel written by "
                                "instance_embed.export?")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def load_signature(saved_model_dir: str, signature: str = SERVING_DEFAULT
                   ) -> tuple[LoadedSignature, str]:
    """Loads one signature of an exported model.

    Args:
      saved_model_dir: a version directory, or an export directory (highest version).
      signature: the signature name.

    Returns:
      (fn, the version directory). `fn(x)` calls the signature with its one input
      (`image_bytes` string `[B]` or `images` uint8 `[B, H, W, 3]`) and returns the
      output dict; it keeps the loaded model alive.
    """
    path = resolve_saved_model_dir(saved_model_dir)
    loaded = tf.saved_model.load(path)
    if signature not in loaded.signatures:
        raise ValueError(f"{path} has no signature {signature!r}; it has "
                         f"{', '.join(sorted(loaded.signatures))}")
    return LoadedSignature(loaded, signature), path


class LoadedSignature:
    """Calls a loaded signature with its one input; holds the loaded model alive.

    Attributes:
      input_name: the signature's input (`image_bytes` or `images`).
    """

    def __init__(self, loaded, name: str):
        self._loaded = loaded  # The signature's variables live as long as this object.
        self._function = loaded.signatures[name]
        (self.input_name,) = self._function.structured_input_signature[1].keys()

    def __call__(self, x) -> dict[str, tf.Tensor]:
        return self._function(**{self.input_name: x})


def load_images_signature(saved_model_dir: str):
    """`load_signature(saved_model_dir, "serving_images")`: uint8 `[B, H, W, 3]` in."""
    return load_signature(saved_model_dir, SERVING_IMAGES)


def rest_request_body(image_bytes_list: Sequence[bytes],
                      signature_name: str = SERVING_COMPACT) -> dict:
    """The JSON body of a TF Serving REST predict request for encoded images.

    `POST http://HOST:8501/v1/models/instance_embed:predict` with this body, in TF
    Serving's row format: one instance per image, the bytes base64-encoded under
    `"b64"` as TF Serving requires for binary strings.

    Args:
      image_bytes_list: encoded JPEG or PNG files.
      signature_name: `serving_compact` (small responses) or `serving_default`.

    Returns:
      `{"signature_name": ..., "instances": [{"image_bytes": {"b64": ...}}, ...]}`.
    """
    return {
        "signature_name": signature_name,
        "instances": [{BYTES_INPUT: {"b64": base64.b64encode(data).decode("ascii")}}
                      for data in image_bytes_list],
    }


def saved_model_versions(export_dir: str) -> list[int]:
    """The integer-named subdirectories of `export_dir` (none if it does not exist)."""
    if not os.path.isdir(export_dir):
        return []
    return [int(name) for name in os.listdir(export_dir)
            if name.isdigit() and os.path.isdir(os.path.join(export_dir, name))]
