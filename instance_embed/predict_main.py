r"""Runs an exported SavedModel on image files.

  python -m instance_embed.predict_main --saved_model=runs/demo/export \
      --input='photos/*.jpg' --output=predictions/

`--saved_model` is an export directory (its highest version is used) or one version
directory; `--input` a file, a directory (every file in it) or a glob. Images larger
than the model's pixel limit need `--tile_size` (e.g. 512): they are predicted in
overlapping tiles and their instances merged. For each image
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
compressed by pycocotools (`Instances.to_coco`; `COCO.loadRes` reads the file as is).
Images run through `instance_embed.Segmenter`, the SavedModel decoding them (JPEG or
PNG); a file that cannot be read or that the model rejects is reported with
its name and the reason, the run goes on, and the exit status is 1 if any failed.
"""

from __future__ import annotations

import glob
import json
import os
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
flags.DEFINE_integer("tile_size", 0, "Predict images with a side over this many pixels "
                     "in overlapping tiles of this size, merging instances across the "
                     "overlaps (a multiple of 32; 0: whole images only).", lower_bound=0)
flags.DEFINE_integer("tile_overlap", 128, "Pixels shared by neighbouring tiles (more than "
                     "the largest instance's size keeps instances whole in some tile).",
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    files = find_inputs(FLAGS.input)
    if not files:
        raise app.UsageError(f"--input={FLAGS.input!r}: no file matches")

    import tensorflow as tf
    import tqdm

    from instance_embed import visualize
    from instance_embed.segmenter import Segmenter

    tiles = {"tile_size": FLAGS.tile_size or None, "tile_overlap": FLAGS.tile_overlap}
    try:
        segmenter = Segmenter.from_saved_model(FLAGS.saved_model, **tiles)
    except (FileNotFoundError, OSError) as e:
        raise app.UsageError(f"--saved_model={FLAGS.saved_model}: {e}") from None
    except ValueError as e:
        flag = "--tile_size" if "tile_size" in str(e) else f"--saved_model={FLAGS.saved_model}"
        raise app.UsageError(f"{flag}: {e}") from None
    os.makedirs(FLAGS.output, exist_ok=True)

    results, failures, overview_tiles = [], [], []
    bar = tqdm.tqdm(list(zip(files, output_stems(files))), desc="predicting", unit="img",
                    disable=not FLAGS.progress)
    for file, stem in bar:
        try:
            instances = segmenter(file).above(FLAGS.min_score)
        except OSError as e:
            _report_failure(bar, failures, file, f"cannot be read: {e.strerror or e}")
            continue
        except ValueError as e:
            _report_failure(bar, failures, file,
                            f"rejected by the model: {str(e).removeprefix('image: ')}")
            continue
        instance_png = tf.io.encode_png(instances.label_image()[..., None].astype(np.uint16))
        with open(os.path.join(FLAGS.output, f"{stem}_instances.png"), "wb") as f:
            f.write(instance_png.numpy())
        overlay = instances.overlay(FLAGS.overlay_min_score)
        with open(os.path.join(FLAGS.output, f"{stem}_overlay.png"), "wb") as f:
            f.write(tf.io.encode_png(overlay).numpy())
        if len(overview_tiles) < FLAGS.overview_images:
            overview_tiles.append(overview_tile(file, stem, instances))
        results.extend(instances.to_coco(stem))
    bar.close()

    with open(os.path.join(FLAGS.output, PREDICTIONS_FILENAME), "w", encoding="utf-8") as f:
        json.dump(results, f)
    if overview_tiles:
        with open(os.path.join(FLAGS.output, OVERVIEW_FILENAME), "wb") as f:
            f.write(tf.io.encode_png(visualize.overview(overview_tiles)).numpy())
    done = len(files) - len(failures)
    print(f"{done} of {len(files)} images done, {len(results)} detections; wrote "
          f"{os.path.join(FLAGS.output, PREDICTIONS_FILENAME)} using {segmenter.source}")
    if failures:
        print(f"{len(failures)} failed: {', '.join(file for file, _ in failures)}",
              file=sys.stderr)
    return 1 if failures else 0


def overview_tile(file: str, stem: str, instances) -> list[np.ndarray]:
    """The overview's panels for one image: image, ground truth if found, prediction.

    Args:
      file: the image's path (named in the error if its ground truth is unreadable).
      stem: its output stem, also the ground truth's file name `<stem>.png`.
      instances: its `Instances`; those scoring `--overlay_min_score` are drawn.
    """
    from PIL import Image

    from instance_embed import visualize

    upscale = visualize.legible_upscale(*instances.image.shape[:2])
    enlarged = np.repeat(np.repeat(instances.image, upscale, axis=0), upscale, axis=1)
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
        instances.overlay(FLAGS.overlay_min_score, upscale=upscale), "prediction"))
    return panels


def _report_failure(bar, failures: list, file: str, reason: str) -> None:
    failures.append((file, reason))
    bar.write(f"FAILED {file}: {reason}", file=sys.stderr)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
