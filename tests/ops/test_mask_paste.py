"""Tests for ops/mask_paste.py: hand-computed cases, a naive reference, edge cases."""


import numpy as np
import pytest

from projects.maskrcnn.ops import mask_paste

# The hand-computed cases use 4x4 masks. With padding 1 the mask becomes 6x6
# and every box is expanded by 6 / 4 = 1.5 about its centre. A column profile
# of the padded all-ones mask is p = [0, 1, 1, 1, 1, 0].
#
# Box (10, 20, 16, 24):
#   x: centre 13, half width 3 * 1.5 = 4.5 -> [8.5, 17.5] -> int [8, 17],
#      10 columns (x1 - x0 + 1). Resize 6 -> 10 samples source
#      (i + 0.5) * 0.6 - 0.5 = -0.2 (clamped to 0), 0.4, 1.0, ..., 4.0, 4.6, 5.2:
#      values [0, 0.4, 1, 1, 1, 1, 1, 1, 0.4, 0] -> columns 8+2 .. 8+7 = 10..15.
#   y: centre 22, half height 2 * 1.5 = 3 -> [19, 25], 7 rows. Resize 6 -> 7
#      samples (i + 0.5) * 6/7 - 0.5 = -0.07 (-> 0), 0.79, ..., 4.21, 5.07:
#      values [0, .786, 1, 1, 1, .786, 0] -> rows 19+1 .. 19+5 = 20..24
#      (5 rows for a box 4 high: the legacy "+1" of torchvision's paste).
#   Every product of kept values is >= 0.786, so the pasted mask is exactly the
#   rectangle rows 20..24, columns 10..15.
BOX = (10.0, 20.0, 16.0, 24.0)


def _rectangle(height, width, rows, cols):
    out = np.zeros((height, width), bool)
    out[rows[0]:rows[1] + 1, cols[0]:cols[1] + 1] = True
    return out


def test_all_ones_mask_pastes_expected_rectangle():
    pasted = mask_paste.paste_masks(np.ones((1, 4, 4)), np.array([BOX]), 40, 30)
    assert pasted.shape == (1, 40, 30)
    assert pasted.dtype == bool
    np.testing.assert_array_equal(pasted[0], _rectangle(40, 30, (20, 24), (10, 15)))


def test_left_half_mask_pastes_left_part():
    # Padded row [0, 1, 1, 0, 0, 0]; sources 1.0, 1.6, 2.2, 2.8 give
    # 1, 1, 0.8, 0.2 -> columns 10, 11, 12 (times the row values >= .786).
    masks = np.zeros((1, 4, 4))
    masks[0, :, :2] = 1.0
    pasted = mask_paste.paste_masks(masks, np.array([BOX]), 40, 30)
    np.testing.assert_array_equal(pasted[0], _rectangle(40, 30, (20, 24), (10, 12)))


def test_threshold_is_inclusive_and_padding_zero_keeps_box():
    # padding=0: no expansion; box (10, 20, 16, 24) -> columns 10..16 and rows
    # 20..24 (inclusive bounds), every resized value exactly 0.5.
    masks = np.full((1, 4, 4), 0.5)
    boxes = np.array([BOX])
    at = mask_paste.paste_masks(masks, boxes, 40, 30, threshold=0.5, padding=0)
    above = mask_paste.paste_masks(masks, boxes, 40, 30, threshold=0.6, padding=0)
    np.testing.assert_array_equal(at[0], _rectangle(40, 30, (20, 24), (10, 16)))
    assert not above.any()


def test_clipping_at_top_left_truncates_towards_zero():
    # x: centre 0, half 3 * 1.5 = 4.5 -> [-4.5, 4.5] -> int [-4, 4] (truncation;
    #    floor would give -5), 9 columns, values [0, .5, 1, 1, 1, 1, 1, .5, 0]:
    #    columns -3..3, clipped to 0..3.
    # y: centre 22.75, half 1.75 * 1.5 = 2.625 -> [20.125, 25.375] -> [20, 25],
    #    6 rows, values [0, 1, 1, 1, 1, 0]: rows 21..24.
    box = np.array([[-3.0, 21.0, 3.0, 24.5]])
    pasted = mask_paste.paste_masks(np.ones((1, 4, 4)), box, 30, 30)
    np.testing.assert_array_equal(pasted[0], _rectangle(30, 30, (21, 24), (0, 3)))


