r"""Runs an exported SavedModel on image files.

  python -m instance_embed.predict_main --saved_model=runs/demo/export \
      --input='photos/*.jpg' --output=predictions/

`--saved_model` is an export directory (its highest version is used) or one version
directory; `--input` a file, a directory (every file in it) or a glob. For each image
`<stem>.<ext>` the output directory gets

* `<stem>_instances.png`: 16-bit grayscale instance labels, 0 background, k for the
  k-th detection (by descending score) where it is the highest-scored mask;
* `<stem>_overlay.png`: the image with the masks in distinct colours, labelled with
  class name and score (detections scoring at least `--overlay_min_score`);

and the run gets `overview.png`, one tile per image for the first `--overview_images`
images: the image, its ground truth when `--ground_truth_dir` holds a `<stem>.png`
picture of it (as `dataset_main --write_images` draws them) and the prediction overlay,
enlarged to at least 256 pixels a side so that labels stay readable;
and one `predictions.json` in the COCO results format: a list of
`{"image_id": <stem>, "category_id", "score", "segmentation": RLE}`, the RLE
`{"size": [H, W], "counts": <string>}` compressed as pycocotools writes it (so
`COCO.loadRes` reads the file as is). Images are decoded by the SavedModel itself
(JPEG or PNG); a file that cannot be read or that the model rejects is reported with
its name and the reason, the run goes on, and the exit status is 1 if any failed.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("saved_model", None, "Export directory (highest version) or a version "
                    "directory written by export_main.")
flags.DEFINE_string("input", None, "An image file, a directory of images, or a glob.")
flags.DEFINE_string("output", None, "Directory for the PNGs and predictions.json.")
flags.DEFINE_float("min_score", 0.0, "Detections scoring below are left out of every "
                   "output.")
flags.DEFINE_float("overlay_min_score", 0.5, "Detections scoring below are not drawn on "
                   "the overlays.")
flags.DEFINE_string("ground_truth_dir", None, "Directory of ground-truth pictures "
                    "<stem>.png shown beside the predictions in overview.png.")
flags.DEFINE_integer("overview_images", 16, "Images in overview.png (0: no overview).",
                     lower_bound=0)
flags.DEFINE_boolean("progress", True, "Show a progress bar.")
for _name in ("saved_model", "input", "output"):
    flags.mark_flag_as_required(_name)

PREDICTIONS_FILENAME = "predictions.json"
OVERVIEW_FILENAME = "overview.png"


def find_inputs(pattern: str) -> list[str]:
    """Files named by `pattern`: a file, a directory (its files, sorted) or a glob."""
    if os.path.isdir(pattern):
        names = sorted(os.listdir(pattern))
        return [os.path.join(pattern, n) for n in names
                if os.path.isfile(os.path.join(pattern, n))]
    if os.path.isfile(pattern):
        return [pattern]
    return sorted(p for p in glob.glob(pattern) if os.path.isfile(p))


def output_stems(paths: Sequence[str]) -> list[str]:
    """Unique output names: the file stem, disambiguated when stems repeat.

    `a.png` and `a.jpg` become `a_png` and `a_jpg`; identical names from different
    directories get a counter.
    """
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    repeated = {s for s in stems if stems.count(s) > 1}
    names = [os.path.basename(p).replace(".", "_") if s in repeated else s
             for p, s in zip(paths, stems)]
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a binary mask `[H, W]` in column-major order, starting with 0s.

    COCO's uncompressed RLE: alternating runs of 0s and 1s over the mask read column
    by column; the first run counts 0s and is 0 when the first pixel is 1.
    """
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return []
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], starts, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def compress_rle_counts(counts: Sequence[int]) -> str:
    """COCO's compressed RLE string of run lengths (as pycocotools' `rleToString`).

    Each count from the third on is stored as its difference to the count two before
    (runs of the same value), then every number as little-endian groups of 5 bits,
    one character each (`48 + group`, bit 0x20 set when more groups follow); a group
    holds the sign in bit 0x10, so the last group of a number is the one after which
    the remaining value is 0 (or -1 for a negative number).
    """
    chars = []
    for i, count in enumerate(counts):
        value = int(count) - (int(counts[i - 2]) if i > 2 else 0)
        while True:
            group = value & 0x1F
            value >>= 5  # arithmetic shift: negative values tend to -1
            more = value != (-1 if group & 0x10 else 0)
            chars.append(chr(48 + (group | 0x20 if more else group)))
            if not more:
                break
    return "".join(chars)


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE `{"size": [H, W], "counts": str}` of a binary mask `[H, W]`."""
    mask = np.asarray(mask)
    return {"size": [int(mask.shape[0]), int(mask.shape[1])],
            "counts": compress_rle_counts(rle_counts(mask))}


def model_error_message(error: Exception) -> str:
    """The SavedModel's own message for a rejected image, without TF's decoration."""
    text = getattr(error, "message", None) or str(error)
    found = re.search(r"assertion failed: \[(.*)\]", text)
    if found:
        # "image_bytes[0] is empty (0 bytes)" -> "is empty (0 bytes)": one image per call.
        return re.sub(r"^image_bytes\[\d+\] ", "", found.group(1))
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def filter_detections(outputs: dict, min_score: float) -> dict:
    """One image's outputs (batch axis removed) keeping detections scoring >= min_score.

    Detections are sorted by descending score with the valid ones first, so the kept
    ones are a prefix; instance ids beyond it are cleared from the instance map (a
    pixel's id is its highest-scored covering mask, so no kept mask lies under them).
    """
    count = int(outputs["num_detections"])
    scores = np.asarray(outputs["detection_scores"])[:count]
    kept = int(np.sum(scores >= min_score))
    instance_map = np.asarray(outputs["instance_map"]).copy()
    instance_map[instance_map > kept] = 0
    return {
        "masks": np.asarray(outputs["detection_masks"])[:kept].astype(bool),
        "classes": np.asarray(outputs["detection_classes"])[:kept],
        "scores": scores[:kept],
        "instance_map": instance_map,
    }


def coco_results(image_id: str, detections: dict) -> list[dict]:
    """COCO results entries of one image's (filtered) detections."""
    return [{"image_id": image_id, "category_id": int(c), "score": float(s),
             "segmentation": encode_rle(m)}
            for m, c, s in zip(detections["masks"], detections["classes"],
                               detections["scores"])]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    files = find_inputs(FLAGS.input)
    if not files:
        raise app.UsageError(f"--input={FLAGS.input!r}: no file matches")

    import tensorflow as tf
    import tqdm

    from instance_embed import serving
    from instance_embed import visualize

    try:
        predict, path = serving.load_signature(FLAGS.saved_model, serving.SERVING_DEFAULT)
        class_names = serving.load_class_names(path)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise app.UsageError(f"--saved_model={FLAGS.saved_model}: {e}") from None
    os.makedirs(FLAGS.output, exist_ok=True)

    results, failures, overview_tiles = [], [], []
    bar = tqdm.tqdm(list(zip(files, output_stems(files))), desc="predicting", unit="img",
                    disable=not FLAGS.progress)
    for file, stem in bar:
        try:
            with open(file, "rb") as f:
                data = f.read()
        except OSError as e:
            _report_failure(bar, failures, file, f"cannot be read: {e.strerror or e}")
            continue
        try:
            outputs = predict(tf.constant([data]))
        except tf.errors.InvalidArgumentError as e:
            _report_failure(bar, failures, file,
                            f"rejected by the model: {model_error_message(e)}")
            continue
        one = {key: value[0].numpy() for key, value in outputs.items()}
        detections = filter_detections(one, FLAGS.min_score)
        image = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()

        instance_png = tf.io.encode_png(
            detections["instance_map"][..., None].astype(np.uint16)).numpy()
        with open(os.path.join(FLAGS.output, f"{stem}_instances.png"), "wb") as f:
            f.write(instance_png)
        shown = detections["scores"] >= FLAGS.overlay_min_score
        drawn = (detections["masks"][shown], detections["classes"][shown], class_names,
                 detections["scores"][shown])
        overlay = visualize.overlay_instances(image, *drawn)
        with open(os.path.join(FLAGS.output, f"{stem}_overlay.png"), "wb") as f:
            f.write(tf.io.encode_png(overlay).numpy())
        if len(overview_tiles) < FLAGS.overview_images:
            overview_tiles.append(overview_tile(file, stem, image, drawn))
        results.extend(coco_results(stem, detections))
    bar.close()

    with open(os.path.join(FLAGS.output, PREDICTIONS_FILENAME), "w", encoding="utf-8") as f:
        json.dump(results, f)
    if overview_tiles:
        with open(os.path.join(FLAGS.output, OVERVIEW_FILENAME), "wb") as f:
            f.write(tf.io.encode_png(visualize.overview(overview_tiles)).numpy())
    done = len(files) - len(failures)
    print(f"{done} of {len(files)} images done, {len(results)} detections; wrote "
          f"{os.path.join(FLAGS.output, PREDICTIONS_FILENAME)} using {path}")
    if failures:
        print(f"{len(failures)} failed: {', '.join(file for file, _ in failures)}",
              file=sys.stderr)
    return 1 if failures else 0


def overview_tile(file: str, stem: str, image: np.ndarray, drawn: tuple
                  ) -> list[np.ndarray]:
    """The overview's panels for one image: image, ground truth if found, prediction.

    Args:
      file: the image's path (named in the error if its ground truth is unreadable).
      stem: its output stem, also the ground truth's file name `<stem>.png`.
      image: `[H, W, 3]` uint8.
      drawn: (masks, classes, class_names, scores) of the detections to draw.
    """
    from PIL import Image

    from instance_embed import visualize

    upscale = visualize.legible_upscale(*image.shape[:2])
    enlarged = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
    panels = [visualize.captioned(enlarged, stem)]
    if FLAGS.ground_truth_dir:
        truth_file = os.path.join(FLAGS.ground_truth_dir, f"{stem}.png")
        if os.path.exists(truth_file):
            try:
                with Image.open(truth_file) as truth:
                    panels.append(visualize.captioned(
                        np.asarray(truth.convert("RGB")), "ground truth"))
            except OSError as e:
                raise app.UsageError(f"--ground_truth_dir: {truth_file} (for {file}) "
                                     f"cannot be read: {e}") from None
    panels.append(visualize.captioned(
        visualize.overlay_instances(image, *drawn, upscale=upscale), "prediction"))
    return panels


def _report_failure(bar, failures: list, file: str, reason: str) -> None:
    failures.append((file, reason))
    bar.write(f"FAILED {file}: {reason}", file=sys.stderr)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
