"""The feature contract shared by every dataset, and helpers to read files into it.

Every builder in `instance_embed.data` yields examples of `features()`:

| key                | dtype, shape     | meaning                                            |
| ------------------ | ---------------- | -------------------------------------------------- |
| `image`            | uint8 [H, W, 3]  | RGB                                                |
| `instances`        | int32 [H, W]     | 0 background, 1..N instance ids, -1 ignore         |
| `instance_classes` | int32 [N]        | class id (1..C) of instance i at index i - 1       |
| `image_id`         | string           | stable id (the file stem for file-based datasets)  |

The helpers below read user files. Every failure names the offending file: in a
dataset of thousands of images an error is only useful when it says which one.
"""

from __future__ import annotations

import io
import os
import pathlib
from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

# The contract as `tf.data` element specs, e.g. for `tf.data.Dataset.from_generator`.
CONTRACT_SIGNATURE = {
    "image": tf.TensorSpec([None, None, 3], tf.uint8),
    "instances": tf.TensorSpec([None, None], tf.int32),
    "instance_classes": tf.TensorSpec([None], tf.int32),
    "image_id": tf.TensorSpec([], tf.string),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# PIL modes of single-channel images holding more than 8 bits per pixel.
_WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_LABEL_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N")


def features() -> tfds.features.FeaturesDict:
    """Returns the `tfds.features.FeaturesDict` of the data contract.

    A fresh object per call, since TFDS binds a FeaturesDict to the builder owning it.
    """
    return tfds.features.FeaturesDict({
        # Stored as PNG, or as the source's own RGB PNG/JPEG bytes (see
        # `for_storage`); decoded by tf.image.decode_image either way.
        "image": tfds.features.Image(
            shape=(None, None, 3), dtype=np.uint8,
            doc="RGB image, uint8 [height, width, 3]."),
        # TFDS needs an explicit encoding for two unknown dimensions; zlib keeps the
        # -1 ignore value, which a PNG label map could not hold.
        "instances": tfds.features.Tensor(
            shape=(None, None), dtype=np.int32, encoding="zlib",
            doc="Instance ids, int32 [height, width]: 0 background, 1..N, -1 ignore."),
        "instance_classes": tfds.features.Tensor(
            shape=(None,), dtype=np.int32,
            doc="Class id (1..C) of instance i at index i - 1, int32 [N]."),
        "image_id": tfds.features.Text(doc="Stable id of the image (file stem)."),
    })


def make_example(image: np.ndarray, instances: np.ndarray,
                 instance_classes: Sequence[int], image_id: str) -> dict:
    """Checks one example against the contract and returns it as a feature dict.

    Args:
        image: uint8 [height, width, 3] RGB.
        instances: integer [height, width] holding -1, 0 and consecutive ids 1..N.
        instance_classes: N class ids, each >= 1.
        image_id: stable id of the image.

    Returns:
        The dict to yield from a builder's `_generate_examples`.

    Raises:
        ValueError: naming `image_id`, when any part breaks the contract.
    """
    image = np.asarray(image)
    instances = np.asarray(instances)
    classes = np.asarray(instance_classes, dtype=np.int64).reshape(-1)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{image_id}: image must be uint8 [H, W, 3], got "
                         f"{image.dtype} {image.shape}")
    if instances.shape != image.shape[:2]:
        raise ValueError(f"{image_id}: instances shape {instances.shape} differs "
                         f"from the image's {image.shape[:2]}")
    if instances.min(initial=0) < -1:
        raise ValueError(f"{image_id}: instance map has values below -1")
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if ids.size != classes.size or np.any(ids != np.arange(1, ids.size + 1)):
        raise ValueError(f"{image_id}: instance ids must be 1..{classes.size} (one "
                         f"per class entry), got {ids.tolist()}")
    if np.any(classes < 1):
        raise ValueError(f"{image_id}: class ids must be >= 1, got {classes.tolist()}")
    return {
        "image": image,
        "instances": instances.astype(np.int32),
        "instance_classes": classes.astype(np.int32),
        "image_id": image_id,
    }


def encode_image(image: np.ndarray, source: str | os.PathLike | None = None) -> bytes:
    """Encoded bytes of an RGB image, for the `image` feature.

    TensorFlow's PNG encoder, which TFDS would use, takes ~3x longer than PIL at a
    low compression level (which compresses photos and noisy images about as well).
    An RGB PNG or JPEG source is kept as it is: re-encoding would cost time, and for
    a JPEG also quality and space.

    Args:
        image: uint8 [height, width, 3], the decoded image.
        source: the file `image` was read from, if any.

    Returns:
        PNG or JPEG bytes that decode to `image` (a JPEG source decodes to it up to
        the decoder's rounding).
    """
    if source is not None:
        with Image.open(source) as img:
            if img.format in ("PNG", "JPEG") and img.mode == "RGB":
                return pathlib.Path(source).read_bytes()
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def for_storage(example: dict, source: str | os.PathLike | None = None) -> dict:
    """`example` with its image replaced by encoded bytes (see `encode_image`)."""
    return {**example, "image": encode_image(example["image"], source)}


