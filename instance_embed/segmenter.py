"""A trained model as a Python object: images in, instances out.

    from instance_embed import Segmenter

    segmenter = Segmenter.from_saved_model("runs/demo/export")  # or .from_model_dir("runs/demo")
    instances = segmenter("photo.jpg")            # a path, encoded bytes or a uint8 array
    for name, score, box in zip(instances.class_names_of(), instances.scores, instances.boxes):
        print(name, f"{score:.2f}", box)          # box: (ymin, xmin, ymax, xmax) in pixels

`tile_size=` predicts images larger than it in overlapping tiles, instances merged across
the overlaps (`tiling.py`): for images over the model's pixel limit. Both kinds of model
run the same graph: a SavedModel's `serving_default` (encoded images)
and `serving_images` (pixels) signatures, or the very functions `export_main` would
write, traced in this process from a run's latest checkpoint. A list of images gives a
list of `Instances`, one image per call (images of a list may differ in size).

Bad input raises a `ValueError` (a `TypeError` for a wrong kind of object) naming the
argument, `image` or `images[i]`, and what is wrong with it; a file that cannot be read
raises the `OSError` that names it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Sequence, Union

import numpy as np
import tensorflow as tf

from instance_embed import serving
from instance_embed import tiling
from instance_embed import visualize
from instance_embed.inference import InferenceConfig
from instance_embed.serving.images import DEFAULT_MAX_IMAGE_PIXELS
from instance_embed.serving.signatures import ServingFunctions

ImageLike = Union[np.ndarray, str, os.PathLike, bytes]


@dataclasses.dataclass(frozen=True)
class Instances:
    """The detections of one image, sorted by descending score.

    Attributes:
      image: uint8 `[H, W, 3]`, the RGB image the model saw.
      masks: bool `[N, H, W]`.
      boxes: float32 `[N, 4]`, each mask's (ymin, xmin, ymax, xmax) in pixel edges: its
        first row and column and one past its last.
      classes: int32 `[N]`, class ids 1..C.
      scores: float32 `[N]`.
      class_names: the C foreground class names; class id c is `class_names[c - 1]`.
    """

    image: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.scores)

    def class_names_of(self) -> list[str]:
        """The class name of each detection."""
        return [self.class_names[c - 1] for c in self.classes]

    def above(self, min_score: float) -> Instances:
        """The detections scoring at least `min_score` (a prefix: scores descend)."""
        kept = int(np.sum(self.scores >= min_score))
        return dataclasses.replace(self, masks=self.masks[:kept], boxes=self.boxes[:kept],
                                   classes=self.classes[:kept], scores=self.scores[:kept])

    def label_image(self) -> np.ndarray:
        """int32 `[H, W]`: k + 1 where detection k is the highest-scored mask, 0 elsewhere
        (the exported model's `instance_map`)."""
        if not len(self):
            return np.zeros(self.image.shape[:2], np.int32)
        covered = self.masks.any(axis=0)
        return np.where(covered, np.argmax(self.masks, axis=0) + 1, 0).astype(np.int32)

    def to_coco(self, image_id) -> list[dict]:
        """COCO results entries (`COCO.loadRes` reads a list of them as is):
        `{"image_id", "category_id", "score", "segmentation": RLE}`, the RLE compressed
        by pycocotools. (No "bbox": given one, `loadRes` replaces the mask by the box.)"""
        from pycocotools import mask as mask_utils

        if not len(self):
            return []
        rles = mask_utils.encode(np.asfortranarray(self.masks.transpose(1, 2, 0), np.uint8))
        return [{"image_id": image_id, "category_id": int(c), "score": float(s),
                 "segmentation": {"size": [int(v) for v in rle["size"]],
                                  "counts": rle["counts"].decode("ascii")}}
                for rle, c, s in zip(rles, self.classes, self.scores)]

    def overlay(self, min_score: float = 0.5, alpha: float = 0.5, upscale: int = 1
                ) -> np.ndarray:
        """uint8 `[H * upscale, W * upscale, 3]`: the image with the masks scoring at
        least `min_score` in distinct colours, labelled with class name and score."""
        shown = self.above(min_score)
        return visualize.overlay_instances(self.image, shown.masks, shown.classes,
                                           self.class_names, shown.scores, alpha=alpha,
                                           upscale=upscale)


class Segmenter:
    """Runs a trained model on images (see the module docstring).

    Attributes:
      class_names: the C foreground class names.
      source: the SavedModel version directory or the checkpoint it runs.
    """

    def __init__(self, detect_bytes, detect_pixels, class_names: Sequence[str], source: str,
                 tile_size: int | None = None, tile_overlap: int = 128,
                 tile_min_score: float = 0.1):
        """Use `from_saved_model`, `from_model_dir` or `from_model`.

        `detect_bytes` (string `[B]`) and `detect_pixels` (uint8 `[B, H, W, 3]`) return
        the `serving_default` outputs of `serving.signatures`. With `tile_size`, images
        with a side over it run in tiles of that size overlapping by `tile_overlap`
        pixels (`tiling.tile_origins`), keeping the detections that score at least
        `tile_min_score`: each merged instance has a dense mask of the whole image's
        size (24 MB at 6000 x 4000), so a large image cannot keep K per tile.
        """
        if tile_size is not None:
            tiling.tile_origins(tile_size + 1, tile_size, tile_overlap)  # checks them
        self._detect_bytes = detect_bytes
        self._detect_pixels = detect_pixels
        self.class_names = tuple(class_names)
        self.source = source
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.tile_min_score = tile_min_score

    @classmethod
    def from_saved_model(cls, path: str, **tiling_args) -> Segmenter:
        """A SavedModel from `export_main`: an export directory (its highest version) or
        one version directory. `tiling_args`: `tile_size`, `tile_overlap`,
        `tile_min_score` (see `__init__`)."""
        version_dir = serving.resolve_saved_model_dir(path)
        loaded = tf.saved_model.load(version_dir)
        by_bytes = loaded.signatures[serving.SERVING_DEFAULT]
        by_pixels = loaded.signatures[serving.SERVING_IMAGES]
        segmenter = cls(lambda x: by_bytes(**{serving.BYTES_INPUT: x}),
                        lambda x: by_pixels(**{serving.IMAGES_INPUT: x}),
                        serving.load_class_names(version_dir), version_dir, **tiling_args)
        segmenter._loaded = loaded  # The signatures' variables live as long as it.
        return segmenter

    @classmethod
    def from_model_dir(cls, model_dir: str, inference_config: InferenceConfig | None = None,
                       checkpoint_path: str | None = None, **tiling_args) -> Segmenter:
        """A run of `train_main`: its latest checkpoint (or `checkpoint_path`) with the
        run's inference settings (or `inference_config`)."""
        from instance_embed.training import checkpoints

        model, config, path = checkpoints.restore_model(model_dir, checkpoint_path)
        if inference_config is not None:
            config = dataclasses.replace(config, inference=inference_config)
        return cls.from_model(model, config, source=path, **tiling_args)

    @classmethod
    def from_model(cls, model, experiment_config, class_names: Sequence[str] | None = None,
                   max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   source: str = "model", **tiling_args) -> Segmenter:
        """A Keras model built from `experiment_config.model`, with its inference
        settings and its dataset's class names (or `class_names`)."""
        functions = ServingFunctions(model, experiment_config.model.taus,
                                     experiment_config.inference, max_image_pixels)
        # The two signatures a Segmenter calls, traced once each for every image size.
        traced = {name: fn.get_concrete_function(*spec)
                  for name, (fn, spec) in functions.signatures().items()
                  if name in (serving.SERVING_DEFAULT, serving.SERVING_IMAGES)}
        names = serving.class_names_of(experiment_config, class_names)
        return cls(traced[serving.SERVING_DEFAULT], traced[serving.SERVING_IMAGES], names,
                   source, **tiling_args)

    def __call__(self, images: ImageLike | Sequence[ImageLike]
                 ) -> Instances | list[Instances]:
        """`Instances` of one image (a path, encoded JPEG/PNG bytes, or a uint8 array
        `[H, W, 3]` or `[H, W]`), or a list of them for a list of images or a
        `[B, H, W, 3]` array."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if isinstance(images, (list, tuple)):
            return [self._one(image, f"images[{i}]") for i, image in enumerate(images)]
        return self._one(images, "image")

    def detect(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        """The `serving_images` outputs for uint8 `[B, H, W, 3]` (what
        `evaluation.evaluate` runs)."""
        return self._detect_pixels(images)

    def _one(self, image: ImageLike, name: str) -> Instances:
        if isinstance(image, (str, os.PathLike)):
            with open(image, "rb") as f:
                image = f.read()
        if isinstance(image, bytes):
            # Decoded by the model (its errors name what is wrong with the file), and
            # here for the image to show; first here when it may need tiles.
            pixels = None if self.tile_size is None else self._decode(image, name)
            if pixels is None or max(pixels.shape[:2]) <= self.tile_size:
                outputs = self._run(self._detect_bytes, tf.constant([image]), name)
                return self._instances(outputs, self._decode(image, name)
                                       if pixels is None else pixels)
        elif isinstance(image, np.ndarray):
            pixels = check_image_array(image, name)
        else:
            raise TypeError(f"{name}: a {type(image).__name__}; expected a path, encoded "
                            "JPEG/PNG bytes or a uint8 NumPy array [H, W, 3]")
        if self.tile_size is not None and max(pixels.shape[:2]) > self.tile_size:
            return self._tiled(pixels, name)
        outputs = self._run(self._detect_pixels, tf.constant(pixels[np.newaxis]), name)
        return self._instances(outputs, pixels)

    @staticmethod
    def _decode(data: bytes, name: str) -> np.ndarray:
        try:
            return tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                                      expand_animations=False).numpy()
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"{name}: cannot be decoded as an image: "
                             f"{model_error_message(e)}") from None

    def _tiled(self, pixels: np.ndarray, name: str) -> Instances:
        """`pixels` in overlapping tiles of `tile_size`, merged (`tiling.merge_tiles`)."""
        height, width = pixels.shape[:2]
        tiles = []
        for y in tiling.tile_origins(height, self.tile_size, self.tile_overlap):
            for x in tiling.tile_origins(width, self.tile_size, self.tile_overlap):
                crop = pixels[y:y + self.tile_size, x:x + self.tile_size]
                outputs = self._run(self._detect_pixels, tf.constant(crop[np.newaxis]),
                                    f"{name} (tile at y={y}, x={x})")
                found = self._instances(outputs, crop).above(self.tile_min_score)
                tiles.append(tiling.TileDetections((y, x), found.masks, found.boxes,
                                                   found.classes, found.scores))
        masks, boxes, classes, scores = tiling.merge_tiles(tiles, (height, width))
        return Instances(image=pixels, masks=masks, boxes=boxes, classes=classes,
                         scores=scores, class_names=self.class_names)

    @staticmethod
    def _run(detect, batch: tf.Tensor, name: str) -> dict[str, np.ndarray]:
        try:
            outputs = detect(batch)
        except tf.errors.InvalidArgumentError as e:
            raise ValueError(f"{name}: {model_error_message(e)}") from None
        return {key: value.numpy()[0] for key, value in outputs.items()}

    def _instances(self, outputs: dict[str, np.ndarray], pixels: np.ndarray) -> Instances:
        count = int(outputs["num_detections"])
        height, width = (int(v) for v in outputs["image_size"])
        # Boxes are normalised by the image's size; in pixel edges they are integers.
        boxes = np.round(outputs["detection_boxes"][:count] * [height, width, height, width])
        return Instances(
            image=pixels,
            masks=outputs["detection_masks"][:count, :height, :width].astype(bool),
            boxes=boxes.astype(np.float32),
            classes=outputs["detection_classes"][:count].astype(np.int32),
            scores=outputs["detection_scores"][:count].astype(np.float32),
            class_names=self.class_names)


def check_image_array(image: np.ndarray, name: str) -> np.ndarray:
    """uint8 `[H, W, 3]` from a uint8 `[H, W]`, `[H, W, 1]` or `[H, W, 3]` array.

    Raises:
      ValueError: naming `name`, for an empty array, another dtype (16-bit, float) or
        another number of channels (RGBA).
    """
    if image.size == 0:
        raise ValueError(f"{name}: an empty array (shape {image.shape})")
    if image.dtype != np.uint8:
        raise ValueError(f"{name}: dtype {image.dtype}; expected uint8 RGB values 0-255 "
                         "(scale 16-bit or float images to uint8 first)")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"{name}: shape {image.shape}; expected [H, W, 3] RGB or [H, W] "
                         "grayscale (drop an alpha channel with image[..., :3])")
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def model_error_message(error: Exception) -> str:
    """The model's own message for a rejected image, without TF's decoration."""
    text = getattr(error, "message", None) or str(error)
    found = re.search(r"assertion failed: \[(.*)\]", text)
    if found:
        # "image_bytes[0] is empty (0 bytes)" -> "is empty (0 bytes)", "images are too
        # large: ..." -> "is too large: ...": the caller names its one image.
        message = re.sub(r"^(image_bytes|images)\[\d+\] ", "", found.group(1))
        return re.sub(r"^images (are|have) ", lambda m: {"are": "is ", "have": "has "}[m[1]],
                      message)
    return text.strip().splitlines()[0] if text.strip() else type(error).__name__
