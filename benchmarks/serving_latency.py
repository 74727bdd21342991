"""Where the exported model's time goes, for one 512 x 512 image.

Exports a model with the default inference settings (K = 100 seeds, no suppression)
and untrained weights (timing does not depend on them, except through how many
detections survive suppression), loads it back as TF Serving would, and times:

- each signature end to end (`serving_default` on JPEG and PNG bytes,
  `serving_images` on uint8 pixels, `serving_compact` returning the PNG instance map);
- the network alone;
- the paper's post-processing at the heads' resolution (seediness + seed selection +
  mask growing, what `benchmarks/postprocess.py` times), and its share of
  `serving_default` end to end (issue target: under 10%);
- all of `predict_instances` (also sorting, classes, full-resolution masks and the
  instance map);
- `serving_default` of a second export with `--jit_compile` (the post-processing as
  one XLA computation), with bilinear and with joint bilateral masks.

Usage: python benchmarks/serving_latency.py [--backbone light] [--output_stride 8]
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
from instance_embed.model import ModelConfig
from instance_embed.model import build_model

import timing  # benchmarks/timing.py

SIZE = 512


def best_and_median(fn, repeats, warmup=3):
    """(best, median) wall time in ms of `fn()` after `warmup` calls."""
    times = timing.wall_times(fn, repeats, warmup)
    return 1e3 * min(times), 1e3 * float(np.median(times))


def test_image():
    """A 512 x 512 photo-like image (smooth colour blobs), as JPEG and PNG bytes too."""
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
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--export_dir", default=None)
    args = parser.parse_args()

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
    image, encoded = test_image()
    pixels = tf.constant(image[None])

    network = inference.network_function(model)
    outputs = network(tf.cast(pixels, tf.float32))
    embeddings, logits = outputs["embeddings"], outputs["class_logits"]
    infer = config.inference

    @tf.function
    def heads_postprocess(embeddings, logits):
        detections = inference.heads_resolution_detections(
            embeddings, tf.nn.softmax(logits), model_config.taus, infer)
        return detections["masks"]

    @tf.function
    def full_postprocess(embeddings, logits):
        return inference.predict_instances(embeddings, logits, (SIZE, SIZE), model_config.taus,
                                           infer)

    signatures = loaded.signatures
    rows = [
        ("serving_default, JPEG bytes in", lambda: signatures[serving.SERVING_DEFAULT](
            **{serving.BYTES_INPUT: tf.constant([encoded["JPEG"]])})["instance_map"].numpy()),
        ("serving_default, PNG bytes in", lambda: signatures[serving.SERVING_DEFAULT](
            **{serving.BYTES_INPUT: tf.constant([encoded["PNG"]])})["instance_map"].numpy()),
        ("serving_images, uint8 pixels in", lambda: signatures[serving.SERVING_IMAGES](
            **{serving.IMAGES_INPUT: pixels})["instance_map"].numpy()),
        ("serving_compact, JPEG in, PNG map out", lambda: signatures[serving.SERVING_COMPACT](
            **{serving.BYTES_INPUT: tf.constant([encoded["JPEG"]])})[
                "instance_map_png_bytes"].numpy()),
        ("serving_default, JPEG, --jit_compile", lambda: compiled["bilinear"].signatures[
            serving.SERVING_DEFAULT](**{serving.BYTES_INPUT: tf.constant([encoded["JPEG"]])})[
                "instance_map"].numpy()),
        ("same, joint bilateral masks", lambda: compiled["joint_bilateral"].signatures[
            serving.SERVING_DEFAULT](**{serving.BYTES_INPUT: tf.constant([encoded["JPEG"]])})[
                "instance_map"].numpy()),
        ("network alone", lambda: network(tf.cast(pixels, tf.float32))["embeddings"].numpy()),
        ("predict_instances (all post-processing)",
         lambda: full_postprocess(embeddings, logits)["instance_map"].numpy()),
        ("seediness + seeds + masks at heads res.",
         lambda: heads_postprocess(embeddings, logits).numpy()),
    ]
    print(f"{args.backbone} backbone, output stride {args.output_stride}, heads "
          f"{embeddings.shape[1]}x{embeddings.shape[2]}, d={embeddings.shape[3]}, "
          f"K={infer.num_seeds}; one {SIZE}x{SIZE} image; TF {tf.__version__}, "
          f"{os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'measurement':<42} {'best ms':>9} {'median ms':>10}")
    times = {}
    for name, fn in rows:
        times[name] = best_and_median(fn, args.repeats)
        print(f"{name:<42} {times[name][0]:>9.1f} {times[name][1]:>10.1f}")
    end_to_end = times[rows[0][0]]
    heads = times[rows[-1][0]]
    share = [100 * h / e for h, e in zip(heads, end_to_end)]
    verdict = "met" if share[1] < 10 else "NOT met"
    print(f"post-processing at heads resolution / serving_default end to end: "
          f"{share[0]:.1f}% (best), {share[1]:.1f}% (median); target < 10%: {verdict}")


if __name__ == "__main__":
    main()
