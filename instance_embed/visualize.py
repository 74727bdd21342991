"""Pictures of what the model sees and predicts (NumPy + Pillow, host side).

Used by the TensorBoard summaries (`summaries.py`), `dataset_main` and `predict_main`:
instance maps in distinct colours, embeddings projected to RGB by a fixed random
projection (the paper's Figure 3), seediness heatmaps (Figure 6), overlays of instances
labelled with class names (and scores, for predictions) and the overview grid of
image, ground truth and prediction.
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


def legible_upscale(height: int, width: int, min_side: int = 256, max_side: int = 1024
                    ) -> int:
    """The integer factor that brings an image's short side to at least `min_side`,
    without taking its long side past `max_side` (a 1 x 500 strip stays a strip).

    Labels are drawn at a fixed font size, so small images (the 128-pixel synthetic
    scenes) are drawn enlarged for their labels to stay readable.
    """
    wanted = -(-min_side // max(1, min(height, width)))
    return max(1, min(wanted, max_side // max(1, height, width)))


def overlay_instances(image: np.ndarray, masks: np.ndarray, classes: Sequence[int],
                      class_names: Sequence[str], scores: Sequence[float] | None = None,
                      alpha: float = 0.5, upscale: int = 1) -> np.ndarray:
    """Draws masks in distinct colours, labelled "class score" (or "class"), over an image.

    Args:
      image: `[H, W, 3]` uint8.
      masks: `[K, H, W]` bool, drawn from the last to the first so that the first
        (highest-scored) mask is on top.
      classes: `[K]` class ids (1..C); names are `class_names[c - 1]`.
      class_names: foreground class names.
      scores: `[K]` scores in [0, 1], or None for ground truth (labels without scores).
      alpha: mask opacity.
      upscale: the picture is drawn `upscale` times larger (nearest neighbour), with
        labels at the usual font size.

    Returns:
      `[H * upscale, W * upscale, 3]` uint8.
    """
    masks = np.asarray(masks, bool).reshape((-1,) + np.shape(image)[:2])
    if upscale > 1:
        image = np.repeat(np.repeat(image, upscale, axis=0), upscale, axis=1)
        masks = np.repeat(np.repeat(masks, upscale, axis=1), upscale, axis=2)
    out = np.asarray(image, np.float32).copy()
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
        text = class_names[cls - 1] if 0 < cls <= len(class_names) else str(cls)
        if scores is not None:
            text += f" {float(scores[k]):.2f}"
        x, y = int(cols.min()), int(rows.min())
        box = draw.textbbox((x, y), text)
        draw.rectangle(box, fill=tuple(int(c) for c in colors[k]))
        draw.text((x, y), text, fill=(0, 0, 0))
    return np.asarray(picture)


def instance_masks(instance_map: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`[H, W]` ids (0 background, negative ignored) -> (ids `[K]`, masks `[K, H, W]` bool)."""
    ids = np.unique(instance_map)
    ids = ids[ids > 0]
    return ids, instance_map[None] == ids[:, None, None]


CAPTION_HEIGHT = 14
_GAP = 4


def captioned(panel: np.ndarray, caption: str) -> np.ndarray:
    """`[H, W, 3]` uint8 -> `[CAPTION_HEIGHT + H, W, 3]`: the caption on white above it."""
    strip = Image.new("RGB", (panel.shape[1], CAPTION_HEIGHT), (255, 255, 255))
    ImageDraw.Draw(strip).text((2, 1), caption, fill=(0, 0, 0))
    return np.concatenate([np.asarray(strip), panel], axis=0)


def overview(tiles: Sequence[Sequence[np.ndarray]], columns: int = 2) -> np.ndarray:
    """Lays out tiles (each a row of `[H, W, 3]` uint8 panels) in a grid on white.

    Args:
      tiles: one tile per image, each a sequence of panels put side by side (e.g. the
        image, its ground truth and the prediction); panels may differ in size.
      columns: tiles per row of the grid.

    Returns:
      `[height, width, 3]` uint8.
    """
    if not tiles:
        raise ValueError("overview needs at least one tile")
    joined = []
    for panels in tiles:
        height = max(p.shape[0] for p in panels)
        width = sum(p.shape[1] for p in panels) + _GAP * (len(panels) - 1)
        tile = np.full((height, width, 3), 255, np.uint8)
        x = 0
        for p in panels:
            tile[:p.shape[0], x:x + p.shape[1]] = p
            x += p.shape[1] + _GAP
        joined.append(tile)
    columns = max(1, min(columns, len(joined)))
    cell_h = max(t.shape[0] for t in joined) + 2 * _GAP
    cell_w = max(t.shape[1] for t in joined) + 2 * _GAP
    rows = -(-len(joined) // columns)
    grid = np.full((rows * cell_h, columns * cell_w, 3), 255, np.uint8)
    for i, tile in enumerate(joined):
        y, x = (i // columns) * cell_h + _GAP, (i % columns) * cell_w + _GAP
        grid[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    return grid
