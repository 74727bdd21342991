"""SavedModels for TF Serving, written atomically as numbered versions.

    export_from_model_dir("runs/demo", "runs/demo/export")   # -> "runs/demo/export/1"

writes the latest checkpoint of a run as a SavedModel in the layout TF Serving reads,
`export_dir/<version>/{saved_model.pb, variables/, assets.extra/}`. What is saved is
the signatures' concrete functions and the variables they read, not the Keras model: a
Keras 3 model inside `tf.saved_model.save` loads in Python but fails in the C++ loader
that TF Serving and `saved_model_cli run` use. Each signature is traced once
(`keras.export.ExportArchive` traces it twice: once outside and once inside the save
context). The version directory is written under a temporary name and renamed when
complete, so a server polling `export_dir` never sees half a model. The signatures are
those of `signatures.py`; the inference settings (the run's, or an `InferenceConfig`
given at export time) are fixed in the SavedModel.

The class names go to `assets.extra/class_names.txt` (line c names class id c), the
settings to `assets.extra/export_info.json`, and one warm-up request per signature to
`assets.extra/tf_serving_warmup_requests`, which TF Serving replays at load (`warmup.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import shutil
import tempfile
from typing import Sequence

import keras
import tensorflow as tf

from instance_embed.configs import ExperimentConfig
from instance_embed.inference import InferenceConfig
from instance_embed.serving import client
from instance_embed.serving.client import ASSETS_EXTRA
from instance_embed.serving.client import CLASS_NAMES_FILENAME
from instance_embed.serving.images import BYTES_INPUT
from instance_embed.serving.images import DEFAULT_MAX_IMAGE_PIXELS
from instance_embed.serving.images import IMAGES_INPUT
from instance_embed.serving.signatures import COMPACT_OUTPUTS
from instance_embed.serving.signatures import DENSE_OUTPUTS
from instance_embed.serving.signatures import MAX_NUM_SEEDS
from instance_embed.serving.signatures import SERVING_COMPACT
from instance_embed.serving.signatures import SERVING_DEFAULT
from instance_embed.serving.signatures import SERVING_IMAGES
from instance_embed.serving.signatures import ServingFunctions
from instance_embed.serving.warmup import write_warmup_requests

EXPORT_INFO_FILENAME = "export_info.json"


@dataclasses.dataclass
class ExportConfig:
    """Where and how an export is written (the inference settings are an
    `InferenceConfig`).

    Attributes:
      version: the version directory under `export_dir`; None takes the next free
        integer (1 for an empty directory). TF Serving serves the highest version.
      overwrite: replace an existing version directory instead of failing.
      max_image_pixels: requests with an image of more pixels (height x width, read
        from the file header) are rejected. Memory grows with K x pixels: the
        full-resolution masks alone take K x H x W bytes.
      class_names: foreground class names (class id c is `class_names[c - 1]`); None
        takes the run's dataset's names.
    """

    version: int | None = None
    overwrite: bool = False
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.version is not None and (
                isinstance(self.version, bool) or not isinstance(self.version, numbers.Integral)
                or self.version < 1):
            raise ValueError(f"ExportConfig.version={self.version!r}: must be None (next "
                             "free version) or a positive integer")
        if (isinstance(self.max_image_pixels, bool)
                or not isinstance(self.max_image_pixels, numbers.Integral)
                or self.max_image_pixels < 1):
            raise ValueError(f"ExportConfig.max_image_pixels={self.max_image_pixels!r}: must "
                             "be a positive integer")
        if self.class_names is not None:
            if isinstance(self.class_names, str) or not all(
                    isinstance(n, str) and n and "\n" not in n for n in self.class_names):
                raise ValueError(f"ExportConfig.class_names={self.class_names!r}: must be a "
                                 "sequence of non-empty one-line strings")
            self.class_names = tuple(self.class_names)


def export_saved_model(model: keras.Model, experiment_config: ExperimentConfig,
                       export_dir: str, export_config: ExportConfig | None = None,
                       checkpoint_path: str | None = None) -> str:
    """Writes `model` as `export_dir/<version>/` for TF Serving.

    Args:
      model: a model built from `experiment_config.model`, with trained weights.
      experiment_config: the run's configuration: its `inference` settings are fixed in
        the SavedModel, its dataset gives the class names.
      export_dir: the versions' parent directory (TF Serving's `--model_base_path`).
      export_config: version, pixel limit, class names (default: `ExportConfig()`).
      checkpoint_path: recorded in `export_info.json` when given.

    Returns:
      The version directory written.

    Raises:
      FileExistsError: the version exists and `export_config.overwrite` is False.
      ValueError: inconsistent settings (too many seeds, class names count, ...).
    """
    export_config = export_config or ExportConfig()
    inference_config = experiment_config.inference
    if inference_config.num_seeds > MAX_NUM_SEEDS:
        raise ValueError(f"num_seeds={inference_config.num_seeds}: at most {MAX_NUM_SEEDS} "
                         "can be exported (instance ids are stored as uint16)")
    names = class_names_of(experiment_config, export_config.class_names)

    os.makedirs(export_dir, exist_ok=True)
    version = export_config.version or next_version(export_dir)
    final_path = os.path.join(export_dir, str(version))
    if os.path.exists(final_path) and not export_config.overwrite:
        raise FileExistsError(f"{final_path} exists: choose another version, or overwrite")

    functions = ServingFunctions(model, experiment_config.model.taus, inference_config,
                                 export_config.max_image_pixels)
    signatures = {name: fn.get_concrete_function(*spec)
                  for name, (fn, spec) in functions.signatures().items()}
    # The save needs every captured variable reachable from its root object.
    root = tf.Module()
    root.variables_read = list({id(v): v for concrete in signatures.values()
                                for v in concrete.variables}.values())

    # A name that is not an integer, so TF Serving skips it until the rename.
    tmp_path = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=export_dir)
    try:
        tf.saved_model.save(root, tmp_path, signatures=signatures)
        _write_assets_extra(tmp_path, names, experiment_config, export_config,
                            checkpoint_path)
        # Warm-up at the training crops' size (within the pixel limit).
        write_warmup_requests(tmp_path, min(experiment_config.input.image_size,
                                            math.isqrt(export_config.max_image_pixels)))
        # mkdtemp made it private; a server running as another user must read it.
        os.chmod(tmp_path, 0o777 & ~_umask())
        if os.path.exists(final_path):
            shutil.rmtree(final_path)
        os.rename(tmp_path, final_path)
    finally:
        if os.path.exists(tmp_path):
            shutil.rmtree(tmp_path, ignore_errors=True)
    return final_path


def export_from_model_dir(model_dir: str, export_dir: str | None = None,
                          export_config: ExportConfig | None = None,
                          inference_config: InferenceConfig | None = None) -> str:
    """Exports the latest checkpoint of a run (see `export_saved_model`).

    Args:
      model_dir: a run directory written by `train_main` (`config.json`, `ckpt/`).
      export_dir: where versions go; default `model_dir/export`.
      export_config: version, pixel limit, class names.
      inference_config: the inference settings to fix in the SavedModel (default: the
        run's).

    Returns:
      The version directory written.

    Raises:
      FileNotFoundError: naming the directory, when it has no config or checkpoint.
    """
    from instance_embed.training import checkpoints  # Builds models: only needed here.

    model, experiment_config, path = checkpoints.restore_model(model_dir)
    if inference_config is not None:
        experiment_config = dataclasses.replace(experiment_config, inference=inference_config)
    return export_saved_model(model, experiment_config,
                              export_dir or os.path.join(model_dir, "export"),
                              export_config, checkpoint_path=path)


def next_version(export_dir: str) -> int:
    """One more than the highest integer-named directory in `export_dir` (1 if none)."""
    return max(client.saved_model_versions(export_dir), default=0) + 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def class_names_of(experiment_config: ExperimentConfig,
                   class_names: Sequence[str] | None = None) -> list[str]:
    """The model's foreground class names: `class_names`, or its dataset's.

    Raises:
      ValueError: their number is not the model's `num_classes`.
    """
    num_classes = experiment_config.model.num_classes
    if class_names is not None:
        names = list(class_names)
    else:
        from instance_embed import data as datasets

        names = datasets.class_names(experiment_config.dataset.name,
                                     experiment_config.dataset.builder_config)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names {names} for a model with "
                         f"num_classes={num_classes}: give the class names")
    return names


def _write_assets_extra(path: str, class_names: Sequence[str],
                        experiment_config: ExperimentConfig, export_config: ExportConfig,
                        checkpoint_path: str | None) -> None:
    extra = os.path.join(path, ASSETS_EXTRA)
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, CLASS_NAMES_FILENAME), "w", encoding="utf-8") as f:
        f.writelines(f"{name}\n" for name in class_names)
    info = {
        "class_names": list(class_names),
        "signatures": {SERVING_DEFAULT: [BYTES_INPUT, list(DENSE_OUTPUTS)],
                       SERVING_IMAGES: [IMAGES_INPUT, list(DENSE_OUTPUTS)],
                       SERVING_COMPACT: [BYTES_INPUT, list(COMPACT_OUTPUTS)]},
        "inference": dataclasses.asdict(experiment_config.inference),
        "max_image_pixels": export_config.max_image_pixels,
        "checkpoint": checkpoint_path,
        "experiment": dataclasses.asdict(experiment_config),
    }
    with open(os.path.join(extra, EXPORT_INFO_FILENAME), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
