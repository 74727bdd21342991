"""Tests of `instance_embed.configs.experiment`: the run's configuration and its JSON."""

import pytest

from instance_embed import configs
from instance_embed.model import ModelConfig


def test_config_round_trips_through_json(tmp_path, tiny_config):
    config = tiny_config("d", "m", train_steps=11)
    config.save(str(tmp_path))
    loaded = configs.ExperimentConfig.load(str(tmp_path))
    assert loaded == config
    assert loaded.model.taus == (0.5, 0.75)


def test_unknown_fields_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="embeding_dim"):
        configs.from_dict(ModelConfig, {"embeding_dim": 3})
    text = configs.ExperimentConfig().to_json().replace('"batch_size"', '"batch_sise"')
    with pytest.raises(ValueError, match="batch_sise"):
        configs.ExperimentConfig.from_json(text)
    with pytest.raises(FileNotFoundError, match="config.json"):
        configs.ExperimentConfig.load(str(tmp_path))


def test_config_rejects_a_non_positive_time_budget():
    with pytest.raises(ValueError, match="time_budget_minutes=0"):
        configs.TrainConfig(time_budget_minutes=0)
