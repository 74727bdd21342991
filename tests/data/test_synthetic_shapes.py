"""Tests of the `synthetic_shapes` generator and builder."""

import itertools

import numpy as np
import pytest
import scipy.ndimage
import tensorflow_datasets as tfds

import instance_embed.data as data
from instance_embed.data import shape_painting
from instance_embed.data import synthetic_shapes as ss

tfds.disable_progress_bar()

CONFIG = ss.SyntheticShapesConfig(name="unit_128", image_size=128, num_train=250,
                                  num_validation=0, num_test=0)
CROSS = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)


def _scenes(style, max_instances=CONFIG.max_instances, geometry=ss.DEFAULT_GEOMETRY):
    out = []
    for index in range(CONFIG.num_train):
        rng = ss.example_rng(CONFIG.seed, "train", index)
        shapes = ss.sample_scene(rng, CONFIG.image_size, max_instances, geometry)
        out.append((shapes, *ss.render_scene(rng, shapes, CONFIG.image_size, style)))
    return out


@pytest.fixture(scope="module")
def scenes():
    """(shapes, image, instances, classes) of 250 generated 128x128 default examples."""
    return _scenes(ss.DEFAULT_STYLE)


@pytest.fixture(scope="module")
def hard_scenes():
    """The same scenes in the 'hard' style."""
    return _scenes(ss.HARD_STYLE)


@pytest.fixture(scope="module")
def demo_scenes():
    """The scenes of the `demo` config's settings (at most 6 large shapes)."""
    demo = next(c for c in ss.SyntheticShapes.BUILDER_CONFIGS if c.name == "demo")
    return _scenes(demo.style, demo.max_instances, demo.geometry)


def _adjacent_ids(instances):
    """Set of (a, b), a < b, of distinct instances with 4-adjacent pixels."""
    pairs = set()
    for a, b in ((instances[1:, :], instances[:-1, :]),
                 (instances[:, 1:], instances[:, :-1])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist())}
    return pairs


def test_same_seed_same_example_different_seed_different():
    first = ss.generate_example(CONFIG, "train", 7)
    again = ss.generate_example(CONFIG, "train", 7)
    for key in ("image", "instances", "instance_classes"):
        np.testing.assert_array_equal(first[key], again[key])
    other_seed = ss.SyntheticShapesConfig(name="unit_seed1", image_size=128, seed=1)
    other = ss.generate_example(other_seed, "train", 7)
    assert not np.array_equal(first["image"], other["image"])
    # Splits are drawn from different streams too.
    assert not np.array_equal(first["image"],
                              ss.generate_example(CONFIG, "validation", 7)["image"])


def test_example_does_not_depend_on_generation_order():
    for index in (3, 1, 0, 2):  # Disturb any state a generator could keep.
        ss.generate_example(CONFIG, "train", index)
    late = ss.generate_example(CONFIG, "train", 4)
    fresh_rng = ss.example_rng(CONFIG.seed, "train", 4)
    shapes = ss.sample_scene(fresh_rng, 128, 10)
    image, instances, _ = ss.render_scene(fresh_rng, shapes, 128)
    np.testing.assert_array_equal(late["image"], image)
    np.testing.assert_array_equal(late["instances"], instances)


def test_contract_and_instance_counts(scenes):
    counts = []
    for _, image, instances, classes in scenes:
        assert image.dtype == np.uint8 and image.shape == (128, 128, 3)
        assert instances.dtype == np.int32 and instances.shape == (128, 128)
        ids = np.unique(instances)
        assert ids.min() == 0  # No ignore label in generated data.
        np.testing.assert_array_equal(ids[ids > 0], np.arange(1, len(classes) + 1))
        assert set(classes.tolist()) <= {1, 2, 3}
        counts.append(len(classes))
    counts = np.array(counts)
    assert counts.min() >= 1 and counts.max() <= 10
    # The whole range occurs, not only a few typical counts.
    assert {1, 2, 5, 9, 10} <= set(counts.tolist())


