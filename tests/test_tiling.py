"""Tiled prediction: the tile grid, merging by hand, and tiled against whole images."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from instance_embed import configs
from instance_embed import tiling
from instance_embed.inference import InferenceConfig
from instance_embed.model import ModelConfig
from instance_embed.segmenter import Segmenter

TAUS = (0.5, 0.75)


@pytest.mark.parametrize("length, tile, overlap, expected", [
    (1000, 256, 64, [0, 192, 384, 576, 744]),
    (512, 256, 64, [0, 192, 256]),
    (256, 256, 64, [0]),
    (100, 256, 64, [0]),
    (300, 256, 250, [0, 32, 44]),  # the step never falls below the alignment
])
def test_tile_origins_cover_with_overlap_on_the_grid(length, tile, overlap, expected):
    origins = tiling.tile_origins(length, tile, overlap)
    assert origins == expected
    assert all(o % tiling.ALIGNMENT == 0 for o in origins[:-1])
    assert origins[-1] + min(tile, length) == length
    # Neighbours share at least the overlap (at most tile - 32: the grid's step).
    assert all(b - a <= max(tile - overlap, tiling.ALIGNMENT)
               for a, b in zip(origins, origins[1:]))


@pytest.mark.parametrize("tile, overlap", [(100, 10), (0, 0), (256, 256), (256, -1)])
def test_tile_origins_refuse_bad_sizes(tile, overlap):
    with pytest.raises(ValueError, match="tile_size"):
        tiling.tile_origins(1000, tile, overlap)


def _tile(origin, shape, rects, classes, scores):
    masks = np.zeros((len(rects),) + shape, bool)
    boxes = np.zeros((len(rects), 4), np.float32)
    for k, (y0, x0, y1, x1) in enumerate(rects):
        masks[k, y0:y1, x0:x1] = True
        boxes[k] = (y0, x0, y1, x1)
    return tiling.TileDetections(origin, masks, boxes, np.array(classes, np.int32),
                                 np.array(scores, np.float32))


def test_merge_tiles_by_hand():
    # Two 10 x 12 tiles side by side, sharing columns 8-11 of the 10 x 20 image.
    left = _tile((0, 0), (10, 12), [(1, 5, 4, 12),    # crosses into the right tile
                                    (6, 9, 8, 11),    # inside the shared zone
                                    (0, 0, 3, 3),     # the left tile's alone
                                    (5, 8, 9, 12)],   # in the zone, another class
                 [1, 1, 2, 1], [0.9, 0.6, 0.8, 0.3])
    right = _tile((0, 8), (10, 12), [(1, 0, 4, 6),    # the first one's other part
                                     (6, 1, 8, 3),    # the duplicate
                                     (5, 0, 9, 4)],   # same pixels, class 2
                  [1, 1, 2], [0.7, 0.65, 0.5])
    masks, boxes, classes, scores = tiling.merge_tiles([left, right], (10, 20))
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.8, 0.65, 0.5, 0.3]))
    np.testing.assert_array_equal(classes, [1, 2, 1, 2, 1])
    expected = np.zeros((10, 20), bool)
    expected[1:4, 5:14] = True  # the union of both parts
    np.testing.assert_array_equal(masks[0], expected)
    np.testing.assert_array_equal(boxes[0], [1, 5, 4, 14])
    np.testing.assert_array_equal(boxes[2], [6, 9, 8, 11])  # the duplicate, once
    # A class disagreement keeps two instances.
    np.testing.assert_array_equal(boxes[3], [5, 8, 9, 12])
    np.testing.assert_array_equal(boxes[4], [5, 8, 9, 12])
    assert masks.shape == (5, 10, 20)


def colour_model() -> keras.Model:
    """A stand-in for a trained network on images of flat-coloured rectangles on black:
    at stride 4, a cell's embedding is its colour (scaled: colours 60 apart are far
    beyond every tau's radius) and it is foreground (class 1) unless black."""
    images = keras.Input((None, None, 3))

    def heads(x):
        cells = tf.nn.avg_pool2d(x, 4, 4, "VALID")
        foreground = tf.reduce_max(cells, axis=-1) > 0
        logits = tf.where(foreground[..., None], [0.0, 10.0], [10.0, 0.0])
        return 0.1 * cells, tf.tile(logits[:, :, :, None, :], [1, 1, 1, len(TAUS), 1])

    embeddings, class_logits = keras.layers.Lambda(heads)(images)
    return keras.Model(images, {"embeddings": embeddings, "class_logits": class_logits})


def rectangles_image():
    """512 x 512 with 11 rectangles (edges on the stride grid), several crossing the tile
    overlaps of 256-pixel tiles, one wider than a tile."""
    image = np.zeros((512, 512, 3), np.uint8)
    rng = np.random.default_rng(3)
    rects = [(8, 8, 60, 120), (180, 148, 240, 300), (100, 180, 160, 220), (20, 400, 88, 500),
             (300, 20, 380, 480), (400, 200, 468, 260), (200, 332, 280, 420),
             (440, 40, 500, 120), (120, 300, 176, 360), (420, 300, 500, 360),
             (260, 240, 292, 280)]
    colours = set()
    for y0, x0, y1, x1 in rects:
        while True:
            colour = tuple(int(c) for c in rng.integers(1, 5, 3) * 60)
            if colour not in colours:
                colours.add(colour)
                break
        image[y0:y1, x0:x1] = colour
    return image, len(rects)


def iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


def test_tiled_prediction_matches_the_whole_image():
    config = configs.ExperimentConfig(
        model=ModelConfig(backbone="light", taus=TAUS, num_classes=1),
        inference=InferenceConfig(num_seeds=30, nms_iou_threshold=0.5))
    model = colour_model()
    whole = Segmenter.from_model(model, config, class_names=["thing"])
    tiled = Segmenter.from_model(model, config, class_names=["thing"], tile_size=256,
                                 tile_overlap=64)
    image, count = rectangles_image()
    expected = whole(image).above(0.5)
    assert len(expected) == count  # the stand-in finds every rectangle whole
    found = tiled(image)
    assert len(found.above(0.5)) == count  # no piece left unmerged, no duplicate
    for mask in expected.masks:
        assert max(iou(mask, other) for other in found.masks) >= 0.9
    for mask, box in zip(found.masks, found.boxes):
        ys, xs = np.nonzero(mask)
        np.testing.assert_array_equal(box, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1])
    # An image no larger than a tile takes the whole-image path.
    small = image[:256, :256]
    np.testing.assert_array_equal(tiled(small).masks, whole(small).masks)
