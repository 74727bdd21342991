"""Training loop: checkpoints, TensorBoard tags, resume, NaN handling, distribution."""

import dataclasses
import glob
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from instance_embed import data as datasets
from instance_embed import training
from instance_embed.training import checkpoints
from instance_embed.training import distribute
from instance_embed.training import time_budget
from instance_embed.training import trainer


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory, write_folder_dataset):
    root = tmp_path_factory.mktemp("folder")
    manual = write_folder_dataset(str(root / "raw"))
    return str(root / "tfds"), manual


def _scalars(event_dir):
    """{tag: [(step, value)]} and the set of image tags of a TensorBoard log directory."""
    scalars, images = {}, set()
    for path in glob.glob(os.path.join(event_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tensor = tf.make_ndarray(value.tensor)
                if tensor.dtype == object or tensor.ndim == 1 and tensor.size > 1:
                    images.add(value.tag)
                else:
                    scalars.setdefault(value.tag, []).append((event.step, float(tensor)))
    return scalars, images


def test_time_budget_plans_fewer_steps_and_compresses_the_schedules(
        folder_dataset, tmp_path, monkeypatch, tiny_config):
    data_dir, manual = folder_dataset
    # The budget clock reads 0 at the start, 5 s when the probe starts (step 10) and 30 s
    # when it ends (step 60): 0.5 s per step, so a 1-minute budget affords
    # 60 + 30 / 0.5 = 120 steps, planned as 100 of the 200 asked for (scale 2).
    assert (time_budget.PROBE_FIRST_STEP, time_budget.PROBE_STEPS) == (10, 50)
    readings = iter([0.0, 5.0, 30.0])
    monkeypatch.setattr(time_budget, "clock", lambda: next(readings))
    config = tiny_config(data_dir, manual, train_steps=200, warmup_steps=20, log_every=5,
                     summary_every=1000, checkpoint_every=1000, time_budget_minutes=1.0)
    config = dataclasses.replace(config, loss=dataclasses.replace(
        config.loss, cls_warmup_steps=100, cls_ramp_steps=100))
    model_dir = str(tmp_path / "run")
    result = training.train(config, model_dir, stop_after_steps=70)
    assert result["step"] == 70
    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(model_dir))
    assert reader.get_tensor("planned_steps/.ATTRIBUTES/VARIABLE_VALUE") == 100

    # Resumed without a clock reading: the checkpointed plan is kept.
    monkeypatch.setattr(time_budget, "clock", lambda: 0.0)
    result = training.train(config, model_dir)
    assert result["step"] == 100

    scalars, _ = _scalars(os.path.join(model_dir, "train"))
    lam, lr = dict(scalars["lambda"]), dict(scalars["learning_rate"])
    # Step s computes its loss at step s - 1, read on the schedules at s - 1 until the
    # plan (step 60) and at 2 (s - 1) after it.
    assert lam[50] == 0.0 and lam[80] == pytest.approx(0.2 * (2 * 79 - 100) / 100, rel=1e-5)
    assert lam[100] == pytest.approx(0.2 * (2 * 99 - 100) / 100, rel=1e-5)
    peak, final = 3e-3, 0.05 * 3e-3
    for s, schedule_step in ((50, 49), (80, 2 * 79), (100, 2 * 99)):
        progress = (schedule_step - 20) / (200 - 20)
        expected = final + (peak - final) * 0.5 * (1 + np.cos(np.pi * progress))
        assert lr[s] == pytest.approx(expected, rel=1e-5)
    assert lr[100] == pytest.approx(final, rel=0.01)


def test_time_budget_plan_follows_a_slowdown_in_the_first_half(
        folder_dataset, tmp_path, monkeypatch, tiny_config):
    data_dir, manual = folder_dataset
    # 0.5 s per step over steps 10-60 (readings 5 and 30): a 1.5-minute budget affords
    # 60 + 60 / 0.5 = 180 steps, planned 150. Then 2 s per step: at step 65 (reading
    # 40) 35 s / 55 steps since step 10 affords 65 + 50 / 0.636 = 143 -> 100, and step 65
    # is past half of that plan: it stays (no more readings).
    readings = iter([0.0, 5.0, 30.0, 40.0])
    monkeypatch.setattr(time_budget, "clock", lambda: next(readings))
    config = tiny_config(data_dir, manual, train_steps=400, warmup_steps=20, log_every=5,
                     summary_every=1000, checkpoint_every=1000, time_budget_minutes=1.5)
    model_dir = str(tmp_path / "run")
    result = training.train(config, model_dir)
    assert result["step"] == 100
    assert next(readings, None) is None
    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(model_dir))
    assert reader.get_tensor("planned_steps/.ATTRIBUTES/VARIABLE_VALUE") == 100
    lr = dict(_scalars(os.path.join(model_dir, "train"))[0]["learning_rate"])
    # Logged after the step-65 revision: read on the schedule at 64 * 400 / 100.
    peak, final = 3e-3, 0.05 * 3e-3
    assert lr[65] == pytest.approx(
        final + (peak - final) * 0.5 * (1 + np.cos(np.pi * (64 * 4 - 20) / 380)), rel=1e-5)
    assert lr[100] == pytest.approx(final, rel=0.01)


