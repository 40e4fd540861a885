"""Tests for ops/anchors.py: cell anchors, grid layout, pyramid checks."""

import numpy as np
import pytest

from projects.maskrcnn.ops import anchors as anchor_ops


def test_cell_anchors_areas_and_aspect_ratios():
    sizes, ratios = (32, 64), (0.5, 1.0, 2.0)
    cell = anchor_ops.cell_anchors(sizes, ratios)
    assert cell.shape == (6, 4)
    w = cell[:, 2] - cell[:, 0]
    h = cell[:, 3] - cell[:, 1]
    # Size-major, then aspect ratio.
    np.testing.assert_allclose(w * h, [32 ** 2] * 3 + [64 ** 2] * 3, rtol=1e-5)
    np.testing.assert_allclose(h / w, list(ratios) * 2, rtol=1e-5)
    # Centred on the origin.
    np.testing.assert_allclose(cell[:, 0] + cell[:, 2], 0, atol=1e-5)
    np.testing.assert_allclose(cell[:, 1] + cell[:, 3], 0, atol=1e-5)


def test_cell_anchor_hand_case():
    # Size 8, ratio 4 (h / w): w = sqrt(64 / 4) = 4, h = 16.
    np.testing.assert_allclose(anchor_ops.cell_anchors((8,), (4.0,)), [[-2, -8, 2, 8]])


@pytest.mark.parametrize('offset', [0.0, 0.5])
def test_grid_anchors_order_count_and_shifts(offset):
    h, w, stride = 2, 3, 8
    sizes, ratios = (16,), (0.5, 1.0)
    cell = anchor_ops.cell_anchors(sizes, ratios)
    num_a = len(cell)
    grid = anchor_ops.grid_anchors((h, w), stride, sizes, ratios, offset)
    assert grid.shape == (h * w * num_a, 4)
    # Position-major (row-major over y, then x), then the anchors of one cell.
    for y in range(h):
        for x in range(w):
            cx, cy = (x + offset) * stride, (y + offset) * stride
            for a in range(num_a):
                np.testing.assert_allclose(grid[(y * w + x) * num_a + a],
                                           cell[a] + [cx, cy, cx, cy], rtol=1e-6)


def test_grid_anchors_first_and_last_centres():
    grid = anchor_ops.grid_anchors((4, 5), 16, (32,), (1.0,), offset=0.0)
    np.testing.assert_allclose(grid[0], [-16, -16, 16, 16])
    # Last cell: x = 4, y = 3 -> centre (64, 48).
    np.testing.assert_allclose(grid[-1], [48, 32, 80, 64])
    # Second anchor steps along x, the (w+1)-th along y.
    np.testing.assert_allclose(grid[1], [0, -16, 32, 16])
    np.testing.assert_allclose(grid[5], [-16, 0, 16, 32])


def test_pyramid_anchors_counts_per_level():
    hws = [(8, 8), (4, 4), (2, 2)]
    out = anchor_ops.pyramid_anchors(hws, (4, 8, 16), ((32,), (64,), (128,)),
                                     (0.5, 1.0, 2.0))
    assert [a.shape for a in out] == [(192, 4), (48, 4), (12, 4)]
    # Each level uses its own size and stride.
    areas = [(a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) for a in out]
    for area, size in zip(areas, (32, 64, 128)):
        np.testing.assert_allclose(area, size ** 2, rtol=1e-5)
    np.testing.assert_allclose((out[2][-1, 0] + out[2][-1, 2]) / 2, 16.0)


def test_pyramid_anchors_level_count_mismatch_raises():
    with pytest.raises(ValueError, match='sizes are given for 2 levels.*3 levels'):
        anchor_ops.pyramid_anchors([(8, 8), (4, 4), (2, 2)], (4, 8, 16),
                                   ((32,), (64,)), (1.0,))
    with pytest.raises(ValueError):
        anchor_ops.pyramid_anchors([(8, 8), (4, 4)], (4, 8, 16),
                                   ((32,), (64,)), (1.0,))