def test_clipping_at_bottom_right():
    pasted = mask_paste.paste_masks(np.ones((1, 4, 4)), np.array([BOX]), 22, 12)
    np.testing.assert_array_equal(pasted[0], _rectangle(22, 12, (20, 21), (10, 11)))


def test_no_masks():
    pasted = mask_paste.paste_masks(np.zeros((0, 28, 28)), np.zeros((0, 4)), 5, 7)
    assert pasted.shape == (0, 5, 7)


def test_degenerate_and_outside_boxes():
    boxes = np.array([
        [10.0, 20.0, 8.0, 24.0],  # x1 < x0: expanded to [10, 7], nothing visible.
        [10.0, 20.0, 10.0, 24.0],  # zero width: one column, x = 10.
        [50.0, 50.0, 60.0, 60.0],  # off the image.
        [-20.0, -20.0, -10.0, -10.0],  # off the image on the negative side.
        [np.nan, 0.0, 5.0, 5.0],
        [0.0, 0.0, np.inf, 5.0],
    ])
    pasted = mask_paste.paste_masks(np.ones((6, 4, 4)), boxes, 30, 30)
    assert pasted.shape == (6, 30, 30)
    assert not pasted[[0, 2, 3, 4, 5]].any()
    # Zero width: the single column samples the middle of the padded mask.
    np.testing.assert_array_equal(pasted[1], _rectangle(30, 30, (20, 24), (10, 10)))


def _reference_paste(mask, box, height, width, threshold, padding):
    """Pixel-by-pixel transcription of torchvision's paste + F.interpolate."""
    mask = np.pad(mask.astype(np.float64), padding)
    size = mask.shape[0]
    scale = np.float32((size) / (size - 2 * padding))
    box = box.astype(np.float32)
    half = (box[2:] - box[:2]) * np.float32(0.5) * scale
    centre = (box[2:] + box[:2]) * np.float32(0.5)
    x0, y0 = (centre - half).astype(np.int64)
    x1, y1 = (centre + half).astype(np.int64)
    w, h = max(x1 - x0 + 1, 1), max(y1 - y0 + 1, 1)

    def source(i, out_size):
        s = max((i + 0.5) * size / out_size - 0.5, 0.0)
        lo = int(s)
        hi = lo + 1 if lo < size - 1 else lo
        return lo, hi, s - lo

    out = np.zeros((height, width), bool)
    for y in range(max(y0, 0), min(y1 + 1, height)):
        ylo, yhi, fy = source(y - y0, h)
        for x in range(max(x0, 0), min(x1 + 1, width)):
            xlo, xhi, fx = source(x - x0, w)
            value = ((1 - fy) * ((1 - fx) * mask[ylo, xlo] + fx * mask[ylo, xhi]) +
                     fy * ((1 - fx) * mask[yhi, xlo] + fx * mask[yhi, xhi]))
            out[y, x] = value >= threshold
    return out


@pytest.mark.parametrize('padding', [0, 1, 2])
def test_matches_naive_reference(padding):
    rng = np.random.default_rng(padding)
    masks = rng.random((12, 7, 7))
    xy = rng.uniform(-10.0, 35.0, (12, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 25.0, (12, 2))], axis=1)
    pasted = mask_paste.paste_masks(masks, boxes, 31, 37, threshold=0.4,
                                    padding=padding)
    for i in range(12):
        expected = _reference_paste(masks[i], boxes[i], 31, 37, 0.4, padding)
        np.testing.assert_array_equal(pasted[i], expected, err_msg=f'mask {i}')
    assert pasted.any()


def test_hundred_masks_on_large_image_stay_near_their_boxes():
    rng = np.random.default_rng(0)
    masks = rng.random((100, 28, 28)).astype(np.float32)
    xy = rng.uniform(0.0, 1000.0, (100, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10.0, 600.0, (100, 2))], axis=1)
    pasted = mask_paste.paste_masks(masks, boxes, 1333, 1333)
    assert pasted.shape == (100, 1333, 1333)
    for mask, (x0, y0, x1, y1) in zip(pasted, boxes):
        ys, xs = np.nonzero(mask)
        assert ys.size
        # The paste expands the box by one 28x28 cell on each side, no more.
        cell_w, cell_h = (x1 - x0) / 28 * 30 / 28, (y1 - y0) / 28 * 30 / 28
        assert xs.min() >= x0 - cell_w - 1 and xs.max() <= x1 + cell_w + 1
        assert ys.min() >= y0 - cell_h - 1 and ys.max() <= y1 + cell_h + 1
