"""Tests for ops/targets.py: RPN, box-head and mask-head training targets."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.ops import anchors as anchor_ops
from projects.maskrcnn.ops import boxes as box_ops
from projects.maskrcnn.ops import targets as target_ops

mask_targets = jax.jit(target_ops.mask_targets, static_argnums=4)
select_foreground = jax.jit(target_ops.select_foreground, static_argnums=1)

# ----------------------------------------------------------------------------
# rpn_targets
# ----------------------------------------------------------------------------

ANCHORS = anchor_ops.grid_anchors((8, 8), 8, (16, 32), (0.5, 1.0, 2.0), offset=0.5)  # 384
GT_BOXES = np.array([[8, 8, 40, 40], [30, 20, 62, 36], [0, 0, 0, 0]], np.float32)
GT_VALID = np.array([True, True, False])


@functools.partial(jax.jit, static_argnames=('weights',))
def _rpn(key, gt_boxes, gt_valid, weights=(1.0, 1.0, 1.0, 1.0)):
    return target_ops.rpn_targets(key, jnp.asarray(ANCHORS), gt_boxes, gt_valid,
                                  iou_thresholds=(0.3, 0.7), batch_size_per_image=64,
                                  positive_fraction=0.5, box_weights=weights)


def _reference_rpn_labels(gt_boxes, gt_valid):
    """POSITIVE: IoU >= 0.7 or a best anchor of a valid gt; NEGATIVE: IoU < 0.3."""
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt_boxes), jnp.asarray(ANCHORS)))
    iou = iou[gt_valid]
    best = iou.max(0)
    positive = best >= 0.7
    for row in iou:
        if row.max() > 0:
            positive |= row == row.max()
    negative = (best < 0.3) & ~positive
    return positive, negative, iou


def test_rpn_targets_positives_decode_to_their_ground_truth():
    weights = (2.0, 2.0, 1.0, 1.0)
    out = jax.tree_util.tree_map(np.asarray, _rpn(jax.random.PRNGKey(0), jnp.asarray(GT_BOXES),
                                                  jnp.asarray(GT_VALID), weights))
    positive, negative, iou = _reference_rpn_labels(GT_BOXES, GT_VALID)
    assert 0 < positive.sum() < 32  # every positive fits in the 32 positive slots
    idx, is_pos = out['indices'], out['is_positive']
    # All reference positives are drawn, and nothing else is called positive.
    assert sorted(idx[is_pos].tolist()) == sorted(np.flatnonzero(positive).tolist())
    assert np.all(negative[idx[(out['weights'] > 0) & ~is_pos]])
    np.testing.assert_array_equal(out['labels'], is_pos.astype(np.float32))
    np.testing.assert_array_equal(out['weights'], np.ones(64))
    # Box targets of positives decode back onto the best-matching ground truth.
    decoded = np.asarray(box_ops.decode_boxes(jnp.asarray(out['box_targets']),
                                              jnp.asarray(ANCHORS[idx]), weights))
    best_gt = GT_BOXES[iou.argmax(0)[idx]]
    np.testing.assert_allclose(decoded[is_pos], best_gt[is_pos], atol=1e-3)
    # Each valid ground truth owns at least one positive anchor.
    assert set(iou.argmax(0)[idx[is_pos]].tolist()) == {0, 1}


def test_rpn_targets_without_valid_ground_truth_are_all_negative():
    out = _rpn(jax.random.PRNGKey(1), jnp.asarray(GT_BOXES), jnp.zeros(3, bool))
    assert not np.asarray(out['is_positive']).any()
    np.testing.assert_array_equal(out['labels'], 0.0)
    np.testing.assert_array_equal(out['weights'], 1.0)
    assert len(set(np.asarray(out['indices']).tolist())) == 64


# ----------------------------------------------------------------------------
# roi_targets
# ----------------------------------------------------------------------------

ROI_GT_BOXES = np.array([[4, 4, 24, 24], [36, 30, 60, 58], [0, 0, 0, 0]], np.float32)
ROI_GT_CLASSES = np.array([2, 1, 0], np.int32)
ROI_GT_VALID = np.array([True, True, False])
PROPOSALS = np.array([
    [5, 5, 25, 25],        # 0: IoU 361/439 = 0.82 with gt 0 -> positive, class 2
    [14, 4, 34, 24],       # 1: IoU 200/600 = 0.33 with gt 0 -> background
    [22, 4, 42, 24],       # 2: IoU 40/760 = 0.05 with gt 0 -> background or ignored
    [0, 40, 10, 50],       # 3..7: no overlap with any ground truth
    [40, 0, 50, 10],
    [45, 5, 55, 15],
    [0, 50, 12, 62],
    [26, 26, 34, 34],
    [38, 32, 58, 56],      # 8: IoU 480/672 = 0.71 with gt 1 -> positive, class 1
    [1, 1, 63, 63],        # 9: invalid
    [4.5, 4.5, 24.5, 24.5],  # 10: invalid (would be positive)
], np.float32)
PROPOSALS_VALID = np.array([True] * 9 + [False, False])


@functools.partial(jax.jit, static_argnames=('bg_iou_low', 'append_gt_boxes'))
def _roi(key, gt_valid, bg_iou_low=0.0, append_gt_boxes=True):
    return target_ops.roi_targets(
        key, jnp.asarray(PROPOSALS), jnp.asarray(PROPOSALS_VALID), jnp.asarray(ROI_GT_BOXES),
        jnp.asarray(ROI_GT_CLASSES), gt_valid, fg_iou_threshold=0.5, bg_iou_low=bg_iou_low,
        batch_size_per_image=16, positive_fraction=0.25, append_gt_boxes=append_gt_boxes)


def _rows(boxes):
    return sorted(tuple(float(v) for v in b) for b in boxes)


def test_roi_targets_appended_ground_truth_are_positives_with_their_class():
    out = jax.tree_util.tree_map(np.asarray, _roi(jax.random.PRNGKey(0), jnp.asarray(ROI_GT_VALID)))
    valid, pos = out['valid'], out['is_positive']
    assert out['boxes'].shape == (16, 4)
    # 4 positives (2 proposals + 2 appended gt) and 7 valid negatives: 11 slots.
    assert pos.sum() == 4 and valid.sum() == 11
    assert _rows(out['boxes'][pos]) == _rows([PROPOSALS[0], PROPOSALS[8],
                                              ROI_GT_BOXES[0], ROI_GT_BOXES[1]])
    np.testing.assert_array_equal(out['classes'][pos], ROI_GT_CLASSES[out['matched_gt'][pos]])
    for box, cls in zip(out['boxes'][pos], out['classes'][pos]):
        assert cls == (2 if box[0] < 10 else 1)
    np.testing.assert_array_equal(out['classes'][~pos], 0)
    assert _rows(out['boxes'][valid & ~pos]) == _rows(PROPOSALS[1:8])
    # Neither invalid proposals nor padding ground truth are drawn.
    drawn = _rows(out['boxes'][valid])
    for never in (PROPOSALS[9], PROPOSALS[10], ROI_GT_BOXES[2]):
        assert tuple(float(v) for v in never) not in drawn


def test_roi_targets_bg_iou_low_ignores_low_overlaps():
    out = jax.tree_util.tree_map(np.asarray, _roi(jax.random.PRNGKey(1), jnp.asarray(ROI_GT_VALID),
                                                  bg_iou_low=0.1))
    valid, pos = out['valid'], out['is_positive']
    # Background is now only IoU in [0.1, 0.5): proposal 1.
    assert pos.sum() == 4 and valid.sum() == 5
    assert _rows(out['boxes'][valid & ~pos]) == _rows(PROPOSALS[1:2])


def test_roi_targets_without_appending_ground_truth():
    out = jax.tree_util.tree_map(np.asarray, _roi(jax.random.PRNGKey(2), jnp.asarray(ROI_GT_VALID),
                                                  append_gt_boxes=False))
    pos = out['is_positive']
    assert _rows(out['boxes'][pos]) == _rows([PROPOSALS[0], PROPOSALS[8]])
    assert out['valid'].sum() == 9


@pytest.mark.parametrize('bg_iou_low', [0.0, 0.1])
def test_roi_targets_no_valid_ground_truth(bg_iou_low):
    out = jax.tree_util.tree_map(np.asarray, _roi(jax.random.PRNGKey(3), jnp.zeros(3, bool),
                                                  bg_iou_low=bg_iou_low))
    assert not out['is_positive'].any()
    assert out['valid'].sum() == 9  # every valid proposal is background
    np.testing.assert_array_equal(out['classes'], 0)


# ----------------------------------------------------------------------------
# select_foreground
# ----------------------------------------------------------------------------

def test_select_foreground_hand_case():
    roi = {'is_positive': jnp.array([False, True, False, True, True, False])}
    idx, ok = select_foreground(roi, 4)
    np.testing.assert_array_equal(np.asarray(idx)[:3], [1, 3, 4])
    np.testing.assert_array_equal(ok, [True, True, True, False])
    assert int(idx[3]) in (0, 2, 5)
    idx, ok = select_foreground(roi, 2)
    np.testing.assert_array_equal(idx, [1, 3])
    np.testing.assert_array_equal(ok, [True, True])


# ----------------------------------------------------------------------------
# mask_targets
# ----------------------------------------------------------------------------

def _centres(lo, hi, n):
    return lo + (np.arange(n) + 0.5) * (hi - lo) / n


def test_mask_targets_full_mask_gives_ones_inside():
    masks = jnp.ones((1, 14, 14), jnp.float32)
    gt_box = jnp.array([[10, 10, 50, 50]], jnp.float32)
    rois = jnp.array([[10, 10, 50, 50], [20, 15, 40, 45], [0, 0, 60, 60]], jnp.float32)
    out = np.asarray(mask_targets(masks, gt_box, jnp.zeros(3, jnp.int32), rois, 28))
    assert out.shape == (3, 28, 28) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], 1.0)
    np.testing.assert_array_equal(out[1], 1.0)
    # The RoI larger than the box: ones well inside, zeros well outside (a crop
    # pixel is 40 / 14 = 2.9 wide; see the xfail in test_roi_align.py for the border).
    c = _centres(0, 60, 28)
    inner = (c > 12) & (c < 48)
    outer = (c < 6) | (c > 54)
    np.testing.assert_array_equal(out[2][np.ix_(inner, inner)], 1.0)
    np.testing.assert_array_equal(out[2][outer, :], 0.0)
    np.testing.assert_array_equal(out[2][:, outer], 0.0)


def test_mask_targets_are_binary_and_follow_matched_gt():
    rng = np.random.default_rng(0)
    masks = np.stack([rng.uniform(size=(14, 14)), np.zeros((14, 14)), np.ones((14, 14))])
    gt_boxes = jnp.array([[0, 0, 28, 28], [5, 5, 20, 20], [5, 5, 20, 20]], jnp.float32)
    rois = jnp.array([[3, 2, 25, 27], [5, 5, 20, 20], [5, 5, 20, 20]], jnp.float32)
    out = np.asarray(mask_targets(jnp.asarray(masks, jnp.float32), gt_boxes,
                                             jnp.array([0, 2, 1]), rois, 7))
    assert set(np.unique(out).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(out[1], 1.0)  # matched gt 2: all ones
    np.testing.assert_array_equal(out[2], 0.0)  # matched gt 1: all zeros


def test_mask_targets_threshold_is_half_inclusive():
    masks = jnp.stack([jnp.full((4, 4), 0.5), jnp.full((4, 4), 0.49)]).astype(jnp.float32)
    box = jnp.array([[0, 0, 8, 8], [0, 0, 8, 8]], jnp.float32)
    out = np.asarray(mask_targets(masks, box, jnp.array([0, 1]), box, 4))
    np.testing.assert_array_equal(out[0], 1.0)
    np.testing.assert_array_equal(out[1], 0.0)
