"""Tests of instance_embed.Segmenter and Instances: a tiny exported model and its run."""

import io

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
import pytest
import tensorflow as tf

import instance_embed
from instance_embed import serving
from instance_embed.segmenter import Instances
from instance_embed.segmenter import model_error_message

NUM_SEEDS = 8
MAX_PIXELS = 4000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_run_dir):
    return make_run_dir(tmp_path_factory.mktemp("run"), NUM_SEEDS, seed=1)


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("export")
    serving.export_from_model_dir(str(run_dir), str(path),
                                  serving.ExportConfig(max_image_pixels=MAX_PIXELS))
    return path


@pytest.fixture(scope="module")
def segmenter(export_dir):
    return instance_embed.Segmenter.from_saved_model(str(export_dir))


@pytest.fixture(scope="module")
def image(image_files):
    return image_files.random_image(37, 45, seed=1)


@pytest.fixture(scope="module")
def signature_outputs(export_dir, image):
    """serving_images called directly: the reference for every Segmenter path."""
    predict, _ = serving.load_images_signature(str(export_dir))
    return {key: value.numpy()[0] for key, value in predict(tf.constant(image[None])).items()}


def assert_instances_match_outputs(instances, outputs, image):
    count = int(outputs["num_detections"])
    assert len(instances) == count >= 3  # enough detections to compare
    np.testing.assert_array_equal(instances.image, image)
    np.testing.assert_array_equal(instances.masks, outputs["detection_masks"][:count] == 1)
    np.testing.assert_array_equal(instances.classes, outputs["detection_classes"][:count])
    np.testing.assert_array_equal(instances.scores, outputs["detection_scores"][:count])
    np.testing.assert_array_equal(instances.label_image(), outputs["instance_map"])
    for mask, box in zip(instances.masks, instances.boxes):
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])


