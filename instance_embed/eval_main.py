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

from instance_embed.configs import flags as config_flags
from instance_embed.inference import InferenceConfig

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
# With --model_dir, these change the run's inference settings (a SavedModel's were fixed
# at export time).
config_flags.define_flags(config_flags.INFERENCE_FLAGS, InferenceConfig, override=True)
flags.DEFINE_boolean("ignore_as_background", False,
                     "Count void (-1) pixels as background in IoU (FCIS-style).")
flags.DEFINE_boolean("use_07_metric", False, "VOC07 11-point AP (as MNC/FCIS printed).")
flags.DEFINE_boolean("tune", False, "With --model_dir: search alpha, suppression, support "
                     "rescoring and the score threshold on this split for the best "
                     "mAP^r@0.5 (network run once), print what was tried, save the best "
                     "into the run's config.json (export_main then uses them) and "
                     "evaluate with them. Tune on validation, report on test.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if bool(FLAGS.model_dir) == bool(FLAGS.saved_model):
        raise app.UsageError("Give exactly one of --model_dir and --saved_model.")
    if FLAGS.tune and not FLAGS.model_dir:
        raise app.UsageError("--tune needs --model_dir (a SavedModel's settings are fixed).")
    if FLAGS.tune and (FLAGS.use_07_metric or FLAGS.ignore_as_background):
        raise app.UsageError("--tune scores with the default protocol: drop "
                             "--use_07_metric and --ignore_as_background.")

    import tensorflow as tf

    from instance_embed import configs
    from instance_embed import data as datasets
    from instance_embed import evaluation
    from instance_embed.segmenter import Segmenter
    from instance_embed.training import checkpoints

    if FLAGS.model_dir:
        try:
            config = configs.ExperimentConfig.load(FLAGS.model_dir)
            inference_config = config_flags.apply_flags(
                config.inference, config_flags.INFERENCE_FLAGS, override=True)
            model, config, checkpoint = checkpoints.restore_model(FLAGS.model_dir)
        except (FileNotFoundError, ValueError) as e:
            message = config_flags.flag_error(e, config_flags.INFERENCE_FLAGS)
            if not message.startswith("--"):
                message = f"--model_dir={FLAGS.model_dir}: {message}"
            raise app.UsageError(message) from None
        if not FLAGS.tune:  # (--tune runs the model itself, once per image)
            segmenter = Segmenter.from_model(
                model, dataclasses.replace(config, inference=inference_config),
                source=checkpoint)
        dataset_config = config.dataset
        source = FLAGS.model_dir
    else:
        try:
            segmenter = Segmenter.from_saved_model(FLAGS.saved_model)
        except (FileNotFoundError, ValueError, OSError) as e:
            raise app.UsageError(f"--saved_model={FLAGS.saved_model}: {e}") from None
        if not FLAGS.dataset:
            raise app.UsageError("--dataset is required with --saved_model")
        dataset_config = configs.DatasetConfig(name=FLAGS.dataset)
        source = FLAGS.saved_model
        checkpoint = segmenter.source
    logging.info("Evaluating %s", checkpoint)

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

    output_dir = FLAGS.output_dir or os.path.join(source, f"eval_{split}")
    if FLAGS.max_examples:
        examples = examples.take(FLAGS.max_examples)
    if FLAGS.tune:
        evaluator = tune(model, checkpoint, config, inference_config, examples, class_names,
                         split, output_dir)
    else:
        evaluator = evaluation.InstanceEvaluator(
            len(class_names), class_names=class_names, use_07_metric=FLAGS.use_07_metric,
            ignore_as_background=FLAGS.ignore_as_background)
        evaluation.evaluate(lambda images: segmenter.detect(tf.cast(images, tf.uint8)),
                            examples, class_names, evaluator=evaluator)
    evaluation.write_outputs(evaluator, output_dir)  # Also logs the table.
    print(f"Wrote {os.path.join(output_dir, evaluation.METRICS_FILENAME)} and "
          f"{os.path.join(output_dir, 'plots')}/")


def tune(model, path: str, config, inference_config, examples, class_names, split: str,
         output_dir: str):
    """`--tune`: the search, its table (printed and in `output_dir/tuning.md`), the best
    settings saved into the run; returns the evaluator of the best settings."""
    from instance_embed import evaluation
    from instance_embed import inference

    cached = evaluation.CachedNetwork(inference.network_function(model), examples,
                                      inference_config.flip_tta)
    logging.info("Network outputs of %d images of %r stored (%s); searching.", len(cached),
                 split, path)
    best, trials = evaluation.tune_inference(cached, examples, class_names,
                                             config.model.taus, inference_config)
    table = evaluation.trials_table(trials, best)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "tuning.md"), "w", encoding="utf-8") as f:
        f.write(f"Tuned on split {split!r} of {FLAGS.model_dir} ({path}).\n\n{table}\n")
    print(f"Settings tried on {split!r} (the chosen one in bold):\n{table}")
    dataclasses.replace(config, inference=best).save(FLAGS.model_dir)
    print(f"Saved the tuned inference settings into {FLAGS.model_dir}/config.json: "
          f"{best}. They were chosen on {split!r}: report on another split.")
    return cached.evaluate(examples, class_names, config.model.taus, best)


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
