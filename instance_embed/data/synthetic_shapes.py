"""`synthetic_shapes`: generated instance segmentation scenes, deterministic from a seed.

Each image holds 1 to `max_instances` shapes of three classes: filled ellipses
("disk"), elliptic annuli ("ring") and thin rotated rectangles ("bar", the spindly
class). Shapes are painted back to front, and placed so that some touch an earlier
shape without overlapping it and some are painted over one (occlusion, which can
cut the occluded shape into disconnected parts that still form one instance).
Colours and textures are drawn independently of the class, some instances borrow
the colour of an earlier one and some are camouflaged in the background's colour,
so neither the class nor the instance can be told from colour alone.

Example `i` of a split is drawn from its own `numpy` generator seeded by
`(seed, split, i)`, so an example does not depend on which others were generated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.signal
import tensorflow_datasets as tfds

from instance_embed.data import features as features_lib
from instance_embed.data.shape_painting import DEFAULT_STYLE
from instance_embed.data.shape_painting import HARD_STYLE
from instance_embed.data.shape_painting import Style
from instance_embed.data.shape_painting import paint_scene

CLASS_NAMES = ("disk", "ring", "bar")
DISK, RING, BAR = 1, 2, 3
SPLITS = ("train", "validation", "test")

# Placement of every shape after the first: (free, touching an earlier shape,
# painted over an earlier shape).
_PLACEMENT_PROBS = (0.35, 0.35, 0.30)
_FREE, _TOUCH, _OCCLUDE = 0, 1, 2
# A shape left with fewer visible pixels than `Geometry.min_visible_fraction` of its
# in-image area (or than `_MIN_PIXELS_AT_128` scaled to the image area) is removed.
_MIN_PIXELS_AT_128 = 20
_MAX_ATTEMPTS = 20


@dataclasses.dataclass(frozen=True)
class Geometry:
    """The shapes' sizes, as fractions of the image size (uniform draws in (low, high)),
    and how much of a shape occlusion may hide.

    Attributes:
        disk_radius: a disk's long semi-axis.
        ring_radius: a ring's outer long semi-axis.
        ring_thickness: a ring's wall, as a fraction of its outer semi-axis.
        bar_half_length: half a bar's length.
        bar_half_width: half a bar's width.
        min_visible_fraction: a shape with less of its in-image area visible is
            removed from the scene.
    """

    disk_radius: tuple[float, float] = (0.06, 0.15)
    ring_radius: tuple[float, float] = (0.09, 0.2)
    ring_thickness: tuple[float, float] = (0.25, 0.45)
    bar_half_length: tuple[float, float] = (0.15, 0.3)
    bar_half_width: tuple[float, float] = (0.015, 0.025)
    min_visible_fraction: float = 0.1


# Thin bars (4-6 px wide at 128 px), ring walls of a few pixels, shapes seen only in
# slivers (e.g. through a ring's hole): hard at stride 4.
DEFAULT_GEOMETRY = Geometry()
# Large, distinct shapes: bars 13-20 px and ring walls at least 6 px wide at 128 px
# (3-5 cells at stride 4), each at least half visible (the `demo` config).
BOLD_GEOMETRY = Geometry(disk_radius=(0.11, 0.19), ring_radius=(0.14, 0.22),
                         ring_thickness=(0.4, 0.55), bar_half_length=(0.17, 0.3),
                         bar_half_width=(0.05, 0.08), min_visible_fraction=0.5)


@dataclasses.dataclass(eq=False)
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """Size and content of a `synthetic_shapes` variant.

    Attributes:
        image_size: height and width of the square images, in pixels.
        num_train: examples in `train`.
        num_validation: examples in `validation`.
        num_test: examples in `test`.
        max_instances: most shapes drawn in one image (at least 1 is always kept).
        seed: base seed; the same seed always gives the same dataset.
        style: appearance (see `Style`).
        geometry: the shapes' sizes (see `Geometry`).
    """

    image_size: int = 128
    num_train: int = 2000
    num_validation: int = 200
    num_test: int = 200
    max_instances: int = 10
    seed: int = 0
    style: Style = DEFAULT_STYLE
    geometry: Geometry = DEFAULT_GEOMETRY

    def __post_init__(self):
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.max_instances < 1:
            raise ValueError(f"max_instances must be >= 1, got {self.max_instances}")
        for split in SPLITS:
            if getattr(self, f"num_{split}") < 0:
                raise ValueError(f"num_{split} must be >= 0")


@dataclasses.dataclass
class Shape:
    """One shape of a scene, before occlusion.

    Attributes:
        class_id: 1 disk, 2 ring, 3 bar.
        ys: int [P] rows of the shape's pixels inside the image.
        xs: int [P] columns of the shape's pixels inside the image.
    """

    class_id: int
    ys: np.ndarray
    xs: np.ndarray

    def mask(self, size: int) -> np.ndarray:
        """bool [size, size] footprint of the whole shape, ignoring occlusion."""
        out = np.zeros((size, size), bool)
        out[self.ys, self.xs] = True
        return out


def shape_footprint(rng: np.random.Generator, class_id: int, size: int,
                    geometry: Geometry = DEFAULT_GEOMETRY) -> np.ndarray:
    """Draws a shape of class `class_id` centred in a local patch.

    Returns:
        bool [2R+1, 2R+1] patch whose centre pixel is the shape's centre.
    """
    theta = rng.uniform(0.0, math.pi)
    if class_id == DISK:
        a = rng.uniform(*geometry.disk_radius) * size
        b = a * rng.uniform(0.6, 1.0)
        extent = a
    elif class_id == RING:
        a = rng.uniform(*geometry.ring_radius) * size
        b = a * rng.uniform(0.7, 1.0)
        thickness = max(2.0, a * rng.uniform(*geometry.ring_thickness))
        extent = a
    else:
        half_length = rng.uniform(*geometry.bar_half_length) * size
        half_width = max(1.0, rng.uniform(*geometry.bar_half_width) * size)
        extent = math.hypot(half_length, half_width)
    radius = int(math.ceil(extent)) + 1
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    v = -xx * math.sin(theta) + yy * math.cos(theta)
    if class_id == DISK:
        return (u / a) ** 2 + (v / b) ** 2 <= 1.0
    if class_id == RING:
        inner_a, inner_b = max(a - thickness, 0.5), max(b - thickness, 0.5)
        inner = (u / inner_a) ** 2 + (v / inner_b) ** 2 > 1.0
        return ((u / a) ** 2 + (v / b) ** 2 <= 1.0) & inner
    return (np.abs(u) <= half_length) & (np.abs(v) <= half_width)


def touching_centres(anchor: Shape, patch: np.ndarray, size: int) -> np.ndarray:
    """Centres where `patch` would touch `anchor` without overlapping it.

    Args:
        anchor: an earlier shape.
        patch: bool [2R+1, 2R+1] footprint of the new shape around its centre.
        size: image height and width.

    Returns:
        int [P, 2] (row, column) centres whose placed patch is disjoint from `anchor`
        but 4-adjacent to it.
    """
    # Only centres within R + 1 of the anchor can touch it: work in that window.
    reach = patch.shape[0] // 2 + 1
    y0, x0 = max(anchor.ys.min() - reach, 0), max(anchor.xs.min() - reach, 0)
    y1 = min(anchor.ys.max() + reach + 1, size)
    x1 = min(anchor.xs.max() + reach + 1, size)
    window = np.zeros((y1 - y0, x1 - x0), np.float32)
    window[anchor.ys - y0, anchor.xs - x0] = 1.0
    # overlap[c] = sum_o anchor[c + o] * patch[o], a correlation; by FFT since
    # patches are large.
    overlap = scipy.signal.correlate(window, patch.astype(np.float32), mode="same",
                                     method="fft") > 0.5
    # Moving the centre one pixel from an overlapping position leaves the patch
    # 4-adjacent to the anchor.
    near = overlap.copy()
    near[1:, :] |= overlap[:-1, :]
    near[:-1, :] |= overlap[1:, :]
    near[:, 1:] |= overlap[:, :-1]
    near[:, :-1] |= overlap[:, 1:]
    return np.argwhere(near & ~overlap) + (y0, x0)


def place_patch(patch: np.ndarray, centre: tuple[int, int], size: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels (rows, columns) of `patch` centred at `centre`, clipped to the image."""
    radius = patch.shape[0] // 2
    dy, dx = np.nonzero(patch)
    ys = dy - radius + centre[0]
    xs = dx - radius + centre[1]
    inside = (ys >= 0) & (ys < size) & (xs >= 0) & (xs < size)
    return ys[inside], xs[inside]


