"""Serving: SavedModels for TF Serving, their signatures, and using them.

- `images`: encoded images checked and decoded, with errors that name the image;
- `signatures`: `serving_default`, `serving_images`, `serving_compact`;
- `export`: `export_from_model_dir` / `export_saved_model`, atomic numbered versions;
  `class_names_of` a run;
- `client`: `load_signature`, `load_class_names`, `rest_request_body`;
- `warmup`: TF Serving's warm-up requests, `predict_request` (gRPC).
"""

from instance_embed.serving.client import (
    LoadedSignature,
    load_class_names,
    load_images_signature,
    load_signature,
    resolve_saved_model_dir,
    rest_request_body,
)
from instance_embed.serving.export import (
    ExportConfig,
    class_names_of,
    export_from_model_dir,
    export_saved_model,
)
from instance_embed.serving.images import BYTES_INPUT, IMAGES_INPUT
from instance_embed.serving.signatures import (
    COMPACT_OUTPUTS,
    DENSE_OUTPUTS,
    SERVING_COMPACT,
    SERVING_DEFAULT,
    SERVING_IMAGES,
)
from instance_embed.serving.warmup import predict_request

__all__ = [
    "BYTES_INPUT",
    "COMPACT_OUTPUTS",
    "DENSE_OUTPUTS",
    "ExportConfig",
    "IMAGES_INPUT",
    "LoadedSignature",
    "SERVING_COMPACT",
    "SERVING_DEFAULT",
    "SERVING_IMAGES",
    "class_names_of",
    "export_from_model_dir",
    "export_saved_model",
    "load_class_names",
    "load_images_signature",
    "load_signature",
    "predict_request",
    "resolve_saved_model_dir",
    "rest_request_body",
]
