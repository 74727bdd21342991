r"""Prepares a dataset, prints a summary of it, and optionally writes images to files.

  python -m instance_embed.dataset_main --dataset=synthetic_shapes
  python -m instance_embed.dataset_main --dataset=penn_fudan_ped \
      --manual_dir=../shared/datasets/PennFudanPed
  python -m instance_embed.dataset_main --dataset=synthetic_shapes --split=test \
      --write_images=4 --output_dir=runs/demo/test_images

The summary gives, per split, the number of images and instances, instances per image
and per class, and image sizes. `--write_images=N` writes the first N images of
`--split` as PNG, e.g. as inputs for `predict_main`, and their ground truth, labelled
with class names (enlarged to at least 256 pixels a side), to `ground_truth/<id>.png`:
`predict_main --ground_truth_dir` puts it beside the predictions in its overview.
"""

from __future__ import annotations

import collections
import os

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "synthetic_shapes", "Dataset name.")
flags.DEFINE_string("data_dir", "data", "TFDS data directory.")
flags.DEFINE_string("manual_dir", None, "Raw files of a dataset read from disk.")
flags.DEFINE_string("builder_config", None, "TFDS builder config name.")
flags.DEFINE_string("split", "test", "Split whose images --write_images writes.")
flags.DEFINE_integer("write_images", 0, "Write this many images of --split as PNG.")
flags.DEFINE_string("output_dir", None, "Where --write_images writes.")


def summarize(examples, class_names) -> dict:
    """Counts of one split: images, instances, per class, per image, image sizes."""
    per_class = collections.Counter()
    per_image = []
    sizes = collections.Counter()
    for example in examples.as_numpy_iterator():
        classes = example["instance_classes"]
        per_class.update(int(c) for c in classes)
        per_image.append(len(classes))
        sizes[example["image"].shape[:2]] += 1
    return {
        "images": len(per_image),
        "instances": sum(per_image),
        "per_class": {class_names[c - 1]: per_class[c] for c in range(1, len(class_names) + 1)},
        "instances_per_image": (min(per_image, default=0), max(per_image, default=0)),
        "sizes": sizes,
    }


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    from PIL import Image

    from instance_embed import data as datasets
    from instance_embed import visualize

    if FLAGS.dataset not in datasets.DATASETS:
        raise app.UsageError(f"--dataset={FLAGS.dataset!r}: unknown; choose one of "
                             f"{', '.join(sorted(datasets.DATASETS))}")
    if FLAGS.write_images and not FLAGS.output_dir:
        raise app.UsageError("--write_images needs --output_dir")

    def load(split):
        return datasets.load(FLAGS.dataset, split, FLAGS.data_dir, FLAGS.manual_dir,
                             FLAGS.builder_config)

    try:
        class_names = datasets.class_names(FLAGS.dataset, FLAGS.builder_config)
        load("train")  # Prepares the dataset, so that its splits are known.
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    data_dir = (datasets.prepared_dir_for_source(FLAGS.data_dir, FLAGS.manual_dir)
                if FLAGS.manual_dir else FLAGS.data_dir)
    prepared = datasets.builder(FLAGS.dataset, data_dir, FLAGS.builder_config)
    print(f"{FLAGS.dataset} prepared in {prepared.data_dir}")
    print(f"classes: {', '.join(class_names)}")
    for split in sorted(prepared.info.splits):
        stats = summarize(load(split), class_names)
        low, high = stats["instances_per_image"]
        sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in stats["sizes"].most_common(3))
        print(f"  {split}: {stats['images']} images, {stats['instances']} instances "
              f"({low}..{high} per image; "
              + ", ".join(f"{name} {n}" for name, n in stats["per_class"].items())
              + f"); sizes {sizes}{' ...' if len(stats['sizes']) > 3 else ''}")

    if FLAGS.write_images:
        truth_dir = os.path.join(FLAGS.output_dir, "ground_truth")
        os.makedirs(truth_dir, exist_ok=True)
        for example in load(FLAGS.split).take(FLAGS.write_images).as_numpy_iterator():
            stem = example["image_id"].decode()
            Image.fromarray(example["image"]).save(os.path.join(FLAGS.output_dir, f"{stem}.png"))
            ids, masks = visualize.instance_masks(example["instances"])
            truth = visualize.overlay_instances(
                example["image"], masks, example["instance_classes"][ids - 1], class_names,
                upscale=visualize.legible_upscale(*example["image"].shape[:2]))
            Image.fromarray(truth).save(os.path.join(truth_dir, f"{stem}.png"))
        print(f"Wrote {FLAGS.write_images} images of {FLAGS.split!r} to {FLAGS.output_dir}")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
