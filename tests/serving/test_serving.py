"""Tests of `instance_embed.serving`: the SavedModel that TF Serving loads.

A tiny run directory (light backbone with random weights, K = 10) is exported once per
module. Its outputs are compared with the in-process model (`inference.make_predict_fn`)
after loading
in a fresh Python process, in `saved_model_cli run` (the TF1/C++-style loader that TF
Serving uses) and in this process. Image headers are checked against Pillow's reading
of the same files, and bad requests against the messages they must produce.
"""

import base64
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from instance_embed import inference
from instance_embed import ops
from instance_embed import serving
from instance_embed.serving import export
from instance_embed.serving import images as image_decoding
from instance_embed.serving import warmup as serving_warmup
from instance_embed.training import checkpoints

NUM_SEEDS = 10
MAX_PIXELS = 200 * 200
CLASS_NAMES = ("disk", "ring", "bar")  # synthetic_shapes, the config's default dataset
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, make_run_dir):
    return make_run_dir(tmp_path_factory.mktemp("run"), NUM_SEEDS)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    export_dir = tmp_path_factory.mktemp("export")
    path = serving.export_from_model_dir(
        str(run_dir), str(export_dir), serving.ExportConfig(max_image_pixels=MAX_PIXELS))
    return path


@pytest.fixture(scope="module")
def reference(run_dir):
    """The in-process model: predict(images uint8 [B, H, W, 3]) -> numpy dict."""
    model, config, _ = checkpoints.restore_model(str(run_dir))
    predict = inference.make_predict_fn(model, config.model.taus, config.inference)

    def run(images):
        outputs = predict(tf.constant(images))
        return {key: value.numpy() for key, value in outputs.items()}

    return run


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported)


@pytest.fixture(scope="module")
def images(image_files):
    return {"a": image_files.random_image(37, 45, seed=1),
            "b": image_files.random_image(20, 60, seed=2)}


def assert_outputs_equal(actual, expected, masks_as="uint8"):
    """Exported outputs (uint8 masks) against the in-process model's (bool masks)."""
    count = expected["num_detections"]
    np.testing.assert_array_equal(actual["num_detections"], count)
    np.testing.assert_array_equal(actual["detection_classes"], expected["detection_classes"])
    np.testing.assert_allclose(actual["detection_scores"], expected["detection_scores"],
                               rtol=1e-5, atol=1e-6)
    assert actual["detection_masks"].dtype == np.dtype(masks_as)
    np.testing.assert_array_equal(actual["detection_masks"],
                                  expected["detection_masks"].astype(np.uint8))
    np.testing.assert_array_equal(actual["instance_map"], expected["instance_map"])


def test_fixture_model_gives_varied_detections(reference, images):
    # Otherwise the comparisons below would compare empty or identical masks.
    outputs = reference(images["a"][None])
    assert len(np.unique(outputs["instance_map"])) >= 3
    assert len(np.unique(outputs["detection_scores"])) > 1


# ----------------------------------------------------------------------------------
# Subprocesses: a fresh Python process and the TF1 loader, started together.

FRESH_PROCESS = """
import sys
import numpy as np
import tensorflow as tf
path, png_file, images_file, out_file = sys.argv[1:]
loaded = tf.saved_model.load(path)
with open(png_file, "rb") as f:
    data = f.read()
results = {}
calls = (("serving_default", "image_bytes", tf.constant([data])),
         ("serving_compact", "image_bytes", tf.constant([data])),
         ("serving_images", "images", tf.constant(np.load(images_file))))
for signature, name, value in calls:
    for key, out in loaded.signatures[signature](**{name: value}).items():
        results[signature + "/" + key] = out.numpy()
np.savez(out_file, **results)
"""


def saved_model_cli():
    script = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]


