"""Tests for modeling/detector.py: full-size shapes, proposals, a tiny detector.

The full-size R50-FPN model is only traced (jax.eval_shape), never run. The tiny
model gets its variables from numpy (compiling the Flax initialisers takes longer
on CPU than running the model), then runs once in training and once in inference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import losses
from projects.maskrcnn.modeling import specs
from projects.maskrcnn.modeling.backbones import resnet
from projects.maskrcnn.modeling.detector import MaskRCNN, generate_proposals
from projects.maskrcnn.modeling.necks import fpn
from projects.maskrcnn.ops import boxes as box_ops
from tests.variables import fill_variables


def _num_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------
# Full-size model, traced only
# ----------------------------------------------------------------------------

def test_full_size_r50_fpn_eval_shape():
    model = MaskRCNN(num_classes=80)
    images = jax.ShapeDtypeStruct((1, 800, 1216, 3), jnp.float32)
    sizes = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    variables = jax.eval_shape(
        lambda x, s: model.init({'params': jax.random.PRNGKey(0)}, x, s, train=False),
        images, sizes)
    out = jax.eval_shape(lambda v, x, s: model.apply(v, x, s, train=False),
                         variables, images, sizes)
    assert out['detection_boxes'].shape == (1, 100, 4)
    assert out['detection_scores'].shape == (1, 100)
    assert out['detection_classes'].shape == (1, 100)
    assert out['detection_valid'].shape == (1, 100)
    assert out['detection_masks'].shape == (1, 100, 28, 28)
    assert out['detection_classes'].dtype == jnp.int32
    assert out['detection_boxes'].dtype == jnp.float32
    # Frozen BN statistics live outside the parameters.
    assert set(variables) == {'params', 'frozen'}
    # torchvision's maskrcnn_resnet50_fpn has 44,401,393 parameters with 91
    # classes and box regression for all 91 (background included). Here the
    # classifier has 81 outputs and the regressor 80 x 4: 10 + 44 fewer outputs
    # of a 1024-input layer, and 11 fewer 1x1 mask predictors on 256 channels.
    assert _num_params(variables['params']) == 44_401_393 - 54 * 1025 - 11 * 257
    assert _num_params(variables['params']['body']) == 23_454_912  # ResNet-50 convs


def test_anchor_levels_must_match_fpn_levels():
    model = MaskRCNN(num_classes=2,
                     backbone=resnet.ResNetSpec(depth=18, width=8),
                     neck_spec=fpn.FPNSpec(channels=8),
                     anchors=specs.AnchorSpec(sizes=((32,), (64,), (128,), (256,))))
    with pytest.raises(ValueError, match='anchors.sizes has 4 levels'):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                          jnp.array([[64, 64]]), train=False))


# ----------------------------------------------------------------------------
# generate_proposals
# ----------------------------------------------------------------------------

# Level 1: four anchors; level 2: one. Image (h, w) = (25, 40).
_LEVEL1 = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [-5, -5, 5, 5]],
                   np.float32)
_LEVEL2 = np.array([[0, 0, 10, 10]], np.float32)
_LOGITS = [jnp.array([[0.1, 0.9, 0.5, 0.3]]), jnp.array([[0.8]])]
# Anchor 2 moves right by 0.1 of its width.
_DELTAS = [jnp.zeros((1, 4, 4)).at[0, 2, 0].set(0.1), jnp.zeros((1, 1, 4))]


def _proposals(train, **spec):
    fn = jax.jit(lambda logits, deltas, sizes: generate_proposals(
        logits, deltas, [_LEVEL1, _LEVEL2], sizes, specs.RPNSpec(nms_threshold=0.7, **spec),
        train))
    props, valid = fn(_LOGITS, _DELTAS, jnp.array([[25.0, 40.0]]))
    return np.asarray(props)[0], np.asarray(valid)[0]


def test_generate_proposals_hand_case():
    props, valid = _proposals(False, pre_nms_topk_test=4, post_nms_topk_test=4)
    # Anchor 0 (score 0.1) overlaps anchor 1 (0.9) by 90/110 > 0.7 on its level
    # and goes; level 2's identical box is not suppressed (NMS is per level).
    np.testing.assert_allclose(props, [[1, 0, 11, 10],      # 0.9
                                       [0, 0, 10, 10],      # 0.8, level 2
                                       [21, 20, 31, 25],    # 0.5, moved, clipped
                                       [0, 0, 5, 5]],       # 0.3, clipped
                               atol=1e-5)
    np.testing.assert_array_equal(valid, [True] * 4)


def test_generate_proposals_train_top_k_and_padding():
    # Two per level before NMS: anchors 1 and 2 of level 1, the one of level 2.
    props, valid = _proposals(True, pre_nms_topk_train=2, post_nms_topk_train=6)
    assert props.shape == (4, 4)  # min(6, levels x 2)
    np.testing.assert_array_equal(valid, [True, True, True, False])
    np.testing.assert_allclose(props[:3], [[1, 0, 11, 10], [0, 0, 10, 10], [21, 20, 31, 25]],
                               atol=1e-5)


def test_generate_proposals_min_box_size():
    props, valid = _proposals(False, pre_nms_topk_test=4, post_nms_topk_test=4,
                              min_box_size=5.0)
    # The clipped 5 x 5 box and the 10 x 5 one are not larger than 5.
    np.testing.assert_array_equal(valid, [True, True, False, False])
    np.testing.assert_allclose(props[:2], [[1, 0, 11, 10], [0, 0, 10, 10]], atol=1e-5)


# ----------------------------------------------------------------------------
# A tiny detector, run for real
# ----------------------------------------------------------------------------

K = 3
TINY = MaskRCNN(
    num_classes=K,
    backbone=resnet.ResNetSpec(depth=18, width=8, norm='gn', freeze_at=0),
    neck_spec=fpn.FPNSpec(channels=16),
    rpn=specs.RPNSpec(batch_size_per_image=64, pre_nms_topk_train=100,
                      post_nms_topk_train=50, pre_nms_topk_test=100, post_nms_topk_test=50),
    roi_heads=specs.ROIHeadsSpec(batch_size_per_image=32),
    box_head=specs.BoxHeadSpec(fc_dim=32),
    mask_head=specs.MaskHeadSpec(conv_dim=16, num_convs=1, num_fg_slots=16),
    test=specs.TestSpec(detections_per_image=20))
IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
SIZES = jnp.array([[64, 64], [50, 60]], jnp.int32)


def _gt():
    masks = np.zeros((2, 3, 14, 14), np.float32)
    masks[:, :, 3:11, 2:12] = 1.0
    return {
        'gt_boxes': jnp.array([[[8, 8, 40, 44], [30, 30, 60, 62], [0, 0, 0, 0]],
                               [[5, 10, 45, 40], [0, 0, 0, 0], [0, 0, 0, 0]]], jnp.float32),
        'gt_classes': jnp.array([[1, 3, 0], [2, 0, 0]], jnp.int32),
        'gt_valid': jnp.array([[True, True, False], [True, False, False]]),
        'gt_masks': jnp.asarray(masks),
    }


def _tiny_variables():
    shapes = jax.eval_shape(lambda: TINY.init({'params': jax.random.PRNGKey(0)}, IMAGES,
                                              SIZES, train=False))
    return fill_variables(shapes)


# Heads whose outputs do not depend on the RoI: class logits CLS_BIAS (class 2
# wins with softmax probability e^5 / (e^5 + 3) = 0.980, the others 0.0066 stay
# under the 0.05 score threshold), box deltas BOX_BIAS[k - 1] for class k, mask
# logits MASK_BIAS[k - 1]. They show which class channel each output was read from.
CLS_BIAS = np.array([0.0, 0.0, 5.0, 0.0], np.float32)
BOX_BIAS = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8], [0.9, 1.0, 1.1, 1.2]],
                    np.float32)
MASK_BIAS = np.array([-3.0, 2.0, -1.0], np.float32)


def _with_constant_heads(variables):
    params = variables['params']
    box, mask = dict(params['box_predictor']), dict(params['mask_predictor'])
    box['cls_score'] = {'kernel': jnp.zeros_like(box['cls_score']['kernel']),
                        'bias': jnp.asarray(CLS_BIAS)}
    box['bbox_pred'] = {'kernel': jnp.zeros_like(box['bbox_pred']['kernel']),
                        'bias': jnp.asarray(BOX_BIAS.reshape(-1))}
    mask['predictor'] = {'kernel': jnp.zeros_like(mask['predictor']['kernel']),
                         'bias': jnp.asarray(MASK_BIAS)}
    return {**variables, 'params': {**params, 'box_predictor': box, 'mask_predictor': mask}}


def test_tiny_maskrcnn_train_outputs():
    gt = _gt()
    out = jax.jit(lambda v, key: TINY.apply(v, IMAGES, SIZES, gt, train=True,
                                            rngs={'sampling': key}))(
        _with_constant_heads(_tiny_variables()), jax.random.PRNGKey(1))
    out = jax.tree_util.tree_map(np.asarray, out)
    expected_shapes = {
        'rpn_logits': (2, 64), 'rpn_deltas': (2, 64, 4), 'rpn_labels': (2, 64),
        'rpn_weights': (2, 64), 'rpn_is_positive': (2, 64), 'rpn_box_targets': (2, 64, 4),
        'roi_cls_logits': (2, 32, K + 1), 'roi_classes': (2, 32), 'roi_valid': (2, 32),
        'roi_is_positive': (2, 32), 'roi_box_deltas': (2, 32, 4),
        'roi_box_targets': (2, 32, 4), 'mask_logits': (2, 16, 28, 28),
        'mask_targets': (2, 16, 28, 28), 'mask_valid': (2, 16), 'num_proposals': (2,),
    }
    assert {k: v.shape for k, v in out.items()} == expected_shapes
    for key, value in out.items():
        assert np.all(np.isfinite(value)), key
    # Every image's ground truth gets anchors (low-quality matches) and RoIs
    # (the appended ground-truth boxes), with the right classes.
    assert np.all(out['rpn_is_positive'].sum(-1) >= 1)
    num_valid_gt = np.asarray(gt['gt_valid']).sum(-1)
    assert np.all(out['roi_is_positive'].sum(-1) >= num_valid_gt)
    for i, allowed in enumerate(({1, 3}, {2})):
        pos = out['roi_is_positive'][i]
        assert set(out['roi_classes'][i][pos].tolist()) <= allowed
        assert np.all(out['roi_classes'][i][~pos] == 0)
    assert np.all(out['roi_is_positive'] <= out['roi_valid'])
    np.testing.assert_array_equal(out['mask_valid'].sum(-1),
                                  np.minimum(out['roi_is_positive'].sum(-1), 16))
    assert set(np.unique(out['mask_targets']).tolist()) <= {0.0, 1.0}
    assert out['mask_targets'][out['mask_valid']].mean() > 0.05
    assert np.all(out['num_proposals'] <= 50) and np.all(out['num_proposals'] > 0)
    total, terms = jax.jit(lambda o: losses.total_loss(o, {}))(out)
    assert np.isfinite(float(total)) and float(total) > 0
    assert all(float(v) > 0 for v in terms.values()), terms
    # Box deltas and mask logits are read from each RoI's target class.
    pos = out['roi_is_positive']
    np.testing.assert_allclose(out['roi_box_deltas'][pos], BOX_BIAS[out['roi_classes'][pos] - 1],
                               rtol=1e-6)
    # The mask slots hold the positive RoIs in order (at most 8 here, 16 slots).
    for i in range(2):
        classes = out['roi_classes'][i][pos[i]]
        assert out['mask_valid'][i].sum() == len(classes)
        logits = out['mask_logits'][i][:len(classes)]
        np.testing.assert_allclose(logits, np.broadcast_to(
            MASK_BIAS[classes - 1][:, None, None], logits.shape), rtol=1e-6)


def test_box_only_instances_get_no_mask_loss():
    """RoIs matched to an instance without a mask (`gt_has_mask` False) leave the
    mask slots; the other instance's RoIs keep theirs, boxes and classes unchanged."""
    gt = _gt()
    run = jax.jit(lambda v, g, key: TINY.apply(v, IMAGES, SIZES, g, train=True,
                                               rngs={'sampling': key}))
    variables = _tiny_variables()
    with_masks = jax.tree_util.tree_map(np.asarray, run(variables, gt, jax.random.PRNGKey(1)))
    # Image 0's first instance (class 1) is box-only.
    has_mask = jnp.array([[False, True, True], [True, True, True]])
    box_only = jax.tree_util.tree_map(np.asarray, run(
        variables, {**gt, 'gt_has_mask': has_mask}, jax.random.PRNGKey(1)))
    for key in ('roi_classes', 'roi_is_positive', 'roi_box_targets', 'rpn_labels'):
        np.testing.assert_array_equal(box_only[key], with_masks[key])
    np.testing.assert_array_equal(box_only['mask_valid'][1], with_masks['mask_valid'][1])
    # In image 0 only the RoIs of the class-3 instance keep a mask target.
    classes = with_masks['roi_classes'][0][with_masks['roi_is_positive'][0]][:16]
    np.testing.assert_array_equal(box_only['mask_valid'][0][:len(classes)], classes == 3)
    assert (classes == 1).any() and (classes == 3).any()


