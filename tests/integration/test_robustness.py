"""Robustness of training data handling: odd annotations, empty images, broken files.

Covers the training side of issue 8 ("nothing crashes, nothing is lost, every error
says what and where"):

* images without any instance, images that are all ignore, and batches made only of
  them: losses and their gradients stay finite, and a real training run on a dataset
  whose masks are all empty trains, checkpoints and evaluates;
* single-pixel instances (on and off the heads' sampling grid), instances that the
  crop cuts away entirely, and more instances than `max_instances`: the pipeline keeps
  its contract and the losses stay finite;
* dataset preparation: a broken file stops `training.train` before the first step
  with an error naming the file, and leaves no half-prepared dataset behind.

Expected values are worked out by hand in each test or checked against the pixels of
the input, never copied from the implementation.
"""

import os
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from instance_embed import data as datasets
from instance_embed import losses
from instance_embed import training
from instance_embed.data import augment
from instance_embed.data import features
from instance_embed.data import pipeline
from instance_embed.losses import sampling
from instance_embed.training import checkpoints

NO_AUGMENT = augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=False)
TAUS = (0.5, 0.75)
STRIDE = 8


def _dataset(examples):
    return tf.data.Dataset.from_generator(lambda: iter(examples),
                                          output_signature=features.CONTRACT_SIGNATURE)


def _example(instances, classes, image_id, image=None):
    instances = np.asarray(instances, np.int32)
    if image is None:
        rng = np.random.default_rng(zlib.crc32(image_id.encode()))
        image = rng.integers(0, 256, instances.shape + (3,)).astype(np.uint8)
    return {"image": image, "instances": instances,
            "instance_classes": np.asarray(classes, np.int32).reshape(-1),
            "image_id": image_id}


def _loss_and_gradients(batch, seed=0, embedding_dim=4, num_classes=2, scale=1.0):
    """InstanceLoss of random heads outputs on `batch`, and its gradients w.r.t. them."""
    instances = tf.convert_to_tensor(batch["instances"])
    size = instances.shape[1] // STRIDE, instances.shape[2] // STRIDE
    batch_size = instances.shape[0]
    rng = np.random.default_rng(seed)
    embeddings = tf.Variable(scale * rng.normal(
        size=(batch_size, *size, embedding_dim)).astype(np.float32))
    logits = tf.Variable(rng.normal(
        size=(batch_size, *size, len(TAUS), num_classes + 1)).astype(np.float32))
    loss_fn = losses.InstanceLoss(losses.LossConfig(
        points_per_instance=5, cls_warmup_steps=0, cls_ramp_steps=0), TAUS)
    with tf.GradientTape() as tape:
        values = loss_fn({"embeddings": embeddings, "class_logits": logits}, batch,
                         step=10, seed=tf.constant([seed, 1], tf.int64))
    grads = tape.gradient(values["total"], [embeddings, logits])
    return values, grads, logits.numpy()


def _assert_finite(values, grads):
    for key in ("total", "embedding", "classification"):
        assert np.isfinite(values[key].numpy()), (key, values[key].numpy())
    for grad in grads:
        assert grad is not None
        assert np.all(np.isfinite(grad.numpy()))


def _packed_batch(instances, classes, max_instances):
    """A training batch (contract 2) from label maps, packed as the pipeline packs."""
    packed = [pipeline.pack_instances(tf.constant(np.asarray(i, np.int32)),
                                      tf.constant(np.asarray(c, np.int32).reshape(-1)),
                                      max_instances) for i, c in zip(instances, classes)]
    return {"instances": tf.stack([p[0] for p in packed]),
            "instance_classes": tf.stack([p[1] for p in packed]),
            "instance_valid": tf.stack([p[2] for p in packed])}


# ---------------------------------------------------------------------------------------
# Empty images.


