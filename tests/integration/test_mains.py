"""The command-line programs: eval_main (checkpoint vs SavedModel), dataset_main, flags."""

import json
import os
import shutil
import sys

import numpy as np
from PIL import Image
import pytest

from instance_embed import data as datasets
from instance_embed import serving
from instance_embed import training


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, write_folder_dataset, tiny_config):
    root = tmp_path_factory.mktemp("mains")
    manual = write_folder_dataset(str(root / "raw"), count=10)
    data_dir, model_dir = str(root / "tfds"), str(root / "run")
    training.train(tiny_config(data_dir, manual, train_steps=20, summary_every=100,
                               checkpoint_every=100), model_dir)
    return data_dir, manual, model_dir


def test_eval_main_checkpoint_and_saved_model_agree(trained_run, tmp_path, run_together,
                                                     error_log_lines):
    data_dir, manual, model_dir = trained_run
    export_dir = serving.export_from_model_dir(model_dir, str(tmp_path / "export"))
    common = ["--dataset=instance_folder", f"--data_dir={data_dir}", f"--manual_dir={manual}",
              "--split=validation"]
    eval_main = [sys.executable, "-m", "instance_embed.eval_main"]
    processes = run_together([
        [*eval_main, f"--model_dir={model_dir}", f"--output_dir={tmp_path / 'ckpt_eval'}",
         *common],
        [*eval_main, f"--saved_model={export_dir}", f"--output_dir={tmp_path / 'saved_eval'}",
         *common]])
    # A clean run logs no errors (grappler and oneDNN once did, for graphs of ours).
    assert [error_log_lines(p.stderr) for p in processes] == [[], []]
    from_ckpt = json.load(open(tmp_path / "ckpt_eval" / "metrics.json"))
    from_saved = json.load(open(tmp_path / "saved_eval" / "metrics.json"))
    assert from_ckpt["num_images"] == 2 and from_ckpt["num_instances"] > 0
    assert from_ckpt == from_saved
    assert os.listdir(tmp_path / "ckpt_eval" / "plots")


def test_eval_main_overrides_inference_settings(trained_run, tmp_path, run_program):
    data_dir, manual, model_dir = trained_run
    # (--jit_compile: the same post-processing compiled by XLA.)
    out = run_program("instance_embed.eval_main", f"--model_dir={model_dir}", "--num_seeds=1",
               "--jit_compile", f"--output_dir={tmp_path}", "--split=validation")
    assert "AP^r" in out.stdout + out.stderr
    # One seed per image: at most one detection, so recall cannot grow with proposals.
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["AR@0.5@10"] == metrics["AR@0.5@1000"]


def test_eval_main_tune_saves_the_best_tried_settings_into_the_run(trained_run, tmp_path,
                                                                   run_program):
    data_dir, manual, model_dir = trained_run
    run_copy = str(tmp_path / "run")
    shutil.copytree(model_dir, run_copy)
    out = run_program("instance_embed.eval_main", f"--model_dir={run_copy}", "--tune",
                      "--split=validation", f"--output_dir={tmp_path / 'tuned'}")
    assert "Settings tried on 'validation'" in out.stdout
    table = (tmp_path / "tuned" / "tuning.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")][1:]
    best_rows = [row for row in rows if "**" in row]
    assert len(rows) >= 8 and len(best_rows) == 1
    cells = [c.strip(" *") for c in best_rows[0].strip("|").split("|")]
    saved = json.load(open(os.path.join(run_copy, "config.json")))["inference"]
    assert [str(saved[f]) for f in ("alpha", "nms_iou_threshold", "support_rescoring",
                                    "score_threshold")] == cells[:4]
    # The best row has the best mAP^r@0.5 of the table, and it is what was evaluated.
    assert float(cells[4]) == max(float(r.strip("|").split("|")[4].strip(" *")) for r in rows)
    metrics = json.load(open(tmp_path / "tuned" / "metrics.json"))
    assert round(100 * metrics["mAP_r@0.5"], 1) == float(cells[4])
    # export_main bakes the tuned settings in.
    export = serving.export_from_model_dir(run_copy, str(tmp_path / "export"))
    info = json.load(open(os.path.join(export, "assets.extra", "export_info.json")))
    assert info["inference"] == saved


