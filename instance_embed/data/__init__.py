"""Datasets as TFDS builders, all yielding the contract of `features.py`.

    ds = instance_embed.data.load("penn_fudan_ped", "train",
                                  manual_dir="../shared/datasets/PennFudanPed")

`load` prepares a dataset on first use (offline for every dataset given a manual
dir) under `data_dir` (a copy per source directory, see `prepared_dir_for_source`),
then reads the prepared copy; delete that copy to prepare again from changed sources.
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Union

import tensorflow_datasets as tfds

from instance_embed.data.instance_folder import InstanceFolder
from instance_embed.data.penn_fudan_ped import PennFudanPed
from instance_embed.data.synthetic_shapes import SyntheticShapes
from instance_embed.data.voc2012_instance import Voc2012Instance

if TYPE_CHECKING:
    import tensorflow as tf

DATASETS: dict[str, type] = {
    "synthetic_shapes": SyntheticShapes,
    "penn_fudan_ped": PennFudanPed,
    "voc2012_instance": Voc2012Instance,
    "instance_folder": InstanceFolder,
}
# The repository's `data/` (git-ignored) when run from its root, as the Makefile does.
DEFAULT_DATA_DIR = "data"

# A config name, a `tfds.core.BuilderConfig` (e.g. a custom-named one), or None for
# the builder's default.
ConfigArg = Union[str, tfds.core.BuilderConfig, None]


def _builder_class(name: str) -> type:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known datasets: "
                         f"{', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def class_names(name: str, config: ConfigArg = None) -> list[str]:
    """Foreground class names of a dataset: class id c is named `names[c - 1]`.

    Args:
        name: a key of `DATASETS`.
        config: the builder config; the built-in datasets' classes do not depend on
            it, but it is checked to exist.

    Raises:
        ValueError: unknown dataset or config name.
    """
    cls = _builder_class(name)
    if isinstance(config, str) and config not in cls.builder_configs:
        raise ValueError(f"Unknown config {config!r} of dataset {name!r}; known: "
                         f"{', '.join(sorted(cls.builder_configs)) or 'none'}")
    return list(cls.CLASS_NAMES)


def builder(name: str, data_dir: str | os.PathLike | None = None,
            config: ConfigArg = None) -> tfds.core.DatasetBuilder:
    """The TFDS builder of dataset `name`, without preparing it.

    Args:
        name: a key of `DATASETS`.
        data_dir: where prepared datasets live; defaults to `DEFAULT_DATA_DIR`.
        config: config name or `tfds.core.BuilderConfig`; None for the default.

    Raises:
        ValueError: unknown dataset or config name.
    """
    cls = _builder_class(name)
    return cls(data_dir=os.fspath(data_dir or DEFAULT_DATA_DIR), config=config)


def prepared_dir_for_source(data_dir: str | os.PathLike,
                            manual_dir: str | os.PathLike) -> str:
    """The TFDS data_dir of a dataset prepared from the files in `manual_dir`.

    TFDS keys a prepared copy by dataset, config and version only; two source folders
    (say the dev copy of Penn-Fudan and another pedestrian collection in its layout)
    would share one copy, and the second would silently read the first. Each source
    directory therefore gets its own data_dir: `<data_dir>/sources/<folder>-<hash>`,
    the hash being of its absolute path.
    """
    source = os.path.abspath(os.fspath(manual_dir))
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:10]
    folder = os.path.basename(source.rstrip(os.sep)) or "root"
    return os.path.join(os.fspath(data_dir), "sources", f"{folder}-{digest}")


def load(name: str, split: str, data_dir: str | os.PathLike | None = None,
         manual_dir: str | os.PathLike | None = None,
         config: ConfigArg = None) -> tf.data.Dataset:
    """Prepares dataset `name` if needed and returns one split.

    The order of the examples is fixed by the prepared copy (TFDS orders a split by
    a hash of the example keys), the same on every call and machine.

    Args:
        name: a key of `DATASETS`.
        split: a TFDS split string, e.g. "train", "validation", "train[:10%]".
        data_dir: where prepared datasets live; defaults to `DEFAULT_DATA_DIR`.
        manual_dir: the source files of a file-based dataset (see each builder's
            layout); None uses TFDS's default `<data_dir>/downloads/manual`.
        config: config name or `tfds.core.BuilderConfig`; None for the default.

    Returns:
        A `tf.data.Dataset` of dicts: `image` uint8 [H, W, 3], `instances` int32
        [H, W], `instance_classes` int32 [N], `image_id` string.

    Raises:
        ValueError: unknown dataset or config name; bad source files (naming them).
        FileNotFoundError: a missing manual dir or file (naming it).
    """
    data_dir = os.fspath(data_dir or DEFAULT_DATA_DIR)
    if manual_dir:
        data_dir = prepared_dir_for_source(data_dir, manual_dir)
    dataset_builder = builder(name, data_dir=data_dir, config=config)
    download_config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual_dir) if manual_dir else None)
    dataset_builder.download_and_prepare(download_config=download_config)
    return dataset_builder.as_dataset(split=split, shuffle_files=False)
