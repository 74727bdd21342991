"""The network and the paper's inference as one function: images in, instances out.

`predict_images(model, images, taus, config)` takes a batch of RGB images of any size,
pads them at the bottom and right to a multiple of 32 (the model's largest stride), runs
the network and `predict_instances`, and crops every full-resolution output back to the
input size. Heads-resolution pixels that lie wholly in the padding cannot seed
(`predict_instances`' `valid_pixels`; their classification is also forced to
background), so no detection comes from outside the image: an image with fewer heads
pixels than `num_seeds` (a 1 x 1 image has one) gets invalid detections for the rest.
`make_predict_fn` wraps it in a `tf.function`. `taus` are always the model's
(`ModelConfig.taus`).

The same computation serves evaluation, training summaries, the SavedModel's
signatures (`serving`) and `predict_main` (through the SavedModel).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import keras
import tensorflow as tf

from instance_embed.inference.config import InferenceConfig
from instance_embed.inference.detections import draw_detections
from instance_embed.inference.detections import select_detections

PAD_MULTIPLE = 32
# Forces background where the heads look at padding: softmax(.)[0] == 1 in float32.
_PADDING_LOGIT = 1e4


def pad_images(images: tf.Tensor, multiple: int = PAD_MULTIPLE) -> tf.Tensor:
    """`[B, H, W, 3]` -> float32 `[B, Hp, Wp, 3]`, zero-padded to multiples of `multiple`."""
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    padded = -(-shape[1:3] // multiple) * multiple
    return tf.pad(images, [[0, 0], [0, padded[0] - shape[1]], [0, padded[1] - shape[2]],
                           [0, 0]])


def pixels_inside_image(heads_size: tf.Tensor, image_size: tf.Tensor,
                        padded_size: tf.Tensor) -> tf.Tensor:
    """bool `[h, w]`: the heads pixels that see some of the image, not only padding.

    Args:
      heads_size: int32 `[2]`, (h, w) of the heads for the padded input.
      image_size: int32 `[2]`, the unpadded (H, W).
      padded_size: int32 `[2]`, (Hp, Wp).
    """
    # A heads pixel covers input rows [i * stride, (i + 1) * stride): it sees the image
    # when i * stride < H.
    stride = padded_size // heads_size
    rows = tf.range(heads_size[0]) * stride[0] < image_size[0]
    cols = tf.range(heads_size[1]) * stride[1] < image_size[1]
    return tf.logical_and(rows[:, None], cols[None, :])


def mask_padding_logits(class_logits: tf.Tensor, image_size: tf.Tensor,
                        padded_size: tf.Tensor) -> tf.Tensor:
    """Makes heads pixels that only cover padding predict background with certainty.

    Args:
      class_logits: `[B, h, w, T, C + 1]` for a padded input of `padded_size`.
      image_size: int32 `[2]`, the unpadded (H, W).
      padded_size: int32 `[2]`, (Hp, Wp).

    Returns:
      `[B, h, w, T, C + 1]`.
    """
    inside = pixels_inside_image(tf.shape(class_logits)[1:3], image_size, padded_size)
    inside = inside[None, :, :, None, None]
    num_classes = tf.shape(class_logits)[-1]
    background = tf.one_hot(0, num_classes, on_value=_PADDING_LOGIT,
                            off_value=-_PADDING_LOGIT, dtype=class_logits.dtype)
    return tf.where(inside, class_logits, background)


def network_function(model: keras.Model) -> tf.types.experimental.PolymorphicFunction:
    """`model` in inference mode as a `tf.function` over float32 `[B, H, W, 3]` images.

    Traced once for any batch and image size, so functions that call the network in
    several places (the SavedModel signatures) hold one copy of its graph, not one per
    call site.
    """

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)],
                 autograph=False)
    def network(images):
        return model(images, training=False)

    return network


def predict_images(model, images: tf.Tensor, taus: Sequence[float],
                   config: InferenceConfig, dense_masks: bool = True,
                   mask_dtype: tf.DType = tf.bool) -> dict[str, tf.Tensor]:
    """Runs the network and the paper's inference on a batch of same-size images.

    Plain TensorFlow ops: call it eagerly, or inside any `tf.function` (the SavedModel
    signatures do).

    Args:
      model: a model from `build_model`, or `network_function(model)`.
      images: `[B, H, W, 3]` RGB, uint8 or float in [0, 255], any H, W >= 1.
      taus: the model's similarity thresholds (`ModelConfig.taus`).
      config: the inference settings.
      dense_masks: whether to return `detection_masks` (the boxes and the instance
        map do not need them).
      mask_dtype: their dtype, tf.bool or tf.uint8.

    Returns:
      `predict_instances`' outputs at the input resolution
      (`num_detections [B]`, `detection_masks` `[B, K, H, W]`, `detection_boxes
      [B, K, 4]` in pixels, `detection_classes [B, K]`, `detection_scores [B, K]`,
      `detection_taus [B, K]`, `seed_indices [B, K]`, `instance_map [B, H, W]`) plus
      the heads' `embeddings [B, h, w, d]` and `class_probs [B, h, w, T, C + 1]` of the
      padded input.
    """
    image_size = tf.shape(images)[1:3]
    padded = pad_images(images)
    outputs = run_network(model, padded, config.flip_tta)
    return predict_from_outputs(outputs, image_size, tf.shape(padded)[1:3], taus, config,
                                padded, dense_masks, mask_dtype)


def run_network(model, padded: tf.Tensor, flip_tta: bool = False) -> dict[str, tf.Tensor]:
    """The network's `embeddings` and `class_logits` for padded images `[B, Hp, Wp, 3]`.

    Args:
      model: a model from `build_model` (run in inference mode), or
        `network_function(model)`.
      padded: images padded by `pad_images`.
      flip_tta: also run the mirrored images, in the same batch, and return the
        flip-averaged class maps (`InferenceConfig.flip_tta`).
    """
    network = (lambda x: model(x, training=False)) if isinstance(model, keras.Model) else model
    if not flip_tta:
        outputs = network(padded)
        return {"embeddings": outputs["embeddings"], "class_logits": outputs["class_logits"]}
    batch = tf.shape(padded)[0]
    both = network(tf.concat([padded, tf.reverse(padded, axis=[2])], axis=0))
    return {"embeddings": both["embeddings"][:batch],
            "class_logits": mirror_averaged_logits(both["class_logits"], batch)}


def mirror_averaged_logits(class_logits: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """Flip test-time augmentation of the class maps (`InferenceConfig.flip_tta`).

    Args:
      class_logits: `[2B, h, w, T, C + 1]`, the images' then their mirrors'.
      batch: B.

    Returns:
      float32 `[B, h, w, T, C + 1]` logits whose softmax is the mean of the image's
      class probabilities and its mirror's flipped back.
    """
    probs = tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)
    mean = (probs[:batch] + tf.reverse(probs[batch:], axis=[2])) / 2
    return tf.math.log(tf.maximum(mean, 1e-30))


def predict_from_outputs(network_outputs: Mapping[str, tf.Tensor], image_size: tf.Tensor,
                         padded_size: tf.Tensor, taus: Sequence[float],
                         config: InferenceConfig,
                         padded_images: tf.Tensor | None = None, dense_masks: bool = True,
                         mask_dtype: tf.DType = tf.bool) -> dict[str, tf.Tensor]:
    """The paper's inference on the network's outputs for images padded by `pad_images`.

    Split from `predict_images` so that inference settings can be varied on stored
    network outputs (see `experiments/inference_ablations.py`).

    Args:
      network_outputs: `embeddings [B, h, w, d]` and `class_logits [B, h, w, T, C + 1]`.
      image_size: int32 [2], the images' (H, W) before padding.
      padded_size: int32 [2], the padded (Hp, Wp) the network saw.
      taus: the model's similarity thresholds.
      config: the inference settings.
      padded_images: `[B, Hp, Wp, 3]`, the images as the network saw them (needed by
        `config.mask_upsampling="joint_bilateral"`, which draws mask boundaries along
        their colour edges).
      dense_masks, mask_dtype: as for `predict_images`.

    Returns:
      As `predict_images`.
    """
    logits = mask_padding_logits(tf.cast(network_outputs["class_logits"], tf.float32),
                                 image_size, padded_size)
    embeddings = tf.cast(network_outputs["embeddings"], tf.float32)
    shape = tf.shape(embeddings)
    inside = pixels_inside_image(shape[1:3], image_size, padded_size)
    valid_pixels = tf.broadcast_to(inside[None], shape[:3])
    if config.jit_compile:
        compiled = _compiled_select_detections(tuple(float(t) for t in taus),
                                               dataclasses.astuple(config))
        selected = compiled(embeddings, logits, valid_pixels)
    else:
        selected = select_detections(embeddings, logits, taus, config, valid_pixels)
    detections = draw_detections(selected, padded_size, config, padded_images,
                                 crop_size=image_size, dense_masks=dense_masks,
                                 mask_dtype=mask_dtype)
    detections["embeddings"] = embeddings
    detections["class_probs"] = tf.nn.softmax(logits, axis=-1)
    return detections


@functools.lru_cache(maxsize=None)
def _compiled_select_detections(taus: tuple, config_fields: tuple):
    """`select_detections` under XLA for one set of taus and `InferenceConfig` fields.

    One `tf.function` per setting, so that XLA's compilation cache (keyed by function
    and input shapes) is reused across calls.
    """
    config = InferenceConfig(*config_fields)

    @tf.function(jit_compile=True, autograph=False)
    def compiled(embeddings, logits, valid_pixels):
        return select_detections(embeddings, logits, taus, config, valid_pixels)

    return compiled


def make_predict_fn(model: keras.Model, taus: Sequence[float], config: InferenceConfig):
    """Returns `predict(images) -> dict`, `predict_images` as a `tf.function`.

    `images` is `[B, H, W, 3]` (uint8 or float, RGB); the dict holds
    `predict_instances`' outputs at the input resolution
    (`detection_masks [B, K, H, W]`, `instance_map [B, H, W]`, ...) plus the heads'
    `embeddings [B, h, w, d]` and `class_probs [B, h, w, T, C + 1]` of the padded input.
    `config.jit_compile` compiles the heads-resolution part with XLA.
    """

    @tf.function(reduce_retracing=True)
    def predict(images):
        return predict_images(model, images, taus, config)

    return predict
