"""Killed, diverging and repeated training runs, in subprocesses (issue 8).

* SIGKILL while a checkpoint is being written: once between writing a checkpoint's
  files and registering it in the `checkpoint` state file (a hook in the child kills
  itself there), and once while its shards are still in the `ckpt-N_temp/` directory
  (the parent watches the directory and kills on sight). After each kill the state file
  names only complete checkpoints, the next start resumes from the last of them, and
  the run finishes with the weights an uninterrupted run reaches.
* `train_main` with a NaN injected into a step's loss (by the test, in the child): the
  run stops with exit status 3 and a message naming the step and the last good
  checkpoint, which stays intact.
* `train_main --deterministic --seed`: two runs log identical losses for 20 steps
  (full augmentation on); another seed gives other losses.

Each child process costs ~10 s of start-up (TensorFlow import, model, tracing).
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf

from instance_embed import data as datasets
from instance_embed import training
from instance_embed.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_STEPS = 10
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory, write_folder_dataset):
    root = tmp_path_factory.mktemp("folder")
    manual = write_folder_dataset(str(root / "raw"))
    data_dir = str(root / "tfds")
    # Prepared once here: the children only read it.
    datasets.load("instance_folder", "train", data_dir=data_dir, manual_dir=manual)
    return data_dir, manual


# ---------------------------------------------------------------------------------------
# SIGKILL while checkpointing.

# Trains the configuration of a `config.json` (argv[1]) into argv[2], optionally dying
# (SIGKILL) while registering checkpoint argv[3].
_CHILD = textwrap.dedent("""
    import os, signal, sys
    from absl import logging
    from instance_embed import configs
    from instance_embed import training

    logging.set_verbosity(logging.INFO)  # the "Resumed from" line

    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else None
    if kill_at is not None:
        # Dies after ckpt-<kill_at>'s files are written, before the state file names it.
        from tensorflow.python.checkpoint import checkpoint_management
        register = checkpoint_management.update_checkpoint_state_internal

        def register_or_die(save_dir, model_checkpoint_path, *args, **kwargs):
            if model_checkpoint_path.endswith(f"ckpt-{kill_at}"):
                os.kill(os.getpid(), signal.SIGKILL)
            return register(save_dir, model_checkpoint_path, *args, **kwargs)

        checkpoint_management.update_checkpoint_state_internal = register_or_die
    with open(sys.argv[1]) as f:
        config = configs.ExperimentConfig.from_json(f.read())
    result = training.train(config, sys.argv[2])
    print("FINISHED", result["step"])
""")


def _kill_config(tiny_config, data_dir, manual, steps):
    return tiny_config(data_dir, manual, train_steps=steps, checkpoint_every=1,
                       summary_every=1000, max_checkpoints=2)


def _start(config, model_dir, log_path, kill_at=None):
    config_file = os.path.join(os.path.dirname(str(log_path)),
                               f"{os.path.basename(str(log_path))}.config.json")
    with open(config_file, "w") as f:
        f.write(config.to_json())
    kill = [] if kill_at is None else [str(kill_at)]
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-c", _CHILD, config_file, str(model_dir), *kill],
                            stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO), log


def _registered_step(ckpt_dir):
    """Step of the checkpoint the state file names, after checking it reads back whole."""
    state = tf.train.get_checkpoint_state(ckpt_dir)
    if state is None:
        return 0
    reader = tf.train.load_checkpoint(state.model_checkpoint_path)
    for name in reader.get_variable_to_shape_map():  # every tensor reads back
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name
    step = int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE"))
    assert state.model_checkpoint_path.endswith(f"ckpt-{step}")
    for path in state.all_model_checkpoint_paths:
        assert os.path.exists(path + ".index"), path
    return step


def _resumed_step(log_path):
    text = open(log_path).read()
    found = re.findall(r"Resumed from \S+ at step (\d+)", text)
    return int(found[-1]) if found else 0


def _kill_when_temp_appears(process, ckpt_dir, timeout=240):
    """SIGKILLs `process` as soon as a `ckpt-N_temp` directory shows up; True if it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.isdir(ckpt_dir) and any(name.endswith("_temp")
                                           for name in os.listdir(ckpt_dir)):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.0005)
    return False