def test_classes_are_balanced_and_bars_are_spindly(scenes):
    classes = np.concatenate([c for _, _, _, c in scenes])
    shares = np.bincount(classes, minlength=4)[1:] / classes.size
    assert np.all(shares > 0.25), shares
    elongation = {ss.DISK: [], ss.RING: [], ss.BAR: []}
    for shapes, *_ in scenes:
        for shape in shapes:
            # Shapes cut by the border have a distorted footprint.
            if min(shape.ys.min(), shape.xs.min()) == 0 or max(
                    shape.ys.max(), shape.xs.max()) == 127:
                continue
            eig = np.linalg.eigvalsh(np.cov(np.stack([shape.ys, shape.xs])))
            elongation[shape.class_id].append(np.sqrt(eig[1] / eig[0]))
    assert np.min(elongation[ss.BAR]) > 5.0  # Length / width of a thin bar.
    assert np.max(elongation[ss.DISK]) < 2.0
    assert np.max(elongation[ss.RING]) < 2.0


def test_occlusion_disconnected_and_touching_instances_are_common(scenes):
    occluded = disconnected = touching = adjacent = 0
    for shapes, _, instances, _ in scenes:
        visible = np.bincount(instances.ravel(), minlength=len(shapes) + 1)[1:]
        full = np.array([len(s.ys) for s in shapes])
        # Every kept instance is visible, and (almost) fully hidden ones are gone.
        assert np.all(visible >= np.maximum(20, 0.1 * full))
        occluded += bool(np.any(visible < full))
        disconnected += any(
            scipy.ndimage.label(instances == k, structure=np.ones((3, 3)))[1] > 1
            for k in range(1, len(shapes) + 1))
        masks = [s.mask(128) for s in shapes]
        touching += any(
            not np.any(a & b) and np.any(scipy.ndimage.binary_dilation(a, CROSS) & b)
            for a, b in itertools.combinations(masks, 2))
        adjacent += bool(_adjacent_ids(instances))
    n = len(scenes)
    assert occluded / n > 0.5
    assert disconnected / n > 0.3
    assert touching / n > 0.4
    assert adjacent / n > 0.6


def test_demo_shapes_are_large_half_visible_and_still_touch_and_occlude(demo_scenes):
    occluded = touching = 0
    widths = {ss.DISK: [], ss.RING: [], ss.BAR: []}
    counts = []
    for shapes, _, instances, classes in demo_scenes:
        counts.append(len(classes))
        visible = np.bincount(instances.ravel(), minlength=len(shapes) + 1)[1:]
        full = np.array([len(s.ys) for s in shapes])
        assert np.all(visible >= 0.5 * full)
        occluded += bool(np.any(visible < full))
        masks = [s.mask(128) for s in shapes]
        touching += any(
            not np.any(a & b) and np.any(scipy.ndimage.binary_dilation(a, CROSS) & b)
            for a, b in itertools.combinations(masks, 2))
        for shape in shapes:
            if min(shape.ys.min(), shape.xs.min()) > 0 and max(
                    shape.ys.max(), shape.xs.max()) < 127:
                # A uniform band of width w has variance w^2 / 12 across it.
                narrow = np.linalg.eigvalsh(np.cov(np.stack([shape.ys, shape.xs])))[0]
                widths[shape.class_id].append(np.sqrt(12 * narrow))
    assert set(counts) == {1, 2, 3, 4, 5, 6}
    n = len(demo_scenes)
    assert occluded / n > 0.25 and touching / n > 0.3
    assert np.min(widths[ss.BAR]) > 11.0  # 3 heads cells at stride 4
    assert np.min(widths[ss.DISK]) > 12.0  # sqrt(3) x the short semi-axis
    assert all(len(w) > 50 for w in widths.values())


@pytest.mark.parametrize("style, low_contrast", [("default", 75), ("hard", 40)])
def test_colour_separates_neither_classes_nor_instances(style, low_contrast, request):
    scenes = request.getfixturevalue("scenes" if style == "default" else "hard_scenes")
    colours, classes, contrasts = [], [], []
    similar_neighbours = 0
    for _, image, instances, inst_classes in scenes:
        image = image.astype(np.float64)
        means = [image[instances == k].mean(axis=0)
                 for k in range(1, len(inst_classes) + 1)]
        colours += means
        classes += inst_classes.tolist()
        for k, mean in enumerate(means, start=1):
            ring = scipy.ndimage.binary_dilation(instances == k, iterations=3)
            ring &= instances == 0
            if ring.sum() >= 20:
                contrasts.append(np.linalg.norm(mean - image[ring].mean(axis=0)))
        similar_neighbours += any(np.linalg.norm(means[a - 1] - means[b - 1]) < 30
                                  for a, b in _adjacent_ids(instances))
    colours, classes = np.array(colours), np.array(classes)
    # Nearest class-mean colour classifier, fitted on half and scored on the other.
    half = len(classes) // 2
    centroids = np.stack([colours[:half][classes[:half] == c].mean(axis=0)
                          for c in (1, 2, 3)])
    predicted = np.argmin(np.linalg.norm(
        colours[half:, None] - centroids[None], axis=-1), axis=1) + 1
    chance = np.bincount(classes[half:]).max() / (len(classes) - half)
    assert np.mean(predicted == classes[half:]) < chance + 0.05
    # Low-contrast (camouflaged) instances exist, and so do touching look-alikes.
    assert np.mean(np.array(contrasts) < low_contrast) > 0.08
    assert similar_neighbours / len(scenes) > 0.1


