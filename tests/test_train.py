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
from PIL import Image

from instance_embed import checkpoints
from instance_embed import configs
from instance_embed import data as datasets
from instance_embed import inference
from instance_embed import losses
from instance_embed import train_lib
from instance_embed.data import augment
from instance_embed.data import pipeline
from instance_embed.model import config as model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAUS = (0.5, 0.75)
NO_AUGMENT = augment.AugmentConfig(rotate=False, resize=False, crop=False, flip=False)


def _write_folder_dataset(root, count=5, size=64):
    """`count` images with two or three rectangles each, in the instance_folder layout."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "masks"))
    for i in range(count):
        mask = np.zeros((size, size), np.uint8)
        for k in range(1, 2 + i % 2 + 1):
            y, x = rng.integers(0, size - 20, 2)
            mask[y:y + 18, x:x + 18] = k
        image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
        image[mask > 0] += np.uint8(120)
        Image.fromarray(image).save(os.path.join(root, "images", f"img{i}.png"))
        Image.fromarray(mask).save(os.path.join(root, "masks", f"img{i}.png"))
    return root


def _config(data_dir, manual_dir, **train):
    train_kwargs = dict(batch_size=4, train_steps=6, learning_rate=3e-3, warmup_steps=0,
                        log_every=1, summary_every=3, checkpoint_every=3, eval_at_end=False,
                        seed=3)
    train_kwargs.update(train)
    return configs.ExperimentConfig(
        dataset=configs.DatasetConfig(name="instance_folder", data_dir=str(data_dir),
                                      manual_dir=str(manual_dir)),
        input=pipeline.InputConfig(image_size=64, max_instances=4, augment=NO_AUGMENT,
                                   shuffle_buffer=1),
        model=model_config.ModelConfig(backbone="light", embedding_dim=8, num_classes=1,
                                       taus=TAUS, head_channels=16, head_depth=1),
        loss=losses.LossConfig(points_per_instance=4, cls_warmup_steps=2, cls_ramp_steps=2,
                               taus=TAUS),
        inference=inference.InferenceConfig(num_seeds=5, taus=TAUS),
        train=configs.TrainConfig(**train_kwargs))


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    manual = _write_folder_dataset(str(root / "raw"))
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


def test_config_round_trips_through_json(tmp_path):
    config = _config("d", "m", train_steps=11)
    config.save(str(tmp_path))
    loaded = configs.ExperimentConfig.load(str(tmp_path))
    assert loaded == config
    assert loaded.model.taus == TAUS


def test_config_rejects_disagreeing_taus():
    with pytest.raises(ValueError, match="taus"):
        configs.ExperimentConfig(model=model_config.ModelConfig(taus=(0.5,)))


def test_learning_rate_schedule_matches_formula():
    schedule = train_lib.WarmupCosineSchedule(1e-3, warmup_steps=10, total_steps=110,
                                              final_fraction=0.1)
    assert float(schedule(0)) == pytest.approx(1e-4)
    assert float(schedule(9)) == pytest.approx(1e-3)
    halfway = 0.1e-3 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * 0.5))
    assert float(schedule(60)) == pytest.approx(halfway, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(1e-4, rel=1e-5)
    scaled = train_lib.ScaledSchedule(schedule, 0.1)
    assert float(scaled(60)) == pytest.approx(0.1 * halfway, rel=1e-5)


def test_plan_steps_hand_worked_cases():
    # 35 steps done in 20 s, 0.5 s per step, 60 s budget: 35 + 40 / 0.5 = 115 -> 100.
    assert train_lib.plan_steps(200, 35, 20.0, 0.5, 60.0) == 100
    assert train_lib.plan_steps(200, 35, 20.0, 0.5, 60.0, multiple=1) == 115
    # Everything fits: the run keeps its train_steps, never more.
    assert train_lib.plan_steps(200, 35, 20.0, 0.5, 1000.0) == 200
    assert train_lib.plan_steps(115, 35, 20.0, 0.5, 60.0) == 115
    # Counts below the multiple are kept as they are.
    assert train_lib.plan_steps(200, 10, 5.0, 1.0, 45.0) == 50
    assert train_lib.plan_steps(200, 10, 5.0, 1.0, 44.0) == 49
    # Out of time already: the run ends after one more step.
    assert train_lib.plan_steps(200, 35, 90.0, 0.5, 60.0) == 36


def test_config_rejects_a_non_positive_time_budget():
    with pytest.raises(ValueError, match="time_budget_minutes=0"):
        configs.TrainConfig(time_budget_minutes=0)


def test_time_budget_plans_fewer_steps_and_compresses_the_schedules(
        folder_dataset, tmp_path, monkeypatch):
    data_dir, manual = folder_dataset
    # The budget clock reads 0 at the start, 5 s when the probe starts (step 10) and 30 s
    # when it ends (step 60): 0.5 s per step, so a 1-minute budget affords
    # 60 + 30 / 0.5 = 120 steps, planned as 100 of the 200 asked for (scale 2).
    assert (train_lib._PROBE_FIRST_STEP, train_lib._PROBE_STEPS) == (10, 50)
    readings = iter([0.0, 5.0, 30.0])
    monkeypatch.setattr(train_lib, "_clock", lambda: next(readings))
    config = _config(data_dir, manual, train_steps=200, warmup_steps=20, log_every=5,
                     summary_every=1000, checkpoint_every=1000, time_budget_minutes=1.0)
    config = dataclasses.replace(config, loss=dataclasses.replace(
        config.loss, cls_warmup_steps=100, cls_ramp_steps=100))
    model_dir = str(tmp_path / "run")
    result = train_lib.train(config, model_dir, stop_after_steps=70)
    assert result["step"] == 70
    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(model_dir))
    assert reader.get_tensor("planned_steps/.ATTRIBUTES/VARIABLE_VALUE") == 100

    # Resumed without a clock reading: the checkpointed plan is kept.
    monkeypatch.setattr(train_lib, "_clock", lambda: 0.0)
    result = train_lib.train(config, model_dir)
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
        folder_dataset, tmp_path, monkeypatch):
    data_dir, manual = folder_dataset
    # 0.5 s per step over steps 10-60 (readings 5 and 30): a 1.5-minute budget affords
    # 60 + 60 / 0.5 = 180 steps, planned 150. Then 2 s per step: at step 65 (reading
    # 40) 35 s / 55 steps since step 10 affords 65 + 50 / 0.636 = 143 -> 100, and step 65
    # is past half of that plan: it stays (no more readings).
    readings = iter([0.0, 5.0, 30.0, 40.0])
    monkeypatch.setattr(train_lib, "_clock", lambda: next(readings))
    config = _config(data_dir, manual, train_steps=400, warmup_steps=20, log_every=5,
                     summary_every=1000, checkpoint_every=1000, time_budget_minutes=1.5)
    model_dir = str(tmp_path / "run")
    result = train_lib.train(config, model_dir)
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


def test_short_run_writes_checkpoints_summaries_and_learns(folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "run")
    config = _config(data_dir, manual, train_steps=30, summary_every=15, checkpoint_every=10)
    result = train_lib.train(config, model_dir)
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


def test_resume_matches_straight_run(folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train_lib.train(_config(data_dir, manual, train_steps=6), straight)
    first = train_lib.train(_config(data_dir, manual, train_steps=6), resumed,
                            stop_after_steps=3)
    assert first["step"] == 3
    result = train_lib.train(_config(data_dir, manual, train_steps=6), resumed)
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


def test_resumes_a_checkpoint_written_before_time_budgets(folder_dataset, tmp_path,
                                                          monkeypatch):
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "run")
    make_checkpoint = train_lib._make_checkpoint
    # The old layout: no planned_steps entry.
    monkeypatch.setattr(train_lib, "_make_checkpoint",
                        lambda *args, planned_steps=None: make_checkpoint(*args[:4]))
    train_lib.train(_config(data_dir, manual, train_steps=6), model_dir, stop_after_steps=3)
    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(model_dir))
    assert not reader.has_tensor("planned_steps/.ATTRIBUTES/VARIABLE_VALUE")
    monkeypatch.setattr(train_lib, "_make_checkpoint", make_checkpoint)
    result = train_lib.train(_config(data_dir, manual, train_steps=6), model_dir)
    assert result["step"] == 6
    reader = tf.train.load_checkpoint(checkpoints.latest_checkpoint(model_dir))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 6
    assert reader.get_tensor("planned_steps/.ATTRIBUTES/VARIABLE_VALUE") == 0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "nan")
    config = _config(data_dir, manual, train_steps=8, checkpoint_every=2, debug_nan_at_step=4)
    with pytest.raises(train_lib.TrainingDivergedError, match="step 5"):
        train_lib.train(config, model_dir)
    latest = checkpoints.latest_checkpoint(model_dir)
    assert latest.endswith("ckpt-4")
    for weight in _final_weights(model_dir):
        assert np.all(np.isfinite(weight))


def test_batch_size_must_divide_over_replicas(folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    config = _config(data_dir, manual, batch_size=3)
    strategy = type("TwoReplicas", (), {"num_replicas_in_sync": 2})()
    with pytest.raises(ValueError, match="batch_size=3"):
        train_lib._validate_replicas(config, strategy)


_FIRST_STEP_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, {tests!r})
    import test_train
    from instance_embed import train_lib
    config = test_train._config({data!r}, {manual!r}, train_steps=1, strategy={strategy!r},
                                summary_every=100, checkpoint_every=100)
    result = train_lib.train(config, {model_dir!r})
    print("RESULT" + json.dumps(result["losses"]))
""")


