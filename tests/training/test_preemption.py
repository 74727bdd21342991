"""Training stopped by a signal: checkpoint at the step, clean exit, identical resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

from instance_embed import data as datasets
from instance_embed.training import checkpoints
from instance_embed.training import signals

TRAIN_STEPS = 300
MULTI_WORKER_STEPS = 60


def _train_command(model_dir, data_dir, manual, train_steps=TRAIN_STEPS):
    # Augmentation on (the default): the resumed run must continue the same stream.
    return [sys.executable, "-m", "instance_embed.train_main", f"--model_dir={model_dir}",
            "--dataset=instance_folder", f"--data_dir={data_dir}", f"--manual_dir={manual}",
            "--image_size=64", "--batch_size=2", f"--train_steps={train_steps}",
            "--noeval_at_end", "--head_channels=8", "--head_depth=1", "--embedding_dim=4",
            "--checkpoint_every=5", "--summary_every=100000", "--log_every=50",
            "--deterministic"]


def _weights(model_dir):
    model, _, _ = checkpoints.restore_model(str(model_dir))
    return [v.numpy() for v in model.weights]


def test_sigterm_checkpoints_exits_and_resumes_to_the_straight_run_weights(
        tmp_path, write_folder_dataset, run_program):
    manual = write_folder_dataset(str(tmp_path / "raw"), count=8)
    data_dir = tmp_path / "tfds"
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_program(*_train_command(straight, data_dir, manual)[2:])

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(_train_command(stopped, data_dir, manual), env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = stopped / "ckpt" / "ckpt-5.index"
    deadline = time.monotonic() + 300
    while not first.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    step = int(checkpoints.latest_checkpoint(str(stopped)).rsplit("-", 1)[-1])
    assert 5 <= step < TRAIN_STEPS
    assert f"SIGTERM at step {step} of {TRAIN_STEPS}: checkpoint" in stderr
    assert "Run the same command again to resume" in stderr

    resumed = run_program(*_train_command(stopped, data_dir, manual)[2:])
    assert f"Training finished at step {TRAIN_STEPS}" in resumed.stderr
    for a, b in zip(_weights(straight), _weights(stopped)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_stop_signals_note_the_first_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGINT)
    before_term = signal.getsignal(signal.SIGTERM)
    with signals.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: noted
        time.sleep(0.01)
        assert stop.received == signal.SIGINT
        # The first signal restored the usual handlers: a second one acts at once.
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGTERM) is before_term
    with signals.StopSignals(()) as nothing:
        assert signal.getsignal(signal.SIGINT) is before
    assert nothing.received is None


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(model_dir, data_dir, manual, workers):
    processes = []
    for index in range(len(workers)):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(tf_config))
        command = _train_command(model_dir, data_dir, manual, MULTI_WORKER_STEPS) + [
            "--strategy=multi_worker_mirrored", "--nodeterministic"]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    return processes


def test_multi_worker_sigterm_to_one_worker_checkpoints_all_at_one_step(
        tmp_path, write_folder_dataset):
    manual = write_folder_dataset(str(tmp_path / "raw"), count=8)
    data_dir = tmp_path / "tfds"
    # Workers must not prepare a dataset concurrently: prepared first, as the README says.
    datasets.load("instance_folder", "train", data_dir=str(data_dir), manual_dir=manual)
    model_dir = tmp_path / "multi"
    workers = [f"127.0.0.1:{_free_port()}" for _ in range(2)]
    chief, other = _start_workers(model_dir, data_dir, manual, workers)
    first = model_dir / "ckpt" / "ckpt-5.index"
    deadline = time.monotonic() + 300
    while not first.exists() and other.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    other.send_signal(signal.SIGTERM)  # the non-chief worker only
    outputs = [p.communicate(timeout=300) for p in (chief, other)]
    for process, (_, stderr) in zip((chief, other), outputs):
        assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    steps = [int(stderr.split("SIGTERM at step ")[1].split()[0]) for _, stderr in outputs]
    # One step for the whole cluster: the chief's checkpoint and the worker's scratch one.
    assert steps[0] == steps[1] and 5 <= steps[0] < MULTI_WORKER_STEPS
    assert checkpoints.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{steps[0]}")
    worker_dir = model_dir / "workers" / "worker_1" / "ckpt"
    assert (worker_dir / f"ckpt-{steps[0]}.index").exists()

    # Started again, the cluster resumes there and finishes.
    restarted = _start_workers(model_dir, data_dir, manual,
                               [f"127.0.0.1:{_free_port()}" for _ in range(2)])
    outputs = [p.communicate(timeout=600) for p in restarted]
    for process, (_, stderr) in zip(restarted, outputs):
        assert process.returncode == 0, stderr[-3000:]
        assert re.search(rf"Resumed from \S*ckpt-{steps[0]} at step {steps[0]}\b", stderr)
    assert f"Training finished at step {MULTI_WORKER_STEPS}" in outputs[0][1]
    assert checkpoints.latest_checkpoint(str(model_dir)).endswith(f"ckpt-{MULTI_WORKER_STEPS}")
