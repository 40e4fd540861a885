"""Tests for the conventions where torchvision and Detectron2 differ: rounded
anchors, the small-box rules, the FPN level epsilon and adaptive RoIAlign sampling."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import anchors as anchor_ops
from projects.maskrcnn.ops import boxes as box_ops
from projects.maskrcnn.ops import roi_align

STRIDES = (4, 8, 16, 32)


def test_rounded_cell_anchors_are_torchvisions():
    # torchvision's AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),)).cell_anchors[0]
    np.testing.assert_array_equal(
        anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0), round_to_int=True),
        [[-23, -11, 23, 11], [-16, -16, 16, 16], [-11, -23, 11, 23]])
    exact = anchor_ops.cell_anchors((32,), (0.5, 1.0, 2.0))
    assert exact[0, 0] == pytest.approx(-16 * math.sqrt(2), rel=1e-6)
    grid = anchor_ops.pyramid_anchors([(2, 3)], [8], [(64,)], (0.5,), round_to_int=True)[0]
    np.testing.assert_array_equal(grid[4], [8 - 45, 8 - 23, 8 + 45, 8 + 23])  # cell (1, 1)


def test_min_size_rules():
    boxes = jnp.array([[0, 0, 1, 5], [0, 0, 1.5, 5], [2, 2, 2, 9], [0, 0, 0.5, 0.5]])
    np.testing.assert_array_equal(box_ops.has_min_size(boxes, 1.0), [False, True, False, False])
    np.testing.assert_array_equal(box_ops.has_min_size(boxes, 1.0, inclusive=True),
                                  [True, True, False, False])
    # With no minimum, both keep exactly the non-empty boxes.
    for inclusive in (False, True):
        np.testing.assert_array_equal(box_ops.has_min_size(boxes, 0.0, inclusive),
                                      [True, True, False, True])


def test_level_rules_differ_just_below_the_canonical_sizes():
    # sqrt(area) a few 1e-7 below 224, 112 and 448 (levels checked against
    # torchvision's LevelMapper: 4, 3, 5), then exactly on 112, 224, 448.
    boxes = jnp.array([[10, 20, 234, 243.9998], [300, 200, 412, 311.9999],
                       [0, 0, 448, 447.9996], [0, 0, 112, 112], [0, 0, 224, 224],
                       [0, 0, 448, 448], [0, 0, 0, 0]], jnp.float32)
    np.testing.assert_array_equal(roi_align.assign_levels(boxes, 2, 5, rule='torchvision'),
                                  [4, 3, 5, 3, 4, 5, 2])
    np.testing.assert_array_equal(roi_align.assign_levels(boxes, 2, 5, rule='detectron2'),
                                  [3, 2, 4, 3, 4, 5, 2])
    with pytest.raises(ValueError, match='unknown level rule'):
        roi_align.assign_levels(boxes, 2, 5, rule='mmdet')


# ----------------------------------------------------------------------------
# Adaptive sampling (Detectron2's sampling_ratio=0)
# ----------------------------------------------------------------------------

def _bilinear(feat, y, x):
    h, w = feat.shape[:2]
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return np.zeros(feat.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(y), h - 1), min(int(x), w - 1)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    if y0 == h - 1:
        y = float(y0)
    if x0 == w - 1:
        x = float(x0)
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feat[y0, x0] + (1 - ly) * lx * feat[y0, x1]
            + ly * (1 - lx) * feat[y1, x0] + ly * lx * feat[y1, x1])


def detectron2_roi_align(feat, box, scale, size, max_grid=None):
    """ROIAlignV2 with sampling_ratio=0: ceil(roi_side / size) samples per bin
    and axis (at most max_grid), averaged; float64 loops over one box."""
    x1, y1, x2, y2 = (float(v) * scale - 0.5 for v in box)
    bw, bh = (x2 - x1) / size, (y2 - y1) / size
    gy, gx = math.ceil((y2 - y1) / size), math.ceil((x2 - x1) / size)
    if max_grid:
        gy, gx = min(gy, max_grid), min(gx, max_grid)
    out = np.zeros((size, size, feat.shape[-1]))
    for ph in range(size):
        for pw in range(size):
            acc = sum(_bilinear(feat, y1 + ph * bh + (iy + 0.5) * bh / gy,
                                x1 + pw * bw + (ix + 0.5) * bw / gx)
                      for iy in range(gy) for ix in range(gx))
            out[ph, pw] = acc / max(gy * gx, 1)
    return out


@functools.partial(jax.jit, static_argnames=('size', 'cap', 'impl'))
def _adaptive(features, boxes, size, cap, impl):
    return roi_align.multilevel_roi_align(features, STRIDES, boxes, size, 0, True, 2,
                                          adaptive_cap=cap, impl=impl)


def _level(box):
    s = math.sqrt(max(box[2] - box[0], 0) * max(box[3] - box[1], 0))
    return min(max(math.floor(4 + math.log2(s / 224 + 1e-8)), 2), 5)


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_adaptive_sampling_matches_detectron2_within_the_cap(impl):
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(256 // s, 320 // s, 2)).astype(np.float32) for s in STRIDES]
    # Per-axis sample counts from 1 to 4 (a wide box, a tall one, tiny and
    # empty ones, and one hanging over the edge).
    boxes = np.array([[10, 12, 60, 30], [40, 16, 52, 120], [100, 50, 101, 51.5],
                      [30, 30, 30, 40], [250, 180, 330, 270], [8, 8, 230, 200],
                      [0, 0, 320, 256]], np.float32)
    out = np.asarray(_adaptive([jnp.asarray(f) for f in feats], jnp.asarray(boxes), 5, 8, impl))
    for i, box in enumerate(boxes):
        lvl = _level(box)
        ref = detectron2_roi_align(feats[lvl - 2], box, 1.0 / 2 ** lvl, 5)
        np.testing.assert_allclose(out[i], ref, atol=1e-5, err_msg=f'box {i}')
    grids = [math.ceil((b[3] - b[1]) / 2 ** _level(b) / 5) for b in boxes]
    assert max(grids) >= 3 and 1 in grids  # the cases cover several counts


@pytest.mark.parametrize('impl', ['gather', 'matmul'])
def test_adaptive_sampling_caps_the_sample_count(impl):
    rng = np.random.default_rng(1)
    feats = [rng.normal(size=(256 // s, 320 // s, 1)).astype(np.float32) for s in STRIDES]
    box = np.array([0, 0, 320, 40], np.float32)  # 40 px wide on P3: 8 samples per bin, capped at 3
    lvl = _level(box)
    out = np.asarray(_adaptive([jnp.asarray(f) for f in feats], jnp.asarray(box[None]), 5, 3, impl))
    capped = detectron2_roi_align(feats[lvl - 2], box, 1.0 / 2 ** lvl, 5, max_grid=3)
    exact = detectron2_roi_align(feats[lvl - 2], box, 1.0 / 2 ** lvl, 5)
    np.testing.assert_allclose(out[0], capped, atol=1e-5)
    assert np.abs(capped - exact).max() > 1e-3


def test_adaptive_sampling_needs_a_cap():
    feats = [jnp.zeros((8, 8, 1))] * 4
    with pytest.raises(ValueError, match='adaptive_cap'):
        roi_align.multilevel_roi_align(feats, STRIDES, jnp.zeros((1, 4)), 7, 0, True, 2)