def test_tiny_maskrcnn_inference_outputs():
    infer = jax.jit(lambda v: TINY.apply(v, IMAGES, SIZES, train=False))
    variables = _tiny_variables()
    det = jax.tree_util.tree_map(np.asarray, infer(variables))
    assert det['detection_boxes'].shape == (2, 20, 4)
    assert det['detection_scores'].shape == (2, 20)
    assert det['detection_classes'].shape == (2, 20)
    assert det['detection_valid'].shape == (2, 20)
    assert det['detection_masks'].shape == (2, 20, 28, 28)
    for key, value in det.items():
        assert np.all(np.isfinite(value)), key
    valid = det['detection_valid']
    assert np.all(valid.sum(-1) > 0)  # otherwise the checks below would be vacuous
    for i, (h, w) in enumerate(np.asarray(SIZES)):
        boxes, ok = det['detection_boxes'][i], valid[i]
        x0, y0, x1, y1 = boxes[ok].T
        assert np.all((x0 >= 0) & (x0 < x1) & (x1 <= w)), boxes[ok]
        assert np.all((y0 >= 0) & (y0 < y1) & (y1 <= h)), boxes[ok]
        classes, scores = det['detection_classes'][i], det['detection_scores'][i]
        assert np.all((classes[ok] >= 1) & (classes[ok] <= K))
        assert np.all(classes[~ok] == 0) and np.all(scores[~ok] == 0)
        assert np.all(scores[ok] > 0.05)
        assert np.all(np.diff(scores[ok]) <= 0)  # by decreasing score
        # Per-class NMS: same-class detections overlap by at most the threshold.
        iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(boxes[ok]), jnp.asarray(boxes[ok])))
        same = classes[ok][:, None] == classes[ok][None, :]
        np.fill_diagonal(same, False)
        assert np.all(iou[same] <= 0.5 + 1e-6)
    masks = det['detection_masks']
    assert np.all((masks >= 0) & (masks <= 1))

    # With heads that ignore the RoI, only class 2 passes the score threshold,
    # and its masks are sigmoid(MASK_BIAS[1]) everywhere.
    det = jax.tree_util.tree_map(np.asarray, infer(_with_constant_heads(variables)))
    valid = det['detection_valid']
    assert np.all(valid.sum(-1) > 0)
    np.testing.assert_array_equal(det['detection_classes'][valid], 2)
    np.testing.assert_allclose(det['detection_scores'][valid], np.exp(5) / (np.exp(5) + 3),
                               rtol=1e-5)
    np.testing.assert_allclose(det['detection_masks'][valid], 1 / (1 + np.exp(-2.0)),
                               rtol=1e-5)