@pytest.fixture(scope="module")
def subprocess_runs(exported, images, tmp_path_factory, image_files):
    """Runs every out-of-process check at once (each spends most of its time importing TF)."""
    tmp = tmp_path_factory.mktemp("subprocess")
    png_file = tmp / "a.png"
    png_file.write_bytes(image_files.encode(images["a"], "PNG"))
    images_file = tmp / "images.npy"
    np.save(images_file, images["a"][None])
    bytes_file = tmp / "bytes.npy"
    np.save(bytes_file, np.array([png_file.read_bytes()], dtype=object))
    cli = saved_model_cli()
    commands = {
        "fresh": [sys.executable, "-c", FRESH_PROCESS, exported, str(png_file),
                  str(images_file), str(tmp / "fresh.npz")],
        "cli_images": cli + ["run", "--dir", exported, "--tag_set", "serve",
                             "--signature_def", "serving_images",
                             "--inputs", f"images={images_file}",
                             "--outdir", str(tmp / "cli_images"), "--overwrite"],
        "cli_bytes": cli + ["run", "--dir", exported, "--tag_set", "serve",
                            "--signature_def", "serving_default",
                            "--inputs", f"image_bytes={bytes_file}",
                            "--outdir", str(tmp / "cli_bytes"), "--overwrite"],
        "cli_show": cli + ["show", "--dir", exported, "--all"],
    }
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = {name: subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env)
                 for name, command in commands.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=SUBPROCESS_TIMEOUT)
        results[name] = (process.returncode, stdout, stderr)
    results["tmp"] = tmp
    return results


def _succeeded(runs, name):
    code, stdout, stderr = runs[name]
    assert code == 0, f"{name} failed ({code}):\n{stdout[-3000:]}\n{stderr[-3000:]}"


def _load_outdir(directory):
    return {name[:-4]: np.load(os.path.join(directory, name), allow_pickle=True)
            for name in os.listdir(directory) if name.endswith(".npy")}


def test_fresh_process_matches_in_process_model(subprocess_runs, reference, images):
    _succeeded(subprocess_runs, "fresh")
    saved = np.load(subprocess_runs["tmp"] / "fresh.npz", allow_pickle=True)
    expected = reference(images["a"][None])
    for signature in ("serving_default", "serving_images"):
        actual = {key.split("/", 1)[1]: saved[key] for key in saved.files
                  if key.startswith(signature + "/")}
        assert set(actual) == set(serving.DENSE_OUTPUTS)
        assert_outputs_equal(actual, expected)
        np.testing.assert_array_equal(actual["image_size"], [[37, 45]])
    compact = {key.split("/", 1)[1]: saved[key] for key in saved.files
               if key.startswith("serving_compact/")}
    assert set(compact) == set(serving.COMPACT_OUTPUTS)
    np.testing.assert_array_equal(compact["detection_classes"], expected["detection_classes"])
    png = tf.io.decode_png(compact["instance_map_png_bytes"][0], dtype=tf.uint16).numpy()
    np.testing.assert_array_equal(png[..., 0], expected["instance_map"][0])


@pytest.mark.parametrize("name", ["cli_images", "cli_bytes"])
def test_saved_model_cli_run_executes_signatures(subprocess_runs, reference, images, name):
    """The TF1 loader (as TF Serving's C++ loader) restores every variable and runs."""
    _succeeded(subprocess_runs, name)
    actual = _load_outdir(subprocess_runs["tmp"] / name)
    assert set(actual) == set(serving.DENSE_OUTPUTS)
    assert_outputs_equal(actual, reference(images["a"][None]))


def test_saved_model_cli_show_lists_signatures_and_outputs(subprocess_runs):
    _succeeded(subprocess_runs, "cli_show")
    text = subprocess_runs["cli_show"][1]
    blocks = re.split(r"signature_def\['", text)[1:]
    found = {}
    for block in blocks:
        name = block.split("'", 1)[0]
        found[name] = (set(re.findall(r"inputs\['(\w+)'\]", block)),
                       set(re.findall(r"outputs\['(\w+)'\]", block)))
    assert found["serving_default"] == ({"image_bytes"}, set(serving.DENSE_OUTPUTS))
    assert found["serving_images"] == ({"images"}, set(serving.DENSE_OUTPUTS))
    assert found["serving_compact"] == ({"image_bytes"}, set(serving.COMPACT_OUTPUTS))
    assert "dtype: DT_STRING" in text and "dtype: DT_UINT8" in text


