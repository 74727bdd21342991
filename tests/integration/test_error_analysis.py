"""experiments/error_analysis.py: IoUs, detection kinds and oracle masks on hand-made cases."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "experiments"))
import error_analysis  # noqa: E402  (a script beside the flagfiles, not a package)


def _two_instances():
    """8x8 labels: instance 1 on the left 4 columns, 2 on rows 0-3 of the right half, an
    ignore row at the bottom."""
    gt = np.zeros((8, 8), np.int32)
    gt[:, :4] = 1
    gt[:4, 4:] = 2
    gt[7, :] = -1
    return gt


def test_mask_ious_ignore_pixels_count_nowhere():
    gt = _two_instances()
    whole_left = np.zeros((8, 8), bool)
    whole_left[:, :4] = True  # 28 pixels of instance 1 + 4 ignore pixels
    top_right = np.zeros((8, 8), bool)
    top_right[:2, 4:] = True  # half of instance 2 (16 pixels)
    ious = error_analysis.mask_ious(gt, np.stack([whole_left, top_right]))
    np.testing.assert_allclose(ious, [[1.0, 0.0], [0.0, 8 / 16]])
    # A third, absent instance gets a column of zeros.
    assert error_analysis.mask_ious(gt, whole_left[None], num_instances=3).shape == (1, 3)


def test_detection_kinds_follow_the_matching_rules():
    gt = _two_instances()
    classes = np.array([1, 2])
    left = gt == 1
    right = gt == 2
    poor = np.zeros((8, 8), bool)
    poor[:4, 5:] = True  # 12 of instance 2's 16 pixels ...
    poor[4:7, 4:] = True  # ... plus 12 background pixels: IoU 12 / 28
    background = np.zeros((8, 8), bool)
    background[4:7, 6:] = True
    masks = np.stack([left, left, right, poor, background])
    kinds = error_analysis.detection_kinds(gt, classes, masks, np.array([1, 1, 1, 2, 2]))
    assert kinds == ["true_positive", "duplicate", "wrong_class", "poor_mask", "background"]


def test_oracle_best_ious_hand_worked():
    # 4x4 heads: instance 1 = left half (8 cells), instance 2 = right half. Instance 1
    # and the top of instance 2 share an embedding; the bottom of instance 2 is far away.
    labels = np.zeros((4, 4), np.int32)
    labels[:, :2] = 1
    labels[:, 2:] = 2
    embeddings = np.zeros((4, 4, 2))
    embeddings[2:, 2:] = [10.0, 0.0]
    taus = (0.5,)  # grows every pixel within squared distance log 3 of the seed
    # Instance 1's seeds grow instance 1 + the top of 2: IoU 8 / 12. Instance 2's best
    # seed is in its bottom half, which grows alone: IoU 4 / 8.
    expected = [8 / 12, 4 / 8, 0.0]
    np.testing.assert_allclose(
        error_analysis.oracle_best_ious(embeddings, labels, taus, num_instances=3), expected)
    full = labels.repeat(2, axis=0).repeat(2, axis=1)
    np.testing.assert_allclose(
        error_analysis.oracle_best_ious(embeddings, labels, taus, full, num_instances=3,
                                        chunk=3), expected)
    # A lower tau (a larger radius) merges everything: the best IoU of instance 2 is
    # then 8 / 16 (the whole image).
    np.testing.assert_allclose(
        error_analysis.oracle_best_ious(embeddings, labels, (1e-50,)), [0.5, 0.5])


@pytest.mark.slow  # about a minute on 2 cores
def test_error_analysis_runs_on_a_trained_run(tmp_path, write_folder_dataset, tiny_config):
    from instance_embed import training

    manual = write_folder_dataset(str(tmp_path / "raw"), count=10)
    model_dir = str(tmp_path / "run")
    config = tiny_config(str(tmp_path / "tfds"), manual, train_steps=4, summary_every=100)
    # The demo's inference settings: the raw pass must drop the duplicate rescoring too.
    config = dataclasses.replace(config, inference=dataclasses.replace(
        config.inference, nms_iou_threshold=0.7, support_rescoring=8.0))
    training.train(config, model_dir)
    out = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "error_analysis.py"),
         f"--model_dir={model_dir}", "--split=validation", "--max_examples=2"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert out.returncode == 0, out.stderr[-3000:]
    shares = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].endswith("%"):
            shares[cells[0]] = float(cells[1].rstrip("%"))
    assert set(shares) == {"oracle, heads resolution", "oracle, full resolution",
                           "detections (no suppression)", "kept detections"}
    # Suppression only removes detections.
    assert shares["kept detections"] <= shares["detections (no suppression)"]
    kinds = [line.split("|")[1].strip() for line in out.stdout.splitlines()
             if line.startswith("| ") and line.split("|")[1].strip() in error_analysis.KINDS]
    assert kinds == list(error_analysis.KINDS)
