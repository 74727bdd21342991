"""SavedModels for TF Serving: encoded images in, instance masks out.

    export_from_model_dir("runs/demo", "runs/demo/export")   # -> "runs/demo/export/1"

writes the latest checkpoint of a run as a SavedModel in the layout TF Serving reads,
`export_dir/<version>/{saved_model.pb, variables/, assets.extra/}`, through
`keras.export.ExportArchive`: a Keras 3 model inside a plain `tf.saved_model.save`
loads in Python but fails in the C++ loader that TF Serving and `saved_model_cli run`
use. The version directory is written under a temporary name and renamed when
complete, so a server polling `export_dir` never sees half a model.

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
| `detection_classes` | int32 `[B, K]` | class ids 1..C, 0 for invalid slots |
| `detection_scores` | float32 `[B, K]` | descending, 0 for invalid slots |
| `instance_map` | int32 `[B, H, W]` | k: the k-th mask is the best on the pixel; 0: none |
| `instance_map_png_bytes` | string `[B]` | each image's `instance_map` as a 16-bit PNG |
| `image_size` | int32 `[B, 2]` | (height, width) of each input image |

`serving_compact` returns only `num_detections`, `detection_classes`,
`detection_scores`, `instance_map_png_bytes` and `image_size`: TF Serving's REST API
cannot filter outputs (gRPC can, with `output_filter`), and dense masks in JSON are
about K x H x W numbers per image. Masks are uint8 rather than bool because JSON then
holds `0`/`1` instead of `false`/`true`; classes are int32 (not float32 as in the TF
Object Detection API) because they are ids.

Encoded images may differ in size within a request: the dense outputs are then at the
largest height and width of the batch, each image's results at the top-left and zeros
beyond its own `image_size` (the PNGs are at each image's own size); such a batch runs
the network one image at a time, so an image's results never depend on the other images
of its request. Grayscale and RGBA (and palette, 16-bit) inputs are converted to RGB
(alpha is dropped).

Bad input fails the request with `InvalidArgumentError`, never the process: a message
names the input, the image's index in the batch and the problem (empty, neither JPEG
nor PNG, corrupt header, too many pixels, data that does not decode). The pixel limit
(`ExportConfig.max_image_pixels`) is checked on the size in the file's header, before
anything is decoded.

The class names go to `assets.extra/class_names.txt` (line c names class id c) and the
settings to `assets.extra/export_info.json`; TF Serving ignores `assets.extra/`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import numbers
import os
import shutil
import tempfile
from typing import Callable, Sequence

import keras
import tensorflow as tf

from instance_embed import configs
from instance_embed import inference
from instance_embed import predictor

SERVING_DEFAULT = "serving_default"
SERVING_IMAGES = "serving_images"
SERVING_COMPACT = "serving_compact"
BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
DENSE_OUTPUTS = ("num_detections", "detection_masks", "detection_classes",
                 "detection_scores", "instance_map", "instance_map_png_bytes", "image_size")
COMPACT_OUTPUTS = ("num_detections", "detection_classes", "detection_scores",
                   "instance_map_png_bytes", "image_size")
ASSETS_EXTRA = "assets.extra"
CLASS_NAMES_FILENAME = "class_names.txt"
EXPORT_INFO_FILENAME = "export_info.json"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# Instance ids 1..K must fit the 16-bit PNG of `instance_map_png_bytes`.
MAX_NUM_SEEDS = 65535

FORMAT_UNKNOWN, FORMAT_JPEG, FORMAT_PNG = 0, 1, 2
_FORMAT_NAMES = ("image", "JPEG", "PNG")
_PNG_SIGNATURE = (137, 80, 78, 71, 13, 10, 26, 10)
_PNG_IHDR = (73, 72, 68, 82)  # b"IHDR"
# JPEG start-of-frame markers (they hold the image size): C0-CF except DHT (C4),
# JPG (C8) and DAC (CC).
_JPEG_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                     0xCE, 0xCF)
# Real JPEGs have a few dozen segments before the frame header at most; the cap keeps a
# crafted file (megabytes of fill bytes) from holding a server thread.
JPEG_MAX_MARKERS = 1000
_DETECTION_KEYS = ("num_detections", "detection_masks", "detection_classes",
                   "detection_scores", "instance_map")


@dataclasses.dataclass
class ExportConfig:
    """What to export and how the exported model infers.

    The inference fields override the run's `InferenceConfig` when set (None keeps
    the run's value); they are fixed in the SavedModel.

    Attributes:
      version: the version directory under `export_dir`; None takes the next free
        integer (1 for an empty directory). TF Serving serves the highest version.
      overwrite: replace an existing version directory instead of failing.
      num_seeds: K, the detections per image (at most 65535).
      alpha: seed diversity weight.
      taus: similarity thresholds, one per slice of the classification head (as many
        as the model's `taus`).
      score_threshold: detections scoring below it are invalid.
      nms_iou_threshold: near-duplicate suppression IoU; a negative value turns
        suppression off.
      support_rescoring: scores scaled by the duplicates each detection suppressed
        (see `inference.InferenceConfig`); 0 turns it off.
      mask_upsampling: "bilinear" or "joint_bilateral" (see `inference.InferenceConfig`).
      bilateral_sigma: colour scale of "joint_bilateral".
      jit_compile: post-processing as one XLA computation (see
        `inference.InferenceConfig`); TF Serving then needs
        `--xla_cpu_compilation_enabled=true`, and compiles once per input size.
      max_image_pixels: requests with an image of more pixels (height x width, read
        from the file header) are rejected. Memory grows with K x pixels: the
        full-resolution masks alone take K x H x W bytes.
      class_names: foreground class names (class id c is `class_names[c - 1]`); None
        takes the run's dataset's names.
    """

    version: int | None = None
    overwrite: bool = False
    num_seeds: int | None = None
    alpha: float | None = None
    taus: tuple[float, ...] | None = None
    score_threshold: float | None = None
    nms_iou_threshold: float | None = None
    support_rescoring: float | None = None
    mask_upsampling: str | None = None
    bilateral_sigma: float | None = None
    jit_compile: bool | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.version is not None and (
                isinstance(self.version, bool) or not isinstance(self.version, numbers.Integral)
                or self.version < 1):
            raise ValueError(f"ExportConfig.version={self.version!r}: must be None (next "
                             "free version) or a positive integer")
        if self.num_seeds is not None and (
                isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, numbers.Integral)
                or not 1 <= self.num_seeds <= MAX_NUM_SEEDS):
            raise ValueError(f"ExportConfig.num_seeds={self.num_seeds!r}: must be an integer "
                             f"in 1..{MAX_NUM_SEEDS} (instance ids are stored as uint16)")
        if (isinstance(self.max_image_pixels, bool)
                or not isinstance(self.max_image_pixels, numbers.Integral)
                or self.max_image_pixels < 1):
            raise ValueError(f"ExportConfig.max_image_pixels={self.max_image_pixels!r}: must "
                             "be a positive integer")
        if self.taus is not None:
            self.taus = tuple(self.taus)
        if self.class_names is not None:
            if isinstance(self.class_names, str) or not all(
                    isinstance(n, str) and n and "\n" not in n for n in self.class_names):
                raise ValueError(f"ExportConfig.class_names={self.class_names!r}: must be a "
                                 "sequence of non-empty one-line strings")
            self.class_names = tuple(self.class_names)

    def inference_config(self, base: inference.InferenceConfig) -> inference.InferenceConfig:
        """`base` (the run's settings) with this config's overrides applied."""
        overrides = {name: getattr(self, name)
                     for name in ("num_seeds", "alpha", "taus", "score_threshold",
                                  "support_rescoring",
                                  "mask_upsampling", "bilateral_sigma", "jit_compile")
                     if getattr(self, name) is not None}
        if self.nms_iou_threshold is not None:
            overrides["nms_iou_threshold"] = (
                None if self.nms_iou_threshold < 0 else self.nms_iou_threshold)
        config = dataclasses.replace(base, **overrides)
        if config.num_seeds > MAX_NUM_SEEDS:
            raise ValueError(f"num_seeds={config.num_seeds}: at most {MAX_NUM_SEEDS} can be "
                             "exported (instance ids are stored as uint16)")
        return config


# --------------------------------------------------------------------------------------
# Reading and decoding encoded images, with errors that name the image.


def read_image_headers(image_bytes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Format and size of encoded images, from their headers only (nothing is decoded).

    JPEG: the segments are walked from the start of the file to the first
    start-of-frame marker, which holds the size. PNG: the size is in the IHDR chunk
    that must follow the signature.

    Args:
      image_bytes: string `[B]`.

    Returns:
      (format int32 `[B]`: `FORMAT_UNKNOWN`, `FORMAT_JPEG` or `FORMAT_PNG`;
       height int64 `[B]`; width int64 `[B]`), the size -1 where the header is
       missing, truncated or corrupt.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    length = tf.strings.length(image_bytes)
    head = _bytes_at(image_bytes, tf.zeros_like(length), 24)
    is_png = tf.reduce_all(head[:, :8] == tf.constant(_PNG_SIGNATURE, tf.int64), axis=1)
    jpeg_start = tf.constant([0xFF, 0xD8, 0xFF], tf.int64)  # SOI and the next marker
    is_jpeg = tf.logical_and(tf.reduce_all(head[:, :3] == jpeg_start, axis=1), length >= 3)
    formats = tf.where(is_png, FORMAT_PNG, tf.where(is_jpeg, FORMAT_JPEG, FORMAT_UNKNOWN))

    png_ok = tf.logical_and(
        length >= 33,  # signature, IHDR length + type + 13 bytes of data + CRC
        tf.reduce_all(head[:, 12:16] == tf.constant(_PNG_IHDR, tf.int64), axis=1))
    png_width = _big_endian(head[:, 16:20])
    png_height = _big_endian(head[:, 20:24])
    jpeg_height, jpeg_width = _jpeg_frame_size(image_bytes, length, is_jpeg)

    missing = tf.constant(-1, tf.int64)
    height = tf.where(is_png, tf.where(png_ok, png_height, missing), jpeg_height)
    width = tf.where(is_png, tf.where(png_ok, png_width, missing), jpeg_width)
    return formats, height, width


def _bytes_at(image_bytes: tf.Tensor, pos: tf.Tensor, count: int) -> tf.Tensor:
    """int64 `[B, count]`: `count` bytes of each string from `pos` (zeros past the end)."""
    pos = tf.minimum(pos, tf.strings.length(image_bytes))  # substr rejects pos > length
    chunk = tf.strings.substr(image_bytes, pos, tf.fill(tf.shape(pos), count))
    raw = tf.io.decode_raw(chunk, tf.uint8, fixed_length=count)
    return tf.cast(raw, tf.int64)


def _big_endian(digits: tf.Tensor) -> tf.Tensor:
    """`[B, n]` bytes (int64) -> `[B]` big-endian unsigned integers."""
    weights = tf.constant([256 ** i for i in reversed(range(digits.shape[-1]))], tf.int64)
    return tf.reduce_sum(digits * weights, axis=-1)


def _jpeg_frame_size(image_bytes: tf.Tensor, length: tf.Tensor, is_jpeg: tf.Tensor):
    """(height, width) int64 `[B]` from each JPEG's start-of-frame marker, -1 if none.

    Every step reads one marker at `pos` for every unfinished image and jumps over its
    segment, so a step costs one 9-byte read per image and a typical file needs five.
    A file without a frame header within `JPEG_MAX_MARKERS` markers counts as corrupt.
    """
    length = tf.cast(length, tf.int64)
    batch = tf.shape(image_bytes)[0]
    sof = tf.constant(_JPEG_SOF_MARKERS, tf.int64)
    missing = tf.fill([batch], tf.constant(-1, tf.int64))

    def step(pos, done, height, width):
        b = _bytes_at(image_bytes, tf.cast(pos, tf.int32), 9)
        marker = b[:, 1]
        is_fill = marker == 0xFF  # fill bytes may pad the space between markers
        standalone = tf.logical_or(tf.logical_and(marker >= 0xD0, marker <= 0xD7),
                                   marker == 0x01)
        is_sof = tf.reduce_any(marker[:, None] == sof[None, :], axis=1)
        segment_length = b[:, 2] * 256 + b[:, 3]
        needed = tf.where(is_sof, tf.constant(9, tf.int64),
                          tf.where(tf.logical_or(is_fill, standalone),
                                   tf.constant(2, tf.int64), tf.constant(4, tf.int64)))
        # Reaching a scan, the end of the image, a new start or a byte that is no
        # marker before any frame header means the header is corrupt.
        bad = tf.reduce_any(tf.stack([
            b[:, 0] != 0xFF, marker == 0x00, marker == 0xD8, marker == 0xD9, marker == 0xDA,
            pos + needed > length,
            tf.logical_and(tf.logical_not(tf.logical_or(is_fill, standalone)),
                           segment_length < 2)], axis=0), axis=0)
        active = tf.logical_not(done)
        failed = tf.logical_and(active, bad)
        found = tf.logical_and(tf.logical_and(active, tf.logical_not(bad)), is_sof)
        height = tf.where(found, b[:, 5] * 256 + b[:, 6], height)
        width = tf.where(found, b[:, 7] * 256 + b[:, 8], width)
        advance = tf.where(is_fill, tf.constant(1, tf.int64),
                           tf.where(standalone, tf.constant(2, tf.int64), 2 + segment_length))
        moving = tf.logical_and(active, tf.logical_not(tf.logical_or(failed, found)))
        pos = tf.where(moving, pos + advance, pos)
        return pos, tf.logical_or(done, tf.logical_or(failed, found)), height, width

    start = tf.fill([batch], tf.constant(2, tf.int64))  # just after the SOI marker
    _, _, height, width = tf.while_loop(
        lambda pos, done, *_: tf.logical_not(tf.reduce_all(done)), step,
        (start, tf.logical_not(is_jpeg), missing, missing),
        maximum_iterations=JPEG_MAX_MARKERS)
    return height, width


def decode_images(image_bytes: tf.Tensor, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                  input_name: str = BYTES_INPUT) -> tuple[tf.Tensor, tf.Tensor]:
    """Checks and decodes a batch of JPEG/PNG images of any sizes into one tensor.

    Every check happens before decoding, in this order, and the first failing image
    raises `InvalidArgumentError("<input_name>[i] <problem>")`: an empty batch, empty
    bytes, neither JPEG nor PNG, a corrupt or truncated header, a zero size, more than
    `max_image_pixels` pixels; then data that does not decode.

    Args:
      image_bytes: string `[B]`.
      max_image_pixels: the largest accepted height x width.
      input_name: how messages call the input.

    Returns:
      (images uint8 `[B, H, W, 3]` RGB, each image at the top-left and zeros beyond
       its size, H and W the largest in the batch; sizes int32 `[B, 2]`).
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    batch = tf.shape(image_bytes)[0]
    formats, height, width = read_image_headers(image_bytes)
    length = tf.strings.length(image_bytes)
    pixels = height * width
    sizes_text = _sizes_text(height, width)
    problems = [  # (failed [B], message [B]); the first failing check is reported.
        (length == 0, _message(input_name, batch, "is empty (0 bytes)")),
        (formats == FORMAT_UNKNOWN, _message(
            input_name, batch, "is neither a JPEG nor a PNG image (unsupported format or "
            "corrupt data; first bytes: ", _hex_prefix(image_bytes), ")")),
        (height < 0, _message(input_name, batch, "has a corrupt or truncated ",
                              _format_name(formats), " header")),
        (pixels == 0, _message(input_name, batch, "has a zero size (", sizes_text, ")")),
        (pixels > max_image_pixels, _message(
            input_name, batch, "is too large: ", sizes_text, " = ", tf.strings.as_string(pixels),
            f" pixels, over max_image_pixels={max_image_pixels}")),
    ]
    checks = [tf.debugging.Assert(batch > 0, [
        f"{input_name} holds no images: send a batch of at least one"])]
    checks.append(_assert_first_ok(problems))
    with tf.control_dependencies(checks):
        image_bytes = tf.identity(image_bytes)

    def decode(index, data, image_format):
        image = tf.cond(image_format == FORMAT_PNG,
                        lambda: tf.io.decode_png(data, channels=3),
                        lambda: tf.io.decode_jpeg(data, channels=3))
        return index, image, tf.shape(image)[:2]

    # tf.data is the one graph construct that can skip a failing op (ignore_errors), so
    # an image that does not decode is found by its missing index rather than failing
    # the request with a message that cannot say which image it was. When every image
    # fails there is no batch: the empty one after it is taken instead. (Dataset.reduce
    # would do the same but costs ~10 ms more per request.)
    decoded = (tf.data.Dataset.from_tensor_slices((tf.range(batch), image_bytes, formats))
               .map(decode).ignore_errors().padded_batch(tf.cast(batch, tf.int64)))
    nothing = tf.data.Dataset.from_tensors(
        (tf.zeros([0], tf.int32), tf.zeros([0, 0, 0, 3], tf.uint8), tf.zeros([0, 2], tf.int32)))
    indices, images, sizes = decoded.concatenate(nothing).take(1).get_single_element()
    arrived = tf.reduce_any(tf.range(batch)[:, None] == indices[None, :], axis=1)
    check = _assert_first_ok([(tf.logical_not(arrived), _message(
        input_name, batch, "could not be decoded: corrupt or truncated ", _format_name(formats),
        " data"))])
    with tf.control_dependencies([check]):
        return tf.identity(images), tf.identity(sizes)


def check_image_tensor(images: tf.Tensor, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       input_name: str = IMAGES_INPUT) -> tf.Tensor:
    """`images [B, H, W, 3]` with the checks of `decode_images` that apply to pixels."""
    shape = tf.shape(images, out_type=tf.int64)
    size_text = tf.strings.join([tf.strings.as_string(shape[1]), "x",
                                 tf.strings.as_string(shape[2])])
    checks = [
        tf.debugging.Assert(shape[0] > 0, [
            f"{input_name} holds no images: send a batch of at least one"]),
        tf.debugging.Assert(shape[1] * shape[2] > 0, [
            tf.strings.join([f"{input_name} have a zero size (", size_text, ")"])]),
        tf.debugging.Assert(shape[1] * shape[2] <= max_image_pixels, [tf.strings.join([
            f"{input_name} are too large: ", size_text, " = ",
            tf.strings.as_string(shape[1] * shape[2]),
            f" pixels, over max_image_pixels={max_image_pixels}"])]),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(images)


def _message(input_name: str, batch: tf.Tensor, *parts) -> tf.Tensor:
    """Per-image messages `"<input_name>[i] <parts>"`; parts are strings or string `[B]`."""
    index = tf.strings.as_string(tf.range(batch))
    return tf.strings.join([f"{input_name}[", index, "] ", *parts])


def _assert_first_ok(problems: Sequence[tuple[tf.Tensor, tf.Tensor]]) -> tf.Operation:
    """Asserts no problem holds; the message is that of the first failing image.

    For that image, the first of its failing checks in `problems` order is reported.
    """
    failed = tf.stack([f for f, _ in problems], axis=0)  # [P, B]
    messages = tf.stack([m for _, m in problems], axis=0)  # [P, B]
    any_failed = tf.reduce_any(failed, axis=0)
    count = tf.shape(any_failed)[0]
    first_image = tf.reduce_min(tf.where(any_failed, tf.range(count), count))
    image = tf.minimum(first_image, tf.maximum(count - 1, 0))
    num_problems = len(problems)
    # tf.argmax does not promise the lowest index on ties. Clipped, as `image` is, so
    # that the message can be built (and ignored) when nothing failed.
    first_problem = tf.reduce_min(
        tf.where(failed[:, image], tf.range(num_problems), num_problems - 1))
    message = tf.cond(count > 0, lambda: messages[first_problem, image], lambda: "")
    return tf.debugging.Assert(tf.logical_not(tf.reduce_any(any_failed)), [message])


def _format_name(formats: tf.Tensor) -> tf.Tensor:
    return tf.gather(tf.constant(_FORMAT_NAMES), formats)


def _sizes_text(height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    return tf.strings.join([tf.strings.as_string(height), "x", tf.strings.as_string(width)])


def _hex_prefix(image_bytes: tf.Tensor, count: int = 8) -> tf.Tensor:
    """The first `count` bytes of each string as hex, to help tell what was sent."""
    digits = tf.constant(list("0123456789abcdef"))
    head = tf.strings.substr(image_bytes, 0, count)
    raw = tf.cast(tf.io.decode_raw(head, tf.uint8, fixed_length=count), tf.int32)
    shown = tf.sequence_mask(tf.minimum(tf.strings.length(image_bytes), count), count)
    pairs = tf.strings.join([tf.gather(digits, raw // 16), tf.gather(digits, raw % 16)])
    pairs = tf.where(shown, pairs, "")
    return tf.strings.reduce_join(pairs, axis=1)


# --------------------------------------------------------------------------------------
# The serving computation.


def detect(model: keras.Model | Callable, images: tf.Tensor, sizes: tf.Tensor,
           config: inference.InferenceConfig, same_size: bool = False
           ) -> dict[str, tf.Tensor]:
    """Detections for a batch of images padded to a common size.

    When all images have the same size the network runs on the batch at once;
    otherwise it runs on each image at its own size (so that results never depend on
    the other images of a request) and the outputs are padded to the batch's size.

    Args:
      model: a model from `build_model`, or `predictor.network_function(model)`.
      images: `[B, H, W, 3]` RGB, each image at the top-left.
      sizes: int32 `[B, 2]`, each image's (height, width) within `images`.
      config: the inference settings.
      same_size: the caller guarantees every size is (H, W): skips the check.

    Returns:
      The serving outputs (module docstring), `detection_masks` as uint8.
    """
    if same_size:
        detections = _detect_together(model, images, config)
    else:
        detections = tf.cond(tf.reduce_all(sizes == sizes[:1]),
                             lambda: _detect_together(model, images, config),
                             lambda: _detect_one_by_one(model, images, sizes, config))
    detections["instance_map_png_bytes"] = tf.map_fn(
        _encode_instance_png, (detections["instance_map"], sizes),
        fn_output_signature=tf.TensorSpec([], tf.string))
    detections["image_size"] = sizes
    return detections


def _detect_together(model, images, config):
    outputs = predictor.predict_images(model, images, config)
    outputs = {key: outputs[key] for key in _DETECTION_KEYS}
    outputs["detection_masks"] = tf.cast(outputs["detection_masks"], tf.uint8)
    return outputs


def _detect_one_by_one(model, images, sizes, config):
    batch = tf.shape(images)[0]
    full_size = tf.shape(images)[1:3]
    arrays = {key: tf.TensorArray(dtype, size=batch, element_shape=shape) for key, dtype, shape
              in (("num_detections", tf.int32, []),
                  ("detection_masks", tf.uint8, [config.num_seeds, None, None]),
                  ("detection_classes", tf.int32, [config.num_seeds]),
                  ("detection_scores", tf.float32, [config.num_seeds]),
                  ("instance_map", tf.int32, [None, None]))}

    def step(i, arrays):
        size = sizes[i]
        outputs = _detect_together(model, images[i:i + 1, :size[0], :size[1]], config)
        pad = full_size - size
        outputs["detection_masks"] = tf.pad(outputs["detection_masks"],
                                            [[0, 0], [0, 0], [0, pad[0]], [0, pad[1]]])
        outputs["instance_map"] = tf.pad(outputs["instance_map"],
                                         [[0, 0], [0, pad[0]], [0, pad[1]]])
        return i + 1, {key: arrays[key].write(i, outputs[key][0]) for key in arrays}

    _, arrays = tf.while_loop(lambda i, _: i < batch, step, (tf.constant(0), arrays))
    return {key: array.stack() for key, array in arrays.items()}


def _encode_instance_png(args) -> tf.Tensor:
    instance_map, size = args
    crop = instance_map[:size[0], :size[1], None]
    return tf.io.encode_png(tf.cast(crop, tf.uint16))


class ServingFunctions:
    """The signatures' `tf.function`s for one model and its export-time settings.

    Attributes:
      serving_default: `image_bytes` string `[B]` -> `DENSE_OUTPUTS`.
      serving_compact: `image_bytes` string `[B]` -> `COMPACT_OUTPUTS`.
      serving_images: `images` uint8 `[B, H, W, 3]` -> `DENSE_OUTPUTS`.
    """

    def __init__(self, model: keras.Model, config: inference.InferenceConfig,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        network = predictor.network_function(model)

        # Explicit tf ops everywhere: ExportArchive traces without AutoGraph anyway.
        @tf.function(autograph=False)
        def from_bytes(image_bytes):
            images, sizes = decode_images(image_bytes, max_image_pixels, BYTES_INPUT)
            return detect(network, images, sizes, config)

        @tf.function(autograph=False)
        def serving_default(image_bytes):
            outputs = from_bytes(image_bytes)
            return {key: outputs[key] for key in DENSE_OUTPUTS}

        @tf.function(autograph=False)
        def serving_compact(image_bytes):
            outputs = from_bytes(image_bytes)
            return {key: outputs[key] for key in COMPACT_OUTPUTS}

        @tf.function(autograph=False)
        def serving_images(images):
            images = check_image_tensor(images, max_image_pixels, IMAGES_INPUT)
            shape = tf.shape(images)
            sizes = tf.tile(shape[None, 1:3], [shape[0], 1])
            outputs = detect(network, images, sizes, config, same_size=True)
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


# --------------------------------------------------------------------------------------
# Writing and reading SavedModels.


def export_saved_model(model: keras.Model, experiment_config: configs.ExperimentConfig,
                       export_dir: str, export_config: ExportConfig | None = None,
                       checkpoint_path: str | None = None) -> str:
    """Writes `model` as `export_dir/<version>/` for TF Serving.

    Args:
      model: a model built from `experiment_config.model`, with trained weights.
      experiment_config: the run's configuration (inference defaults, class names).
      export_dir: the versions' parent directory (TF Serving's `--model_base_path`).
      export_config: version and inference overrides (default: `ExportConfig()`).
      checkpoint_path: recorded in `export_info.json` when given.

    Returns:
      The version directory written.

    Raises:
      FileExistsError: the version exists and `export_config.overwrite` is False.
      ValueError: inconsistent settings (taus count, class names count, ...).
    """
    export_config = export_config or ExportConfig()
    inference_config = export_config.inference_config(experiment_config.inference)
    num_taus = len(experiment_config.model.taus)
    if len(inference_config.taus) != num_taus:
        raise ValueError(
            f"taus={inference_config.taus}: the model's classification head has {num_taus} "
            f"slices (model.taus={experiment_config.model.taus}); give {num_taus} values")
    names = _class_names(experiment_config, export_config)

    os.makedirs(export_dir, exist_ok=True)
    version = export_config.version or next_version(export_dir)
    final_path = os.path.join(export_dir, str(version))
    if os.path.exists(final_path) and not export_config.overwrite:
        raise FileExistsError(f"{final_path} exists: choose another version, or overwrite")

    archive = keras.export.ExportArchive()
    archive.track(model)
    functions = ServingFunctions(model, inference_config, export_config.max_image_pixels)
    for name, (fn, spec) in functions.signatures().items():
        archive.add_endpoint(name, fn, input_signature=spec)

    # A name that is not an integer, so TF Serving skips it until the rename.
    tmp_path = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        archive.write_out(tmp_path, verbose=False)
        _write_assets_extra(tmp_path, names, experiment_config, inference_config,
                            export_config, checkpoint_path)
        # mkdtemp made it private; a server running as another user must read it.
        os.chmod(tmp_path, 0o777 & ~_umask())
        if os.path.exists(final_path):
            shutil.rmtree(final_path)
        os.rename(tmp_path, final_path)
    finally:
        if os.path.exists(tmp_path):
            shutil.rmtree(tmp_path, ignore_errors=True)
    return final_path


def export_from_model_dir(model_dir: str, export_dir: str | None = None,
                          export_config: ExportConfig | None = None) -> str:
    """Exports the latest checkpoint of a run (see `export_saved_model`).

    Args:
      model_dir: a run directory written by `train_main` (`config.json`, `ckpt/`).
      export_dir: where versions go; default `model_dir/export`.
      export_config: version and inference overrides.

    Returns:
      The version directory written.

    Raises:
      FileNotFoundError: naming the directory, when it has no config or checkpoint.
    """
    from instance_embed import checkpoints  # Builds models: only needed here.

    model, experiment_config, path = checkpoints.restore_model(model_dir)
    return export_saved_model(model, experiment_config,
                              export_dir or os.path.join(model_dir, "export"),
                              export_config, checkpoint_path=path)


def next_version(export_dir: str) -> int:
    """One more than the highest integer-named directory in `export_dir` (1 if none)."""
    return max(_versions(export_dir), default=0) + 1


def resolve_saved_model_dir(path: str) -> str:
    """A SavedModel directory: `path` itself, or its highest version directory.

    Raises:
      FileNotFoundError: naming `path`, when neither holds a `saved_model.pb`.
    """
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for version in sorted(_versions(path), reverse=True):
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
                   ) -> tuple[Callable[..., dict[str, tf.Tensor]], str]:
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
    return _Signature(loaded, signature), path


class _Signature:
    """Calls a loaded signature with its one input; holds the loaded model alive."""

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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _versions(export_dir: str) -> list[int]:
    if not os.path.isdir(export_dir):
        return []
    return [int(name) for name in os.listdir(export_dir)
            if name.isdigit() and os.path.isdir(os.path.join(export_dir, name))]


def _class_names(experiment_config: configs.ExperimentConfig,
                 export_config: ExportConfig) -> list[str]:
    num_classes = experiment_config.model.num_classes
    if export_config.class_names is not None:
        names = list(export_config.class_names)
    else:
        from instance_embed import data as datasets

        names = datasets.class_names(experiment_config.dataset.name,
                                     experiment_config.dataset.builder_config)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for a model with "
                         f"num_classes={num_classes}: give ExportConfig.class_names")
    return names


def _write_assets_extra(path: str, class_names: Sequence[str],
                        experiment_config: configs.ExperimentConfig,
                        inference_config: inference.InferenceConfig,
                        export_config: ExportConfig, checkpoint_path: str | None) -> None:
    extra = os.path.join(path, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, CLASS_NAMES_FILENAME), "w", encoding="utf-8") as f:
        f.writelines(f"{name}\n" for name in class_names)
    info = {
        "class_names": list(class_names),
        "signatures": {SERVING_DEFAULT: [BYTES_INPUT, list(DENSE_OUTPUTS)],
                       SERVING_IMAGES: [IMAGES_INPUT, list(DENSE_OUTPUTS)],
                       SERVING_COMPACT: [BYTES_INPUT, list(COMPACT_OUTPUTS)]},
        "inference": dataclasses.asdict(inference_config),
        "max_image_pixels": export_config.max_image_pixels,
        "checkpoint": checkpoint_path,
        "experiment": dataclasses.asdict(experiment_config),
    }
    with open(os.path.join(extra, EXPORT_INFO_FILENAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
