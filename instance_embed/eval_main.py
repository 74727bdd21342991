r"""Evaluates a trained run or an exported SavedModel on a dataset split.

  # The latest checkpoint of a run, on the split and dataset it was trained for:
  python -m instance_embed.eval_main --model_dir=runs/demo --split=test

  # An exported SavedModel (its inference settings were fixed at export time):
  python -m instance_embed.eval_main --saved_model=runs/demo/export \
      --dataset=synthetic_shapes --split=test

  # Any directory in the Penn-Fudan layout:
  python -m instance_embed.eval_main --model_dir=runs/pennfudan \
      --dataset=penn_fudan_ped --manual_dir=/data/OtherPedestrians --split=validation

Writes `metrics.json`, the paper's Table 1 style table (also logged) and `plots/` to
`--output_dir` (default: `<model_dir>/eval_<split>` or `<saved_model>/eval_<split>`).
With `--model_dir`, the inference flags (`--num_seeds`, `--alpha`, ...) override the
run's settings, so the paper's ablations (Tables 2 and 3) need no retraining.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory written by train_main.")
flags.DEFINE_string("saved_model", None, "SavedModel directory (an export dir or a version).")
flags.DEFINE_string("dataset", None, "Dataset (default: the run's).")
flags.DEFINE_string("split", None, "Split (default: the run's eval split).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (default: the run's, or data/).")
flags.DEFINE_string("manual_dir", None, "Raw files of a dataset read from disk.")
flags.DEFINE_string("builder_config", None, "TFDS builder config (default: the run's).")
flags.DEFINE_string("output_dir", None, "Where metrics.json and plots/ go.")
flags.DEFINE_integer("max_examples", 0, "Evaluate at most this many examples (0 = all).")
flags.DEFINE_integer("num_seeds", None, "Override: seeds per image (checkpoint mode).")
flags.DEFINE_float("alpha", None, "Override: seed diversity weight (checkpoint mode).")
flags.DEFINE_float("score_threshold", None, "Override: drop detections below (checkpoint).")
flags.DEFINE_float("nms_iou_threshold", None,
                   "Override: near-duplicate suppression IoU (checkpoint mode); <0 turns "
                   "it off.")
flags.DEFINE_float("support_rescoring", None,
                   "Override: scale kept scores by min(1, suppressed duplicates + 1 / this); "
                   "0 turns it off (checkpoint mode).")
flags.DEFINE_enum("mask_upsampling", None, ["bilinear", "joint_bilateral"],
                  "Override: how masks reach the image's resolution (checkpoint mode).")
flags.DEFINE_float("bilateral_sigma", None,
                   "Override: colour scale of joint_bilateral (checkpoint mode).")
flags.DEFINE_boolean("jit_compile", None,
                     "Override: post-processing as one XLA computation (checkpoint mode; "
                     "compiled once per image size).")
flags.DEFINE_boolean("ignore_as_background", False,
                     "Count void (-1) pixels as background in IoU (FCIS-style).")
flags.DEFINE_boolean("use_07_metric", False, "VOC07 11-point AP (as MNC/FCIS printed).")


def _inference_overrides(inference_config):
    overrides = {}
    for name in ("num_seeds", "alpha", "score_threshold", "support_rescoring", "mask_upsampling",
                 "bilateral_sigma", "jit_compile"):
        if FLAGS[name].value is not None:
            overrides[name] = FLAGS[name].value
    if FLAGS.nms_iou_threshold is not None:
        overrides["nms_iou_threshold"] = (
            None if FLAGS.nms_iou_threshold < 0 else FLAGS.nms_iou_threshold)
    return dataclasses.replace(inference_config, **overrides)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
        raise app.UsageError("Give exactly one of --model_dir and --saved_model.")

    import tensorflow as tf

    from instance_embed import checkpoints
    from instance_embed import configs
    from instance_embed import data as datasets
    from instance_embed import eval_lib
    from instance_embed import evaluation
    from instance_embed import predictor

    if FLAGS.model_dir:
        try:
            model, config, path = checkpoints.restore_model(FLAGS.model_dir)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--model_dir={FLAGS.model_dir}: {e}") from None
        logging.info("Evaluating checkpoint %s", path)
        predict_fn = predictor.make_predict_fn(model, _inference_overrides(config.inference))
        dataset_config = config.dataset
        source = FLAGS.model_dir
    else:
        from instance_embed import export

        try:
            predict_fn, saved_path = export.load_images_signature(FLAGS.saved_model)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise app.UsageError(f"--saved_model={FLAGS.saved_model}: {e}") from None
        logging.info("Evaluating SavedModel %s", saved_path)
        if not FLAGS.dataset:
            raise app.UsageError("--dataset is required with --saved_model")
        dataset_config = configs.DatasetConfig(name=FLAGS.dataset)
        source = FLAGS.saved_model

    name = FLAGS.dataset or dataset_config.name
    if name not in datasets.DATASETS:
        raise app.UsageError(f"--dataset={name!r}: unknown dataset; choose one of "
                             f"{', '.join(sorted(datasets.DATASETS))}")
    same_dataset = name == dataset_config.name
    builder_config = FLAGS.builder_config or (
        dataset_config.builder_config if same_dataset else None)
    manual_dir = FLAGS.manual_dir or (dataset_config.manual_dir if same_dataset else None)
    data_dir = FLAGS.data_dir or dataset_config.data_dir
    split = FLAGS.split or dataset_config.eval_split
    try:
        examples = datasets.load(name, split, data_dir=data_dir, manual_dir=manual_dir,
                                 config=builder_config)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(f"Cannot read dataset {name!r} split {split!r}: {e}") from None
    class_names = datasets.class_names(name, builder_config)

    evaluator = evaluation.InstanceEvaluator(
        len(class_names), class_names=class_names, use_07_metric=FLAGS.use_07_metric,
        ignore_as_background=FLAGS.ignore_as_background)
    eval_lib.evaluate(lambda images: predict_fn(tf.cast(images, tf.uint8)), examples,
                      class_names, max_examples=FLAGS.max_examples, evaluator=evaluator)
    output_dir = FLAGS.output_dir or os.path.join(source, f"eval_{split}")
    eval_lib.write_outputs(evaluator, output_dir)  # Also logs the table.
    print(f"Wrote {os.path.join(output_dir, evaluation.METRICS_FILENAME)} and "
          f"{os.path.join(output_dir, 'plots')}/")


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
