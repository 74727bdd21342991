"""Pictures of what the model sees and predicts (NumPy + Pillow, host side).

Used by the TensorBoard summaries (`summaries.py`) and by `predict_main` overlays:
instance maps in distinct colours, embeddings projected to RGB by a fixed random
projection (the paper's Figure 3), seediness heatmaps (Figure 6) and prediction overlays
with class names and scores.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IGNORE_COLOR = (128, 128, 128)


def palette(num_colors: int, seed: int = 3) -> np.ndarray:
    """`[num_colors, 3]` uint8 saturated colours; entry 0 is black (background).

    Hues are spread by the golden ratio so neighbouring ids get distinct colours.
    """
    ids = np.arange(num_colors, dtype=np.float64)
    hue = (ids * 0.618033988749895 + seed * 0.1) % 1.0
    sat = 0.65 + 0.35 * ((ids * 0.37) % 1.0)
    val = 0.75 + 0.25 * ((ids * 0.53) % 1.0)
    colors = (_hsv_to_rgb(hue, sat, val) * 255).round().astype(np.uint8)
    colors[0] = 0
    return colors


def _hsv_to_rgb(h, s, v):
    i = np.floor(h * 6).astype(int) % 6
    f = h * 6 - np.floor(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    table = np.stack([
        np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
        np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1)], 0)
    return table[i, np.arange(len(h))]


def colorize_instances(instance_map: np.ndarray) -> np.ndarray:
    """`[..., H, W]` int ids (0 background, -1 ignore) -> `[..., H, W, 3]` uint8."""
    instance_map = np.asarray(instance_map)
    ids = np.maximum(instance_map, 0)
    colors = palette(int(ids.max(initial=0)) + 1)[ids]
    colors[instance_map < 0] = IGNORE_COLOR
    return colors


def project_embeddings(embeddings: np.ndarray, seed: int = 0) -> np.ndarray:
    """`[..., H, W, d]` embeddings -> `[..., H, W, 3]` uint8 by a fixed random projection.

    The projection depends only on `d` and `seed`, so pictures from different steps are
    comparable; each image is stretched to the full colour range independently.
    """
    embeddings = np.asarray(embeddings, np.float32)
    dim = embeddings.shape[-1]
    projection = np.random.default_rng(seed).normal(size=(dim, 3)).astype(np.float32)
    rgb = embeddings @ projection / np.sqrt(dim)
    axes = tuple(range(rgb.ndim - 3, rgb.ndim - 1))
    low = rgb.min(axis=axes, keepdims=True)
    high = rgb.max(axis=axes, keepdims=True)
    return ((rgb - low) / np.maximum(high - low, 1e-6) * 255).round().astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """`[..., H, W]` values in [0, 1] -> `[..., H, W, 3]` uint8 (black-red-yellow-white)."""
    v = np.clip(np.asarray(values, np.float32), 0.0, 1.0)
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)],
                   axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def overlay_predictions(image: np.ndarray, masks: np.ndarray, classes: Sequence[int],
                        scores: Sequence[float], class_names: Sequence[str],
                        alpha: float = 0.5) -> np.ndarray:
    """Draws masks in distinct colours with "class score" labels over an image.

    Args:
      image: `[H, W, 3]` uint8.
      masks: `[K, H, W]` bool, drawn from the last to the first so that the first
        (highest-scored) mask is on top.
      classes: `[K]` class ids (1..C); names are `class_names[c - 1]`.
      scores: `[K]` scores in [0, 1].
      class_names: foreground class names.
      alpha: mask opacity.

    Returns:
      `[H, W, 3]` uint8.
    """
    out = np.asarray(image, np.float32).copy()
    masks = np.asarray(masks, bool)
    colors = palette(len(masks) + 1)[1:].astype(np.float32)
    for k in range(len(masks) - 1, -1, -1):
        out[masks[k]] = (1 - alpha) * out[masks[k]] + alpha * colors[k]
    picture = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for k in range(len(masks)):
        rows, cols = np.nonzero(masks[k])
        if rows.size == 0:
            continue
        cls = int(classes[k])
        name = class_names[cls - 1] if 0 < cls <= len(class_names) else str(cls)
        text = f"{name} {float(scores[k]):.2f}"
        x, y = int(cols.min()), int(rows.min())
        box = draw.textbbox((x, y), text)
        draw.rectangle(box, fill=tuple(int(c) for c in colors[k]))
        draw.text((x, y), text, fill=(0, 0, 0))
    return np.asarray(picture)