def run_together(commands, timeout=600):
    """Runs each command (an argv list) in its own process, all at once; their stdouts.

    Each process must exit with status 0 (its stderr's end is the failure message).
    """
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO) for command in commands]
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        assert process.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def _first_step_losses(strategies, data_dir, manual, root):
    """{strategy: first-step losses}, each run in its own process, the processes at once."""
    scripts = [_FIRST_STEP_SCRIPT.format(tests=os.path.join(REPO, "tests"), data=data_dir,
                                         manual=manual, strategy=strategy,
                                         model_dir=os.path.join(root, strategy))
               for strategy in strategies]
    outputs = run_together([[sys.executable, "-c", script] for script in scripts], timeout=300)
    losses_by_strategy = {}
    for strategy, out in zip(strategies, outputs):
        line = [l for l in out.splitlines() if l.startswith("RESULT")][-1]
        losses_by_strategy[strategy] = json.loads(line[len("RESULT"):])
    return losses_by_strategy


def test_mirrored_first_step_equals_default(folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    # Prepared once here, so that the two processes only read it.
    datasets.load("instance_folder", "train", data_dir=data_dir, manual_dir=manual)
    losses_by_strategy = _first_step_losses(["default", "mirrored"], data_dir, manual,
                                            str(tmp_path))
    default, mirrored = losses_by_strategy["default"], losses_by_strategy["mirrored"]
    for key in ("total", "embedding", "classification"):
        assert mirrored[key] == pytest.approx(default[key], rel=1e-4, abs=1e-5), key


_WORKER_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import test_train
    from instance_embed import train_lib
    config = test_train._config({data!r}, {manual!r}, train_steps=3,
                                strategy="multi_worker_mirrored", summary_every=100)
    result = train_lib.train(config, {model_dir!r})
    print("RESULT" + json.dumps(result["losses"]))
""")


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_multi_worker_mirrored_two_local_workers(folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    # Workers must not prepare a dataset concurrently: prepare it first, as the README says.
    datasets.load("instance_folder", "train", data_dir=data_dir, manual_dir=manual)
    model_dir = str(tmp_path / "multi")
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    script = _WORKER_SCRIPT.format(tests=os.path.join(REPO, "tests"), data=data_dir,
                                   manual=manual, model_dir=model_dir)
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(tf_config))
        processes.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO,
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
def test_mixed_precision_trains(policy, folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    config = _config(data_dir, manual, train_steps=3, summary_every=100)
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, mixed_precision=policy))
    before = keras.mixed_precision.dtype_policy().name
    result = train_lib.train(config, str(tmp_path / policy))
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