@pytest.mark.slow  # about a minute on 2 cores
def test_sigkill_while_checkpointing_resumes_from_last_complete_checkpoint(
        folder_dataset, tmp_path, tiny_config):
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "killed")
    ckpt_dir = os.path.join(model_dir, "ckpt")
    config = _kill_config(tiny_config, data_dir, manual, TRAIN_STEPS)

    # 1. Killed between writing ckpt-3 and registering it.
    process, log = _start(config, model_dir, tmp_path / "run1.log", kill_at=3)
    assert process.wait(timeout=300) == -signal.SIGKILL, open(tmp_path / "run1.log").read()
    log.close()
    assert os.path.exists(os.path.join(ckpt_dir, "ckpt-3.index"))  # written ...
    assert _registered_step(ckpt_dir) == 2  # ... but not registered

    # 2. Killed while the shards of a checkpoint are in ckpt-N_temp/ (tried up to three
    # times: the kill must land before the shards are merged).
    expected_resume = 2
    caught_mid_write = False
    for attempt in range(3):
        log_path = tmp_path / f"run2_{attempt}.log"
        process, log = _start(config, model_dir, log_path)
        killed = _kill_when_temp_appears(process, ckpt_dir)
        log.close()
        assert killed, open(log_path).read()[-3000:]
        assert _resumed_step(log_path) == expected_resume, open(log_path).read()[-3000:]
        expected_resume = _registered_step(ckpt_dir)
        assert expected_resume < TRAIN_STEPS
        # Shards of a checkpoint newer than the registered one: the kill landed mid-write.
        unfinished = [int(re.search(r"ckpt-(\d+)_temp$", path).group(1))
                      for path in glob.glob(os.path.join(ckpt_dir, "ckpt-*_temp"))]
        if any(step > expected_resume for step in unfinished):
            caught_mid_write = True
            break
    assert caught_mid_write, "no kill landed while a checkpoint was being written"

    # 3. Started again, the run resumes from the last registered checkpoint and finishes.
    log_path = tmp_path / "run3.log"
    process, log = _start(config, model_dir, log_path)
    assert process.wait(timeout=300) == 0, open(log_path).read()[-3000:]
    log.close()
    assert _resumed_step(log_path) == expected_resume
    assert f"FINISHED {TRAIN_STEPS}" in open(log_path).read()
    assert _registered_step(ckpt_dir) == TRAIN_STEPS

    # Nothing was lost: every batch of this tiny dataset is the whole training split,
    # so the weights equal those of an uninterrupted run.
    _assert_same_as_straight_run(model_dir, config, tmp_path)


def _wait_for_new_checkpoint(process, ckpt_dir, after_step, timeout=240):
    """Waits until the state file names a checkpoint past `after_step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        state = tf.train.get_checkpoint_state(ckpt_dir)
        if state is not None and int(state.model_checkpoint_path.rsplit("-", 1)[1]) > after_step:
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(folder_dataset, tmp_path, tiny_config):
    """Up to five kill -9 at random moments of training (seeded), each after the run has
    made progress; every restart resumes from the last registered checkpoint."""
    data_dir, manual = folder_dataset
    model_dir = str(tmp_path / "killed")
    ckpt_dir = os.path.join(model_dir, "ckpt")
    rng = np.random.default_rng(8)
    steps = 16
    config = _kill_config(tiny_config, data_dir, manual, steps)
    registered, kills = 0, 0
    for round_index in range(6):
        log_path = tmp_path / f"run{round_index}.log"
        process, log = _start(config, model_dir, log_path)
        if round_index < 5 and _wait_for_new_checkpoint(process, ckpt_dir, registered):
            time.sleep(rng.uniform(0.0, 0.4))
            process.send_signal(signal.SIGKILL)
        code = process.wait(timeout=300)
        log.close()
        text = open(log_path).read()
        assert _resumed_step(log_path) == registered, text[-3000:]
        if code == 0:
            assert f"FINISHED {steps}" in text
            break
        assert code == -signal.SIGKILL, text[-3000:]
        kills += 1
        registered = _registered_step(ckpt_dir)
    assert kills >= 3 and _registered_step(ckpt_dir) == steps
    _assert_same_as_straight_run(model_dir, config, tmp_path)


# ---------------------------------------------------------------------------------------
# train_main: NaN stop and determinism.


# train_main with the loss of step 2 (the third step) made NaN: argv are its flags.
_NAN_AT_STEP_2_MAIN = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    from instance_embed import train_main
    from instance_embed.training import trainer

    class NaNAtStep2(trainer.InstanceLoss):
        def __call__(self, outputs, batch, step, seed):
            values = super().__call__(outputs, batch, step, seed)
            return dict(values, total=values["total"] + tf.where(tf.equal(step, 2.0),
                                                                 np.nan, 0.0))

    trainer.InstanceLoss = NaNAtStep2
    sys.argv = ["train_main", *sys.argv[1:]]
    train_main.run()
""")


def _train_main_flags(data_dir, manual, model_dir, seed, steps, *extra):
    return [sys.executable, "-m", "instance_embed.train_main", f"--model_dir={model_dir}",
            "--dataset=instance_folder", f"--data_dir={data_dir}", f"--manual_dir={manual}",
            "--image_size=64", "--max_instances=4", "--embedding_dim=8",
            "--head_channels=16", "--head_depth=1", "--taus=0.5,0.75",
            "--points_per_instance=4", "--cls_warmup_steps=2", "--cls_ramp_steps=2",
            "--num_seeds=5", "--batch_size=4", f"--train_steps={steps}",
            "--learning_rate=3e-3", "--warmup_steps=0", "--log_every=1",
            "--summary_every=1000", "--noeval_at_end", f"--seed={seed}", *extra]