def test_eval_main_refuses_bad_arguments(trained_run, tmp_path, run_program):
    _, _, model_dir = trained_run
    out = run_program("instance_embed.eval_main", expect_ok=False)
    assert out.returncode != 0 and "exactly one of --model_dir and --saved_model" in out.stderr
    out = run_program("instance_embed.eval_main", f"--model_dir={tmp_path / 'missing'}",
               expect_ok=False)
    assert out.returncode != 0 and "config.json" in out.stderr
    out = run_program("instance_embed.eval_main", f"--model_dir={model_dir}", "--dataset=nope",
               expect_ok=False)
    assert out.returncode != 0 and "--dataset='nope'" in out.stderr


def test_dataset_main_summarizes_and_writes_images(trained_run, tmp_path, run_program):
    data_dir, manual, _ = trained_run
    out = run_program("instance_embed.dataset_main", "--dataset=instance_folder",
               f"--data_dir={data_dir}", f"--manual_dir={manual}", "--split=validation",
               "--write_images=2", f"--output_dir={tmp_path}")
    assert "train: 8 images" in out.stdout and "validation: 2 images" in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["ground_truth", "img4.png", "img9.png"]
    assert sorted(os.listdir(tmp_path / "ground_truth")) == ["img4.png", "img9.png"]
    # The ground truth is the image enlarged to 256 (64 px -> 4x) with the instances
    # blended in: untouched background, changed instance pixels.
    example = next(datasets.load("instance_folder", "validation", data_dir, manual)
                   .as_numpy_iterator())
    stem = example["image_id"].decode()
    with Image.open(tmp_path / "ground_truth" / f"{stem}.png") as picture:
        truth = np.asarray(picture.convert("RGB"))
    enlarge = lambda a: np.repeat(np.repeat(a, 4, axis=0), 4, axis=1)
    image, instances = enlarge(example["image"]), enlarge(example["instances"])
    assert truth.shape == image.shape == (256, 256, 3)
    background = instances == 0
    for instance_id in np.unique(instances[instances > 0]):
        rows, cols = np.nonzero(instances == instance_id)
        background[rows.min():rows.min() + 16, cols.min():] = False  # its label
    np.testing.assert_array_equal(truth[background], image[background])
    assert (truth[instances > 0] != image[instances > 0]).any(axis=-1).mean() > 0.9


@pytest.mark.parametrize("flag, message", [
    ("--dataset=nope", "--dataset='nope': unknown dataset"),
    ("--backbone=nope", "--backbone='nope': unknown backbone"),
    ("--train_steps=-1", "--train_steps=-1: must be >= 0"),
    ("--time_budget_minutes=0", "--time_budget_minutes=0.0: must be positive"),
    ("--pyramid_scales=1.0,0", "--pyramid_scales="),
    ("--image_size=100", "--image_size=100: must be a positive multiple of 32"),
])
def test_train_main_refuses_bad_flags_at_start(flag, message, tmp_path):
    # In process: train_main.main checks its flags before it imports the training code.
    # (The next test runs the program itself: exit status and message on stderr.)
    from absl import app
    from absl import flags
    from absl.testing import flagsaver

    from instance_embed import train_main

    # Only train_main's flags are set: parsing a whole command line here would also
    # validate the flags of the other programs this test process has imported.
    with flagsaver.flagsaver():
        flags.FLAGS.mark_as_parsed()
        for argument in (f"--model_dir={tmp_path}", flag):
            name, value = argument[2:].split("=", 1)
            flags.FLAGS[name].parse(value)
        with pytest.raises(app.UsageError) as error:
            train_main.main(["train_main"])
    assert message in str(error.value)
    assert not os.path.exists(tmp_path / "config.json")


def test_train_main_float32_flag_overrides_a_flagfile_policy():
    # The demo flagfile asks for --mixed_precision=auto; a later --mixed_precision=float32
    # must give a float32 run, which an enum without that value could not express.
    from absl import flags
    from absl.testing import flagsaver

    from instance_embed import train_main

    with flagsaver.flagsaver():
        flags.FLAGS.mark_as_parsed()
        flags.FLAGS["mixed_precision"].parse("mixed_bfloat16")
        assert train_main.config_from_flags().model.mixed_precision == "mixed_bfloat16"
        flags.FLAGS["mixed_precision"].parse("float32")
        assert train_main.config_from_flags().model.mixed_precision is None


