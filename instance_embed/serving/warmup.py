"""TF Serving warm-up: requests replayed when a version loads, and gRPC request protos.

TF Serving reads `assets.extra/tf_serving_warmup_requests`, a TFRecord file of
`PredictionLog`s, and runs each request before it reports the version ready, so that the
first user request does not pay for graph optimisation (or, with `--jit_compile`, XLA
compilation: seconds). `write_warmup_requests` writes one request per signature at one
image size; `predict_request` builds the same `PredictRequest` protos a gRPC client sends.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import numpy as np
from PIL import Image
import tensorflow as tf

from instance_embed.serving.client import ASSETS_EXTRA
from instance_embed.serving.images import BYTES_INPUT
from instance_embed.serving.images import IMAGES_INPUT
from instance_embed.serving.signatures import SERVING_COMPACT
from instance_embed.serving.signatures import SERVING_DEFAULT
from instance_embed.serving.signatures import SERVING_IMAGES

WARMUP_FILENAME = "tf_serving_warmup_requests"
MODEL_NAME = "instance_embed"
# Each signature's input: encoded files or pixels.
SIGNATURE_INPUTS = {SERVING_DEFAULT: BYTES_INPUT, SERVING_COMPACT: BYTES_INPUT,
                    SERVING_IMAGES: IMAGES_INPUT}


def predict_request(signature_name: str, images: Sequence[bytes] | np.ndarray,
                    model_name: str = MODEL_NAME):
    """A TF Serving gRPC `PredictRequest` for one of the signatures.

    Args:
      signature_name: `serving_default` or `serving_compact` (encoded JPEG/PNG files
        in `images`) or `serving_images` (`images` uint8 `[B, H, W, 3]`).
      images: the request's images.
      model_name: the server's `--model_name`.
    """
    from tensorflow_serving.apis import predict_pb2

    input_name = SIGNATURE_INPUTS[signature_name]
    if input_name == BYTES_INPUT:
        tensor = tf.make_tensor_proto(list(images), dtype=tf.string)
    else:
        tensor = tf.make_tensor_proto(np.asarray(images, np.uint8))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    request.inputs[input_name].CopyFrom(tensor)
    return request


def warmup_image(height: int, width: int) -> np.ndarray:
    """uint8 `[height, width, 3]`: smooth colour gradients (the same at every export)."""
    y = np.linspace(0, 255, height)[:, None]
    x = np.linspace(0, 255, width)[None, :]
    return np.stack(np.broadcast_arrays(y, x, (y + x) / 2), axis=-1).astype(np.uint8)


def write_warmup_requests(saved_model_dir: str, image_size: int) -> str:
    """Writes one request per signature, each one `image_size` square image, to
    `saved_model_dir/assets.extra/`; returns the file's path."""
    from tensorflow_serving.apis import prediction_log_pb2

    image = warmup_image(image_size, image_size)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    path = os.path.join(saved_model_dir, ASSETS_EXTRA, WARMUP_FILENAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for signature_name, input_name in SIGNATURE_INPUTS.items():
            images = [buffer.getvalue()] if input_name == BYTES_INPUT else image[None]
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(
                    request=predict_request(signature_name, images)))
            writer.write(log.SerializeToString())
    return path