def test_short_run_writes_checkpoints_summaries_and_learns(folder_dataset, tmp_path, tiny_config):
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "run")
    config = tiny_config(data_dir, manual, train_steps=30, summary_every=15, checkpoint_every=10)
    result = training.train(config, model_dir)
    assert result["step"] == 30

    ckpts = tf.train.get_checkpoint_state(os.path.join(model_dir, "ckpt"))
    steps = sorted(int(p.rsplit("-", 1)[1]) for p in ckpts.all_model_checkpoint_paths)
    assert steps == [10, 20, 30]
    assert json.load(open(os.path.join(model_dir, "config.json")))["train"]["train_steps"] == 30

    scalars, images = _scalars(os.path.join(model_dir, "train"))
    for tag in ("loss/total", "loss/embedding", "loss/classification", "lambda",
                "learning_rate", "images_per_second"):
        assert tag in scalars, tag
    assert {"input/image", "input/ground_truth", "output/embeddings_rgb",
            "output/seediness", "output/predicted_instances"} <= images
    lam = dict(scalars["lambda"])
    assert lam[1] == 0.0 and lam[2] == 0.0 and lam[30] == pytest.approx(0.2)
    embedding = [v for _, v in sorted(scalars["loss/embedding"])]
    assert np.mean(embedding[-5:]) < 0.5 * np.mean(embedding[:5])

    projector_dir = os.path.join(model_dir, "projector")
    assert os.path.exists(os.path.join(projector_dir, "projector_config.pbtxt"))
    rows = open(os.path.join(projector_dir, "metadata.tsv")).read().splitlines()
    assert rows[0] == "image\tinstance\tclass"
    saved = tf.train.load_variable(
        tf.train.latest_checkpoint(projector_dir), "embeddings/.ATTRIBUTES/VARIABLE_VALUE")
    assert saved.shape == (len(rows) - 1, 8)


def _final_weights(model_dir):
    model, _, _ = checkpoints.restore_model(model_dir)
    return [v.numpy() for v in model.weights]


def test_resume_matches_straight_run(folder_dataset, tmp_path, tiny_config):
    data_dir, manual = folder_dataset
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    training.train(tiny_config(data_dir, manual, train_steps=6), straight)
    first = training.train(tiny_config(data_dir, manual, train_steps=6), resumed,
                            stop_after_steps=3)
    assert first["step"] == 3
    result = training.train(tiny_config(data_dir, manual, train_steps=6), resumed)
    assert result["step"] == 6

    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(resumed))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 6
    for a, b in zip(_final_weights(straight), _final_weights(resumed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # Adam's moments were restored, not restarted: they match the straight run's too.
    straight_reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(straight))
    moments = [k for k in straight_reader.get_variable_to_shape_map()
               if k.startswith("head_optimizer/") and "VARIABLE_VALUE" in k]
    assert moments
    for key in moments:
        np.testing.assert_allclose(reader.get_tensor(key), straight_reader.get_tensor(key),
                                   rtol=1e-4, atol=1e-6)


class _NaNAtStep4(trainer.InstanceLoss):
    """The loss, made NaN at step 4 (added, so the NaN reaches no other step)."""

    def __call__(self, outputs, batch, step, seed):
        values = super().__call__(outputs, batch, step, seed)
        total = values["total"] + tf.where(tf.equal(step, 4.0), np.nan, 0.0)
        return dict(values, total=total)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder_dataset, tmp_path, tiny_config,
                                                       monkeypatch):
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "nan")
    monkeypatch.setattr(trainer, "InstanceLoss", _NaNAtStep4)
    config = tiny_config(data_dir, manual, train_steps=8, checkpoint_every=2)
    with pytest.raises(training.TrainingDivergedError, match="step 5"):
        training.train(config, model_dir)
    latest = checkpoints.latest_checkpoint(model_dir)
    assert latest.endswith("ckpt-4")
    for weight in _final_weights(model_dir):
        assert np.all(np.isfinite(weight))


def test_batch_size_must_divide_over_replicas(folder_dataset, tiny_config):
    data_dir, manual = folder_dataset
    config = tiny_config(data_dir, manual, batch_size=3)
    strategy = type("TwoReplicas", (), {"num_replicas_in_sync": 2})()
    with pytest.raises(ValueError, match="batch_size=3"):
        distribute.per_replica_batch_size(config.train.batch_size, strategy, "mirrored")


