"""Training: the loop, its optimizers and schedules, the time budget, summaries and
checkpoints.

- `trainer`: `train(config, model_dir)`;
- `optimization`: the learning-rate schedules and the two optimizers;
- `time_budget`: fitting a run into a number of minutes;
- `distribute`: strategies by name, the batch split, the chief;
- `signals`: SIGTERM and Ctrl-C noted so that a run checkpoints (on every worker);
- `summaries`: TensorBoard pictures and the embedding projector;
- `checkpoints`: restoring a trained run from its directory.
"""

from instance_embed.training.checkpoints import latest_checkpoint, restore_model
from instance_embed.training.distribute import IncompatibleConfigError, make_strategy
from instance_embed.training.trainer import TrainingDivergedError, train

__all__ = [
    "IncompatibleConfigError",
    "TrainingDivergedError",
    "latest_checkpoint",
    "make_strategy",
    "restore_model",
    "train",
]
