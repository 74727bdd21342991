"""How `synthetic_shapes` scenes look: textures, colours and noise (`paint_scene`).

The scene's geometry (which pixels each shape covers, in painting order) comes from
`synthetic_shapes.sample_scene`; this module only decides the colours, drawing from the
example's own generator after the geometry, so an example stays a function of its seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:  # only a type: synthetic_shapes imports this module
    from instance_embed.data.synthetic_shapes import Shape

_RANDOM_COLOUR, _COPIED_COLOUR, _CAMOUFLAGE = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class Style:
    """How hard the appearance is: textures, noise and colour confusions.

    Ranges are (low, high) of uniform draws, per image or per instance.

    Attributes:
        colour_probs: probabilities that an instance's colour is uniformly random,
            copied from an earlier instance (plus a little noise), or camouflaged:
            close to the background under it.
        camouflage_contrast: RGB distance of a camouflaged colour from the mean
            background under the instance.
        background_texture: amplitude of the background's plane-wave texture.
        instance_texture: largest amplitude of an instance's luminance texture.
        instance_tint: largest amplitude of an instance's chromatic texture.
        noise: standard deviation of the per-pixel sensor noise.
    """

    colour_probs: tuple[float, float, float] = (0.6, 0.25, 0.15)
    camouflage_contrast: tuple[float, float] = (15.0, 35.0)
    background_texture: tuple[float, float] = (8.0, 35.0)
    instance_texture: float = 30.0
    instance_tint: float = 12.0
    noise: tuple[float, float] = (3.0, 12.0)


# Hard enough that colour never settles class or instance, easy enough for a CPU to
# learn in minutes: camouflaged instances stay visible, textures are milder.
DEFAULT_STYLE = Style(colour_probs=(0.7, 0.2, 0.1), camouflage_contrast=(40.0, 70.0),
                      background_texture=(4.0, 15.0), instance_texture=15.0,
                      instance_tint=8.0, noise=(2.0, 8.0))
# Camouflage down to the texture's level, strong textures: a stress test.
HARD_STYLE = Style()


@dataclasses.dataclass
class Waves:
    """A random sum of plane waves, one texture; `sample` draws one.

    value(y, x)[c] = sum_k weights[k, c] * sin(fy[k] * y + fx[k] * x + phase[k]).
    """

    fy: np.ndarray  # [K] radians per pixel along rows.
    fx: np.ndarray  # [K] radians per pixel along columns.
    phase: np.ndarray  # [K]
    weights: np.ndarray  # [K, channels]

    @classmethod
    def sample(cls, rng: np.random.Generator, size: int, num_waves: int,
               cycles: tuple[float, float], channels: int) -> "Waves":
        """Waves of `cycles` (log-uniform) periods per image, unit variance on average."""
        freq = np.exp(rng.uniform(*np.log(cycles), num_waves)) * 2 * math.pi / size
        angle = rng.uniform(0, 2 * math.pi, num_waves)
        phase = rng.uniform(0, 2 * math.pi, num_waves)
        weights = rng.normal(size=(num_waves, channels)) * math.sqrt(2.0 / num_waves)
        return cls(freq * np.sin(angle), freq * np.cos(angle), phase, weights)

    def at(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """float [P, channels] values at pixels (ys [P], xs [P])."""
        return np.sin(np.outer(ys, self.fy) + np.outer(xs, self.fx) + self.phase
                      ) @ self.weights

    def on_grid(self, size: int) -> np.ndarray:
        """float [size, size, channels] values on the whole image.

        Separable, since sin(a + b) = sin(a) cos(b) + cos(a) sin(b): two matrix
        products instead of a sine per pixel and wave.
        """
        t = np.arange(size, dtype=np.float64)
        row = np.outer(t, self.fy)  # [size, K]
        col = np.outer(t, self.fx) + self.phase  # [size, K]
        col_cos = np.cos(col)[:, :, None] * self.weights  # [size, K, channels]
        col_sin = np.sin(col)[:, :, None] * self.weights
        channels = self.weights.shape[1]
        out = (np.sin(row) @ col_cos.transpose(1, 0, 2).reshape(len(self.fy), -1)
               + np.cos(row) @ col_sin.transpose(1, 0, 2).reshape(len(self.fy), -1))
        return out.reshape(size, size, channels)


def paint_scene(rng: np.random.Generator, shapes: Sequence[Shape], size: int,
                style: Style = DEFAULT_STYLE) -> np.ndarray:
    """Paints a scene on a textured background and adds sensor noise.

    Args:
        rng: the example's generator.
        shapes: shapes in painting order, as from `sample_scene`.
        size: image height and width.
        style: textures, noise and colour confusions.

    Returns:
        image: uint8 [size, size, 3].
    """
    base = rng.uniform(30, 225, 3)
    texture = Waves.sample(rng, size, 8, (0.5, 12.0), 3).on_grid(size)
    background = base + texture * rng.uniform(*style.background_texture)
    canvas = background.copy()
    colours: list[np.ndarray] = []
    for shape in shapes:
        kind = int(rng.choice(3, p=style.colour_probs))
        if kind == _COPIED_COLOUR and colours:
            colour = colours[int(rng.integers(len(colours)))] + rng.normal(0, 8, 3)
        elif kind == _CAMOUFLAGE:
            # Close to the background underneath, yet no closer than the noise level.
            offset = rng.normal(size=3)
            offset *= rng.uniform(*style.camouflage_contrast) / np.linalg.norm(offset)
            colour = background[shape.ys, shape.xs].mean(axis=0) + offset
        else:
            colour = rng.uniform(0, 255, 3)
        colours.append(colour)
        # A luminance texture plus a weaker chromatic one, class-independent.
        pattern = Waves.sample(rng, size, 4, (1.0, 20.0), 1).at(shape.ys, shape.xs)
        tint = Waves.sample(rng, size, 3, (0.5, 6.0), 3).at(shape.ys, shape.xs)
        canvas[shape.ys, shape.xs] = (colour + pattern * rng.uniform(0, style.instance_texture)
                                      + tint * rng.uniform(0, style.instance_tint))
    noisy = canvas + rng.uniform(*style.noise) * rng.standard_normal(canvas.shape,
                                                                      dtype=np.float32)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)
