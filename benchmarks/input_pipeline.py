"""Throughput of the training input pipeline (images/s), printed as a table.

Measures `instance_embed.data.pipeline.train_dataset` (paper 4.2 augmentation, crop
to `--image_size`) on synthetic shapes (the `large` config: 512x512 images; preparing
it the first time takes minutes) and on Penn-Fudan (skipped when its directory is
absent). Rows per dataset: "decode only" reads the examples without augmentation;
"train" is the whole pipeline; "train, cached" serves decoded examples from the
pipeline's in-memory cache, i.e. the augmentation cost alone. Besides images/s, each
row gives the process's CPU time per image, which other load on a shared machine
does not change.

    python benchmarks/input_pipeline.py [--image_size=512] [--num_images=200]

The target is 50 images/s on 2 CPU cores, so that the input never stalls training.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # pylint: disable=g-import-not-at-top

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(REPO_ROOT / "data"),
                        help="TFDS data_dir where the datasets are (or get) prepared.")
    parser.add_argument("--penn_fudan_dir",
                        default=str(REPO_ROOT.parent / "shared" / "datasets" / "PennFudanPed"),
                        help="Penn-Fudan manual dir (PNGImages/, PedMasks/).")
    parser.add_argument("--synthetic_config", default="large",
                        help="Builder config of synthetic_shapes (large = 512x512 images).")
    parser.add_argument("--datasets", default="synthetic_shapes,penn_fudan_ped",
                        help="Comma-separated datasets to measure.")
    parser.add_argument("--image_size", type=int, default=512, help="Training crop size S.")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--num_images", type=int, default=200,
                        help="Images timed per row, after the warm-up.")
    parser.add_argument("--warmup_images", type=int, default=48)
    parser.add_argument("--cache_examples", type=int, default=64,
                        help="Examples kept in memory for the cached row.")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def measure(dataset: tf.data.Dataset, batch_size: int, num_images: int,
            warmup_images: int) -> tuple[float, float]:
    """Iterates `dataset` (batches of `batch_size`) after a warm-up.

    Returns:
      (images per second of wall time, CPU milliseconds of this process per image).
      The CPU time counts every thread (tf.data's included), so it does not depend on
      what else the machine runs, unlike the wall-clock rate.
    """
    iterator = iter(dataset)
    for _ in range(-(-warmup_images // batch_size)):
        next(iterator)
    num_batches = -(-num_images // batch_size)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = num_batches * batch_size
    return images / wall, 1000 * cpu / images


def load_examples(name: str, args: argparse.Namespace) -> tf.data.Dataset | None:
    """The train split of `name`, or None (with a message) when it is unavailable."""
    from instance_embed import data  # pylint: disable=g-import-not-at-top
    if name == "penn_fudan_ped":
        if not (pathlib.Path(args.penn_fudan_dir) / "PNGImages").is_dir():
            print(f"Skipping penn_fudan_ped: no Penn-Fudan directory at {args.penn_fudan_dir}")
            return None
        return data.load(name, "train", data_dir=args.data_dir,
                         manual_dir=args.penn_fudan_dir)
    if name == "synthetic_shapes":
        return data.load(name, "train", data_dir=args.data_dir, config=args.synthetic_config)
    return data.load(name, "train", data_dir=args.data_dir)


def mean_image_size(examples: tf.data.Dataset, limit: int = 50) -> str:
    sizes = [tuple(ex["image"].shape[:2]) for ex in examples.take(limit)]
    height = sum(s[0] for s in sizes) / len(sizes)
    width = sum(s[1] for s in sizes) / len(sizes)
    return f"{height:.0f}x{width:.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    from instance_embed.data import pipeline  # pylint: disable=g-import-not-at-top

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load_before = os.getloadavg()[0]
    rows = []
    for name in [n.strip() for n in args.datasets.split(",") if n.strip()]:
        examples = load_examples(name, args)
        if examples is None:
            continue
        input_size = mean_image_size(examples)
        decode_only = examples.repeat().map(lambda ex: ex["image"]).batch(1).prefetch(
            tf.data.AUTOTUNE)
        rows.append((name, input_size, "decode only",
                     *measure(decode_only, 1, args.num_images, args.warmup_images)))
        config = pipeline.InputConfig(image_size=args.image_size, shuffle_buffer=256)
        dataset = pipeline.train_dataset(examples, config, args.batch_size, seed=args.seed)
        rows.append((name, input_size, "train",
                     *measure(dataset, args.batch_size, args.num_images, args.warmup_images)))
        # Cache a subset and warm up past one epoch of it, so the timed images come from
        # memory: this row is the cost of the augmentation alone.
        cached = dataclasses.replace(config, cache=True)
        dataset = pipeline.train_dataset(examples.take(args.cache_examples), cached,
                                         args.batch_size, seed=args.seed)
        rows.append((name, input_size, "train, cached",
                     *measure(dataset, args.batch_size, args.num_images,
                              args.warmup_images + args.cache_examples)))

    print(f"\nTraining input pipeline, crop {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}, {args.num_images} images timed after a warm-up; "
          f"{cores} CPU cores; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after. On a shared machine other load lowers "
          "images/s; CPU ms/image does not depend on it, and the last column is the "
          f"rate it allows on {cores} idle cores.\n")
    header = ("dataset", "mean input HxW", "pipeline", "images/s", "CPU ms/image",
              f"images/s on {cores} idle cores")
    table = [header] + [(n, s, p, f"{r:.1f}", f"{c:.1f}", f"{cores * 1000 / c:.0f}")
                        for n, s, p, r, c in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |")
        if i == 0:
            print("| " + " | ".join("-" * w for w in widths) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
