"""Training stopped by a signal: checkpoint at the step, clean exit, identical resume."""

import os
import signal
import subprocess
import sys
import time

import numpy as np

from instance_embed.training import checkpoints
from instance_embed.training import trainer

TRAIN_STEPS = 300


def _train_command(model_dir, data_dir, manual):
    # Augmentation on (the default): the resumed run must continue the same stream.
    return [sys.executable, "-m", "instance_embed.train_main", f"--model_dir={model_dir}",
            "--dataset=instance_folder", f"--data_dir={data_dir}", f"--manual_dir={manual}",
            "--image_size=64", "--batch_size=2", f"--train_steps={TRAIN_STEPS}",
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
    with trainer.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: noted
        time.sleep(0.01)
        assert stop.received == signal.SIGINT
        # The first signal restored the usual handlers: a second one acts at once.
        assert signal.getsignal(signal.SIGINT) is before
    assert signal.getsignal(signal.SIGTERM) is before_term
    with trainer.StopSignals(()) as nothing:
        assert signal.getsignal(signal.SIGINT) is before
    assert nothing.received is None
