"""Reading a run directory back: its configuration and its latest trained weights."""

from __future__ import annotations

import dataclasses
import os

import keras
import tensorflow as tf

from instance_embed import configs
from instance_embed.model import build_model

CHECKPOINT_SUBDIR = "ckpt"


def latest_checkpoint(model_dir: str) -> str:
    """Path prefix of the latest complete checkpoint in `model_dir/ckpt/`.

    Raises:
      FileNotFoundError: naming the directory, when it holds no checkpoint.
    """
    ckpt_dir = os.path.join(model_dir, CHECKPOINT_SUBDIR)
    path = tf.train.latest_checkpoint(ckpt_dir)
    if path is None:
        raise FileNotFoundError(
            f"No checkpoint in {ckpt_dir}: train first with "
            f"`python -m instance_embed.train_main --model_dir={model_dir} ...`")
    return path


def restore_model(model_dir: str, checkpoint_path: str | None = None
                  ) -> tuple[keras.Model, configs.ExperimentConfig, str]:
    """Rebuilds a run's model from `config.json` and loads its weights.

    Args:
      model_dir: a directory written by `train_main`.
      checkpoint_path: a specific checkpoint prefix (default: the latest one).

    Returns:
      (model, the run's ExperimentConfig, the checkpoint path used). The model computes
      in float32 whatever the run's `mixed_precision`.
    """
    config = configs.ExperimentConfig.load(model_dir)
    path = checkpoint_path or latest_checkpoint(model_dir)
    # Mixed precision is a training choice: variables are float32 either way, and a
    # float32 model evaluates and serves the same on every CPU (bfloat16 is emulated,
    # and slow, on CPUs without bfloat16 units).
    # The checkpoint holds every weight: pretrained backbone weights (a file, a package)
    # were an initialisation and are not needed, nor read, here.
    model = build_model(dataclasses.replace(config.model, mixed_precision=None),
                        load_backbone_weights=False)
    # Optimizer slots and the step are in the checkpoint too; only the model is needed.
    tf.train.Checkpoint(model=model).restore(path).expect_partial().assert_existing_objects_matched()
    return model, config, path