def test_batch_of_background_only_images_has_finite_loss_and_gradients():
    batch = _packed_batch([np.zeros((32, 32))] * 3, [[]] * 3, max_instances=4)
    values, grads, logits = _loss_and_gradients(batch)
    _assert_finite(values, grads)
    # Only background points: every pair is "same instance", so the embedding loss is
    # -mean log sigma >= 0 and 0 only if all sampled embeddings coincide.
    assert values["embedding"].numpy() > 0
    np.testing.assert_array_equal(values["embedding_valid"].numpy(), [True] * 3)
    # Every seed's target is background (no instance to match): the classification loss
    # is a mean of cross-entropies towards class 0 over sampled pixels and taus, so it
    # lies within their range over all pixels.
    shifted = logits - logits.max(axis=-1, keepdims=True)
    cross_entropy = np.log(np.exp(shifted).sum(axis=-1)) - shifted[..., 0]
    assert (cross_entropy.min() - 1e-5 <= values["classification"].numpy()
            <= cross_entropy.max() + 1e-5)


def test_batch_of_all_ignore_images_gives_zero_loss_and_zero_gradients():
    batch = _packed_batch([-np.ones((32, 32))] * 2, [[]] * 2, max_instances=3)
    values, grads, _ = _loss_and_gradients(batch)
    _assert_finite(values, grads)
    assert values["total"].numpy() == 0.0
    assert not values["embedding_valid"].numpy().any()
    assert not values["classification_valid"].numpy().any()
    for grad in grads:
        assert not np.any(grad.numpy())


def test_empty_images_do_not_change_the_mean_over_the_others():
    """An all-ignore image adds nothing; the mean runs over the images that have points."""
    instances = np.zeros((32, 32), np.int32)
    instances[4:20, 4:20] = 1
    alone = _packed_batch([instances], [[1]], max_instances=3)
    mixed = _packed_batch([instances, -np.ones((32, 32))], [[1], []], max_instances=3)
    values_alone, _, _ = _loss_and_gradients(alone, seed=3)
    values_mixed, grads, _ = _loss_and_gradients(mixed, seed=3)
    _assert_finite(values_mixed, grads)
    np.testing.assert_array_equal(values_mixed["embedding_valid"].numpy(), [True, False])
    # The mean runs over the one valid image only, which draws the same heads outputs
    # and points as when it is alone: the loss is the same.
    assert values_mixed["embedding"].numpy() == pytest.approx(
        values_mixed["embedding_per_image"].numpy()[0])
    assert values_mixed["embedding"].numpy() == pytest.approx(
        values_alone["embedding"].numpy(), rel=1e-6)


# ---------------------------------------------------------------------------------------
# Single-pixel instances.


def test_single_pixel_instances_on_and_off_the_sampling_grid():
    """At stride 8 the heads see input pixel (8i + 4, 8j + 4); a lone pixel elsewhere
    vanishes at the heads' resolution and must become padding, not NaN."""
    instances = np.zeros((32, 32), np.int32)
    instances[12, 20] = 1  # on the grid: heads pixel (1, 2)
    instances[13, 21] = 2  # off the grid: invisible to the heads
    instances[2:30, 26:32] = 3  # a large instance
    batch = _packed_batch([instances], [[1, 2, 1]], max_instances=4)
    labels = sampling.labels_at_resolution(batch["instances"], (4, 4)).numpy()[0]
    assert labels[1, 2] == 1 and not np.any(labels == 2)

    points = sampling.sample_points(labels[None], batch["instance_valid"], 5,
                                  tf.constant([0, 0], tf.int64))
    ids = points["point_instance_ids"].numpy()[0].reshape(5, 5)  # slot-major [M + 1, K]
    indices = points["point_indices"].numpy()[0].reshape(5, 5)
    # Slot 1: its one pixel, K times, each point of weight 1 / 1.
    np.testing.assert_array_equal(ids[1], [1] * 5)
    np.testing.assert_array_equal(indices[1], [1 * 4 + 2] * 5)
    np.testing.assert_allclose(points["point_weights"].numpy()[0].reshape(5, 5)[1], 1.0)
    # Slot 2 is valid but has no pixel here; slot 4 is not valid: padding.
    np.testing.assert_array_equal(ids[2], [-1] * 5)
    np.testing.assert_array_equal(ids[4], [-1] * 5)

    values, grads, _ = _loss_and_gradients(batch)
    _assert_finite(values, grads)


