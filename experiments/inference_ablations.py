"""The paper's inference ablations (Tables 2 and 3) on one trained model.

  .venv/bin/python experiments/inference_ablations.py --model_dir=runs/pennfudan \
      [--split=validation] [--manual_dir=...] [--output=experiments/ablations.md]

Runs the network once per image of the split (the run's eval split by default), keeps
its outputs, and re-runs only the inference of paper 3.3-3.4 for each setting:

- mAP^r@0.5 against the seed diversity weight alpha (paper Table 2), with the run's
  other inference settings;
- mAP^r@0.5 and AR@0.5 (recall of the ground-truth instances at IoU 0.5 among all
  detections) against the number of seeds (paper Table 3);
- both with near-duplicate mask suppression (`--nms_iou_threshold`, default the run's
  or 0.5) and without it (the paper's setting).

Prints Markdown tables (and writes them to `--output` when given).
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS


def define_flags():
    """Defined only when run as a program: tests import this module beside other mains."""
    flags.DEFINE_string("model_dir", None, "Run directory written by train_main.")
    flags.DEFINE_string("split", None, "Split (default: the run's eval split).")
    flags.DEFINE_string("manual_dir", None, "Raw files (default: the run's).")
    flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's).")
    flags.DEFINE_list("alphas", ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6"], "Alphas (Table 2).")
    flags.DEFINE_list("num_seeds", ["10", "20", "50", "100", "200"], "Seed counts (Table 3).")
    flags.DEFINE_float("nms_iou_threshold", None,
                       "Suppression IoU of the 'on' rows (default: the run's, else 0.5).")
    flags.DEFINE_string("output", None, "Also write the tables to this Markdown file.")


def ablation_tables(cache, examples, class_names, taus, base, alphas, seed_counts, nms
                    ) -> tuple[dict, dict]:
    """Paper Tables 2 and 3, each with suppression at IoU `nms` and without.

    Returns:
      ({alpha: (mAP^r@0.5 with suppression, without)},
       {seeds: (mAP^r@0.5 with, AR@0.5 with, mAP^r@0.5 without, AR@0.5 without)}),
      with AR@0.5 the recall of ground-truth instances at IoU 0.5 among all detections.
    """
    def run(**overrides):
        result = cache.evaluate(examples, class_names, taus,
                                dataclasses.replace(base, **overrides)).result()
        return result["mAP_r@0.5"], result["AR@0.5@1000"]

    by_alpha = {}
    for alpha in alphas:
        by_alpha[alpha] = (run(alpha=alpha, nms_iou_threshold=nms)[0],
                           run(alpha=alpha, nms_iou_threshold=None)[0])
        logging.info("alpha %g: %s", alpha, by_alpha[alpha])
    by_seeds = {}
    for num_seeds in seed_counts:
        by_seeds[num_seeds] = (*run(num_seeds=num_seeds, nms_iou_threshold=nms),
                               *run(num_seeds=num_seeds, nms_iou_threshold=None))
        logging.info("%d seeds: %s", num_seeds, by_seeds[num_seeds])
    return by_alpha, by_seeds


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.model_dir:
        raise app.UsageError("--model_dir is required")

    from instance_embed import data as datasets
    from instance_embed import evaluation
    from instance_embed import inference
    from instance_embed.training import checkpoints

    model, config, path = checkpoints.restore_model(FLAGS.model_dir)
    data = config.dataset
    split = FLAGS.split or data.eval_split
    examples = datasets.load(data.name, split, data_dir=FLAGS.data_dir or data.data_dir,
                             manual_dir=FLAGS.manual_dir or data.manual_dir,
                             config=data.builder_config)
    class_names = datasets.class_names(data.name, data.builder_config)
    start = time.perf_counter()
    cache = evaluation.CachedNetwork(inference.network_function(model), examples,
                                     config.inference.flip_tta)
    logging.info("Network outputs of %d images in %.1f s (checkpoint %s).", len(cache),
                 time.perf_counter() - start, path)
    nms = FLAGS.nms_iou_threshold or config.inference.nms_iou_threshold or 0.5
    base = config.inference
    by_alpha, by_seeds = ablation_tables(
        cache, examples, class_names, config.model.taus, base, [float(a) for a in FLAGS.alphas],
        [int(k) for k in FLAGS.num_seeds], nms)

    lines = [f"Model: `{FLAGS.model_dir}` ({os.path.basename(path)}), split `{split}`, "
             f"{len(cache)} images; other settings as the run's: {base}.", ""]
    lines += [f"| alpha | mAP^r@0.5, suppression at IoU {nms} | mAP^r@0.5, no suppression |",
              "|---|---|---|"]
    lines += [f"| {alpha:g} | {100 * on:.1f} | {100 * off:.1f} |"
              for alpha, (on, off) in by_alpha.items()]
    lines += ["", f"| seeds | mAP^r@0.5 (suppression {nms}) | AR@0.5 (suppression) | "
              "mAP^r@0.5 (none) | AR@0.5 (none) |", "|---|---|---|---|---|"]
    lines += [f"| {k} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |"
              for k, values in by_seeds.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    define_flags()
    app.run(main)
