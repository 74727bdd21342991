"""The SavedModel's signatures: encoded images or pixels in, instance masks out.

Signatures (K = `num_seeds`, fixed at export time; B images per request):

| signature | input |
| --- | --- |
| `serving_default` | `image_bytes`: string `[B]`, encoded JPEG or PNG |
| `serving_images` | `images`: uint8 `[B, H, W, 3]`, RGB |
| `serving_compact` | `image_bytes`, as `serving_default`; small outputs for REST |

| output | dtype, shape | meaning |
| --- | --- | --- |
| `num_detections` | int32 `[B]` | valid detections, sorted first |
| `detection_masks` | uint8 `[B, K, H, W]` | 0/1 masks at the input resolution |
| `detection_boxes` | float32 `[B, K, 4]` | each mask's box, normalised (below); 0 if invalid |
| `detection_classes` | int32 `[B, K]` | class ids 1..C, 0 for invalid slots |
| `detection_scores` | float32 `[B, K]` | descending, 0 for invalid slots |
| `instance_map` | int32 `[B, H, W]` | k: the k-th mask is the best on the pixel; 0: none |
| `instance_map_png_bytes` | string `[B]` | each image's `instance_map` as a 16-bit PNG |
| `image_size` | int32 `[B, 2]` | (height, width) of each input image |

Boxes are (ymin, xmin, ymax, xmax) as in the TF Object Detection API: the edges of the
mask's first and one past its last row and column, divided by the image's own height and
width (so 0..1 whatever the padding of a batch).

`serving_compact` returns only `num_detections`, `detection_boxes`, `detection_classes`,
`detection_scores`, `instance_map_png_bytes` and `image_size`, without the dense masks
(boxes and instance map come from the heads-resolution masks, or a few drawn ones when
that is cheaper): TF Serving's REST API cannot filter outputs (gRPC can, with `output_filter`), and dense masks in JSON are
about K x H x W numbers per image. Masks are uint8 rather than bool because JSON then
holds `0`/`1` instead of `false`/`true`; classes are int32 (not float32 as in the TF
Object Detection API) because they are ids.

Encoded images may differ in size within a request: the dense outputs are then at the
largest height and width of the batch, each image's results at the top-left and zeros
beyond its own `image_size` (the PNGs are at each image's own size); such a batch runs
the network one image at a time, so an image's results never depend on the other images
of its request. Grayscale and RGBA (and palette, 16-bit) inputs are converted to RGB
(alpha is dropped). Bad input fails the request, never the process (`images.py`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import keras
import tensorflow as tf

from instance_embed.inference import InferenceConfig
from instance_embed.inference import network_function
from instance_embed.inference import predict_images
from instance_embed.serving.images import BYTES_INPUT
from instance_embed.serving.images import DEFAULT_MAX_IMAGE_PIXELS
from instance_embed.serving.images import IMAGES_INPUT
from instance_embed.serving.images import check_image_tensor
from instance_embed.serving.images import decode_images

SERVING_DEFAULT = "serving_default"
SERVING_IMAGES = "serving_images"
SERVING_COMPACT = "serving_compact"
DENSE_OUTPUTS = ("num_detections", "detection_masks", "detection_boxes",
                 "detection_classes", "detection_scores", "instance_map",
                 "instance_map_png_bytes", "image_size")
COMPACT_OUTPUTS = ("num_detections", "detection_boxes", "detection_classes",
                   "detection_scores", "instance_map_png_bytes", "image_size")
# Instance ids 1..K must fit the 16-bit PNG of `instance_map_png_bytes`.
MAX_NUM_SEEDS = 65535
_DETECTION_KEYS = ("num_detections", "detection_masks", "detection_boxes",
                   "detection_classes", "detection_scores", "instance_map")


def batch_detections(model: keras.Model | Callable, images: tf.Tensor, sizes: tf.Tensor,
                     taus: Sequence[float], config: InferenceConfig, same_size: bool = False,
                     dense_masks: bool = True) -> dict[str, tf.Tensor]:
    """Detections for a batch of images padded to a common size.

    When all images have the same size the network runs on the batch at once;
    otherwise it runs on each image at its own size (so that results never depend on
    the other images of a request) and the outputs are padded to the batch's size.

    Args:
      model: a model from `build_model`, or `inference.network_function(model)`.
      images: `[B, H, W, 3]` RGB, each image at the top-left.
      sizes: int32 `[B, 2]`, each image's (height, width) within `images`.
      taus: the model's similarity thresholds (`ModelConfig.taus`).
      config: the inference settings.
      same_size: the caller guarantees every size is (H, W): skips the check.
      dense_masks: whether to compute `detection_masks` (`serving_compact` does not).

    Returns:
      The serving outputs (module docstring).
    """
    if same_size:
        detections = _detect_together(model, images, taus, config, dense_masks)
    else:
        detections = tf.cond(
            tf.reduce_all(sizes == sizes[:1]),
            lambda: _detect_together(model, images, taus, config, dense_masks),
            lambda: _detect_one_by_one(model, images, sizes, taus, config, dense_masks))
    detections["instance_map_png_bytes"] = tf.map_fn(
        _encode_instance_png, (detections["instance_map"], sizes),
        fn_output_signature=tf.TensorSpec([], tf.string))
    detections["image_size"] = sizes
    return detections


def _detect_together(model, images, taus, config, dense_masks):
    outputs = predict_images(model, images, taus, config, dense_masks, tf.uint8)
    outputs = {key: outputs[key] for key in _DETECTION_KEYS if key in outputs}
    size = tf.cast(tf.shape(images)[1:3], tf.float32)
    outputs["detection_boxes"] /= tf.tile(size, [2])
    return outputs


def _detect_one_by_one(model, images, sizes, taus, config, dense_masks):
    batch = tf.shape(images)[0]
    full_size = tf.shape(images)[1:3]
    arrays = {key: tf.TensorArray(dtype, size=batch, element_shape=shape) for key, dtype, shape
              in (("num_detections", tf.int32, []),
                  ("detection_masks", tf.uint8, [config.num_seeds, None, None]),
                  ("detection_boxes", tf.float32, [config.num_seeds, 4]),
                  ("detection_classes", tf.int32, [config.num_seeds]),
                  ("detection_scores", tf.float32, [config.num_seeds]),
                  ("instance_map", tf.int32, [None, None]))
              if dense_masks or key != "detection_masks"}

    def step(i, arrays):
        size = sizes[i]
        outputs = _detect_together(model, images[i:i + 1, :size[0], :size[1]], taus, config,
                                   dense_masks)
        pad = full_size - size
        if dense_masks:
            outputs["detection_masks"] = tf.pad(outputs["detection_masks"],
                                                [[0, 0], [0, 0], [0, pad[0]], [0, pad[1]]])
        outputs["instance_map"] = tf.pad(outputs["instance_map"],
                                         [[0, 0], [0, pad[0]], [0, pad[1]]])
        return i + 1, {key: arrays[key].write(i, outputs[key][0]) for key in arrays}

    _, arrays = tf.while_loop(lambda i, _: i < batch, step, (tf.constant(0), arrays))
    return {key: array.stack() for key, array in arrays.items()}


def _encode_instance_png(args) -> tf.Tensor:
    instance_map, size = args
    return encode_instance_png(instance_map[:size[0], :size[1]])


def encode_instance_png(instance_map: tf.Tensor) -> tf.Tensor:
    """An instance map, int `[H, W]` (ids 0..65535), as a 16-bit grayscale PNG string.

    zlib's fastest level: half the encoding time of the default (6) on a 512 x 512 map of
    100 instances, for a PNG 1.4-1.6 times as large (docs/benchmarks.md).
    """
    return tf.io.encode_png(tf.cast(instance_map[..., None], tf.uint16), compression=1)


class ServingFunctions:
    """The signatures' `tf.function`s for one model and its export-time settings.

    Attributes:
      serving_default: `image_bytes` string `[B]` -> `DENSE_OUTPUTS`.
      serving_compact: `image_bytes` string `[B]` -> `COMPACT_OUTPUTS`.
      serving_images: `images` uint8 `[B, H, W, 3]` -> `DENSE_OUTPUTS`.
    """

    def __init__(self, model: keras.Model, taus: Sequence[float], config: InferenceConfig,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        network = network_function(model)

        # Explicit tf ops everywhere: the signatures are traced without AutoGraph.
        def from_bytes(image_bytes, dense_masks):
            images, sizes = decode_images(image_bytes, max_image_pixels, BYTES_INPUT)
            return batch_detections(network, images, sizes, taus, config,
                                    dense_masks=dense_masks)

        @tf.function(autograph=False)
        def serving_default(image_bytes):
            outputs = from_bytes(image_bytes, dense_masks=True)
            return {key: outputs[key] for key in DENSE_OUTPUTS}

        @tf.function(autograph=False)
        def serving_compact(image_bytes):
            outputs = from_bytes(image_bytes, dense_masks=False)
            return {key: outputs[key] for key in COMPACT_OUTPUTS}

        @tf.function(autograph=False)
        def serving_images(images):
            images = check_image_tensor(images, max_image_pixels, IMAGES_INPUT)
            shape = tf.shape(images)
            sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
            outputs = batch_detections(network, images, sizes, taus, config, same_size=True)
            return {key: outputs[key] for key in DENSE_OUTPUTS}

        self.serving_default = serving_default
        self.serving_compact = serving_compact
        self.serving_images = serving_images

    def signatures(self) -> dict[str, tuple[Callable, list[tf.TensorSpec]]]:
        """Signature name -> (tf.function, input signature)."""
        bytes_spec = [tf.TensorSpec([None], tf.string, name=BYTES_INPUT)]
        images_spec = [tf.TensorSpec([None, None, None, 3], tf.uint8, name=IMAGES_INPUT)]
        return {
            SERVING_DEFAULT: (self.serving_default, bytes_spec),
            SERVING_IMAGES: (self.serving_images, images_spec),
            SERVING_COMPACT: (self.serving_compact, bytes_spec),
        }
