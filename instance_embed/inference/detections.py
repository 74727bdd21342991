"""From pixel embeddings and mask classes to instance masks (paper sections 3.3-3.4).

The network gives, at the heads' resolution `[h, w]`, an embedding `e_p` per pixel and,
for each similarity threshold tau, the probability `C[p, tau, c]` that the mask grown
from `p` at tau is an instance of class `c` (0 = a bad seed). Inference is:

1. seediness `S_p = max over tau, max over c >= 1 of C[p, tau, c]` (`ops.seeds.seediness`);
2. greedy seeds, `p_t = argmax log S_p + alpha * log D(p)` with `D` the squared
   embedding distance to the nearest chosen seed (`ops.seeds.select_seeds`);
3. per seed, `(tau, c) = argmax C[p, tau, c]` over foreground classes, score = that
   probability (`ops.masks.seed_classes_and_scores`);
4. per seed, the mask `{q : sigma(p, q) >= tau}` with `sigma = 2 / (1 + exp(d2))`,
   i.e. `d2 <= log(2 / tau - 1)`, for all seeds at once as one matrix product
   (`ops.masks.grow_masks`);
5. `heads_resolution_detections` runs steps 1-4 (sharing the centred embeddings between
   seed selection and mask growing) and sorts the detections by score;
   `select_detections` optionally drops low scores and near-duplicate masks;
   `draw_detections` brings the kept masks to the input resolution with their boxes
   and the instance map (`ops.upsampling`); `predict_instances` is the two in one.

Everything is TensorFlow ops on batched tensors with a static number of seeds K, so it
runs eagerly and inside `tf.function` (unknown batch and image sizes included);
`select_detections` also under `jit_compile=True`. Seeds that do not exist (K larger
than h * w, see `select_seeds`) are carried as index -1 and produce empty, invalid
detections rather than an error, so the output shapes never depend on the image size.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from instance_embed.inference.config import InferenceConfig
from instance_embed.ops import checks
from instance_embed.ops import geometry
from instance_embed.ops import bilateral
from instance_embed.ops import upsampling
from instance_embed.ops.masks import descending_order
from instance_embed.ops.masks import grow_masks_from_geometry
from instance_embed.ops.masks import seed_classes_and_scores
from instance_embed.ops.masks import suppress_duplicates
from instance_embed.ops.seeds import graph_ready
from instance_embed.ops.seeds import seediness
from instance_embed.ops.seeds import select_seeds_from_geometry


@graph_ready
def heads_resolution_detections(embeddings: tf.Tensor, class_probs: tf.Tensor,
                                taus: Sequence[float],
                                config: InferenceConfig | None = None,
                                valid_pixels: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """The paper's inference at the heads' resolution: steps 1-4 of this module.

    `seediness`, `select_seeds`, `seed_classes_and_scores` and `grow_masks` in one call
    (the centred embeddings and their norms are computed once for seed selection and
    mask growing), with the detections sorted by descending score (ties in seed order)
    and missing seeds (-1) last. `predict_instances` builds on it; this is also what
    benchmarks/postprocess.py times.

    Args:
      embeddings: float [batch, h, w, dim].
      class_probs: float [batch, h, w, num_taus, num_classes + 1], softmax over the last
        axis.
      taus: the model's similarity thresholds (`ModelConfig.taus`), one per slice of
        `class_probs`' axis 3, each in (0, 1].
      config: an `InferenceConfig` (num_seeds and alpha are used); the paper's
        defaults when None.
      valid_pixels: optional bool [batch, h, w], the pixels that may seed (see
        `select_seeds`).

    Returns:
      A dict of seed_indices int32 [batch, K] (-1: no seed), classes int32 [batch, K]
      (0 for no seed), scores float32 [batch, K], taus float32 [batch, K] (the tau each
      mask was grown with) and masks bool [batch, K, h, w].
    """
    config, taus, embeddings, class_probs = check_heads_outputs(
        config, taus, embeddings, class_probs, "class_probs")
    seed_map = seediness(class_probs)
    valid_pixels = checks.check_valid_pixels(valid_pixels, seed_map)

    pixels = geometry.pixel_geometry(embeddings)
    seeds = select_seeds_from_geometry(pixels, seed_map, config.num_seeds,
                                       tf.constant(config.alpha, tf.float32), valid_pixels)
    tau_index, classes, scores = seed_classes_and_scores(class_probs, seeds)
    seed_taus = tf.gather(tf.constant(taus, tf.float32), tau_index)
    # Score order first: the masks are then grown in it rather than gathered.
    order = descending_order(tf.where(seeds >= 0, scores, -1.0))
    seeds, classes, scores, seed_taus = (
        tf.gather(x, order, batch_dims=1) for x in (seeds, classes, scores, seed_taus))
    masks = grow_masks_from_geometry(pixels, tf.shape(embeddings)[1:3], seeds, seed_taus)
    return {"seed_indices": seeds, "classes": classes, "scores": scores, "taus": seed_taus,
            "masks": masks}


@graph_ready
def predict_instances(embeddings: tf.Tensor, class_logits: tf.Tensor,
                      image_size: Sequence[int] | tf.Tensor,
                      taus: Sequence[float],
                      config: InferenceConfig | None = None,
                      valid_pixels: tf.Tensor | None = None,
                      images: tf.Tensor | None = None,
                      crop_size: Sequence[int] | tf.Tensor | None = None,
                      dense_masks: bool = True,
                      mask_dtype: tf.DType = tf.bool) -> dict[str, tf.Tensor]:
    """Instance masks, classes and scores for a batch, at the input image's resolution.

    Seeds, classes, scores and masks are computed at the heads' resolution as in the
    paper (`heads_resolution_detections`). A pixel of the image is in a mask when the
    bilinear interpolation of the seed's heads-resolution 0/1 mask is >= 0.5
    (`ops.upsampling`), rather than resizing the embeddings: this needs no distance
    computation at full resolution, a pixel whose surrounding heads pixels agree on a
    mask gets that answer, and the boundary falls half-way between the centres of an
    inside and an outside heads pixel, i.e. on the edge of the stride cell, as the
    labels were sampled for training. (Resizing the signed margins instead shrinks every
    mask: the margin inside is at most log(2 / tau - 1) while outside it falls to minus
    the squared distance between instances, so the zero crossing sits next to the
    inside pixel.) The boxes and the instance map come from the heads-resolution masks
    (or from a few drawn masks when that is cheaper), so `dense_masks=False` skips the
    `[B, K, H, W]` output.

    Detections below `config.score_threshold`, suppressed as near-duplicates, or coming
    from a missing seed (-1, when K exceeds the pixels that may seed) are invalid: they
    are sorted after the valid ones, their masks are empty, their class, score and tau
    are 0 and their seed index is -1. Valid detections are sorted by descending score
    (ties keep seed order).

    Args:
      embeddings: float [batch, h, w, dim].
      class_logits: float [batch, h, w, num_taus, num_classes + 1]; softmax is applied
        here (contract 5 works on class_probs = softmax(class_logits)).
      image_size: (H, W), Python ints or an int tensor [2]: the input the heads cover,
        an integer multiple of (h, w) (the network's stride).
      taus: the model's similarity thresholds (`ModelConfig.taus`).
      config: an `InferenceConfig`; the paper's defaults when None.
      valid_pixels: optional bool [batch, h, w], the heads pixels that may seed a
        detection (see `select_seeds`); None: all.
      images: [batch, H, W, 3] RGB in [0, 255] at `image_size`; needed only by
        `config.mask_upsampling="joint_bilateral"`.
      crop_size: optional (H', W') <= (H, W): the outputs cover only the top-left
        (H', W') of the input (the image before `predictor.pad_images`); default
        `image_size`.
      dense_masks: whether to return `detection_masks`.
      mask_dtype: `detection_masks`' dtype, tf.bool or tf.uint8 (0/1, as served).

    Returns:
      A dict of
        num_detections: int32 [batch], the number of valid detections;
        detection_masks: [batch, K, H', W'] of `mask_dtype` (if `dense_masks`);
        detection_boxes: float32 [batch, K, 4], each mask's box in pixel edges
          (`ops.mask_boxes`), zeros when invalid;
        detection_classes: int32 [batch, K], 1..num_classes (0 when invalid);
        detection_scores: float32 [batch, K], descending;
        detection_taus: float32 [batch, K], the tau each mask was grown with;
        seed_indices: int32 [batch, K], flattened heads-resolution index of each seed;
        instance_map: int32 [batch, H', W'], for each pixel the 1-based index of the
          highest-scored mask covering it (the first in detection order), 0 elsewhere.
    """
    config, taus, embeddings, class_logits = check_heads_outputs(
        config, taus, embeddings, class_logits, "class_logits")
    detections = select_detections(embeddings, class_logits, taus, config, valid_pixels)
    return draw_detections(detections, image_size, config, images, crop_size, dense_masks,
                           mask_dtype)


@graph_ready
def select_detections(embeddings: tf.Tensor, class_logits: tf.Tensor,
                      taus: Sequence[float], config: InferenceConfig | None = None,
                      valid_pixels: tf.Tensor | None = None) -> dict[str, tf.Tensor]:
    """`predict_instances` up to the heads-resolution masks of the kept detections.

    The heads-resolution part, which `InferenceConfig.jit_compile` runs under XLA:
    `heads_resolution_detections`, then the score threshold, near-duplicate suppression
    and support rescoring, and the detections sorted with the kept ones first.

    Returns:
      A dict of keep bool [batch, K] (True before False), seed_indices, classes,
      scores, taus ([batch, K], 0 or -1 where not kept) and masks bool
      [batch, K, h, w] (empty where not kept).
    """
    config, taus, embeddings, class_logits = check_heads_outputs(
        config, taus, embeddings, class_logits, "class_logits")
    # In score order, so that suppression lets higher scores win; the detections below
    # the threshold then follow those above it.
    detections = heads_resolution_detections(
        embeddings, tf.nn.softmax(class_logits, axis=-1), taus, config, valid_pixels)
    seeds, scores, classes, seed_taus, low_res_masks = (
        detections[key] for key in ("seed_indices", "scores", "classes", "taus", "masks"))
    keep = tf.logical_and(seeds >= 0, scores >= config.score_threshold)
    if config.nms_iou_threshold is not None:
        keep, support = suppress_duplicates(low_res_masks, keep, config.nms_iou_threshold)
        if config.support_rescoring > 0:
            scores *= tf.minimum(1.0, tf.cast(support, tf.float32) / config.support_rescoring)
        order = descending_order(tf.where(keep, scores, -1.0))
        seeds, scores, classes, seed_taus, keep, low_res_masks = (
            tf.gather(x, order, batch_dims=1)
            for x in (seeds, scores, classes, seed_taus, keep, low_res_masks))
    return {"keep": keep,
            "seed_indices": tf.where(keep, seeds, -1),
            "classes": tf.where(keep, classes, 0),
            "scores": tf.where(keep, scores, 0.0),
            "taus": tf.where(keep, seed_taus, 0.0),
            "masks": tf.logical_and(low_res_masks, keep[:, :, None, None])}


@graph_ready
def draw_detections(detections: dict[str, tf.Tensor], image_size, config: InferenceConfig,
                    images: tf.Tensor | None = None, crop_size=None, dense_masks: bool = True,
                    mask_dtype: tf.DType = tf.bool) -> dict[str, tf.Tensor]:
    """`select_detections`' output at the image's resolution: `predict_instances`' dict.

    Plain TensorFlow ops, also under `InferenceConfig.jit_compile` (XLA's CPU gathers
    are several times slower than TF's here), with shapes that depend on how many
    detections were kept (so not inside a `jit_compile=True` function). Arguments as
    for `predict_instances`.
    """
    image_size = checks.check_image_size(image_size)
    if crop_size is None:
        crop_size = image_size
    else:
        crop_size = checks.check_image_size(crop_size, "crop_size")
        tf.debugging.assert_less_equal(crop_size, image_size,
                                       message="crop_size must be within image_size")
    if mask_dtype not in (tf.bool, tf.uint8):
        raise ValueError(f"mask_dtype must be tf.bool or tf.uint8, got {mask_dtype!r}")
    keep, low_res_masks = detections["keep"], detections["masks"]
    stride = upsampling.strides(tf.shape(low_res_masks)[2:4], image_size)
    # Work in proportion to the detections kept: only the first `drawn` slots of the
    # batch hold masks (kept ones sort first); the rest are padded with zeros. (At
    # least one, empty if need be: no zero-size loops.)
    num_slots = low_res_masks.shape[1]
    drawn = tf.maximum(tf.reduce_max(tf.reduce_sum(tf.cast(keep, tf.int32), axis=1)), 1)
    low_res_masks = low_res_masks[:, :drawn]
    outputs = {}
    if config.mask_upsampling == "joint_bilateral":
        if images is None:
            raise ValueError('InferenceConfig.mask_upsampling="joint_bilateral" needs the '
                             "images: pass images= to predict_instances")
        images = checks.as_float(images, "images", rank=4)
        tf.debugging.assert_equal(tf.shape(images)[1:3], image_size,
                                  message="images must have image_size (the padded size)")
        planes = bilateral.bilateral_planes(images, tf.shape(low_res_masks)[2:4],
                                            config.bilateral_sigma, crop_size)
        patterns = upsampling.dual_patterns(low_res_masks)
        masks = (bilateral.draw_masks(patterns, planes, crop_size, mask_dtype)
                 if dense_masks else None)
        outputs["detection_boxes"], outputs["instance_map"] = (
            bilateral.boxes_and_instance_map(patterns, planes, crop_size, masks))
        if dense_masks:
            outputs["detection_masks"] = masks
    else:
        codes = upsampling.cell_codes(low_res_masks)
        tables = upsampling.BilinearTables.build(stride, mask_dtype)
        outputs["detection_boxes"] = upsampling.boxes_from_codes(codes, tables, crop_size)
        if dense_masks:
            masks = upsampling.draw_masks(codes, tables, crop_size)
            outputs["detection_masks"] = masks
            outputs["instance_map"] = upsampling.instance_map_of_few(
                low_res_masks, stride, crop_size, masks)
        else:
            outputs["instance_map"] = upsampling.instance_map(low_res_masks, stride, crop_size)
    for key in ("detection_boxes", "detection_masks"):
        if key in outputs:
            value = outputs[key]
            padded = tf.pad(value, [[0, 0], [0, num_slots - drawn]]
                            + [[0, 0]] * (value.shape.rank - 2))
            padded.set_shape(value.shape[:1].concatenate([num_slots]).concatenate(
                value.shape[2:]))
            outputs[key] = padded
    return {
        "num_detections": tf.reduce_sum(tf.cast(detections["keep"], tf.int32), axis=-1),
        **outputs,
        "detection_classes": detections["classes"],
        "detection_scores": detections["scores"],
        "detection_taus": detections["taus"],
        "seed_indices": detections["seed_indices"],
    }


def check_heads_outputs(config, taus, embeddings, per_tau, per_tau_name: str):
    """(config, taus, embeddings, per_tau) checked: the paper's config when None; taus a
    tuple of numbers in (0, 1]; float embeddings [B, h, w, d] and class probabilities or
    logits [B, h, w, T, C+1] on the same grid, with one tau slice per tau."""
    config = config if config is not None else InferenceConfig()
    if not isinstance(config, InferenceConfig):
        raise TypeError(f"config must be an InferenceConfig, got {type(config).__name__}")
    if (isinstance(taus, (str, bytes)) or not isinstance(taus, Sequence) or not taus
            or not all(checks.is_real(t) and 0 < t <= 1 for t in taus)):
        raise ValueError(f"taus={taus!r}: must be a non-empty sequence of numbers in (0, 1]")
    taus = tuple(float(t) for t in taus)
    embeddings = checks.as_float(embeddings, "embeddings", rank=4)
    per_tau = checks.as_float(per_tau, per_tau_name, rank=5)
    checks.check_same_spatial(embeddings, "embeddings", per_tau, per_tau_name)
    num_taus = per_tau.shape[3]
    if num_taus is not None and num_taus != len(taus):
        raise ValueError(
            f"{per_tau_name} has {num_taus} tau slices but taus has {len(taus)} values "
            f"{taus}: they must be the model's ModelConfig.taus")
    return config, taus, embeddings, per_tau