@pytest.mark.parametrize("style, min_std", [("default", 4), ("hard", 8)])
def test_backgrounds_are_textured(style, min_std, request):
    scenes = request.getfixturevalue("scenes" if style == "default" else "hard_scenes")
    # Pixel noise is averaged away by the 5x5 filter; textures add structure at larger
    # scales.
    smooth_std = []
    for _, image, instances, _ in scenes[:50]:
        smooth = scipy.ndimage.uniform_filter(image.astype(np.float64), size=(5, 5, 1))
        smooth_std.append(smooth[instances == 0].std(axis=0).mean())
    assert np.median(smooth_std) > min_std


def test_waves_on_grid_matches_pointwise_sum():
    waves = shape_painting.Waves.sample(np.random.default_rng(3), 40, 5, (0.5, 12.0), 3)
    ys, xs = np.mgrid[0:40, 0:40]
    expected = np.zeros((40, 40, 3))
    for k in range(5):
        arg = waves.fy[k] * ys + waves.fx[k] * xs + waves.phase[k]
        expected += np.sin(arg)[..., None] * waves.weights[k]
    np.testing.assert_allclose(waves.on_grid(40), expected, atol=1e-9)
    np.testing.assert_allclose(waves.at(ys.ravel(), xs.ravel()),
                               expected.reshape(-1, 3), atol=1e-9)


@pytest.mark.parametrize("class_id", [ss.DISK, ss.RING, ss.BAR])
def test_touching_centres_match_brute_force(class_id):
    size = 48
    rng = np.random.default_rng(class_id)
    anchor_patch = ss.shape_footprint(rng, ss.DISK, size)
    ys, xs = ss.place_patch(anchor_patch, (20, 26), size)
    anchor = ss.Shape(ss.DISK, ys, xs)
    anchor_mask = anchor.mask(size)
    patch = ss.shape_footprint(rng, class_id, size)
    expected = set()
    for cy, cx in itertools.product(range(size), range(size)):
        placed = np.zeros((size, size), bool)
        placed[ss.place_patch(patch, (cy, cx), size)] = True
        if not np.any(placed & anchor_mask) and np.any(
                scipy.ndimage.binary_dilation(placed, CROSS) & anchor_mask):
            expected.add((cy, cx))
    got = {tuple(c) for c in ss.touching_centres(anchor, patch, size).tolist()}
    # Centres whose whole patch falls outside the image cannot touch anything.
    assert got == expected and expected


def test_config_validation():
    with pytest.raises(ValueError, match="image_size"):
        ss.SyntheticShapesConfig(name="bad", image_size=8)
    with pytest.raises(ValueError, match="num_test"):
        ss.SyntheticShapesConfig(name="bad", num_test=-1)


def test_load_round_trip_equals_generator(tmp_path):
    config = ss.SyntheticShapesConfig(name="unit_load", image_size=64, num_train=5,
                                      num_validation=2, num_test=3, seed=11)
    sizes = {}
    for split in ss.SPLITS:
        examples = list(tfds.as_numpy(data.load("synthetic_shapes", split,
                                                data_dir=tmp_path, config=config)))
        sizes[split] = len(examples)
        for example in examples:
            index = int(example["image_id"].decode().rsplit("_", 1)[1])
            expected = ss.generate_example(config, split, index)
            assert example["image"].dtype == np.uint8
            assert example["instances"].dtype == np.int32
            assert example["instance_classes"].dtype == np.int32
            for key in ("image", "instances", "instance_classes"):
                np.testing.assert_array_equal(example[key], expected[key])
    assert sizes == {"train": 5, "validation": 2, "test": 3}
    assert data.class_names("synthetic_shapes", config) == ["disk", "ring", "bar"]