def test_train_main_program_exits_with_the_flag_error(tmp_path, run_program):
    out = run_program("instance_embed.train_main", f"--model_dir={tmp_path}", "--image_size=100",
               expect_ok=False)
    assert out.returncode == 1
    assert "--image_size=100: must be a positive multiple of 32" in out.stderr
    assert "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "config.json")


def test_train_main_reports_a_broken_dataset_file_before_training(tmp_path, write_folder_dataset,
                                                                 run_program):
    manual = write_folder_dataset(str(tmp_path / "raw"), count=5)
    os.remove(os.path.join(manual, "masks", "img3.png"))
    out = run_program("instance_embed.train_main", f"--model_dir={tmp_path / 'run'}",
               "--dataset=instance_folder", f"--data_dir={tmp_path / 'tfds'}",
               f"--manual_dir={manual}", "--image_size=64", expect_ok=False)
    assert out.returncode == 2
    assert "img3" in out.stderr and "Traceback" not in out.stderr
    assert not os.path.exists(tmp_path / "run" / "ckpt")


def test_train_main_resolves_auto_mixed_precision_for_this_machine(tmp_path,
                                                                  write_folder_dataset,
                                                                  run_program):
    import tensorflow as tf

    from instance_embed.model import config as model_config

    manual = write_folder_dataset(str(tmp_path / "raw"), count=5)
    run_dir = tmp_path / "run"
    out = run_program("instance_embed.train_main", f"--model_dir={run_dir}",
               "--dataset=instance_folder", f"--data_dir={tmp_path / 'tfds'}",
               f"--manual_dir={manual}", "--image_size=64", "--batch_size=2",
               "--train_steps=1", "--noeval_at_end", "--head_channels=8",
               "--embedding_dim=4", "--mixed_precision=auto")
    native = (model_config.cpu_has_native_bfloat16()
              and not tf.config.list_physical_devices("GPU"))
    expected = "mixed_bfloat16" if native else None
    with open(run_dir / "config.json") as f:
        assert json.load(f)["model"]["mixed_precision"] == expected
    assert f"--mixed_precision=auto: training in {expected or 'float32'}" in out.stderr


def _penn_fudan_layout_copy(folder_dataset, root, num_images):
    """The first `num_images` images of an instance_folder dataset in Penn-Fudan layout."""
    os.makedirs(os.path.join(root, "PNGImages"))
    os.makedirs(os.path.join(root, "PedMasks"))
    instances = 0
    for i in range(num_images):
        name = f"Other{i:05d}"
        shutil.copy(os.path.join(folder_dataset, "images", f"img{i}.png"),
                    os.path.join(root, "PNGImages", f"{name}.png"))
        shutil.copy(os.path.join(folder_dataset, "masks", f"img{i}.png"),
                    os.path.join(root, "PedMasks", f"{name}_mask.png"))
        if i % 5 == 4:  # the validation split: every 5th image by name
            mask = np.asarray(Image.open(os.path.join(folder_dataset, "masks", f"img{i}.png")))
            instances += len(np.unique(mask[mask > 0]))
    return root, instances


@pytest.mark.slow  # about a minute on 2 cores
def test_eval_main_reads_any_penn_fudan_layout_folder(trained_run, tmp_path, run_program):
    # A model trained on another dataset, evaluated on two different pedestrian-style
    # folders through --manual_dir: each is read on its own (no stale prepared copy).
    data_dir, manual, model_dir = trained_run
    for num_images in (10, 5):
        folder, instances = _penn_fudan_layout_copy(
            manual, str(tmp_path / f"peds{num_images}"), num_images)
        out_dir = tmp_path / f"eval{num_images}"
        run_program("instance_embed.eval_main", f"--model_dir={model_dir}",
             "--dataset=penn_fudan_ped", f"--manual_dir={folder}",
             f"--data_dir={tmp_path / 'tfds'}", "--split=validation", f"--output_dir={out_dir}")
        metrics = json.load(open(out_dir / "metrics.json"))
        assert metrics["num_images"] == num_images // 5
        assert metrics["num_instances"] == instances > 0
    # Every image of a collection, as the README documents for other pedestrian sets.
    run_program("instance_embed.eval_main", f"--model_dir={model_dir}", "--dataset=penn_fudan_ped",
         f"--manual_dir={folder}", f"--data_dir={tmp_path / 'tfds'}",
         "--split=train+validation", f"--output_dir={tmp_path / 'all'}")
    assert json.load(open(tmp_path / "all" / "metrics.json"))["num_images"] == 5