def _logged_losses(model_dir):
    """{tag: [value at step 1, 2, ...]} of the loss scalars in the TensorBoard log."""
    losses = {}
    for path in glob.glob(os.path.join(model_dir, "train", "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith("loss/"):
                    losses.setdefault(value.tag, {})[event.step] = float(
                        tf.make_ndarray(value.tensor))
    return {tag: [steps[s] for s in sorted(steps)] for tag, steps in losses.items()}


@pytest.mark.slow  # about a minute on 2 cores
def test_train_main_same_seed_gives_identical_losses_and_nan_stops_cleanly(
        folder_dataset, tmp_path):
    data_dir, manual = folder_dataset
    runs = {
        "a": _train_main_flags(data_dir, manual, tmp_path / "a", 7, 20, "--deterministic",
                               "--checkpoint_every=1000"),
        "b": _train_main_flags(data_dir, manual, tmp_path / "b", 7, 20, "--deterministic",
                               "--checkpoint_every=1000"),
        # Another seed, and a NaN injected into the loss of the third step.
        "nan": [sys.executable, "-c", _NAN_AT_STEP_2_MAIN] + _train_main_flags(
            data_dir, manual, tmp_path / "nan", 8, 6, "--deterministic",
            "--checkpoint_every=1")[3:],
    }
    # Two at a time: determinism must hold on a busy machine too.
    processes = {name: subprocess.Popen(command, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
                 for name, command in list(runs.items())[:2]}
    outputs = {name: p.communicate(timeout=600) for name, p in processes.items()}
    nan = subprocess.run(runs["nan"], capture_output=True, text=True, env=ENV, cwd=REPO,
                         timeout=600)
    for name, (_, err) in outputs.items():
        assert processes[name].returncode == 0, err[-3000:]

    first, second = _logged_losses(tmp_path / "a"), _logged_losses(tmp_path / "b")
    assert set(first) == {"loss/total", "loss/embedding", "loss/classification"}
    for tag in first:
        assert len(first[tag]) == 20, tag
        assert first[tag] == second[tag], tag  # bit for bit
    # The losses move (the optimizer steps), so the equality is not trivial.
    assert len(set(first["loss/total"])) > 10

    assert nan.returncode == 3, nan.stderr[-3000:]
    assert "Loss became non-finite at step 3" in nan.stderr
    assert "The last good checkpoint is" in nan.stderr and "ckpt-2" in nan.stderr
    assert checkpoints.latest_checkpoint(str(tmp_path / "nan")).endswith("ckpt-2")
    model, _, _ = checkpoints.restore_model(str(tmp_path / "nan"))
    assert all(np.all(np.isfinite(w.numpy())) for w in model.weights)
    other_seed = _logged_losses(tmp_path / "nan")["loss/total"]
    assert other_seed[:2] != first["loss/total"][:2]
    with open(tmp_path / "a" / "config.json") as f:
        assert json.load(f)["train"]["seed"] == 7


_TWO_DEVICES_MAIN = textwrap.dedent("""
    import sys
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2)
    from instance_embed import train_main
    sys.argv = ["train_main", "--model_dir={model_dir}", "--strategy=mirrored",
                "--batch_size=3", "--image_size=64", "--data_dir={data_dir}",
                "--builder_config=tiny"]
    train_main.run()
""")


def test_train_main_refuses_a_batch_that_does_not_split_over_replicas(tmp_path):
    model_dir = tmp_path / "run"
    # (The tiny dataset in tmp_path: the default one would be prepared in the repository.)
    script = _TWO_DEVICES_MAIN.format(model_dir=model_dir, data_dir=tmp_path / "tfds")
    out = subprocess.run([sys.executable, "-c", script],
                         capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert ("--batch_size=3: must be divisible by the number of replicas (2) of strategy "
            "'mirrored'") in out.stderr
    assert "Traceback" not in out.stderr
    assert not os.path.exists(model_dir / "config.json")
    assert not os.path.exists(model_dir / "ckpt")


def _assert_same_as_straight_run(model_dir, config, tmp_path):
    """The killed-and-resumed run ends with the weights of an uninterrupted one."""
    straight = str(tmp_path / "straight")
    training.train(config, straight)
    killed_model, _, _ = checkpoints.restore_model(model_dir)
    straight_model, _, _ = checkpoints.restore_model(straight)
    for a, b in zip(killed_model.weights, straight_model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