def test_array_path_and_bytes_give_the_signature_outputs(segmenter, image, image_files,
                                                         signature_outputs, tmp_path):
    png = image_files.encode(image, "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(png)
    for source in (image, str(path), path, png):
        assert_instances_match_outputs(segmenter(source), signature_outputs, image)
    names = tuple(serving.load_class_names(str(segmenter.source)))
    assert segmenter.class_names == names and len(names) == 3
    instances = segmenter(image)
    assert instances.class_names_of() == [names[c - 1] for c in instances.classes]


def test_from_model_dir_runs_the_same_graph_as_the_export(run_dir, image, signature_outputs):
    segmenter = instance_embed.Segmenter.from_model_dir(str(run_dir))
    assert_instances_match_outputs(segmenter(image), signature_outputs, image)
    assert segmenter.source.endswith("ckpt-1")


def test_lists_and_batches_give_one_result_per_image(segmenter, image, image_files):
    other = image_files.random_image(20, 60, seed=2)
    results = segmenter([image, other, image])
    assert [r.image.shape[:2] for r in results] == [(37, 45), (20, 60), (37, 45)]
    np.testing.assert_array_equal(results[0].masks, results[2].masks)
    batch = segmenter(np.stack([image, image]))
    assert len(batch) == 2
    np.testing.assert_array_equal(batch[1].scores, results[0].scores)


def test_grayscale_arrays_become_rgb(segmenter, image):
    gray = image[..., 0]
    as_rgb = segmenter(np.repeat(gray[..., None], 3, axis=2))
    for variant in (gray, gray[..., None]):
        np.testing.assert_array_equal(segmenter(variant).masks, as_rgb.masks)


def test_above_keeps_a_prefix_and_label_image_follows(segmenter, image):
    instances = segmenter(image)
    threshold = float(instances.scores[1])  # keeps at least the first two
    kept = instances.above(threshold)
    assert 2 <= len(kept) < len(instances) or np.all(instances.scores >= threshold)
    np.testing.assert_array_equal(kept.scores, instances.scores[:len(kept)])
    labels, full = kept.label_image(), instances.label_image()
    # A kept detection keeps its pixels; the others' pixels become background.
    np.testing.assert_array_equal(labels, np.where(full <= len(kept), full, 0))


def test_to_coco_is_read_by_pycocotools(segmenter, image):
    instances = segmenter(image)
    results = instances.to_coco(7)
    assert len(results) == len(instances)
    coco = COCO()
    coco.dataset = {"images": [{"id": 7, "height": 37, "width": 45}], "annotations": [],
                    "categories": [{"id": c, "name": str(c)} for c in range(1, 4)]}
    coco.createIndex()
    loaded = coco.loadRes(results)
    for annotation, mask, box, c, s in zip(
            loaded.loadAnns(loaded.getAnnIds()), instances.masks, instances.boxes,
            instances.classes, instances.scores):
        np.testing.assert_array_equal(loaded.annToMask(annotation), mask)
        assert annotation["category_id"] == c and annotation["score"] == pytest.approx(s)
        # loadRes computes the box from the mask: it is the Instances' box.
        ymin, xmin, ymax, xmax = box
        np.testing.assert_array_equal(annotation["bbox"], [xmin, ymin, xmax - xmin, ymax - ymin])
        assert annotation["area"] == mask.sum() == mask_utils.area(annotation["segmentation"])


def test_overlay_draws_only_detections_above_the_score(segmenter, image):
    instances = segmenter(image)
    np.testing.assert_array_equal(instances.overlay(min_score=2.0), image)
    drawn = instances.overlay(min_score=0.0)
    assert drawn.shape == image.shape
    # Pixels of the top detection are tinted.
    top = instances.masks[0]
    assert np.any(drawn[top] != image[top])
    assert instances.overlay(min_score=0.0, upscale=2).shape == (74, 90, 3)


def test_empty_instances():
    empty = Instances(image=np.zeros((4, 5, 3), np.uint8), masks=np.zeros((0, 4, 5), bool),
                      boxes=np.zeros((0, 4), np.float32), classes=np.zeros(0, np.int32),
                      scores=np.zeros(0, np.float32), class_names=("x",))
    np.testing.assert_array_equal(empty.label_image(), np.zeros((4, 5), np.int32))
    assert empty.to_coco(1) == [] and len(empty.above(0.5)) == 0


@pytest.mark.parametrize("bad, error, message", [
    (np.zeros((0, 5, 3), np.uint8), ValueError, "image: an empty array"),
    (np.zeros((4, 5, 4), np.uint8), ValueError, "image: shape (4, 5, 4)"),
    (np.zeros((4, 5, 3), np.uint16), ValueError, "image: dtype uint16"),
    (np.zeros((4, 5, 3), np.float32), ValueError, "image: dtype float32"),
    (np.zeros((50, 90, 3), np.uint8), ValueError, "image: is too large: 50x90"),
    (b"not an image at all", ValueError, "image: is neither a JPEG nor a PNG"),
    (b"", ValueError, "image: is empty (0 bytes)"),
    ([[1, 2], [3, 4]], TypeError, "images[0]: a list"),  # a list is a list of images
    (3.5, TypeError, "image: a float; expected a path"),
])
def test_bad_input_is_refused_naming_it(segmenter, bad, error, message):
    with pytest.raises(error) as raised:
        segmenter(bad)
    assert message in str(raised.value)


def test_a_bad_image_in_a_list_is_named_by_its_index(segmenter, image, tmp_path):
    with pytest.raises(ValueError, match=r"images\[1\]: dtype int64"):
        segmenter([image, np.zeros((4, 4, 3), np.int64)])
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        segmenter([image, str(missing)])
    # The segmenter still works after refusing input.
    assert len(segmenter(image)) >= 3


def test_model_error_message_drops_tf_decoration():
    error = tf.errors.InvalidArgumentError(
        None, None, "Graph execution error:\n\nDetected at node Assert/Assert\n"
        "assertion failed: [image_bytes[0] is empty (0 bytes)]\n\t [[{{node Assert}}]]")
    assert model_error_message(error) == "is empty (0 bytes)"
    error = tf.errors.InvalidArgumentError(
        None, None, "assertion failed: [images are too large: 9x9 = 81 pixels]")
    assert model_error_message(error) == "is too large: 9x9 = 81 pixels"
    assert model_error_message(ValueError("plain\nmore")) == "plain"


def test_encoded_images_decode_as_the_model_sees_them(segmenter, image):
    buffer = io.BytesIO()
    Image.fromarray(image).convert("RGBA").save(buffer, format="PNG")
    instances = segmenter(buffer.getvalue())  # alpha dropped, as the model does
    np.testing.assert_array_equal(instances.image, image)
    np.testing.assert_array_equal(instances.masks, segmenter(image).masks)
