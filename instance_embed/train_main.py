r"""Trains an instance embedding model.

  python -m instance_embed.train_main --flagfile=experiments/shapes_demo.flags \
      --model_dir=runs/demo

Started again with the same flags, a run resumes from the last checkpoint in
`--model_dir/ckpt/` and stops at `--train_steps`. Every flag sets a field of
`configs.ExperimentConfig` (declared in `configs/flags.py`, help text from the field's
documentation); the resolved configuration is written to `--model_dir/config.json`,
which `eval_main` and `export_main` read back.
"""

from __future__ import annotations

import dataclasses
import sys

from absl import app
from absl import flags
from absl import logging

from instance_embed import configs
from instance_embed.configs import flags as config_flags
from instance_embed.model import backbones
from instance_embed.model import config as model_config

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, logs, config.json.")
config_flags.define_flags(config_flags.EXPERIMENT_FLAGS, configs.ExperimentConfig)
flags.DEFINE_enum("mixed_precision", None,
                  [model_config.AUTO_MIXED_PRECISION, model_config.FLOAT32,
                   *model_config.MIXED_PRECISION_POLICIES],
                  "Mixed precision policy for training (losses stay float32; evaluation "
                  "and export run in float32). 'auto': mixed_bfloat16 on a TPU or a CPU "
                  "with bfloat16 units (AMX/AVX512-BF16), else float32. 'float32': as when "
                  "unset, and overrides a flagfile's choice.")
flags.DEFINE_boolean("deterministic", False, "Enable TF op determinism (slower).")


def validate_flags() -> None:
    """Refuses flag values that no configuration check covers, naming the flag."""
    from instance_embed import data as datasets  # Registering builders imports TFDS.

    checks = (
        (bool(FLAGS.model_dir), "model_dir", "is required"),
        (FLAGS.dataset in datasets.DATASETS, "dataset",
         f"unknown dataset; choose one of {', '.join(sorted(datasets.DATASETS))}"),
        (FLAGS.backbone in backbones.available_backbones(), "backbone",
         f"unknown backbone; choose one of {', '.join(backbones.available_backbones())}"),
        (FLAGS.strategy != "tpu" or FLAGS.tpu is not None, "tpu",
         "is required with --strategy=tpu ('' or 'local' for a TPU VM)"),
    )
    for ok, flag, why in checks:
        if not ok:
            raise config_flags.FlagValueError(f"--{flag}={FLAGS[flag].value!r}: {why}")


def config_from_flags() -> configs.ExperimentConfig:
    """The `ExperimentConfig` the flags describe (validated by the dataclasses)."""
    from instance_embed import data as datasets

    config = config_flags.apply_flags(configs.ExperimentConfig(),
                                      config_flags.EXPERIMENT_FLAGS)
    model = dataclasses.replace(
        config.model,
        num_classes=len(datasets.class_names(config.dataset.name,
                                             config.dataset.builder_config)),
        mixed_precision=model_config.resolve_mixed_precision(FLAGS.mixed_precision,
                                                             config.train.strategy))
    return dataclasses.replace(config, model=model)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        validate_flags()
        config = config_from_flags()
    except config_flags.FlagValueError as e:
        raise app.UsageError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise app.UsageError(config_flags.flag_error(e, config_flags.EXPERIMENT_FLAGS)) from None
    if FLAGS.mixed_precision == model_config.AUTO_MIXED_PRECISION:
        logging.info("--mixed_precision=auto: training in %s on this machine.",
                     config.model.mixed_precision or "float32")
    if FLAGS.deterministic:
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()

    from instance_embed import data as datasets
    from instance_embed import training

    # The strategy first: a batch that does not split over its replicas is reported
    # before anything is prepared, trained or written.
    strategy = training.make_strategy(config.train.strategy, config.train.tpu)
    try:
        training.distribute.per_replica_batch_size(config.train.batch_size, strategy,
                                                   config.train.strategy)
    except training.IncompatibleConfigError as e:
        raise app.UsageError(f"--{e}") from None

    # Prepare (and so validate) the dataset before anything is trained or written: a bad
    # source file is reported by name, without a traceback.
    dataset = config.dataset
    try:
        for split in (dataset.train_split, dataset.eval_split):
            datasets.load(dataset.name, split, data_dir=dataset.data_dir,
                          manual_dir=dataset.manual_dir, config=dataset.builder_config)
    except (FileNotFoundError, ValueError) as e:
        logging.error("Cannot read dataset %r: %s", dataset.name, e)
        sys.exit(2)

    try:
        result = training.train(config, FLAGS.model_dir, strategy=strategy)
    except training.IncompatibleConfigError as e:
        # Found once the model is built, before anything is trained: a flag problem.
        raise app.UsageError(f"--{e}") from None
    except training.TrainingDivergedError as e:
        logging.error("%s", e)
        sys.exit(3)
    logging.info("Final losses: %s", result["losses"])
    if "signal" in result:
        # Stopped by a signal, checkpointed: the shell's status for it (143 for SIGTERM).
        sys.exit(128 + int(result["signal"]))


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
