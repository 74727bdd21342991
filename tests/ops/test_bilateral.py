"""Joint bilateral mask upsampling (ops.bilateral) against the definition in NumPy."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from instance_embed import inference
from instance_embed.model.config import PAPER_TAUS as TAUS
from instance_embed.ops import masks
from instance_embed.ops import bilateral
from instance_embed.ops import upsampling


def np_joint_bilateral(mask, image, sigma):
    """mask bool [h, w], image [H, W, 3] (H = s h) -> (weighted vote [H, W], bool [H, W]).

    Written directly from the definition: for each pixel, its four surrounding cell
    centres on tf.image.resize's bilinear grid, each weighted by bilinear weight times
    exp(-||I(x) - cell mean||^2 / (2 sigma^2)), normalised; inside when the inside cells'
    weights sum to at least 0.5.
    """
    h, w = mask.shape
    height, width = image.shape[:2]
    s = height // h
    image = image.astype(np.float64)
    means = image.reshape(h, s, w, s, 3).mean(axis=(1, 3))
    vote = np.zeros((height, width))
    for y in range(height):
        sy = min(max((y + 0.5) * h / height - 0.5, 0.0), h - 1.0)
        y0 = int(np.floor(sy))
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for x in range(width):
            sx = min(max((x + 0.5) * w / width - 0.5, 0.0), w - 1.0)
            x0 = int(np.floor(sx))
            x1, fx = min(x0 + 1, w - 1), sx - x0
            cells = [(y0, x0, (1 - fy) * (1 - fx)), (y0, x1, (1 - fy) * fx),
                     (y1, x0, fy * (1 - fx)), (y1, x1, fy * fx)]
            weights = np.array([b * np.exp(-np.sum((image[y, x] - means[i, j]) ** 2)
                                           / (2 * sigma ** 2)) for i, j, b in cells])
            values = np.array([mask[i, j] for i, j, _ in cells], np.float64)
            vote[y, x] = (weights * values).sum() / weights.sum()
    return vote, vote >= 0.5


def _draw(mask, image, sigma):
    planes = bilateral.bilateral_planes(tf.constant(image[None], tf.float32), mask.shape, sigma)
    patterns = upsampling.dual_patterns(tf.constant(mask[None, None]))
    return bilateral.draw_masks(patterns, planes, tf.constant(image.shape[:2])).numpy()[0, 0]


@pytest.mark.parametrize("seed, stride, sigma", [(0, 4, 10.0), (1, 4, 40.0), (2, 8, 25.0),
                                                 (3, 2, 15.0), (4, 3, 20.0), (5, 1, 20.0)])
def test_drawn_mask_matches_the_definition(seed, stride, sigma):
    rng = np.random.default_rng(seed)
    h, w = 5, 7
    mask = rng.random((h, w)) < 0.5
    # Blocky colours with noise: pixels near some cell means and far from others.
    image = rng.uniform(0, 255, (h, w, 3)).repeat(stride, 0).repeat(stride, 1)
    image = np.roll(image, (stride // 2, stride // 3), axis=(0, 1))
    image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255)
    vote, expected = np_joint_bilateral(mask, image, sigma)
    got = _draw(mask, image, sigma)
    decided = np.abs(vote - 0.5) > 1e-4  # float32 and float64 may split exact ties
    assert decided.mean() > 0.9
    np.testing.assert_array_equal(got[decided], expected[decided])


def test_thin_bar_follows_the_colour_edge_not_the_cell_grid():
    # 16 x 16 image, stride 4: a bright bar on columns 5-6 of a dark background. At the
    # heads' resolution only cell column 1 (image columns 4-7) holds it.
    image = np.full((16, 16, 3), 30.0)
    image[:, 5:7] = 230.0
    mask = np.zeros((4, 4), bool)
    mask[:, 1] = True
    bar = np.zeros((16, 16), bool)
    bar[:, 5:7] = True
    joint = _draw(mask, image, 10.0)
    np.testing.assert_array_equal(joint, bar)
    # The bilinear masks fill the whole stride cell: IoU 0.5 with the bar.
    bilinear = _draw(mask, image, 1e9)
    np.testing.assert_array_equal(bilinear, np.repeat(mask, 4, 0).repeat(4, 1))


def _clustered(rng, batch=2, h=8, w=10, d=6):
    labels = rng.integers(0, 3, (batch, h, w))
    centres = rng.normal(size=(batch, 3, d)) * 3.0
    embeddings = np.take_along_axis(centres, labels.reshape(batch, -1, 1), 1)
    embeddings = embeddings.reshape(batch, h, w, d) + 0.05 * rng.normal(size=(batch, h, w, d))
    logits = 2.0 * rng.normal(size=(batch, h, w, 4, 3))
    return embeddings.astype(np.float32), logits.astype(np.float32)


def test_infinite_sigma_gives_the_bilinear_masks():
    rng = np.random.default_rng(5)
    embeddings, logits = _clustered(rng)
    images = rng.uniform(0, 255, (2, 32, 40, 3)).astype(np.float32)
    bilinear = inference.predict_instances(
        embeddings, logits, (32, 40), TAUS, inference.InferenceConfig(num_seeds=12))
    joint = inference.predict_instances(
        embeddings, logits, (32, 40),
        TAUS, inference.InferenceConfig(num_seeds=12, mask_upsampling="joint_bilateral",
                                  bilateral_sigma=1e30), images=images)
    for key in bilinear:
        np.testing.assert_array_equal(joint[key].numpy(), bilinear[key].numpy(), err_msg=key)


def test_joint_bilateral_predictions_plain_jit_and_batched_agree():
    rng = np.random.default_rng(6)
    embeddings, logits = _clustered(rng)
    images = rng.uniform(0, 255, (2, 32, 40, 3)).astype(np.float32)
    config = inference.InferenceConfig(num_seeds=12, nms_iou_threshold=0.5,
                                       mask_upsampling="joint_bilateral", bilateral_sigma=30.0)

    def run(e, l, i):
        return inference.predict_instances(e, l, (32, 40), TAUS, config, images=i)

    plain = {k: v.numpy() for k, v in tf.function(run)(embeddings, logits, images).items()}
    # InferenceConfig.jit_compile: the heads-resolution part under XLA.
    size = tf.constant([32, 40])
    jitted = inference.predict_from_outputs(
        {"embeddings": embeddings, "class_logits": logits}, size, size, TAUS,
        dataclasses.replace(config, jit_compile=True), images)
    for key, value in plain.items():
        np.testing.assert_allclose(jitted[key].numpy(), value, rtol=1e-5, atol=1e-6,
                                   err_msg=key)
    one = run(embeddings[1:], logits[1:], images[1:])
    for key, value in plain.items():
        np.testing.assert_array_equal(one[key].numpy()[0], value[1], err_msg=key)
    # Each kept mask, drawn alone from its heads-resolution mask, is the reference's.
    heads_masks = masks.grow_masks(embeddings, plain["seed_indices"],
                                   np.maximum(plain["detection_taus"], 0.25)).numpy()
    for b in range(2):
        for k in range(int(plain["num_detections"][b])):
            vote, expected = np_joint_bilateral(heads_masks[b, k], images[b], 30.0)
            decided = np.abs(vote - 0.5) > 1e-4
            np.testing.assert_array_equal(plain["detection_masks"][b, k][decided],
                                          expected[decided])


def test_predictor_passes_the_padded_images():
    # Through inference.predict_images the images are padded to a multiple of 32 and the
    # masks come back cropped: each equals the reference drawn on the padded image from
    # the detection's heads-resolution mask, then cropped.
    rng = np.random.default_rng(7)
    image = rng.uniform(0, 255, (1, 40, 50, 3)).astype(np.float32)
    embeddings, logits = _clustered(rng, batch=1, h=16, w=16)

    def network(padded):
        assert tuple(padded.shape[1:3]) == (64, 64)
        return {"embeddings": embeddings, "class_logits": logits}

    config = inference.InferenceConfig(num_seeds=5, mask_upsampling="joint_bilateral")
    got = {k: v.numpy() for k, v in
           inference.predict_images(network, tf.constant(image), TAUS, config).items()}
    padded = inference.pad_images(tf.constant(image)).numpy()[0]
    heads_masks = masks.grow_masks(embeddings, got["seed_indices"],
                                   np.maximum(got["detection_taus"], 0.25)).numpy()
    assert got["num_detections"][0] == 5
    for k in range(5):
        vote, expected = np_joint_bilateral(heads_masks[0, k], padded, 10.0)
        decided = (np.abs(vote - 0.5) > 1e-4)[:40, :50]
        np.testing.assert_array_equal(got["detection_masks"][0, k][decided],
                                      expected[:40, :50][decided])


def test_joint_bilateral_needs_the_images_and_valid_settings():
    rng = np.random.default_rng(8)
    embeddings, logits = _clustered(rng, batch=1)
    config = inference.InferenceConfig(num_seeds=3, mask_upsampling="joint_bilateral")
    with pytest.raises(ValueError, match="needs the images"):
        inference.predict_instances(embeddings, logits, (32, 40), TAUS, config)
    with pytest.raises(tf.errors.InvalidArgumentError, match="multiple of the heads"):
        inference.predict_instances(embeddings, logits, (30, 40), TAUS, config,
                                    images=np.zeros((1, 30, 40, 3), np.float32))
    with pytest.raises(ValueError, match="mask_upsampling"):
        inference.InferenceConfig(mask_upsampling="bicubic")
    for sigma in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="bilateral_sigma"):
            inference.InferenceConfig(bilateral_sigma=sigma)


def _first_covering(masks):
    """NumPy instance map of masks [B, K, H, W]: 1 + the first k covering each pixel, or 0."""
    return np.where(masks.any(axis=1), masks.argmax(axis=1) + 1, 0)


# Heads 8 x 10: strides 4, 3, 1 and 8, with crops cutting cells or not; 12 and 24 masks,
# with dense outputs and without (the way to the boxes and the map depends on K x stride,
# both ways are checked directly below).
@pytest.mark.parametrize("size, crop", [((32, 40), (32, 40)), ((32, 40), (29, 33)),
                                        ((32, 40), (1, 1)), ((24, 30), (23, 17)),
                                        ((8, 10), (8, 10)), ((64, 80), (57, 80))])
@pytest.mark.parametrize("num_seeds", [12, 24])
def test_instance_map_and_boxes_follow_the_drawn_masks(size, crop, num_seeds):
    rng = np.random.default_rng(8)
    embeddings, logits = _clustered(rng)
    images = rng.uniform(0, 255, (2,) + size + (3,)).astype(np.float32)
    config = inference.InferenceConfig(num_seeds=num_seeds, mask_upsampling="joint_bilateral",
                                       bilateral_sigma=20.0)
    out = inference.predict_instances(embeddings, logits, size, TAUS, config,
                                      images=images, crop_size=crop)
    drawn = out["detection_masks"].numpy()
    assert drawn.shape == (2, num_seeds) + crop
    assert out["num_detections"].numpy().max() == num_seeds  # all drawn
    covered = drawn.any(axis=1)
    want = _first_covering(drawn)
    np.testing.assert_array_equal(out["instance_map"].numpy(), want)
    np.testing.assert_array_equal(out["detection_boxes"].numpy(),
                                  masks.mask_boxes(drawn).numpy())
    compact = inference.predict_instances(embeddings, logits, size, TAUS, config, images=images,
                                          crop_size=crop, dense_masks=False)
    assert "detection_masks" not in compact
    for key in ("detection_boxes", "instance_map"):
        np.testing.assert_array_equal(compact[key].numpy(), out[key].numpy())
    whole = inference.predict_instances(embeddings, logits, size, TAUS, config,
                                        images=images)
    np.testing.assert_array_equal(drawn, whole["detection_masks"].numpy()[..., :crop[0],
                                                                          :crop[1]])
    if crop == size:  # masks to check (at stride 1 the 12 detections cover every pixel)
        assert covered.any() and (size == (8, 10) or not covered.all())


@pytest.mark.parametrize("stride_y, stride_x, crop", [
    (4, 4, None), (4, 4, (29, 33)), (8, 8, (57, 80)), (3, 5, (23, 47)), (1, 1, None),
    (2, 2, (1, 1)), (16, 8, (100, 71))])
@pytest.mark.parametrize("num_masks", [9, 70])
def test_boxes_and_map_from_patterns_equal_the_drawn_masks_ones(stride_y, stride_x, crop,
                                                                num_masks):
    # 9 masks: `boxes_and_instance_map` takes the drawn masks; 70: the patterns from
    # stride 4 on (K x stride above 256).
    rng = np.random.default_rng(stride_y * 10 + stride_x)
    h, w = 8, 10
    size = (h * stride_y, w * stride_x)
    crop = tf.constant(crop or size)
    low = rng.random((2, num_masks, h, w)) < 0.3
    low[1, 4] = False  # an empty mask
    images = tf.constant(rng.uniform(0, 255, (2,) + size + (3,)), tf.float32)
    planes = bilateral.bilateral_planes(images, (h, w), 15.0, crop)
    patterns = upsampling.dual_patterns(tf.constant(low))
    drawn = bilateral.draw_masks(patterns, planes, crop)
    want = masks.mask_boxes(drawn).numpy()
    drawn = drawn.numpy()
    want_map = _first_covering(drawn)
    np.testing.assert_array_equal(bilateral.boxes_from_patterns(patterns, planes).numpy(), want)
    np.testing.assert_array_equal(bilateral.instance_map(patterns, planes, crop).numpy(),
                                  want_map)
    for given in (None, tf.constant(drawn, tf.uint8)):  # whichever way it picks
        boxes, instance_map = bilateral.boxes_and_instance_map(patterns, planes, crop, given)
        np.testing.assert_array_equal(boxes.numpy(), want)
        np.testing.assert_array_equal(instance_map.numpy(), want_map)
    assert (want[1, 4] == 0).all() and (want[0, :, 2:] > 0).any()
