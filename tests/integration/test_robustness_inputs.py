"""Odd and broken image files through `predict_main` and the SavedModel (issue 8).

One tiny model (light backbone, random weights) is exported once with the default
pixel limit (4096 x 4096). Every file is either answered correctly, meaning exactly
what the `serving_images` signature gives for the RGB pixels the file holds (worked
out here with Pillow, independently of the model's decoder), or refused with a
message naming the file and the problem, while `predict_main` goes on with the others.

The pixel limit is checked on the size in the file header before anything is decoded:
a PNG whose header claims 100000 x 100000 pixels but holds no image data is refused
as too large (a decoder would have failed on the missing data instead), and a real,
decodable 4100 x 4100 PNG is refused by the same check.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from instance_embed import configs
from instance_embed import inference
from instance_embed import predict_main
from instance_embed import serving
from instance_embed.model import ModelConfig, build_model
from instance_embed.serving import images as image_decoding


NUM_SEEDS = 6
STRIDE = 8


def _model():
    model_config = ModelConfig(backbone="light", embedding_dim=8, num_classes=2,
                               head_channels=16, head_depth=1)
    model = build_model(model_config)
    rng = np.random.default_rng(5)
    for variable in model.weights:
        if variable.path.endswith("gamma"):  # zero-initialised: blocks start as identity
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype(np.float32))
    config = configs.ExperimentConfig(
        model=model_config, inference=inference.InferenceConfig(num_seeds=NUM_SEEDS))
    return model, config


@pytest.fixture(scope="module")
def tiny_model():
    return _model()


@pytest.fixture(scope="module")
def export_dir(tiny_model, tmp_path_factory):
    model, config = tiny_model
    path = tmp_path_factory.mktemp("export")
    serving.export_saved_model(model, config, str(path),
                               serving.ExportConfig(class_names=("thing", "stuff")))
    return path


@pytest.fixture(scope="module")
def loaded(export_dir):
    return tf.saved_model.load(serving.resolve_saved_model_dir(str(export_dir)))


# The names of `_good_files`, for the parameters (they are known before any file exists).
GOOD_FILE_NAMES = ("gray.jpg", "gray.png", "gray16.png", "one.jpg", "one.png", "palette.png",
                   "rgb.png", "rgba.png", "tall.png", "wide.png")


def _good_files(image_files):
    """{file name: (bytes, the RGB pixels it holds)}: every kind the model must read."""
    rgb = image_files.random_image(37, 45, seed=1)
    deep = (np.arange(23 * 29, dtype=np.uint32).reshape(23, 29) * 97 % 65536).astype(np.uint16)
    gray = image_files.random_image(24, 30, seed=3)[..., 0]
    rgba = np.concatenate([rgb, np.random.default_rng(0).integers(
        0, 256, rgb.shape[:2] + (1,), np.uint8)], axis=-1)
    palette = Image.fromarray(image_files.random_image(20, 26, seed=4)).convert("P")
    one = np.array([[[200, 30, 90]]], np.uint8)
    gray_jpeg = image_files.encode(gray, "JPEG", quality=95)
    one_jpeg = image_files.encode(one, "JPEG", quality=95)
    wide = image_files.random_image(50, 4000, seed=6)
    tall = image_files.random_image(4000, 50, seed=7)
    return {
        "rgb.png": (image_files.encode(rgb, "PNG"), rgb),
        # 16-bit samples become 8-bit by keeping their high byte.
        "gray16.png": (image_files.encode(Image.fromarray(deep), "PNG"),
                       np.repeat((deep >> 8).astype(np.uint8)[..., None], 3, axis=-1)),
        "gray.png": (image_files.encode(gray, "PNG"), np.repeat(gray[..., None], 3, axis=-1)),
        # JPEG pixels depend on the decoder's IDCT: read with TF's, as the model does.
        "gray.jpg": (gray_jpeg, tf.io.decode_jpeg(gray_jpeg, channels=3).numpy()),
        "rgba.png": (image_files.encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb),
        "palette.png": (image_files.encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        "one.png": (image_files.encode(one, "PNG"), one),
        "one.jpg": (one_jpeg, tf.io.decode_jpeg(one_jpeg, channels=3).numpy()),
        "wide.png": (image_files.encode(wide, "PNG"), wide),
        "tall.png": (image_files.encode(tall, "PNG"), tall),
    }


def _real_png(width, height):
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


def _bad_files(image_files):
    """{file name: (bytes, expected message)}."""
    png = image_files.encode(image_files.random_image(30, 40, seed=8), "PNG")
    noisy = image_files.encode(
        np.random.default_rng(3).integers(0, 256, (60, 60, 3), np.uint8), "PNG")
    jpeg = image_files.encode(image_files.random_image(30, 40, seed=9), "JPEG")
    gif = io.BytesIO()
    Image.fromarray(image_files.random_image(8, 8)).save(gif, "GIF")
    return {
        "empty.png": (b"", "is empty (0 bytes)"),
        "notes.png": (b"these are my notes, not an image\n", "is neither a JPEG nor a PNG"),
        "animation.gif": (gif.getvalue(), "is neither a JPEG nor a PNG"),
        "cut_header.png": (png[:30], "has a corrupt or truncated PNG header"),
        "cut_data.png": (noisy[:len(noisy) // 2], "could not be decoded: corrupt or "
                                                    "truncated PNG data"),
        "cut_header.jpg": (jpeg[:40], "has a corrupt or truncated JPEG header"),
        "cut_data.jpg": (jpeg[:len(jpeg) // 2], "could not be decoded: corrupt or "
                                                  "truncated JPEG data"),
        "huge_header.png": (image_files.png_header_only(100_000, 100_000),
                            "is too large: 100000x100000 = 10000000000 pixels, over "
                            f"max_image_pixels={image_decoding.DEFAULT_MAX_IMAGE_PIXELS}"),
        "huge_header.jpg": (image_files.jpeg_with_size(jpeg, 65_000, 60_000),
                            "is too large: 60000x65000"),
        "huge.png": (_real_png(4100, 4100), "is too large: 4100x4100 = 16810000 pixels"),
    }


@pytest.fixture(scope="module")
def good_files(image_files):
    return _good_files(image_files)


@pytest.fixture(scope="module")
def bad_files(image_files):
    return _bad_files(image_files)


@pytest.fixture(scope="module")
def files(tmp_path_factory, good_files, bad_files):
    folder = tmp_path_factory.mktemp("inputs")
    good, bad = good_files, bad_files
    for name, (data, _) in {**good, **bad}.items():
        (folder / name).write_bytes(data)
    return folder, good, bad


def _expected(loaded, pixels):
    outputs = loaded.signatures["serving_images"](images=tf.constant(pixels[None]))
    return {key: value.numpy()[0] for key, value in outputs.items()}


# ---------------------------------------------------------------------------------------
# The SavedModel, called directly.


def test_the_good_files_are_those_named(good_files):
    assert tuple(sorted(good_files)) == GOOD_FILE_NAMES


@pytest.mark.parametrize("name", GOOD_FILE_NAMES)
def test_saved_model_reads_every_kind_of_image(loaded, name, good_files):
    data, pixels = good_files[name]
    actual = loaded.signatures["serving_default"](image_bytes=tf.constant([data]))
    actual = {key: value.numpy()[0] for key, value in actual.items()}
    expected = _expected(loaded, pixels)
    height, width = pixels.shape[:2]
    np.testing.assert_array_equal(actual["image_size"], [height, width])
    assert actual["detection_masks"].shape == (NUM_SEEDS, height, width)
    for key in serving.DENSE_OUTPUTS:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=key)
    _assert_consistent_detections(actual, height, width)


def _assert_consistent_detections(outputs, height, width):
    """Valid detections first, sorted, in range, and an instance map made of them."""
    count = int(outputs["num_detections"])
    masks = outputs["detection_masks"].astype(bool)
    assert 1 <= count <= NUM_SEEDS
    # Only heads pixels that see the image may seed: at stride 8 there are
    # ceil(H / 8) x ceil(W / 8) of them.
    assert count <= -(-height // STRIDE) * -(-width // STRIDE)
    assert not masks[count:].any()
    scores = outputs["detection_scores"]
    assert np.all(np.diff(scores[:count]) <= 0) and np.all(scores[count:] == 0)
    assert np.all((scores[:count] > 0) & (scores[:count] <= 1))
    assert np.all(np.isin(outputs["detection_classes"][:count], [1, 2]))
    instance_map = outputs["instance_map"]
    covered = masks.any(axis=0)
    np.testing.assert_array_equal(instance_map > 0, covered)
    first = np.argmax(masks, axis=0) + 1
    np.testing.assert_array_equal(instance_map[covered], first[covered])


def test_saved_model_refuses_bad_files_by_index_and_keeps_working(loaded, image_files,
                                                                   bad_files):
    default = loaded.signatures["serving_default"]
    good = image_files.encode(image_files.random_image(30, 40), "PNG")
    for name, (data, message) in bad_files.items():
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            default(image_bytes=tf.constant([good, data]))
        assert f"image_bytes[1] {message}" in info.value.message, name
    assert int(default(image_bytes=tf.constant([good]))["num_detections"][0]) >= 1


@pytest.mark.parametrize("size", [(1, 1), (1, 9), (9, 1), (8, 8), (9, 9), (17, 3),
                                  (33, 70), (3, 200)])
def test_no_detection_is_seeded_from_the_padding(tiny_model, size, image_files):
    """Small images are padded to 32 x 32: detections only come from heads pixels that
    see the image (a 1 x 1 image has one such pixel), the other slots are invalid."""
    model, config = tiny_model
    height, width = size
    image = image_files.random_image(height, width, seed=height * 1000 + width)
    outputs = inference.predict_images(model, tf.constant(image[None]), config.model.taus,
                                       config.inference)
    outputs = {key: value.numpy()[0] for key, value in outputs.items()}
    count = int(outputs["num_detections"])
    inside = -(-height // STRIDE) * -(-width // STRIDE)
    assert count == min(NUM_SEEDS, inside)
    padded_width = -(-width // 32) * 32 // STRIDE
    seeds = outputs["seed_indices"]
    rows, cols = seeds[:count] // padded_width, seeds[:count] % padded_width
    assert np.all(rows * STRIDE < height) and np.all(cols * STRIDE < width)
    np.testing.assert_array_equal(seeds[count:], -1)
    masks = outputs["detection_masks"]
    assert masks.shape == (NUM_SEEDS, height, width)
    assert not masks[count:].any()
    # In a one-pixel-high (or -wide) image, the top-left pixel of the seed's stride cell
    # reads the seed's heads pixel with bilinear weight 1 along the short axis and
    # 9/16 along the other: it is in the mask, which is never empty. (Elsewhere a cell
    # that is only partly inside the image can lose its whole mask to the crop.)
    if height == 1 or width == 1:
        assert masks[:count].reshape(count, -1).any(axis=1).all()


# ---------------------------------------------------------------------------------------
# predict_main on a folder of all of them.


@pytest.fixture(scope="module")
def run(export_dir, files, tmp_path_factory):
    folder, _, _ = files
    output = tmp_path_factory.mktemp("predictions")
    process = subprocess.run(
        [sys.executable, "-m", "instance_embed.predict_main", f"--saved_model={export_dir}",
         f"--input={folder}", f"--output={output}", "--overlay_min_score=0", "--noprogress"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return process, output


def _stems(files):
    """{file name: output stem}, as predict_main names its outputs."""
    folder, good, bad = files
    names = sorted({**good, **bad})
    return dict(zip(names, predict_main.output_stems([str(folder / n) for n in names])))


def test_predict_main_reports_each_bad_file_and_finishes_the_others(run, files):
    process, output = run
    _, good, bad = files
    assert process.returncode == 1, process.stderr[-3000:]
    failed = {}
    for line in process.stderr.splitlines():
        if line.startswith("FAILED "):
            path, reason = line[len("FAILED "):].split(": ", 1)
            failed[os.path.basename(path)] = reason
    assert set(failed) == set(bad), process.stderr[-3000:]
    stems = _stems(files)
    for name, (_, message) in bad.items():
        assert message in failed[name], (name, failed[name])
        assert not (output / f"{stems[name]}_instances.png").exists(), name
        assert not (output / f"{stems[name]}_overlay.png").exists(), name
    total = len(good) + len(bad)
    assert f"{len(good)} of {total} images done" in process.stdout


def test_predict_main_outputs_of_good_files_match_the_saved_model(run, files, loaded):
    _, output = run
    _, good, _ = files
    with open(output / "predictions.json") as f:
        results = json.load(f)
    stems = _stems(files)
    for name, (_, pixels) in good.items():
        stem = stems[name]
        expected = _expected(loaded, pixels)
        height, width = pixels.shape[:2]
        instances = np.asarray(Image.open(output / f"{stem}_instances.png"))
        np.testing.assert_array_equal(instances, expected["instance_map"], err_msg=name)
        overlay = np.asarray(Image.open(output / f"{stem}_overlay.png"))
        assert overlay.shape == (height, width, 3), name
        mine = [r for r in results if r["image_id"] == stem]
        assert len(mine) == int(expected["num_detections"]), name
        for result in mine:
            assert result["segmentation"]["size"] == [height, width]
            assert 0 < result["score"] <= 1 and result["category_id"] in (1, 2)
