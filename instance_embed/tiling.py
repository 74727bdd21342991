"""Large images predicted in overlapping tiles, instances merged across the overlaps.

Every tile runs through the same network and post-processing as a whole image. Two
tiles see their overlap zone alike, so one instance has nearly the same mask there in
both: detections of neighbouring tiles whose masks within the zone have IoU >= 0.5 (and
the same class) are one instance, whether it lies in the zone (a duplicate), crosses
it (cut by one tile's edge, whole in the other) or is larger than both (cut in each).
A merged instance's mask is the union of its parts, its class and score those of its
highest-scored part, so scores stay on the scale of untiled predictions.

Tile origins are multiples of `ALIGNMENT` (and the last tile ends at the image's edge),
so that every tile's stride cells fall on the same pixel grid as the whole image's.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# The network pads images to multiples of 32 (inference.PAD_MULTIPLE); origins on that
# grid keep every tile's cells on the whole image's grid.
ALIGNMENT = 32
MERGE_IOU = 0.5


def tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels covering `length`, neighbours sharing at
    least `overlap` pixels (at most `tile - ALIGNMENT`: origins stay on the grid); the
    last tile ends at `length`.

    Raises:
      ValueError: `tile` is not a positive multiple of `ALIGNMENT` larger than `overlap`.
    """
    if tile < ALIGNMENT or tile % ALIGNMENT or not 0 <= overlap < tile:
        raise ValueError(f"tile_size={tile}, tile_overlap={overlap}: the tile size must be "
                         f"a positive multiple of {ALIGNMENT} larger than the overlap")
    if length <= tile:
        return [0]
    step = max(ALIGNMENT, (tile - overlap) // ALIGNMENT * ALIGNMENT)
    origins = list(range(0, length - tile, step))
    return origins + [length - tile]


@dataclasses.dataclass(frozen=True)
class TileDetections:
    """One tile's detections: its origin `(y, x)` in the image, masks bool
    `[n, h, w]`, boxes `[n, 4]` (pixels, the tile's frame), classes `[n]`, scores `[n]`."""

    origin: tuple[int, int]
    masks: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


def merge_tiles(tiles: Sequence[TileDetections], image_size: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The image's instances from its tiles' detections (see the module docstring).

    Returns:
      (masks bool `[N, H, W]`, boxes float32 `[N, 4]` in pixels, classes int32 `[N]`,
      scores float32 `[N]`), sorted by descending score.
    """
    parent = {}  # union-find over (tile, detection)

    def find(node):
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for i, a in enumerate(tiles):
        for j in range(i + 1, len(tiles)):
            _link_overlapping(i, a, j, tiles[j], lambda p, q: parent.__setitem__(
                find(p), find(q)))
    groups: dict = {}
    for i, tile in enumerate(tiles):
        for k in range(len(tile.scores)):
            groups.setdefault(find((i, k)), []).append((i, k))

    height, width = image_size
    merged = []
    for members in groups.values():
        best_tile, best = max(members, key=lambda m: (tiles[m[0]].scores[m[1]], -m[0], -m[1]))
        mask = np.zeros((height, width), bool)
        box = [height, width, 0, 0]
        for i, k in members:
            (y, x), part = tiles[i].origin, tiles[i].masks[k]
            mask[y:y + part.shape[0], x:x + part.shape[1]] |= part
            ymin, xmin, ymax, xmax = tiles[i].boxes[k]
            if ymax > ymin:  # an empty part has a zero box
                box = [min(box[0], y + ymin), min(box[1], x + xmin),
                       max(box[2], y + ymax), max(box[3], x + xmax)]
        if box[2] <= box[0]:
            box = [0, 0, 0, 0]
        merged.append((float(tiles[best_tile].scores[best]),
                       int(tiles[best_tile].classes[best]), mask, box))
    merged.sort(key=lambda m: -m[0])
    count = len(merged)
    masks = np.stack([m[2] for m in merged]) if count else np.zeros((0, height, width), bool)
    return (masks, np.array([m[3] for m in merged], np.float32).reshape(count, 4),
            np.array([m[1] for m in merged], np.int32),
            np.array([m[0] for m in merged], np.float32))


def _link_overlapping(i: int, a: TileDetections, j: int, b: TileDetections, link) -> None:
    """Calls `link((i, k), (j, l))` for each pair of detections that are one instance."""
    top, left = max(a.origin[0], b.origin[0]), max(a.origin[1], b.origin[1])
    bottom = min(a.origin[0] + a.masks.shape[1], b.origin[0] + b.masks.shape[1])
    right = min(a.origin[1] + a.masks.shape[2], b.origin[1] + b.masks.shape[2])
    if bottom <= top or right <= left or not len(a.scores) or not len(b.scores):
        return

    def zone(tile):  # float32 [n, zone pixels]: the masks within the shared zone
        y, x = top - tile.origin[0], left - tile.origin[1]
        part = tile.masks[:, y:y + bottom - top, x:x + right - left]
        return part.reshape(len(part), -1).astype(np.float32)

    za, zb = zone(a), zone(b)
    intersection = za @ zb.T  # exact: pixel counts below 2^24
    union = za.sum(1)[:, None] + zb.sum(1)[None, :] - intersection
    iou = np.where(union > 0, intersection / np.maximum(union, 1), 0)
    same = a.classes[:, None] == b.classes[None, :]
    for k, l in zip(*np.nonzero((iou >= MERGE_IOU) & same)):
        link((i, int(k)), (j, int(l)))