# ----------------------------------------------------------------------------------
# The loaded model, in this process.


def test_rest_request_body_runs_on_signature(loaded, reference, images, image_files):
    """The documented REST body, read as TF Serving reads its row format."""
    files = [image_files.encode(images["a"], "PNG"), image_files.encode(images["a"], "PNG")]
    body = json.loads(json.dumps(serving.rest_request_body(files)))
    assert body["signature_name"] == "serving_compact"
    # Row format: one object per instance, keyed by input name; {"b64": ...} is binary.
    tensor = tf.constant([base64.b64decode(instance["image_bytes"]["b64"])
                          for instance in body["instances"]])
    outputs = loaded.signatures[body["signature_name"]](image_bytes=tensor)
    # TF Serving answers {"predictions": [...]} with outputs named *_bytes in base64.
    response = json.loads(json.dumps({"predictions": [
        {key: ({"b64": base64.b64encode(value[i].numpy()).decode()} if key.endswith("_bytes")
               else value[i].numpy().tolist()) for key, value in outputs.items()}
        for i in range(len(files))]}))
    expected = reference(images["a"][None])
    for prediction in response["predictions"]:
        png = base64.b64decode(prediction["instance_map_png_bytes"]["b64"])
        instance_map = np.asarray(Image.open(io.BytesIO(png)))
        np.testing.assert_array_equal(instance_map, expected["instance_map"][0])
        assert prediction["num_detections"] == expected["num_detections"][0]
        assert prediction["detection_classes"] == expected["detection_classes"][0].tolist()
        assert prediction["image_size"] == [37, 45]


def test_mixed_sizes_pad_to_largest_and_match_single_images(loaded, images, image_files):
    default = loaded.signatures["serving_default"]
    files = [image_files.encode(images["a"], "PNG"), image_files.encode(images["b"], "PNG")]
    together = {k: v.numpy() for k, v in default(image_bytes=tf.constant(files)).items()}
    np.testing.assert_array_equal(together["image_size"], [[37, 45], [20, 60]])
    assert together["detection_masks"].shape == (2, NUM_SEEDS, 37, 60)
    assert together["instance_map"].shape == (2, 37, 60)
    for i, (data, (height, width)) in enumerate(zip(files, [(37, 45), (20, 60)])):
        alone = {k: v.numpy()[0] for k, v in default(image_bytes=tf.constant([data])).items()}
        for key in ("num_detections", "detection_classes", "detection_scores"):
            np.testing.assert_array_equal(together[key][i], alone[key])
        masks, instance_map = together["detection_masks"][i], together["instance_map"][i]
        np.testing.assert_array_equal(masks[:, :height, :width], alone["detection_masks"])
        np.testing.assert_array_equal(instance_map[:height, :width], alone["instance_map"])
        # Beyond its own size an image has no mask and no instance.
        assert masks.sum() == alone["detection_masks"].sum()
        assert np.count_nonzero(instance_map) == np.count_nonzero(alone["instance_map"])
        png = np.asarray(Image.open(io.BytesIO(together["instance_map_png_bytes"][i])))
        assert png.shape == (height, width)
        np.testing.assert_array_equal(png, alone["instance_map"])


