"""Where the exported model's time goes, for one 512 x 512 image, as ratios to the network.

Exports a model, loads it back as TF Serving would, and times side by side:

- each signature end to end (`serving_default` on JPEG and PNG bytes,
  `serving_images` on uint8 pixels, `serving_compact` returning the PNG instance map);
- `serving_default` of exports with `--jit_compile` (the heads-resolution
  post-processing under XLA), with bilinear and with joint bilateral masks;
- the network alone, the denominator of every ratio;
- all of `predict_instances`, and its heads-resolution part under the run's settings
  (`select_detections`: seediness, seeds, masks, threshold, suppression);
- the floor: the signature's work besides the network and the drawing, each part
  timed alone, so no drawing can take the signature below it. For `serving_compact`,
  the heads-resolution part (plain graph), decoding the JPEG and encoding the PNG
  instance map; for `serving_default`, also writing the dense `[K, H, W]` uint8 masks
  (timed as `tf.fill`, which is faster than any drawing).

Two cases (issue 23's targets: `serving_default` <= 1.3x the network in the worst case
and <= 1.15x with a trained model, `serving_compact` <= 1.1x, joint bilateral <= 1.5x):

- worst case (default): untrained weights, K = 100, no suppression, so every mask is
  drawn; the image is smooth colour blobs;
- trained (`--model_dir`): a run's latest checkpoint under its own inference settings,
  on `--image` resized to 512 x 512.

Usage: python benchmarks/serving_latency.py [--backbone light] [--output_stride 8]
       [--model_dir runs/pennfudan_mobilenet --image PennPed00072.png]
       [--repeats 15] [--export_dir /tmp/serving_latency]
"""

import argparse
import dataclasses
import io
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from PIL import Image
import tensorflow as tf

from instance_embed import configs
from instance_embed import inference
from instance_embed import serving
from instance_embed.inference.detections import select_detections
from instance_embed.model import ModelConfig
from instance_embed.model import build_model
from instance_embed.serving.signatures import encode_instance_png
from instance_embed.training import checkpoints

import timing  # benchmarks/timing.py

SIZE = 512
HEADS_ROW = "heads resolution (select_detections)"
DECODE_ROW = "floor: decode the JPEG"
PNG_ROW = "floor: encode the PNG instance map"
WRITE_ROW = "floor: write K x H x W uint8 (tf.fill)"