def _visible_labels(shapes: list[Shape], size: int) -> np.ndarray:
    """int32 [size, size]: index + 1 of the topmost shape at each pixel, 0 if none."""
    labels = np.zeros((size, size), np.int32)
    for k, shape in enumerate(shapes):
        labels[shape.ys, shape.xs] = k + 1
    return labels


def sample_scene(rng: np.random.Generator, size: int, max_instances: int = 10,
                 geometry: Geometry = DEFAULT_GEOMETRY) -> list[Shape]:
    """Draws the shapes of one image, back to front.

    Shapes that end up (almost) fully hidden or outside the image are removed, so
    every returned shape has visible pixels and the scene holds 1..max_instances.

    Args:
        rng: the example's generator.
        size: image height and width.
        max_instances: most shapes drawn.
        geometry: the shapes' sizes.

    Returns:
        Shapes in painting order (later ones cover earlier ones).
    """
    min_pixels = max(4, round(_MIN_PIXELS_AT_128 * (size / 128) ** 2))
    for _ in range(_MAX_ATTEMPTS):
        num = int(rng.integers(1, max_instances + 1))
        shapes: list[Shape] = []
        for _ in range(num):
            class_id = int(rng.integers(1, len(CLASS_NAMES) + 1))
            patch = shape_footprint(rng, class_id, size, geometry)
            placement = int(rng.choice(3, p=_PLACEMENT_PROBS)) if shapes else _FREE
            anchor = int(rng.integers(len(shapes))) if shapes else -1
            centre = None
            if placement == _TOUCH:
                candidates = touching_centres(shapes[anchor], patch, size)
                if len(candidates):
                    centre = candidates[rng.integers(len(candidates))]
            elif placement == _OCCLUDE:
                pick = rng.integers(len(shapes[anchor].ys))
                centre = (shapes[anchor].ys[pick], shapes[anchor].xs[pick])
            if centre is None:
                margin = 0.05 * size
                centre = tuple(np.round(rng.uniform(margin, size - 1 - margin, 2))
                               .astype(int))
            ys, xs = place_patch(patch, centre, size)
            if len(ys):
                shapes.append(Shape(class_id, ys, xs))
        # Removing a shape only uncovers others, so one pass of removals suffices.
        counts = np.bincount(_visible_labels(shapes, size).ravel(),
                             minlength=len(shapes) + 1)[1:]
        kept = [s for s, count in zip(shapes, counts)
                if count >= max(min_pixels, geometry.min_visible_fraction * len(s.ys))]
        if kept:
            return kept
    raise RuntimeError("Could not draw a scene with a visible shape; "
                       f"image_size={size} is too small")