def numpy_boxes(masks, height, width):
    """Normalised (ymin, xmin, ymax, xmax) of each [H, W] mask, pixel edges; 0 if empty."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for k, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        if len(ys):
            boxes[k] = [ys.min() / height, xs.min() / width,
                        (ys.max() + 1) / height, (xs.max() + 1) / width]
    return boxes


def test_boxes_enclose_the_masks_in_every_signature(loaded, images, image_files):
    files = [image_files.encode(images["a"], "PNG"), image_files.encode(images["b"], "PNG")]
    dense = {k: v.numpy() for k, v in
             loaded.signatures["serving_default"](image_bytes=tf.constant(files)).items()}
    compact = loaded.signatures["serving_compact"](image_bytes=tf.constant(files))
    pixels = loaded.signatures["serving_images"](images=tf.constant(images["a"][None]))
    nonempty = 0
    for i, (height, width) in enumerate([(37, 45), (20, 60)]):
        masks = dense["detection_masks"][i][:, :height, :width]
        expected = numpy_boxes(masks, height, width)
        nonempty += np.count_nonzero(expected.any(axis=1))
        # By the image's own size, not the batch's padded 37 x 60.
        np.testing.assert_allclose(dense["detection_boxes"][i], expected, rtol=1e-6)
        np.testing.assert_allclose(compact["detection_boxes"][i], expected, rtol=1e-6)
        # Invalid slots have empty masks and zero boxes.
        assert not expected[dense["num_detections"][i]:].any()
    assert nonempty >= 3
    np.testing.assert_allclose(pixels["detection_boxes"][0], dense["detection_boxes"][0],
                               rtol=1e-6)


def run_request(loaded, request):
    """What TF Serving does with a PredictRequest: the signature on its tensors."""
    signature = loaded.signatures[request.model_spec.signature_name]
    inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
    outputs = {key: value.numpy() for key, value in signature(**inputs).items()}
    if request.output_filter:
        outputs = {key: outputs[key] for key in request.output_filter}
    return outputs


def test_warmup_requests_cover_every_signature_and_run(exported, loaded):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(exported, "assets.extra", "tf_serving_warmup_requests")
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(path)]
    requests = {log.predict_log.request.model_spec.signature_name: log.predict_log.request
                for log in logs}
    assert len(logs) == 3 and set(requests) == {"serving_default", "serving_compact",
                                                "serving_images"}
    # The run's 512 x 512 training crops are over this export's pixel limit: the
    # requests use the largest square within it.
    size = 200
    image = serving_warmup.warmup_image(size, size)
    png = tf.make_ndarray(requests["serving_default"].inputs["image_bytes"])[0]
    np.testing.assert_array_equal(tf.io.decode_png(png).numpy(), image)
    np.testing.assert_array_equal(
        tf.make_ndarray(requests["serving_images"].inputs["images"]), image[None])
    outputs = {name: run_request(loaded, request) for name, request in requests.items()}
    for name in ("serving_default", "serving_images"):
        np.testing.assert_array_equal(outputs[name]["image_size"], [[size, size]])
    assert_outputs_equal(outputs["serving_images"], {
        **outputs["serving_default"],
        "detection_masks": outputs["serving_default"]["detection_masks"] == 1})
    np.testing.assert_array_equal(outputs["serving_compact"]["detection_scores"],
                                  outputs["serving_default"]["detection_scores"])


def test_grpc_request_runs_as_the_server_runs_it(loaded, reference, images, image_files):
    request = serving.predict_request("serving_default", [image_files.encode(images["a"], "PNG")])
    request.output_filter.extend(["num_detections", "detection_masks", "detection_classes",
                                  "detection_scores", "instance_map"])
    assert request.model_spec.name == "instance_embed"
    outputs = run_request(loaded, request)
    assert_outputs_equal(outputs, reference(images["a"][None]))
    pixels = serving.predict_request("serving_images", images["b"][None])
    np.testing.assert_array_equal(run_request(loaded, pixels)["image_size"], [[20, 60]])


def test_mask_boxes_by_hand():
    masks = np.zeros((1, 3, 4, 5), bool)
    masks[0, 0, 2, 3] = True  # one pixel
    masks[0, 1, 1:4, 0:2] = True  # a block touching the left and bottom edges
    masks[0, 1, 0, 4] = True  # and a pixel in the top-right corner
    boxes = ops.mask_boxes(tf.constant(masks)).numpy()
    np.testing.assert_array_equal(boxes[0], [[2, 3, 3, 4], [0, 0, 4, 5], [0, 0, 0, 0]])


def test_jpeg_grayscale_and_rgba_inputs_become_rgb(loaded, images, image_files):
    default, from_pixels = loaded.signatures["serving_default"], loaded.signatures[
        "serving_images"]
    rgb = images["a"]
    gray = rgb.mean(axis=-1).astype(np.uint8)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 90, np.uint8)], axis=-1)
    jpeg = image_files.encode(rgb, "JPEG", quality=90)
    cases = [
        (image_files.encode(gray, "PNG"), np.repeat(gray[..., None], 3, axis=-1)),
        (image_files.encode(Image.fromarray(rgba, "RGBA"), "PNG"), rgb),
        # JPEG pixels depend on the decoder: compare with TF's own decoding of the file.
        (jpeg, tf.io.decode_jpeg(jpeg, channels=3).numpy()),
    ]
    for data, pixels in cases:
        actual = default(image_bytes=tf.constant([data]))
        expected = from_pixels(images=tf.constant(pixels[None]))
        for key in serving.DENSE_OUTPUTS:
            np.testing.assert_array_equal(actual[key].numpy(), expected[key].numpy(), key)


@pytest.fixture(scope="module")
def good_image(image_files):
    return image_files.random_image(30, 40, seed=5)


def _bad_requests(image_files, good_image):
    png, jpeg = image_files.encode(good_image, "PNG"), image_files.encode(good_image, "JPEG")
    noisy = image_files.encode(
        np.random.default_rng(3).integers(0, 256, (60, 60, 3), np.uint8), "PNG")
    return [
        ([png, b""], r"image_bytes\[1\] is empty \(0 bytes\)"),
        ([b"GIF89a\x01\x00\x01\x00"], r"image_bytes\[0\] is neither a JPEG nor a PNG image"
                                        r".*first bytes: 4749463839610100"),
        ([b"hello, world\n"], r"image_bytes\[0\] is neither a JPEG nor a PNG"),
        ([png, png[:30]], r"image_bytes\[1\] has a corrupt or truncated PNG header"),
        ([jpeg[:40]], r"image_bytes\[0\] has a corrupt or truncated JPEG header"),
        ([png, noisy[:len(noisy) // 2]],
         r"image_bytes\[1\] could not be decoded: corrupt or truncated PNG data"),
        ([jpeg[:len(jpeg) // 2], png],
         r"image_bytes\[0\] could not be decoded: corrupt or truncated JPEG data"),
        ([image_files.png_header_only(0, 5)], r"image_bytes\[0\] has a zero size \(5x0\)"),
        ([png, image_files.png_header_only(100_000, 90_000)],
         r"image_bytes\[1\] is too large: 90000x100000 = 9000000000 pixels, over "
         rf"max_image_pixels={MAX_PIXELS}"),
        ([image_files.jpeg_with_size(jpeg, 60_000, 50_000)],
         r"image_bytes\[0\] is too large: 50000x60000"),
        ([image_files.encode(image_files.random_image(201, 200), "PNG")],
         r"image_bytes\[0\] is too large: 201x200"),
        # The first bad image is named, with its first problem.
        ([png, b"", b"junk"], r"image_bytes\[1\] is empty"),
        ([], r"image_bytes holds no images"),
    ]


def test_bad_requests_fail_with_clear_errors_and_model_keeps_working(loaded, image_files,
                                                                      good_image):
    default = loaded.signatures["serving_default"]
    good_png = tf.constant([image_files.encode(good_image, "PNG")])
    good = default(image_bytes=good_png)
    for request, pattern in _bad_requests(image_files, good_image):
        with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
            default(image_bytes=tf.constant(request, tf.string))
    again = default(image_bytes=good_png)
    for key in serving.DENSE_OUTPUTS:
        np.testing.assert_array_equal(again[key].numpy(), good[key].numpy())


def test_bad_image_tensors_fail_with_clear_errors(loaded, good_image):
    from_pixels = loaded.signatures["serving_images"]
    for shape, pattern in (((1, 0, 5, 3), r"images have a zero size \(0x5\)"),
                           ((1, 201, 200, 3), r"images are too large: 201x200 = 40200 pixels"),
                           ((0, 8, 8, 3), r"images holds no images")):
        with pytest.raises(tf.errors.InvalidArgumentError, match=pattern):
            from_pixels(images=tf.zeros(shape, tf.uint8))
    assert from_pixels(images=tf.constant(good_image[None]))["num_detections"].shape == (1,)


def test_export_dir_layout_and_assets(exported):
    export_dir = os.path.dirname(exported)
    assert os.path.basename(exported) == "1"
    assert sorted(os.listdir(export_dir)) == ["1"]  # no temporary directory left behind
    assert os.path.isfile(os.path.join(exported, "saved_model.pb"))
    umask = os.umask(0)
    os.umask(umask)
    # Readable by a server running as another user, as the umask allows.
    assert os.stat(exported).st_mode & 0o777 == 0o777 & ~umask
    assert os.path.isfile(os.path.join(exported, "variables", "variables.index"))
    assert serving.load_class_names(export_dir) == list(CLASS_NAMES)
    with open(os.path.join(exported, "assets.extra", "export_info.json")) as f:
        info = json.load(f)
    assert info["inference"]["num_seeds"] == NUM_SEEDS
    assert info["max_image_pixels"] == MAX_PIXELS
    assert info["checkpoint"].endswith("ckpt-1")
    assert serving.resolve_saved_model_dir(export_dir) == exported
    assert serving.resolve_saved_model_dir(exported) == exported
    assert export.next_version(export_dir) == 2


def test_existing_version_is_not_overwritten(run_dir, exported):
    export_dir = os.path.dirname(exported)
    with pytest.raises(FileExistsError, match=re.escape(exported)):
        serving.export_from_model_dir(str(run_dir), export_dir, serving.ExportConfig(version=1))


def test_load_signature_wraps_one_input(exported, image_files):
    predict, path = serving.load_images_signature(os.path.dirname(exported))
    assert path == exported
    outputs = predict(tf.constant(image_files.random_image(30, 40, seed=5)[None]))
    assert outputs["detection_masks"].shape == (1, NUM_SEEDS, 30, 40)
    with pytest.raises(ValueError, match="no signature 'nope'"):
        serving.load_signature(exported, "nope")


# ----------------------------------------------------------------------------------
# Header parsing and decoding (eager, no SavedModel).


def _header_cases(image_files):
    rgb = image_files.random_image(23, 31, seed=4)
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # ImageDescription: a long APP1 segment before the frame
    jpeg = image_files.encode(rgb, "JPEG")
    return {
        "jpeg": jpeg,
        "jpeg_progressive": image_files.encode(rgb, "JPEG", progressive=True),
        "jpeg_exif": image_files.encode(rgb, "JPEG", exif=exif.tobytes()),
        "jpeg_gray": image_files.encode(rgb[..., 0], "JPEG"),
        "jpeg_fill_bytes": jpeg[:2] + b"\xff\xff\xff" + jpeg[2:],
        "png_rgb": image_files.encode(rgb, "PNG"),
        "png_rgba": image_files.encode(Image.fromarray(rgb).convert("RGBA"), "PNG"),
        "png_palette": image_files.encode(Image.fromarray(rgb).convert("P"), "PNG"),
        "png_16bit": image_files.encode(Image.fromarray(rgb[..., 0].astype(np.uint16) * 250),
                                        "PNG"),
        "png_huge_header": image_files.png_header_only(70_000, 3),
    }


def test_read_image_headers_match_pillow(image_files):
    cases = _header_cases(image_files=image_files)
    formats, heights, widths = (t.numpy() for t in image_decoding.read_image_headers(
        tf.constant(list(cases.values()))))
    for (name, data), fmt, height, width in zip(cases.items(), formats, heights, widths):
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            expected_fmt = {"JPEG": image_decoding.FORMAT_JPEG,
                            "PNG": image_decoding.FORMAT_PNG}[image.format]
            assert (fmt, width, height) == (expected_fmt, *image.size), name


def test_read_image_headers_reject_truncated_and_unknown(image_files):
    jpeg = image_files.encode(image_files.random_image(23, 31), "JPEG")
    frame = jpeg.index(b"\xff\xc0")
    png = image_files.encode(image_files.random_image(23, 31), "PNG")
    cases = [jpeg[:cut] for cut in (3, 4, 6, 20, frame, frame + 5, frame + 8)]
    cases += [png[:cut] for cut in (8, 20, 32)]
    cases += [png[:12] + b"IDAT" + png[16:]]  # the first chunk must be IHDR
    cases += [jpeg[:2] + b"\xff\xda" + jpeg[4:]]  # a scan before any frame header
    # Legal fill bytes, but more markers than any real header has: the walk stops.
    cases += [jpeg[:2] + b"\xff" * (image_decoding.JPEG_MAX_MARKERS + 5) + jpeg[2:]]
    formats, heights, widths = (t.numpy() for t in image_decoding.read_image_headers(
        tf.constant(cases)))
    assert (heights == -1).all() and (widths == -1).all()
    assert set(formats) == {image_decoding.FORMAT_JPEG, image_decoding.FORMAT_PNG}
    formats, heights, _ = (t.numpy() for t in image_decoding.read_image_headers(
        tf.constant([b"", b"BM....", b"\xff\xd8"])))
    assert (formats == image_decoding.FORMAT_UNKNOWN).all() and (heights == -1).all()


def test_decode_images_converts_to_rgb_and_pads(image_files):
    rgb = image_files.random_image(12, 10, seed=7)
    gray = rgb[..., 1]
    palette = Image.fromarray(rgb).convert("P")
    deep = (np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 500)
    cases = [
        (image_files.encode(rgb, "PNG"), rgb),
        (image_files.encode(gray, "PNG"), np.repeat(gray[..., None], 3, axis=-1)),
        (image_files.encode(Image.fromarray(rgb).convert("RGBA"), "PNG"), rgb),
        (image_files.encode(palette, "PNG"), np.asarray(palette.convert("RGB"))),
        # 16-bit samples keep their high byte.
        (image_files.encode(Image.fromarray(deep), "PNG"),
         np.repeat((deep >> 8)[..., None], 3, -1)),
        (image_files.encode(image_files.random_image(7, 15), "PNG"),
         image_files.random_image(7, 15)),
    ]
    images, sizes = image_decoding.decode_images(tf.constant([data for data, _ in cases]))
    images, sizes = images.numpy(), sizes.numpy()
    assert images.shape == (len(cases), 12, 15, 3) and images.dtype == np.uint8
    for image, size, (_, expected) in zip(images, sizes, cases):
        height, width = expected.shape[:2]
        np.testing.assert_array_equal(size, [height, width])
        np.testing.assert_array_equal(image[:height, :width], expected)
        assert not image[height:].any() and not image[:, width:].any()


def test_decode_images_limit_is_configurable(image_files):
    data = image_files.encode(image_files.random_image(10, 10), "PNG")
    image_decoding.decode_images(tf.constant([data]), max_image_pixels=100)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"photo\[0\] is too large: 10x10 = 100 pixels, over "
                             r"max_image_pixels=99"):
        image_decoding.decode_images(tf.constant([data]), max_image_pixels=99, input_name="photo")


# ----------------------------------------------------------------------------------
# Configuration and errors.


def test_export_config_validation():
    for kwargs, pattern in (({"version": 0}, "version"),
                            ({"max_image_pixels": 0}, "max_image_pixels"),
                            ({"class_names": "abc"}, "class_names"),
                            ({"class_names": ("a\nb",)}, "class_names")):
        with pytest.raises(ValueError, match=pattern):
            serving.ExportConfig(**kwargs)


def test_joint_bilateral_export_matches_in_process_model(run_dir, images, tmp_path):
    # The export override reaches the signatures: same masks as the in-process model
    # with the same setting, and not the bilinear ones.
    model, config, _ = checkpoints.restore_model(str(run_dir))
    joint_config = dataclasses.replace(config.inference, mask_upsampling="joint_bilateral")
    path = serving.export_from_model_dir(str(run_dir), str(tmp_path),
                                         inference_config=joint_config)
    joint = inference.make_predict_fn(model, config.model.taus, joint_config)
    bilinear = inference.make_predict_fn(model, config.model.taus, config.inference)
    signature = tf.saved_model.load(path).signatures[serving.SERVING_IMAGES]
    batch = tf.constant(images["a"][None])
    actual = {k: v.numpy() for k, v in signature(images=batch).items()}
    expected = {k: v.numpy() for k, v in joint(batch).items()}
    assert_outputs_equal(actual, expected)
    assert not np.array_equal(expected["detection_masks"],
                              bilinear(batch)["detection_masks"].numpy())


def test_jit_compiled_export_matches_plain_model_and_runs_in_tf1_loader(
        run_dir, reference, images, tmp_path, image_files):
    # Post-processing under XLA gives the plain model's detections, for one image and
    # for a batch of two sizes (each image on its own, a compilation per size), and
    # the TF1 loader TF Serving uses runs it (pip TensorFlow links the XLA CPU JIT).
    run_inference = checkpoints.restore_model(str(run_dir))[1].inference
    path = serving.export_from_model_dir(
        str(run_dir), str(tmp_path),
        inference_config=dataclasses.replace(run_inference, jit_compile=True))
    loaded = tf.saved_model.load(path)
    actual = loaded.signatures[serving.SERVING_IMAGES](images=tf.constant(images["a"][None]))
    assert_outputs_equal({k: v.numpy() for k, v in actual.items()}, reference(images["a"][None]))
    encoded = tf.constant([image_files.encode(images["a"], "PNG"),
                           image_files.encode(images["b"], "PNG")])
    batch = loaded.signatures[serving.SERVING_DEFAULT](image_bytes=encoded)
    for i, name in enumerate("ab"):
        expected = reference(images[name][None])
        height, width = images[name].shape[:2]
        one = {key: batch[key].numpy()[i:i + 1] for key in serving.DENSE_OUTPUTS}
        one["detection_masks"] = one["detection_masks"][:, :, :height, :width]
        one["instance_map"] = one["instance_map"][:, :height, :width]
        assert_outputs_equal(one, expected)

    images_file = tmp_path / "images.npy"
    np.save(images_file, images["b"][None])
    completed = subprocess.run(
        saved_model_cli() + ["run", "--dir", path, "--tag_set", "serve", "--signature_def",
                             "serving_images", "--inputs", f"images={images_file}",
                             "--outdir", str(tmp_path / "cli"), "--overwrite"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_outputs_equal(_load_outdir(tmp_path / "cli"), reference(images["b"][None]))


def test_export_traces_each_signature_once(run_dir, tmp_path, monkeypatch):
    """Tracing the post-processing is most of an export's time: one trace per signature
    (Keras' ExportArchive traced each twice, outside and inside the save context)."""
    from instance_embed.serving import signatures as serving_signatures

    traces = []
    original = serving_signatures.batch_detections

    def counting_batch_detections(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(serving_signatures, "batch_detections", counting_batch_detections)
    model, config, _ = checkpoints.restore_model(str(run_dir))
    serving.export_saved_model(model, config, str(tmp_path))
    assert len(traces) == 3


def test_export_rejects_inconsistent_settings(run_dir, tmp_path):
    model, config, _ = checkpoints.restore_model(str(run_dir))
    too_many = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, num_seeds=70_000))
    with pytest.raises(ValueError, match="num_seeds=70000: at most 65535"):
        serving.export_saved_model(model, too_many, str(tmp_path))
    with pytest.raises(ValueError, match="2 class names"):
        serving.export_saved_model(model, config, str(tmp_path),
                                   serving.ExportConfig(class_names=("a", "b")))
    assert not os.listdir(tmp_path)


def test_export_from_model_dir_names_missing_pieces(tmp_path, run_dir):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        serving.export_from_model_dir(str(tmp_path))
    no_checkpoint = tmp_path / "fresh_run"
    no_checkpoint.mkdir()
    shutil.copy(run_dir / "config.json", no_checkpoint / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(str(no_checkpoint / "ckpt"))):
        serving.export_from_model_dir(str(no_checkpoint))
    with pytest.raises(FileNotFoundError, match="No SavedModel in"):
        serving.resolve_saved_model_dir(str(tmp_path))


def test_next_version_counts_integer_directories_only(tmp_path):
    assert export.next_version(str(tmp_path / "missing")) == 1
    for name in ("3", "12", "junk", ".tmp-13-x"):
        (tmp_path / name).mkdir()
    (tmp_path / "40").write_text("a file, not a version")
    assert export.next_version(str(tmp_path)) == 13
