"""Tests of instance_embed.predict_main: files in, PNGs and COCO results out.

A tiny random model is exported once; predict_main runs on a folder holding good
images, a text file named .png and an empty file, in a subprocess so that its exit
status is the real one. Its outputs are checked against the SavedModel's own outputs
and, for the RLE, against pycocotools.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import app
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from instance_embed import predict_main
from instance_embed import serving
from instance_embed import visualize

NUM_SEEDS = 8
CLASS_NAMES = ("disk", "ring", "bar")


def random_image(height, width, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 8, 2), max(width // 8, 2), 3), np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, make_run_dir):
    run_dir = make_run_dir(tmp_path_factory.mktemp("run"), NUM_SEEDS, seed=1)
    path = tmp_path_factory.mktemp("export")
    serving.export_from_model_dir(str(run_dir), str(path))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    good = {"street.png": encode(random_image(37, 45, seed=1), "PNG"),
            "field.jpg": encode(random_image(20, 60, seed=2), "JPEG"),
            "gray.png": encode(random_image(24, 24, seed=3)[..., 0], "PNG")}
    for name, data in good.items():
        (folder / name).write_bytes(data)
    (folder / "notes.png").write_text("not an image, whatever the name says\n")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "subfolder").mkdir()  # not a file: skipped
    return folder, good


@pytest.fixture(scope="module")
def ground_truth_dir(tmp_path_factory):
    """A ground-truth picture for street.png only (any picture: it is shown as it is)."""
    folder = tmp_path_factory.mktemp("ground_truth")
    (folder / "street.png").write_bytes(encode(random_image(70, 90, seed=4), "PNG"))
    return folder


@pytest.fixture(scope="module")
def run(export_dir, inputs, ground_truth_dir, tmp_path_factory):
    folder, _ = inputs
    output = tmp_path_factory.mktemp("predictions")
    process = subprocess.run(
        [sys.executable, "-m", "instance_embed.predict_main", f"--saved_model={export_dir}",
         f"--input={folder}", f"--output={output}", "--overlay_min_score=0",
         f"--ground_truth_dir={ground_truth_dir}"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return process, output


@pytest.fixture(scope="module")
def model_outputs(export_dir, inputs):
    """The SavedModel's outputs for each good file, called directly."""
    _, good = inputs
    predict, _ = serving.load_signature(str(export_dir))
    return {os.path.splitext(name)[0]: {k: v.numpy()[0] for k, v in
                                        predict(tf.constant([data])).items()}
            for name, data in good.items()}