def test_image_of_only_single_pixel_instances_off_the_grid():
    """Every instance vanishes at the heads' resolution: background only, finite."""
    instances = np.zeros((32, 32), np.int32)
    for k, (y, x) in enumerate([(0, 0), (9, 1), (31, 31)], start=1):
        instances[y, x] = k
    batch = _packed_batch([instances, instances], [[1, 2, 1]] * 2, max_instances=3)
    assert batch["instance_valid"].numpy().all()  # present at full resolution
    values, grads, _ = _loss_and_gradients(batch)
    _assert_finite(values, grads)
    assert values["embedding_valid"].numpy().all()  # background points remain


# ---------------------------------------------------------------------------------------
# Crops and instance limits through the real pipeline.


def test_instance_cut_away_by_the_crop_is_dropped_and_the_other_kept():
    """A 64 x 256 image cropped to 64 x 64: the instances at the two ends are never in
    the same window, so every batch has one of them cut away entirely."""
    instances = np.zeros((64, 256), np.int32)
    instances[20:40, 2:22] = 1  # class 1, red
    instances[20:40, 234:254] = 2  # class 2, green
    image = np.zeros((64, 256, 3), np.uint8)
    image[instances == 1] = (255, 0, 0)
    image[instances == 2] = (0, 255, 0)
    example = _example(instances, [1, 2], "wide", image=image)
    augment_config = augment.AugmentConfig(rotate=False, resize=False, flip=False,
                                           num_crop_candidates=4)
    config = pipeline.InputConfig(image_size=64, max_instances=4, augment=augment_config,
                                  shuffle_buffer=1)
    seen = set()
    for batch in pipeline.train_dataset(_dataset([example]), config, batch_size=4,
                                        seed=5).take(4):
        valid = batch["instance_valid"].numpy()
        classes = batch["instance_classes"].numpy()
        maps = batch["instances"].numpy()
        images = batch["image"].numpy()
        for b in range(4):
            count = int(valid[b].sum())
            present = set(np.unique(maps[b])) - {-1, 0}
            assert present == set(range(1, count + 1))
            np.testing.assert_array_equal(classes[b][count:], 0)
            for new_id in present:
                colour = images[b][maps[b] == new_id].mean(axis=0)
                # The surviving instance's class agrees with its colour.
                expected = 1 if colour[0] > colour[1] else 2
                assert classes[b][new_id - 1] == expected
                seen.add(expected)
            assert count <= 1
        values, grads, _ = _loss_and_gradients(batch, seed=1)
        _assert_finite(values, grads)
    assert seen  # at least one crop held an instance


def test_more_instances_than_max_instances_with_full_augmentation():
    """40 tiny instances, M = 5, full augmentation: contract holds, losses finite."""
    rng = np.random.default_rng(2)
    instances = np.zeros((96, 96), np.int32)
    for k in range(40):
        y, x = (k // 8) * 19 + 1, (k % 8) * 12 + 1
        h, w = int(rng.integers(1, 17)), int(rng.integers(1, 10))
        instances[y:y + h, x:x + w] = k + 1
    classes = rng.integers(1, 3, 40)
    examples = [_example(instances, classes, "many"),
                _example(np.zeros((40, 50)), [], "empty"),
                _example(-np.ones((50, 40)), [], "void")]
    config = pipeline.InputConfig(image_size=64, max_instances=5, shuffle_buffer=3)
    for batch in pipeline.train_dataset(_dataset(examples), config, batch_size=3,
                                        seed=11).take(4):
        valid = batch["instance_valid"].numpy()
        assert valid.shape == (3, 5)
        for b in range(3):
            count = int(valid[b].sum())
            np.testing.assert_array_equal(valid[b], np.arange(5) < count)
            present = set(np.unique(batch["instances"].numpy()[b])) - {-1, 0}
            assert present == set(range(1, count + 1))
            assert np.all(batch["instance_classes"].numpy()[b][:count] >= 1)
        values, grads, _ = _loss_and_gradients(batch, seed=2)
        _assert_finite(values, grads)


@pytest.mark.parametrize("scale", [1e-4, 1e3])
def test_extreme_embeddings_keep_losses_finite(scale):
    """Coincident (tiny) and very distant (huge) embeddings on a crowded batch."""
    instances = np.zeros((32, 32), np.int32)
    instances[:16, :16], instances[16:, 16:], instances[0:4, 28:32] = 1, 2, 3
    batch = _packed_batch([instances, np.zeros((32, 32))], [[1, 2, 2], []],
                          max_instances=2)
    values, grads, _ = _loss_and_gradients(batch, scale=scale)
    _assert_finite(values, grads)


# ---------------------------------------------------------------------------------------
# A real training run on images without instances.


def _write_empty_folder_dataset(root, count=5, size=64):
    """Images with all-zero masks (no instance at all), in the instance_folder layout."""
    rng = np.random.default_rng(1)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    for i in range(count):
        image = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "images", f"e{i}.png"))
        Image.fromarray(np.zeros((size, size), np.uint8)).save(
            os.path.join(root, "masks", f"e{i}.png"))
    return root