# Runs the configuration of a `config.json` (argv[1]) into a model directory (argv[2]),
# on two logical CPUs (for a mirrored strategy of two replicas), and prints the losses.
_TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)
    from instance_embed import configs
    from instance_embed import training
    with open(sys.argv[1]) as f:
        config = configs.ExperimentConfig.from_json(f.read())
    result = training.train(config, sys.argv[2])
    print("RESULT" + json.dumps(result["losses"]))
""")


def _save_config(config, path) -> str:
    with open(path, "w") as f:
        f.write(config.to_json())
    return str(path)


def _first_step_losses(strategies, data_dir, manual, root, tiny_config, run_together):
    """{strategy: first-step losses}, each run in its own process, the processes at once."""
    commands = []
    for strategy in strategies:
        config = tiny_config(data_dir, manual, train_steps=1, strategy=strategy,
                             summary_every=100, checkpoint_every=100)
        commands.append([sys.executable, "-c", _TRAIN_SCRIPT,
                         _save_config(config, os.path.join(root, f"{strategy}.json")),
                         os.path.join(root, strategy)])
    outputs = run_together(commands, timeout=300)
    losses_by_strategy = {}
    for strategy, out in zip(strategies, outputs):
        line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
        losses_by_strategy[strategy] = json.loads(line[len("RESULT"):])
    return losses_by_strategy


def test_mirrored_first_step_equals_default(folder_dataset, tmp_path, tiny_config,
                                            run_together):
    data_dir, manual = folder_dataset
    # Prepared once here, so that the two processes only read it.
    datasets.load("instance_folder", "train", data_dir=data_dir, manual_dir=manual)
    losses_by_strategy = _first_step_losses(["default", "mirrored"], data_dir, manual,
                                            str(tmp_path), tiny_config, run_together)
    default, mirrored = losses_by_strategy["default"], losses_by_strategy["mirrored"]
    for key in ("total", "embedding", "classification"):
        assert mirrored[key] == pytest.approx(default[key], rel=1e-4, abs=1e-5), key


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# In the default suite (about 35 s on 2 cores): CI covers multi-worker training.
def test_multi_worker_mirrored_two_local_workers(folder_dataset, tmp_path, tiny_config,
                                                 repo_root):
    data_dir, manual = folder_dataset
    # Workers must not prepare a dataset concurrently: prepare it first, as the README says.
    datasets.load("instance_folder", "train", data_dir=data_dir, manual_dir=manual)
    model_dir = str(tmp_path / "multi")
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    config_file = _save_config(
        tiny_config(data_dir, manual, train_steps=3, strategy="multi_worker_mirrored",
                    summary_every=100), tmp_path / "config.json")
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(tf_config))
        processes.append(subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, config_file,
                                           model_dir], env=env, cwd=repo_root,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    outputs = [p.communicate(timeout=600) for p in processes]
    errors = [err[-2000:] for p, (_, err) in zip(processes, outputs) if p.returncode]
    assert not errors, "\n-----\n".join(errors)
    losses_by_worker = [json.loads([l for l in out.splitlines() if l.startswith("RESULT")][-1][6:])
                        for out, _ in outputs]
    # Both workers report the same all-reduced losses; the chief wrote the run.
    assert losses_by_worker[0] == pytest.approx(losses_by_worker[1])
    assert checkpoints.latest_checkpoint(model_dir).endswith("ckpt-3")
    assert os.path.exists(os.path.join(model_dir, "config.json"))


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains(policy, folder_dataset, tmp_path, tiny_config):
    data_dir, manual = folder_dataset
    config = tiny_config(data_dir, manual, train_steps=3, summary_every=100)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, mixed_precision=policy))
    before = keras.mixed_precision.dtype_policy().name
    result = training.train(config, str(tmp_path / policy))
    assert result["step"] == 3
    assert all(np.isfinite(v) for v in result["losses"].values())
    # Building the model must not leave the global policy changed.
    assert keras.mixed_precision.dtype_policy().name == before
    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(str(tmp_path / policy)))
    scales = [k for k in reader.get_variable_to_shape_map() if "dynamic_scale" in k]
    assert bool(scales) == (policy == "mixed_float16")
    # Evaluation and export rebuild the run's model in float32 from the same variables.
    model, restored_config, _ = checkpoints.restore_model(str(tmp_path / policy))
    assert restored_config.model.mixed_precision == policy
    conv = model.get_layer("backbone").get_layer("stage2_block1_a_conv")
    assert conv.compute_dtype == "float32" and conv.kernel.dtype == "float32"
