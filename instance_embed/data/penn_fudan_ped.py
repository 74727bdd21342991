"""`penn_fudan_ped`: the Penn-Fudan pedestrian database, one class (`person`).

Reads an extracted copy in the Penn-Fudan layout, given as the manual dir (the
folder holding `PNGImages/` and `PedMasks/`, or its parent). Without a manual dir
the official archive is downloaded.

Split, deterministic: images sorted by file name; the 5th, 10th, 15th, ... image
(0-based index % 5 == 4) goes to `validation`, the rest to `train`. On the full
170-image release that is 136 / 34; on a 128-image copy 103 / 25.
"""

from __future__ import annotations

import pathlib

import tensorflow_datasets as tfds

from instance_embed.data import features as features_lib

CLASS_NAMES = ("person",)
URL = "https://www.cis.upenn.edu/~jshi/ped_html/PennFudanPed.zip"
_LAYOUT = """\
  <manual_dir>/                    (or <manual_dir>/PennFudanPed/)
    PNGImages/<name>.png           RGB images
    PedMasks/<name>_mask.png       8-bit masks: 0 background, 1..N pedestrians
"""


def find_dataset_root(manual_dir: pathlib.Path) -> pathlib.Path:
    """The folder holding `PNGImages/` and `PedMasks/`: `manual_dir` or a child.

    Raises:
        FileNotFoundError: naming `manual_dir` and the expected layout.
    """
    root = features_lib.find_root(manual_dir, ("", "PennFudanPed"),
                                  ("PNGImages", "PedMasks"))
    if root is None:
        raise FileNotFoundError(
            f"No Penn-Fudan data in {manual_dir}: expected layout\n{_LAYOUT}")
    return root


def split_images(root: pathlib.Path) -> dict[str, list[pathlib.Path]]:
    """Images of `root/PNGImages` by split (see the module docstring for the rule).

    Raises:
        FileNotFoundError: `PNGImages/` holds no image.
    """
    images = features_lib.list_images(root / "PNGImages")
    if not images:
        raise FileNotFoundError(
            f"No images in {root / 'PNGImages'}: expected layout\n{_LAYOUT}")
    return features_lib.deterministic_split(images)


def read_example(image_path: pathlib.Path) -> dict:
    """The contract example of one Penn-Fudan image and its `PedMasks` mask.

    Raises:
        FileNotFoundError / ValueError: naming the image or mask file at fault.
    """
    mask_path = image_path.parent.parent / "PedMasks" / f"{image_path.stem}_mask.png"
    return features_lib.class_agnostic_example(image_path, mask_path)


class PennFudanPed(tfds.core.GeneratorBasedBuilder):
    """Penn-Fudan pedestrians with instance masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CLASS_NAMES = CLASS_NAMES
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Extract PennFudanPed.zip (from https://www.cis.upenn.edu/~jshi/ped_html/) "
        "and pass the extracted folder as the manual dir:\n" + _LAYOUT)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=features_lib.features(),
            homepage="https://www.cis.upenn.edu/~jshi/ped_html/",
            citation=(
                "@inproceedings{wang2007pennfudan, title={Object Detection Combining "
                "Recognition and Segmentation}, author={Wang, Liming and Shi, Jianbo "
                "and Song, Gang and Shen, I-fan}, booktitle={ACCV}, year={2007}}"),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
        )

    def download_and_prepare(self, *, download_config=None, **kwargs):
        """As `tfds.core.DatasetBuilder.download_and_prepare`.

        Without `download_config.manual_dir` the official archive is downloaded,
        unless TFDS's default manual dir (`<data_dir>/downloads/manual`) already holds
        the data; with one, that directory must hold the data, and nothing is
        downloaded.
        """
        # Recorded here because the download manager cannot tell a manual dir the
        # caller gave from TFDS's default one.
        self._manual_dir_given = bool(download_config and download_config.manual_dir)
        super().download_and_prepare(download_config=download_config, **kwargs)

    def _split_generators(self, dl_manager):
        try:
            root = find_dataset_root(features_lib.resolve_manual_dir(dl_manager))
        except FileNotFoundError:
            if getattr(self, "_manual_dir_given", True):
                raise
            root = find_dataset_root(pathlib.Path(dl_manager.download_and_extract(URL)))
        splits = split_images(root)
        # TFDS cannot write an empty split: with fewer than 5 images there is no
        # validation image, and no validation split.
        return {split: self._generate_examples(paths)
                for split, paths in splits.items() if paths}

    def _generate_examples(self, image_paths):
        for path in image_paths:
            yield path.stem, features_lib.for_storage(read_example(path), path)
