"""Tests of instance_embed.data.pipeline on examples built here (no dataset files)."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from instance_embed.data import augment
from instance_embed.data import features
from instance_embed.data import pipeline

NO_AUGMENT = augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=False)


def _dataset(examples):
    return tf.data.Dataset.from_generator(lambda: iter(examples),
                                          output_signature=features.CONTRACT_SIGNATURE)


def _rectangles_example(rng, height, width, sizes, classes, image_id):
    """Non-overlapping rectangles of the given (h, w) sizes; pixel colour = id * 10."""
    instances = np.zeros((height, width), np.int32)
    x = 1
    for i, (h, w) in enumerate(sizes, start=1):
        y = int(rng.integers(1, height - h))
        instances[y:y + h, x:x + w] = i
        x += w + 1
    assert x <= width
    image = np.repeat((instances * 10).astype(np.uint8)[..., None], 3, axis=-1)
    return {"image": image, "instances": instances,
            "instance_classes": np.asarray(classes, np.int32), "image_id": image_id}


def _random_examples(num, seed=0, size=(80, 100)):
    rng = np.random.default_rng(seed)
    examples = []
    for k in range(num):
        n = int(rng.integers(1, 6))
        sizes = [(int(rng.integers(8, 40)), int(rng.integers(5, 18))) for _ in range(n)]
        classes = rng.integers(1, 4, n)
        examples.append(_rectangles_example(rng, *size, sizes, classes, f"img{k}"))
    return examples


def _reference_pack(instances, classes, max_instances):
    """NumPy reference: keep the largest M present ids (ties: lower id), renumber in order."""
    ids = np.arange(1, len(classes) + 1)
    areas = np.array([(instances == i).sum() for i in ids])
    present = ids[areas > 0]
    ranked = sorted(present, key=lambda i: (-areas[i - 1], i))[:max_instances]
    kept = sorted(ranked)
    out = np.where(instances == 0, 0, -1)
    for new, old in enumerate(kept, start=1):
        out[instances == old] = new
    out_classes = np.zeros(max_instances, np.int32)
    out_classes[:len(kept)] = [classes[i - 1] for i in kept]
    valid = np.arange(max_instances) < len(kept)
    return out, out_classes, valid


def test_pack_instances_hand_worked():
    instances = np.array([[1, 1, 1, 2],
                          [4, 4, 0, 2],
                          [4, 4, -1, 5]], np.int32)
    classes = np.array([7, 8, 9, 6, 5], np.int32)  # Instance 3 is absent (cropped away).
    packed, out_classes, valid = pipeline.pack_instances(instances, classes, 2)
    # Areas: 1 -> 3, 2 -> 2, 4 -> 4, 5 -> 1. Keep 4 and 1; in id order 1 -> 1, 4 -> 2.
    np.testing.assert_array_equal(packed.numpy(), [[1, 1, 1, -1],
                                                   [2, 2, 0, -1],
                                                   [2, 2, -1, -1]])
    np.testing.assert_array_equal(out_classes.numpy(), [7, 6])
    np.testing.assert_array_equal(valid.numpy(), [True, True])


@pytest.mark.parametrize("seed,max_instances", [(0, 32), (1, 32), (2, 5), (3, 1)])
def test_pack_instances_matches_numpy_reference(seed, max_instances):
    rng = np.random.default_rng(seed)
    num = 40
    instances = rng.integers(-1, num + 1, (30, 30)).astype(np.int32)
    # Give areas a wide spread and leave some ids absent.
    instances[rng.random((30, 30)) < 0.3] = 3
    instances[instances == 17] = 0
    classes = rng.integers(1, 21, num).astype(np.int32)
    packed, out_classes, valid = pipeline.pack_instances(instances, classes, max_instances)
    ref = _reference_pack(instances, classes, max_instances)
    np.testing.assert_array_equal(packed.numpy(), ref[0])
    np.testing.assert_array_equal(out_classes.numpy(), ref[1])
    np.testing.assert_array_equal(valid.numpy(), ref[2])


def test_pack_instances_without_instances():
    instances = np.zeros((4, 4), np.int32)
    packed, classes, valid = pipeline.pack_instances(instances, np.zeros([0], np.int32), 3)
    np.testing.assert_array_equal(packed.numpy(), instances)
    np.testing.assert_array_equal(classes.numpy(), [0, 0, 0])
    assert not valid.numpy().any()


def test_batches_have_static_shapes_and_dtypes():
    config = pipeline.InputConfig(image_size=64, max_instances=8, shuffle_buffer=4)
    dataset = pipeline.train_dataset(_dataset(_random_examples(5)), config, batch_size=3,
                                     seed=0)
    expected = {
        "image": ([3, 64, 64, 3], tf.float32),
        "instances": ([3, 64, 64], tf.int32),
        "instance_classes": ([3, 8], tf.int32),
        "instance_valid": ([3, 8], tf.bool),
        "image_id": ([3], tf.string),
    }
    spec = dataset.element_spec
    assert set(spec) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert spec[key].shape.as_list() == shape, key
        assert spec[key].dtype == dtype, key
    for batch in dataset.take(4):  # Repeats past the 5 examples.
        for key, (shape, dtype) in expected.items():
            assert batch[key].shape.as_list() == shape and batch[key].dtype == dtype
        image = batch["image"].numpy()
        assert image.min() >= 0 and image.max() <= 255


def test_classes_stay_aligned_with_ids_and_ids_are_consecutive():
    # The colour of each pixel is 10 * (original id); the class of original id i is
    # 100 + i, so every kept instance can be traced back.
    rng = np.random.default_rng(5)
    examples = []
    for k in range(6):
        sizes = [(int(rng.integers(10, 60)), int(rng.integers(6, 20))) for _ in range(5)]
        examples.append(_rectangles_example(rng, 90, 120, sizes, [101, 102, 103, 104, 105],
                                            f"img{k}"))
    config = pipeline.InputConfig(
        image_size=64, max_instances=32, shuffle_buffer=1,
        augment=augment.AugmentConfig(rotate=False, min_scale=0.7, max_scale=1.2))
    checked = 0
    for batch in pipeline.train_dataset(_dataset(examples), config, 2, seed=3,
                                        repeat=False):
        for image, instances, classes, valid in zip(
                batch["image"].numpy(), batch["instances"].numpy(),
                batch["instance_classes"].numpy(), batch["instance_valid"].numpy()):
            n = int(valid.sum())
            assert valid[:n].all() and not valid[n:].any()
            assert (classes[n:] == 0).all()
            np.testing.assert_array_equal(np.unique(instances[instances > 0]),
                                          np.arange(1, n + 1))
            for new_id in range(1, n + 1):
                # Interior pixels keep the exact colour of their original id.
                interior = ndimage.binary_erosion(instances == new_id, np.ones((3, 3)))
                if not interior.any():
                    continue  # A sliver left by the crop: only blended colours.
                colours = np.unique(image[interior])
                assert len(colours) == 1, colours
                assert classes[new_id - 1] == 100 + colours[0] / 10
                checked += 1
    assert checked > 10


def test_more_than_max_instances_keeps_the_largest():
    rng = np.random.default_rng(6)
    # Areas 40*4=160, 200, 30, 250, 60, 100: the 3 largest are ids 4, 2, 1.
    sizes = [(40, 4), (40, 5), (30, 1), (50, 5), (30, 2), (50, 2)]
    example = _rectangles_example(rng, 64, 64, sizes, [1, 2, 3, 4, 5, 6], "many")
    config = pipeline.InputConfig(image_size=64, max_instances=3, augment=NO_AUGMENT)
    batch = next(iter(pipeline.train_dataset(_dataset([example]), config, 1, seed=0)))
    instances = batch["instances"].numpy()[0]
    original = example["instances"]
    # Kept ids 1, 2, 4 renumbered 1, 2, 3 in their order; the others become ignore.
    expected = np.select([original == 4, np.isin(original, [3, 5, 6])], [3, -1], original)
    np.testing.assert_array_equal(instances, expected)
    np.testing.assert_array_equal(batch["instance_classes"].numpy()[0], [1, 2, 4])
    np.testing.assert_array_equal(batch["instance_valid"].numpy()[0], [True] * 3)


def _take(dataset, num):
    return [{k: v.numpy() for k, v in b.items()} for b in dataset.take(num)]


def _assert_same_batches(first, second):
    for a, b in zip(first, second, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_same_seed_identical_batches_different_seed_different():
    examples = _random_examples(8, seed=1)
    config = pipeline.InputConfig(image_size=64, shuffle_buffer=8)
    build = lambda seed: pipeline.train_dataset(_dataset(examples), config, 4, seed=seed)
    first, again, other = _take(build(11), 3), _take(build(11), 3), _take(build(12), 3)
    _assert_same_batches(first, again)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))


def test_cache_does_not_change_the_batches():
    examples = _random_examples(6, seed=2)
    plain = pipeline.InputConfig(image_size=64, shuffle_buffer=6)
    cached = pipeline.InputConfig(image_size=64, shuffle_buffer=6, cache=True)
    _assert_same_batches(_take(pipeline.train_dataset(_dataset(examples), plain, 2, 4), 5),
                         _take(pipeline.train_dataset(_dataset(examples), cached, 2, 4), 5))


def test_skip_batches_continues_the_stream_across_epochs():
    # 5 examples in batches of 2: the skipped batches end inside the second epoch.
    examples = _random_examples(5, seed=5)
    config = pipeline.InputConfig(image_size=64, shuffle_buffer=5)
    build = lambda skip: pipeline.train_dataset(_dataset(examples), config, 2, seed=7,
                                                skip_batches=skip)
    _assert_same_batches(_take(build(3), 4), _take(build(0), 7)[3:])


def test_epochs_are_reshuffled_and_reaugmented():
    examples = _random_examples(4, seed=3)
    config = pipeline.InputConfig(image_size=64, shuffle_buffer=4)
    batches = _take(pipeline.train_dataset(_dataset(examples), config, 4, seed=0), 2)
    assert sorted(batches[0]["image_id"]) == sorted(batches[1]["image_id"])
    assert not np.array_equal(batches[0]["image"], batches[1]["image"])


def test_input_context_shards_and_gives_per_replica_batches():
    examples = _random_examples(8, seed=4)
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1,
                                         num_replicas_in_sync=2)
    config = pipeline.InputConfig(image_size=64, shuffle_buffer=1)
    dataset = pipeline.train_dataset(_dataset(examples), config, batch_size=4, seed=0,
                                     repeat=False, input_context=context)
    ids = [i.decode() for b in dataset for i in b["image_id"].numpy()]
    assert dataset.element_spec["image"].shape[0] == 2
    assert ids == ["img1", "img3", "img5", "img7"]


def test_bad_examples_name_the_key():
    examples = _random_examples(1)
    missing = _dataset(examples).map(lambda e: {k: v for k, v in e.items()
                                                if k != "instance_classes"})
    with pytest.raises(ValueError, match="instance_classes"):
        pipeline.train_dataset(missing, pipeline.InputConfig(), 2)
    wrong = _dataset(examples).map(lambda e: {**e, "instances": tf.cast(e["instances"],
                                                                        tf.uint8)})
    with pytest.raises(ValueError, match="instances"):
        pipeline.train_dataset(wrong, pipeline.InputConfig(), 2)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline.train_dataset(_dataset(examples), pipeline.InputConfig(), 0)


@pytest.mark.parametrize("kwargs,field", [({"image_size": 100}, "image_size"),
                                          ({"max_instances": 0}, "max_instances")])
def test_bad_input_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        pipeline.InputConfig(**kwargs)
