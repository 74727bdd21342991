"""`instance_folder`: your own images and label masks, class-agnostic.

The layout StarDist, Cellpose and EmbedSeg users already have: one label image per
image, same file stem, 0 background and any positive ids (8, 16 or 32-bit PNG or
TIFF; ids are renumbered 1..N in increasing order). Every instance has class 1,
`object`. Images may be PNG, JPEG or TIFF; grayscale becomes RGB.

Splits: with `images/` + `masks/` at the top of the manual dir, the images sorted
by file name go every `validation_every`-th (5th, 10th, ...: 0-based index % 5 == 4
by default) to `validation` and the others to `train`. To choose the splits
yourself, use `train/`, `validation/` and optionally `test/` folders instead, each
with its own `images/` + `masks/`. See `LAYOUT`.
"""

from __future__ import annotations

import dataclasses
import pathlib

import tensorflow_datasets as tfds

from instance_embed.data import features as features_lib

CLASS_NAMES = ("object",)
MASK_EXTENSIONS = (".png", ".tif", ".tiff")
SPLIT_FOLDERS = ("train", "validation", "test")
LAYOUT = """\
  <manual_dir>/
    images/<stem>.png|.jpg|.jpeg|.tif|.tiff
    masks/<stem>.png|.tif|.tiff     label image: 0 background, 1 id per instance
  or, with splits of your choice:
  <manual_dir>/
    train/images/  train/masks/
    validation/images/  validation/masks/
    test/images/  test/masks/       (optional)
"""


@dataclasses.dataclass(eq=False)
class InstanceFolderConfig(tfds.core.BuilderConfig):
    """A named `instance_folder` variant.

    Give each of your folders its own config name: the prepared copy is stored under
    `<data_dir>/instance_folder/<name>/`, and is reused until deleted.

    Attributes:
        validation_every: with a flat `images/` + `masks/` layout, every this-many-th
            image by sorted name goes to `validation`; 0 puts all images in `train`.
    """

    validation_every: int = 5

    def __post_init__(self):
        if self.validation_every < 0 or self.validation_every == 1:
            raise ValueError("validation_every must be 0 (no validation split) or "
                             f">= 2, got {self.validation_every}")


def find_mask(masks_dir: pathlib.Path, stem: str) -> pathlib.Path:
    """The label image of the image with file stem `stem`.

    Raises:
        FileNotFoundError: there is none; names the expected file.
        ValueError: several files would match.
    """
    found = [masks_dir / f"{stem}{ext}" for ext in MASK_EXTENSIONS
             if (masks_dir / f"{stem}{ext}").is_file()]
    if not found:
        raise FileNotFoundError(
            f"Missing mask {masks_dir / stem}.png (or .tif/.tiff) for image {stem!r}")
    if len(found) > 1:
        raise ValueError(f"Several masks for image {stem!r}: {[str(p) for p in found]}")
    return found[0]


def split_images(manual_dir: pathlib.Path, validation_every: int = 5
                 ) -> dict[str, list[pathlib.Path]]:
    """The images of each split (see the module docstring for the rules).

    Raises:
        FileNotFoundError: naming `manual_dir` and the layout, when neither layout is
            there or a split has no image.
    """
    if (manual_dir / "images").is_dir():
        images = features_lib.list_images(manual_dir / "images")
        if not images:
            raise FileNotFoundError(
                f"No images in {manual_dir / 'images'}: expected layout\n{LAYOUT}")
        if validation_every == 0:
            return {"train": images}
        return features_lib.deterministic_split(images, every=validation_every)
    splits = {}
    for split in SPLIT_FOLDERS:
        folder = manual_dir / split / "images"
        if folder.is_dir():
            splits[split] = features_lib.list_images(folder)
            if not splits[split]:
                raise FileNotFoundError(f"No images in {folder}: expected layout\n"
                                        f"{LAYOUT}")
    if not splits:
        raise FileNotFoundError(
            f"Neither images/ nor train/images/ in {manual_dir}: expected layout\n"
            f"{LAYOUT}")
    return splits


def read_example(image_path: pathlib.Path) -> dict:
    """The contract example of one image and its mask in the sibling `masks/`.

    Raises:
        FileNotFoundError / ValueError: naming the image or mask file at fault.
    """
    mask_path = find_mask(image_path.parent.parent / "masks", image_path.stem)
    return features_lib.class_agnostic_example(image_path, mask_path)


class InstanceFolder(tfds.core.GeneratorBasedBuilder):
    """Class-agnostic instances from a folder of images and label masks."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    CLASS_NAMES = CLASS_NAMES
    BUILDER_CONFIGS = [InstanceFolderConfig(
        name="default", description="Every 5th image by name to validation.")]
    DEFAULT_BUILDER_CONFIG_NAME = "default"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Pass the folder holding your images and masks as the manual dir:\n" + LAYOUT)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=features_lib.features(),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
        )

    def _split_generators(self, dl_manager):
        manual_dir = features_lib.resolve_manual_dir(dl_manager)
        splits = split_images(manual_dir, self.builder_config.validation_every)
        # TFDS cannot write an empty split: one that gets no image (a folder with
        # fewer than `validation_every` images) is left out.
        return {split: self._generate_examples(paths)
                for split, paths in splits.items() if paths}

    def _generate_examples(self, image_paths):
        for path in image_paths:
            yield path.stem, features_lib.for_storage(read_example(path), path)