def test_image(path=None):
    """A 512 x 512 image (`path` resized, or smooth colour blobs), and as JPEG and PNG."""
    if path:
        image = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE),
                                                                  Image.BILINEAR))
    else:
        rng = np.random.default_rng(0)
        small = rng.integers(0, 256, (16, 16, 3), np.uint8)
        image = np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC))
    encoded = {}
    for name in ("JPEG", "PNG"):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, name)
        encoded[name] = buffer.getvalue()
    return image, encoded


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="light")
    parser.add_argument("--output_stride", type=int, default=8)
    parser.add_argument("--model_dir", default=None,
                        help="a trained run, timed under its own inference settings")
    parser.add_argument("--image", default=None, help="the image to time (resized)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--export_dir", default=None)
    args = parser.parse_args()

    if args.model_dir:
        model, config, _ = checkpoints.restore_model(args.model_dir)
        model_config = config.model
    else:
        model_config = ModelConfig(backbone=args.backbone, output_stride=args.output_stride,
                                   num_classes=3)
        config = configs.ExperimentConfig(model=model_config)
        model = build_model(model_config)
    export_dir = args.export_dir or tempfile.mkdtemp(prefix="serving_latency_")
    path = serving.export_saved_model(model, config, export_dir,
                                      serving.ExportConfig(overwrite=True, version=1))
    loaded = tf.saved_model.load(path)
    compiled = {}
    for version, upsampling in ((2, "bilinear"), (3, "joint_bilateral")):
        jit_config = dataclasses.replace(config, inference=dataclasses.replace(
            config.inference, jit_compile=True, mask_upsampling=upsampling))
        compiled[upsampling] = tf.saved_model.load(serving.export_saved_model(
            model, jit_config, export_dir, serving.ExportConfig(overwrite=True,
                                                                version=version)))
    image, encoded = test_image(args.image)
    pixels = tf.constant(image[None])

    network = inference.network_function(model)
    float_pixels = tf.cast(pixels, tf.float32)
    outputs = network(float_pixels)
    embeddings, logits = outputs["embeddings"], outputs["class_logits"]
    infer = config.inference

    @tf.function
    def heads_postprocess(embeddings, logits):
        return select_detections(embeddings, logits, model_config.taus, infer)["masks"]

    @tf.function
    def full_postprocess(embeddings, logits, images):
        return inference.predict_instances(embeddings, logits, (SIZE, SIZE), model_config.taus,
                                           infer, images=images)

    instance_map = full_postprocess(embeddings, logits, float_pixels)["instance_map"][0]
    encode_png = tf.function(encode_instance_png)
    decode_jpeg = tf.function(lambda data: tf.io.decode_jpeg(data, channels=3))
    fill = tf.function(lambda value: tf.fill([1, infer.num_seeds, SIZE, SIZE], value))

    def signature(export, name, **inputs):
        return lambda: export.signatures[name](**inputs)["instance_map_png_bytes"].numpy()

    jpeg = {serving.BYTES_INPUT: tf.constant([encoded["JPEG"]])}
    png = {serving.BYTES_INPUT: tf.constant([encoded["PNG"]])}
    network_row = "network alone"
    rows = [
        ("serving_default, JPEG bytes in", signature(loaded, serving.SERVING_DEFAULT, **jpeg)),
        ("serving_default, PNG bytes in", signature(loaded, serving.SERVING_DEFAULT, **png)),
        ("serving_images, uint8 pixels in", signature(
            loaded, serving.SERVING_IMAGES, **{serving.IMAGES_INPUT: pixels})),
        ("serving_compact, JPEG in, PNG map out", signature(
            loaded, serving.SERVING_COMPACT, **jpeg)),
        ("serving_default, JPEG, --jit_compile", signature(
            compiled["bilinear"], serving.SERVING_DEFAULT, **jpeg)),
        ("same, joint bilateral masks", signature(
            compiled["joint_bilateral"], serving.SERVING_DEFAULT, **jpeg)),
        (network_row, lambda: network(tf.cast(pixels, tf.float32))["embeddings"].numpy()),
        ("predict_instances (all post-processing)",
         lambda: full_postprocess(embeddings, logits, float_pixels)["instance_map"].numpy()),
        (HEADS_ROW, lambda: heads_postprocess(embeddings, logits).numpy()),
        (DECODE_ROW, lambda: decode_jpeg(tf.constant(encoded["JPEG"])).numpy()),
        (PNG_ROW, lambda: encode_png(instance_map).numpy()),
        (WRITE_ROW, lambda: fill(tf.constant(1, tf.uint8)).numpy()),
    ]
    detections = loaded.signatures[serving.SERVING_DEFAULT](**jpeg)
    case = (f"trained: {args.model_dir} under its own inference settings"
            if args.model_dir else "worst case: untrained weights, no suppression")
    print(f"{model_config.backbone} backbone, output stride {model_config.output_stride}, heads "
          f"{embeddings.shape[1]}x{embeddings.shape[2]}, d={embeddings.shape[3]}, "
          f"K={infer.num_seeds}, {int(detections['num_detections'][0])} detections kept; "
          f"{case}; one {SIZE}x{SIZE} image; TF {tf.__version__}, {os.cpu_count()} CPUs, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    # Interleaved rounds, so that a slow spell of the machine hits every row alike.
    times = {name: [] for name, _ in rows}
    for _ in range(3):
        for name, fn in rows:
            times[name] += timing.wall_times(fn, max(1, args.repeats // 3), warmup=2)
    network_best = min(times[network_row])
    network_median = float(np.median(times[network_row]))
    print(f"{'measurement':<42} {'best ms':>8} {'median ms':>10} {'/ network':>10}")
    for name, _ in rows:
        best, median = min(times[name]), float(np.median(times[name]))
        print(f"{name:<42} {1e3 * best:>8.1f} {1e3 * median:>10.1f} "
              f"{best / network_best:>6.2f} {median / network_median:>4.2f}")
    print("ratios: best / best and median / median")
    best = {name: min(values) for name, values in times.items()}
    compact_floor = best[HEADS_ROW] + best[DECODE_ROW] + best[PNG_ROW]
    for name, floor, targets in (
            ("serving_compact", compact_floor, "1.1"),
            ("serving_default", compact_floor + best[WRITE_ROW], "1.3 worst, 1.15 trained")):
        print(f"floor of {name}: network + {1e3 * floor:.1f} ms = "
              f"{1 + floor / network_best:.2f} x the network (issue 23's target: {targets})")


if __name__ == "__main__":
    main()