def test_training_on_images_without_instances_runs_and_checkpoints(tmp_path, tiny_config):
    manual = _write_empty_folder_dataset(str(tmp_path / "raw"))
    examples = list(datasets.load("instance_folder", "train", data_dir=str(tmp_path / "tfds"),
                                  manual_dir=manual).as_numpy_iterator())
    assert len(examples) == 4 and all(e["instance_classes"].size == 0 for e in examples)
    config = tiny_config(str(tmp_path / "tfds"), manual, train_steps=4,
                                checkpoint_every=2, summary_every=4, eval_at_end=True)
    model_dir = str(tmp_path / "run")
    result = training.train(config, model_dir)
    assert result["step"] == 4
    assert all(np.isfinite(v) for v in result["losses"].values())
    assert result["losses"]["embedding"] > 0  # background points still pull together
    # Evaluation of a split without any ground truth: nothing to average, so NaN
    # (null in metrics.json), not an exception.
    assert result["metrics"]["num_instances"] == 0
    assert np.isnan(result["metrics"]["mAP_r@0.5"])
    assert checkpoints.latest_checkpoint(model_dir).endswith("ckpt-4")
    model, _, _ = checkpoints.restore_model(model_dir)
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)


# ---------------------------------------------------------------------------------------
# Dataset preparation: the file is named, before anything trains.


@pytest.mark.parametrize("breakage, error, name", [
    ("missing_mask", FileNotFoundError, "img2"),
    ("wrong_size_mask", ValueError, "img1.png"),
    ("unreadable_image", ValueError, "img3.png"),
])
def test_broken_dataset_stops_training_before_the_first_step(tmp_path, breakage, error,
                                                              name, tiny_config,
                                                              write_folder_dataset):
    manual = write_folder_dataset(str(tmp_path / "raw"))
    masks, images = os.path.join(manual, "masks"), os.path.join(manual, "images")
    if breakage == "missing_mask":
        os.remove(os.path.join(masks, "img2.png"))
    elif breakage == "wrong_size_mask":
        Image.fromarray(np.zeros((64, 63), np.uint8)).save(os.path.join(masks, "img1.png"))
    else:
        with open(os.path.join(images, "img3.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n truncated")
    data_dir, model_dir = str(tmp_path / "tfds"), str(tmp_path / "run")
    config = tiny_config(data_dir, manual, train_steps=2)
    with pytest.raises(error, match=name):
        training.train(config, model_dir)
    # Nothing was trained or saved, and no half-prepared dataset is left to be reused.
    assert tf.train.latest_checkpoint(os.path.join(model_dir, "ckpt")) is None
    with pytest.raises(error, match=name):
        datasets.load("instance_folder", "train", data_dir=data_dir, manual_dir=manual)
    # Once the file is fixed, the same data_dir prepares and trains.
    write_folder_dataset(str(tmp_path / "fixed"))
    for folder in ("images", "masks"):
        for file in os.listdir(os.path.join(tmp_path, "fixed", folder)):
            os.replace(os.path.join(tmp_path, "fixed", folder, file),
                       os.path.join(manual, folder, file))
    assert len(list(datasets.load("instance_folder", "train", data_dir=data_dir,
                                  manual_dir=manual))) == 4