def _open_image(path: pathlib.Path) -> Image.Image:
    """Opens and fully decodes an image file, or raises an error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"Missing file: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # Decode now: a truncated file must fail here, not in TF.
            return img.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"Cannot read image file {path}: {e}") from e


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as RGB uint8.

    Grayscale becomes RGB by repeating the channel; alpha is dropped. Grayscale
    deeper than 8 bits (16-bit or float microscopy TIFFs) is min-max scaled per
    image to 0..255.

    Args:
        path: PNG, JPEG or TIFF file.

    Returns:
        uint8 [height, width, 3].

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable image; the message names it.
    """
    path = pathlib.Path(path)
    img = _open_image(path)
    if img.mode in _WIDE_GRAY_MODES:
        gray = np.asarray(img, dtype=np.float64)
        lo, hi = float(gray.min()), float(gray.max())
        gray = (gray - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(gray)
        return np.repeat(np.round(gray).astype(np.uint8)[..., None], 3, axis=-1)
    try:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot convert image file {path} (PIL mode {img.mode}) "
                         f"to RGB: {e}") from e


def read_label_map(path: str | os.PathLike) -> np.ndarray:
    """Reads a single-channel label image: 8, 16 or 32-bit, or palette.

    A palette ("P" mode) PNG gives its palette indices, which is how VOC stores labels.

    Args:
        path: label image file (PNG or TIFF).

    Returns:
        int64 [height, width] raw label values.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable or has colour channels; the message names it.
    """
    path = pathlib.Path(path)
    img = _open_image(path)
    if img.mode not in _LABEL_MODES:
        raise ValueError(f"Label map {path} must be a single-channel image (8/16/32-bit "
                         f"or palette), got PIL mode {img.mode!r}")
    return np.asarray(img).astype(np.int64)


def check_same_size(image: np.ndarray, label_map: np.ndarray,
                    image_path: str | os.PathLike,
                    label_path: str | os.PathLike) -> None:
    """Raises ValueError naming both files when a label map's size differs from its image."""
    if image.shape[:2] != label_map.shape[:2]:
        raise ValueError(
            f"Mask {label_path} is {label_map.shape[1]}x{label_map.shape[0]} (WxH) but "
            f"its image {image_path} is {image.shape[1]}x{image.shape[0]}")


def relabel_consecutive(label_map: np.ndarray, ignore_values: Iterable[int] = ()
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Renumbers the positive ids of a label map to 1..N, keeping their order.

    Args:
        label_map: integer [height, width]; 0 is background.
        ignore_values: raw values that become -1 (e.g. VOC's 255 border).

    Returns:
        instances: int32 [height, width] holding -1, 0 and 1..N.
        old_ids: int64 [N], the raw id of new id i at index i - 1.
    """
    label_map = np.asarray(label_map)
    ignore = np.isin(label_map, list(ignore_values))
    foreground = (label_map > 0) & ~ignore
    old_ids, inverse = np.unique(label_map[foreground], return_inverse=True)
    instances = np.zeros(label_map.shape, np.int32)
    instances[foreground] = inverse.astype(np.int32) + 1
    instances[ignore] = -1
    return instances, old_ids.astype(np.int64)


def class_agnostic_example(image_path: pathlib.Path, mask_path: pathlib.Path) -> dict:
    """An example from an image and a label map of any ids, every instance of class 1.

    Raises:
        FileNotFoundError / ValueError: naming the image or mask file at fault.
    """
    image = read_image(image_path)
    label_map = read_label_map(mask_path)
    check_same_size(image, label_map, image_path, mask_path)
    instances, old_ids = relabel_consecutive(label_map)
    return make_example(image, instances, np.ones(len(old_ids), np.int32), image_path.stem)


def deterministic_split(paths: Sequence[pathlib.Path], every: int = 5
                        ) -> dict[str, list[pathlib.Path]]:
    """Splits files by sorted name: every `every`-th file goes to validation.

    With `every=5` the files at 0-based sorted positions 4, 9, 14, ... (index % 5 == 4,
    i.e. the 5th, 10th, ...) form `validation` and the others `train`. Files added
    after the last one never move an earlier file to the other split.

    Args:
        paths: files; sorted here by file name.
        every: period of the validation pick.

    Returns:
        {"train": [...], "validation": [...]}, each sorted by name.
    """
    ordered = sorted(paths, key=lambda p: p.name)
    return {
        "train": [p for i, p in enumerate(ordered) if i % every != every - 1],
        "validation": [p for i, p in enumerate(ordered) if i % every == every - 1],
    }


def resolve_manual_dir(dl_manager) -> pathlib.Path:
    """Returns the manual dir, or raises FileNotFoundError naming it.

    TFDS signals a missing or empty manual dir with an AssertionError (whose message
    names the directory and quotes the builder's MANUAL_DOWNLOAD_INSTRUCTIONS, i.e.
    the layout); callers deserve an ordinary exception type.
    """
    try:
        return pathlib.Path(dl_manager.manual_dir)
    except AssertionError as e:
        raise FileNotFoundError(str(e)) from e


def find_root(base: pathlib.Path, candidates: Sequence[str],
              required: Sequence[str]) -> pathlib.Path | None:
    """Returns the first `base / candidate` holding every `required` entry, or None."""
    for candidate in candidates:
        root = base / candidate if candidate else base
        if all((root / entry).exists() for entry in required):
            return root
    return None


def list_images(directory: pathlib.Path) -> list[pathlib.Path]:
    """Image files directly in `directory`, sorted by name.

    Raises:
        ValueError: two images share a stem (their masks would be ambiguous).
    """
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not p.name.startswith("."))
    seen: dict[str, pathlib.Path] = {}
    for p in files:
        if p.stem in seen:
            raise ValueError(f"Two images share the stem {p.stem!r}: {seen[p.stem]} "
                             f"and {p}")
        seen[p.stem] = p
    return files