def test_bad_files_are_reported_and_exit_status_is_nonzero(run):
    process, _ = run
    assert process.returncode == 1, process.stderr[-3000:]
    failed = [line for line in process.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2, process.stderr[-3000:]
    assert any("notes.png" in line and "neither a JPEG nor a PNG" in line for line in failed)
    assert any("empty.jpg" in line and "is empty (0 bytes)" in line for line in failed)
    assert "3 of 5 images done" in process.stdout


def test_a_run_logs_no_errors_but_for_the_bad_files(run, error_log_lines):
    # The serving path's counterpart of test_mains' check for eval_main (where grappler
    # failed to sort the seed selection's graph and oneDNN logged its fallback for a
    # boolean transpose, ERROR lines a user reads as failures).
    process, _ = run
    assert [line for line in error_log_lines(process.stderr)
            if "notes.png" not in line and "empty.jpg" not in line] == []


def test_instance_pngs_match_the_saved_model(run, model_outputs, inputs):
    _, output = run
    _, good = inputs
    written = sorted(os.listdir(output))
    expected = sorted([f"{stem}_{kind}.png" for stem in model_outputs
                       for kind in ("instances", "overlay")]
                      + ["overview.png", "predictions.json"])
    assert written == expected
    for stem, outputs in model_outputs.items():
        with Image.open(output / f"{stem}_instances.png") as picture:
            assert picture.mode == "I;16"  # 16-bit grayscale PNG
            labels = np.asarray(picture)
        np.testing.assert_array_equal(labels, outputs["instance_map"])
        assert labels.max() >= 1


def test_overlays_show_masks_over_the_image(run, model_outputs, inputs):
    _, output = run
    _, good = inputs
    for name, data in good.items():
        stem = os.path.splitext(name)[0]
        image = tf.io.decode_image(data, channels=3).numpy()
        with Image.open(output / f"{stem}_overlay.png") as picture:
            assert picture.mode == "RGB"
            overlay = np.asarray(picture)
        assert overlay.shape == image.shape
        outputs = model_outputs[stem]
        masks = outputs["detection_masks"][:outputs["num_detections"]].astype(bool)
        union = masks.any(axis=0)
        assert (overlay[union] != image[union]).any(axis=-1).mean() > 0.5
        # Away from the masks and the labels written at their top-left corners, the
        # image is untouched.
        untouched = ~union
        for mask in masks:
            rows, cols = np.nonzero(mask)
            if rows.size == 0:  # a seed's mask can vanish at full resolution
                continue
            untouched[rows.min():rows.min() + 16, cols.min():cols.min() + 160] = False
        np.testing.assert_array_equal(overlay[untouched], image[untouched])


def find_panel(picture, panel):
    """[(y, x)] where `panel` appears, pixel for pixel, in `picture`."""
    h, w = panel.shape[:2]
    candidates = zip(*np.nonzero((picture[:picture.shape[0] - h + 1, :picture.shape[1] - w + 1]
                                  == panel[0, 0]).all(axis=-1)))
    return [(y, x) for y, x in candidates if (picture[y:y + h, x:x + w] == panel).all()]


def test_overview_shows_each_image_with_its_ground_truth_and_prediction(
        run, model_outputs, inputs, ground_truth_dir):
    _, output = run
    _, good = inputs
    with Image.open(output / "overview.png") as picture:
        overview = np.asarray(picture.convert("RGB"))
    with Image.open(ground_truth_dir / "street.png") as picture:
        truth = np.asarray(picture)
    for name, data in good.items():
        stem = os.path.splitext(name)[0]
        image = tf.io.decode_image(data, channels=3).numpy()
        scale = visualize.legible_upscale(*image.shape[:2])
        enlarged = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
        found = find_panel(overview, enlarged)
        assert len(found) == 1, (stem, found)  # one tile per image
        (y, x), = found
        outputs, count = model_outputs[stem], int(model_outputs[stem]["num_detections"])
        prediction = visualize.overlay_instances(
            image, outputs["detection_masks"][:count] == 1,
            outputs["detection_classes"][:count], CLASS_NAMES,
            outputs["detection_scores"][:count], upscale=scale)
        # Left to right: the image, its ground truth if there is one, the prediction.
        right = find_panel(overview[y:y + max(enlarged.shape[0], truth.shape[0])], prediction)
        assert len(right) == 1 and right[0][1] > x + enlarged.shape[1]
        beside = find_panel(overview[y:y + truth.shape[0], x:right[0][1]], truth)
        assert len(beside) == (1 if stem == "street" else 0), stem


def test_unreadable_ground_truth_picture_is_a_usage_error_naming_it(
        export_dir, inputs, tmp_path):
    folder, _ = inputs
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    (truth_dir / "field.png").write_text("not a picture")
    process = subprocess.run(
        [sys.executable, "-m", "instance_embed.predict_main", f"--saved_model={export_dir}",
         f"--input={folder / 'field.jpg'}", f"--output={tmp_path / 'out'}",
         f"--ground_truth_dir={truth_dir}"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert process.returncode != 0
    assert f"{truth_dir / 'field.png'}" in process.stderr and "field.jpg" in process.stderr


def test_predictions_json_is_coco_results_of_the_model(run, model_outputs, inputs):
    _, output = run
    with open(output / "predictions.json") as f:
        results = json.load(f)
    assert {r["image_id"] for r in results} == set(model_outputs)
    for stem, outputs in model_outputs.items():
        mine = [r for r in results if r["image_id"] == stem]
        count = int(outputs["num_detections"])
        assert len(mine) == count  # --min_score=0 keeps every valid detection
        for k, result in enumerate(mine):
            assert result["category_id"] == outputs["detection_classes"][k]
            assert result["score"] == pytest.approx(float(outputs["detection_scores"][k]))
            mask = mask_utils.decode(result["segmentation"])
            np.testing.assert_array_equal(mask, outputs["detection_masks"][k])

    # pycocotools reads the file as a results file for matching ground truth.
    coco = COCO()
    coco.dataset = {
        "images": [{"id": stem, "height": int(o["image_size"][0]),
                    "width": int(o["image_size"][1])} for stem, o in model_outputs.items()],
        "annotations": [],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]}
    coco.createIndex()
    detections = coco.loadRes(str(output / "predictions.json"))
    rank, seen = [], {}  # each result's position among its image's results
    for result in results:
        rank.append(seen.get(result["image_id"], 0))
        seen[result["image_id"]] = rank[-1] + 1
    annotations = detections.loadAnns(detections.getAnnIds())
    assert len(annotations) == len(results)
    for annotation in annotations:  # ids number the results from 1, in file order
        i = annotation["id"] - 1
        outputs = model_outputs[results[i]["image_id"]]
        np.testing.assert_array_equal(detections.annToMask(annotation),
                                      outputs["detection_masks"][rank[i]])


def test_missing_saved_model_is_a_usage_error(tmp_path, inputs):
    folder, _ = inputs
    argv = ["predict_main", f"--saved_model={tmp_path / 'nothing'}", f"--input={folder}",
            f"--output={tmp_path / 'out'}"]
    predict_main.FLAGS(argv)
    try:
        with pytest.raises(app.UsageError, match="No SavedModel in"):
            predict_main.main(argv[:1])
        predict_main.FLAGS(argv[:3] + [f"--input={tmp_path / '*.jpg'}"])
        with pytest.raises(app.UsageError, match="no file matches"):
            predict_main.main(argv[:1])
    finally:
        predict_main.FLAGS.unparse_flags()


def test_output_stems_and_inputs(tmp_path):
    assert predict_main.output_stems(["a/x.png", "b/y.jpg"]) == ["x", "y"]
    assert predict_main.output_stems(["a.png", "a.jpg", "b.png"]) == ["a_png", "a_jpg", "b"]
    assert predict_main.output_stems(["d1/a.png", "d2/a.png"]) == ["a_png", "a_png_2"]
    for name in ("1.png", "2.jpg", "3.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert predict_main.find_inputs(str(tmp_path)) == [
        str(tmp_path / n) for n in ("1.png", "2.jpg", "3.txt")]
    assert predict_main.find_inputs(str(tmp_path / "*.png")) == [str(tmp_path / "1.png")]
    assert predict_main.find_inputs(str(tmp_path / "2.jpg")) == [str(tmp_path / "2.jpg")]
    assert predict_main.find_inputs(str(tmp_path / "none*")) == []


def test_tile_size_predicts_in_tiles_and_refuses_a_bad_size(export_dir, inputs, tmp_path):
    folder, _ = inputs
    argv = ["predict_main", f"--saved_model={export_dir}", f"--input={folder / 'street.png'}",
            f"--output={tmp_path / 'tiled'}", "--tile_size=32", "--tile_overlap=8",
            "--noprogress"]
    predict_main.FLAGS(argv)
    try:
        assert predict_main.main(argv[:1]) == 0  # 37 x 45 in 32-pixel tiles
        with open(tmp_path / "tiled" / "predictions.json") as f:
            results = json.load(f)
        assert results and {r["image_id"] for r in results} == {"street"}
        with Image.open(tmp_path / "tiled" / "street_instances.png") as labels:
            assert labels.size == (45, 37)
        predict_main.FLAGS(argv[:-3] + ["--tile_size=30"])
        with pytest.raises(app.UsageError, match="--tile_size: .*multiple of 32"):
            predict_main.main(argv[:1])
    finally:
        predict_main.FLAGS.unparse_flags()
