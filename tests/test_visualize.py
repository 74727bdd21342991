"""Tests of instance_embed.visualize: overlays, enlargement and the overview grid."""

import numpy as np
import pytest

from instance_embed import visualize

CLASS_NAMES = ("disk", "ring", "bar")


def noise_image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


@pytest.mark.parametrize("height, width, expected", [
    (128, 128, 2), (100, 300, 3), (300, 400, 1), (256, 1000, 1), (37, 45, 7), (1, 5, 204),
])
def test_legible_upscale_brings_the_short_side_to_256(height, width, expected):
    factor = visualize.legible_upscale(height, width)
    assert factor == expected
    assert min(height, width) * factor >= 256 or max(height, width) * (factor + 1) > 1024
    assert factor == 1 or min(height, width) * (factor - 1) < 256


@pytest.mark.parametrize("height, width, expected", [(1, 500, 2), (3, 2000, 1), (600, 2, 1)])
def test_legible_upscale_keeps_the_long_side_within_1024(height, width, expected):
    # An extreme strip (a 1 x 500 image) would otherwise become 256 x 128000 pixels.
    assert visualize.legible_upscale(height, width) == expected


def test_instance_masks_split_an_instance_map_and_skip_ignore():
    instance_map = np.array([[0, 1, 1], [-1, 3, 0], [2, 2, 3]])
    ids, masks = visualize.instance_masks(instance_map)
    np.testing.assert_array_equal(ids, [1, 2, 3])
    np.testing.assert_array_equal(masks[2], [[0, 0, 0], [0, 1, 0], [0, 0, 1]])
    assert not masks.any(axis=0)[1, 0]  # the ignore pixel is in no mask


@pytest.mark.parametrize("scores", [None, [0.9, 0.4]])
def test_overlay_blends_masks_and_labels_them_at_their_corner(scores):
    image = np.full((60, 60, 3), 200, np.uint8)
    masks = np.zeros((2, 60, 60), bool)
    masks[0, 25:55, 5:15] = True
    masks[1, 25:55, 40:55] = True
    out = visualize.overlay_instances(image, masks, [1, 3], CLASS_NAMES, scores)
    colors = visualize.palette(3)[1:].astype(np.float32)
    # Below the label (at the mask's top-left corner) the mask is the 50/50 blend.
    expected = np.round(0.5 * 200 + 0.5 * colors[0]).astype(np.uint8)
    np.testing.assert_array_equal(out[50, 6], expected)
    # Label boxes are filled with the mask's colour from its top-left corner.
    label = out[25:37, 40:55].reshape(-1, 3)
    assert (label == colors[1].astype(np.uint8)).all(axis=-1).mean() > 0.3
    # Away from masks and labels the image is untouched.
    np.testing.assert_array_equal(out[:20], image[:20])


def test_labels_include_scores_only_for_predictions():
    image = np.full((40, 120, 3), 255, np.uint8)
    masks = np.zeros((1, 40, 120), bool)
    masks[0, 10:30, 2:110] = True
    truth = visualize.overlay_instances(image, masks, [2], CLASS_NAMES)
    predicted = visualize.overlay_instances(image, masks, [2], CLASS_NAMES, [0.87])
    # "ring" and "ring 0.87" share their first characters; the score adds ink after.
    text_rows = slice(10, 20)
    assert (truth[text_rows, 2:20] == predicted[text_rows, 2:20]).all()
    assert (truth[text_rows, 30:80] != predicted[text_rows, 30:80]).any()


def test_enlarged_overlay_is_the_nearest_neighbour_enlargement_away_from_labels():
    image = noise_image(32, 48, seed=1)
    masks = np.zeros((1, 32, 48), bool)
    masks[0, 2:30, 30:46] = True
    small = visualize.overlay_instances(image, masks, [1], CLASS_NAMES, [0.5])
    large = visualize.overlay_instances(image, masks, [1], CLASS_NAMES, [0.5], upscale=3)
    assert large.shape == (96, 144, 3)
    enlarged = np.repeat(np.repeat(small, 3, axis=0), 3, axis=1)
    # The label, at the mask's top-left corner, is some 11 rows tall at any scale: rows
    # 6-17 of `large` and 6-39 of `enlarged`. Below it both show the blended mask.
    np.testing.assert_array_equal(large[:6], enlarged[:6])
    np.testing.assert_array_equal(large[40:], enlarged[40:])
    image_large = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)
    assert (large[40:90, 90:138] != image_large[40:90, 90:138]).any(axis=-1).all()


def test_overview_places_every_panel_once_in_a_grid_on_white():
    tiles = [[noise_image(20, 30, seed=i), noise_image(25, 10, seed=10 + i)]
             for i in range(3)]
    grid = visualize.overview(tiles, columns=2)
    gap = 4
    tile_h, tile_w = 25, 30 + gap + 10
    cell_h, cell_w = tile_h + 2 * gap, tile_w + 2 * gap
    assert grid.shape == (2 * cell_h, 2 * cell_w, 3)
    covered = np.zeros(grid.shape[:2], bool)
    for i, (left, right) in enumerate(tiles):
        y, x = (i // 2) * cell_h + gap, (i % 2) * cell_w + gap
        np.testing.assert_array_equal(grid[y:y + 20, x:x + 30], left)
        np.testing.assert_array_equal(grid[y:y + 25, x + 30 + gap:x + tile_w], right)
        covered[y:y + 20, x:x + 30] = True
        covered[y:y + 25, x + 30 + gap:x + tile_w] = True
    assert (grid[~covered] == 255).all()


def test_overview_without_tiles_is_an_error():
    with pytest.raises(ValueError, match="at least one tile"):
        visualize.overview([])


def test_captioned_adds_a_strip_with_ink_above_the_panel():
    panel = noise_image(30, 80)
    out = visualize.captioned(panel, "test_000001")
    assert out.shape == (30 + visualize.CAPTION_HEIGHT, 80, 3)
    np.testing.assert_array_equal(out[visualize.CAPTION_HEIGHT:], panel)
    strip = out[:visualize.CAPTION_HEIGHT]
    assert (strip < 128).any() and (strip == 255).mean() > 0.5
