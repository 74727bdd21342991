"""Encoded images in, uint8 pixels out: checks with errors that name the image.

`decode_images` checks a batch of JPEG/PNG files from their headers alone (format,
size, the pixel limit), then decodes them into one tensor, each image at the top-left.
Any problem fails the call with `InvalidArgumentError("<input>[i] <problem>")`, naming
the image's index in the batch; a server answers that request with an error and keeps
serving. `check_image_tensor` applies the same limits to a uint8 tensor.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096

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
    # would do the same but is slower per request.)
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
