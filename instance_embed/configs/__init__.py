"""The experiment configuration, one dataclass tree saved as a run's `config.json`.

- `experiment`: `ExperimentConfig` (dataset, input, model, loss, inference, train) and
  its JSON round trip;
- `flags`: absl flags generated from the tree's fields, for the `*_main.py` programs.
"""

from instance_embed.configs.experiment import (
    CONFIG_FILENAME,
    STRATEGIES,
    DatasetConfig,
    ExperimentConfig,
    TrainConfig,
    from_dict,
)

__all__ = [
    "CONFIG_FILENAME",
    "STRATEGIES",
    "DatasetConfig",
    "ExperimentConfig",
    "TrainConfig",
    "from_dict",
]