def render_scene(rng: np.random.Generator, shapes: list[Shape], size: int,
                 style: Style = DEFAULT_STYLE
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene's image (`shape_painting.paint_scene`) and its labels.

    Returns:
        image: uint8 [size, size, 3].
        instances: int32 [size, size], 0 background and ids 1..N in painting order.
        instance_classes: int32 [N].
    """
    image = paint_scene(rng, shapes, size, style)
    classes = np.array([shape.class_id for shape in shapes], np.int32)
    return image, _visible_labels(shapes, size), classes


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of example `index` of `split`, independent of all others."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def generate_example(config: SyntheticShapesConfig, split: str, index: int) -> dict:
    """Example `index` of `split` under `config`, as a contract feature dict."""
    rng = example_rng(config.seed, split, index)
    shapes = sample_scene(rng, config.image_size, config.max_instances, config.geometry)
    image, instances, classes = render_scene(rng, shapes, config.image_size, config.style)
    return features_lib.make_example(image, instances, classes, f"{split}_{index:06d}")


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic shapes (disk, ring, bar) with touching and occluding instances."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "Milder default style (visible camouflage, weaker textures); "
                               "the 1.0.0 style is the 'hard' config."}
    CLASS_NAMES = CLASS_NAMES
    BUILDER_CONFIGS = [
        SyntheticShapesConfig(
            name="default", description="128x128, 2000/200/200, up to 10 shapes, thin bars, "
            "shapes seen in slivers: the CPU benchmark (experiments/shapes_default.flags).",
            image_size=128, num_train=2000, num_validation=200, num_test=200),
        SyntheticShapesConfig(
            name="demo", description="128x128, 2000/200/200, 1-6 large, distinct shapes "
            "at least half visible (still touching and occluding): `make demo`.",
            image_size=128, num_train=2000, num_validation=200, num_test=200,
            max_instances=6, geometry=BOLD_GEOMETRY),
        SyntheticShapesConfig(
            name="large", description="512x512, 1000/100/100: benchmarks and GPU runs.",
            image_size=512, num_train=1000, num_validation=100, num_test=100),
        SyntheticShapesConfig(
            name="tiny", description="64x64, 32/8/8: smoke tests.",
            image_size=64, num_train=32, num_validation=8, num_test=8),
        SyntheticShapesConfig(
            name="hard", description="128x128, 2000/200/200, camouflage down to the "
            "texture level and strong textures: a stress test.",
            image_size=128, num_train=2000, num_validation=200, num_test=200,
            style=HARD_STYLE),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=features_lib.features(),
            metadata=tfds.core.MetadataDict(class_names=list(CLASS_NAMES)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        config = self.builder_config
        # TFDS cannot write an empty split: a config may leave one out with 0.
        return {split: self._generate_examples(split, getattr(config, f"num_{split}"))
                for split in SPLITS if getattr(config, f"num_{split}") > 0}

    def _generate_examples(self, split: str, num_examples: int):
        for index in range(num_examples):
            yield index, features_lib.for_storage(
                generate_example(self.builder_config, split, index))
