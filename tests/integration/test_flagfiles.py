"""The flagfiles train as written: `make demo`'s, the `default` benchmark's and Penn-Fudan's.

Each runs `train_main` with its flagfile for a few steps on the dataset config it names
(generated here, as `make demo` does; Penn-Fudan from the copy beside the repository,
skipped when it is absent), and the demo's run is exported.
"""

import json
import re

import pytest


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.mark.parametrize("flagfile, builder_config, backbone", [
    ("shapes_demo.flags", "demo", "mobilenet_v2"),
    ("shapes_default.flags", None, "light"),
])
def test_flagfile_trains_on_its_dataset_config(flagfile, builder_config, backbone, data_dir,
                                               tmp_path, run_program):
    model_dir = tmp_path / "run"
    out = run_program("instance_embed.train_main", f"--flagfile=experiments/{flagfile}",
                      f"--data_dir={data_dir}", f"--model_dir={model_dir}",
                      "--train_steps=3", "--checkpoint_every=3", "--log_every=1",
                      "--mixed_precision=float32")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dataset"]["name"] == "synthetic_shapes"
    assert config["dataset"]["builder_config"] == builder_config
    assert config["model"]["backbone"] == backbone
    assert config["train"]["train_steps"] == 3
    log = out.stderr + out.stdout
    assert "step 3/3" in log
    # The run says what it trained: steps and precision (the demo's honesty).
    assert "Training finished at step 3 in" in log and "computing in float32" in log
    expected = "demo" if builder_config else "default"
    assert (data_dir / "synthetic_shapes" / expected).is_dir()
    if flagfile == "shapes_demo.flags":
        assert config["model"]["backbone_weights"] == "torchvision"
        export_dir = tmp_path / "export"
        run_program("instance_embed.export_main", f"--model_dir={model_dir}",
                    f"--export_dir={export_dir}")
        assert (export_dir / "1" / "saved_model.pb").is_file()


@pytest.mark.parametrize("flagfile, backbone, image_size", [
    ("pennfudan.flags", "light", 256),
    ("pennfudan_mobilenet.flags", "mobilenet_v2", 384),
    ("pennfudan_vgg16.flags", "vgg16", 384),
])
def test_penn_fudan_flagfile_trains_on_the_real_data(flagfile, backbone, image_size,
                                                     penn_fudan_dir, data_dir, repo_root,
                                                     tmp_path, run_program):
    """The Penn-Fudan flagfiles as the README runs them: `--manual_dir` is the user's,
    never the flagfile's, and two steps train on the real images at the flagfile's crop."""
    flags_text = (repo_root / "experiments" / flagfile).read_text()
    assert not re.search(r"^\s*--manual_dir", flags_text, re.MULTILINE)  # comments may name it
    model_dir = tmp_path / "run"
    out = run_program("instance_embed.train_main", f"--flagfile=experiments/{flagfile}",
                      f"--manual_dir={penn_fudan_dir}", f"--data_dir={data_dir}",
                      f"--model_dir={model_dir}", "--train_steps=2", "--checkpoint_every=2",
                      "--eval_every=0", "--noeval_at_end", "--log_every=1", "--nocache")
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dataset"]["name"] == "penn_fudan_ped"
    assert config["model"]["backbone"] == backbone
    assert config["input"]["image_size"] == image_size
    assert "step 2/2" in out.stderr + out.stdout
