"""Tests for projects/maskrcnn/losses.py on small hand-made training outputs.

(losses.py sits next to modeling/; its test lives here with the other model tests.)
The dicts use the keys of MaskRCNN._train_outputs in modeling/detector.py.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from projects.maskrcnn import losses
from projects.maskrcnn.model import MaskRCNNModel

# Jitted: one compile is cheaper on CPU than eager dispatch of every op.
rpn_losses = jax.jit(losses.rpn_losses, static_argnums=1)
box_head_losses = jax.jit(losses.box_head_losses, static_argnums=1)
mask_loss = jax.jit(losses.mask_loss)


def _bce(logit, label):
    p = 1 / (1 + math.exp(-logit))
    return -(label * math.log(p) + (1 - label) * math.log(1 - p))


def _ce(logits, label):
    logits = np.asarray(logits, np.float64)
    return float(np.log(np.exp(logits).sum()) - logits[label])


def test_smooth_l1_beta_zero_is_l1():
    x = jnp.array([-2.0, -0.3, 0.0, 0.25, 3.0])
    np.testing.assert_allclose(losses.smooth_l1(x, 0.0), [2.0, 0.3, 0.0, 0.25, 3.0])


def test_smooth_l1_beta_one_hand_values():
    x = jnp.array([-2.0, -0.5, 0.0, 0.5, 1.0, 3.0])
    # |x| < 1: x^2 / 2; otherwise |x| - 0.5.
    np.testing.assert_allclose(losses.smooth_l1(x, 1.0), [1.5, 0.125, 0.0, 0.125, 0.5, 2.5])


def test_smooth_l1_other_beta():
    # beta 0.5: |x| < 0.5 -> x^2 / (2 * 0.5) = x^2; else |x| - 0.25.
    np.testing.assert_allclose(losses.smooth_l1(jnp.array([0.2, -0.4, 2.0]), 0.5),
                               [0.04, 0.16, 1.75], rtol=1e-6)


def _rpn_out():
    return {
        'rpn_logits': jnp.array([[0.0, 0.0, 2.0, -1.0], [1.0, -3.0, 0.0, 5.0]]),
        'rpn_labels': jnp.array([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]),
        'rpn_weights': jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]),
        'rpn_is_positive': jnp.array([[True, False, True, False], [False] * 4]),
        'rpn_deltas': jnp.array([[[0.5, -1.0, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0],
                                  [0.1, 0.1, 0.1, 0.1], [7.0, 7.0, 7.0, 7.0]],
                                 [[5.0] * 4] * 4]),
        'rpn_box_targets': jnp.zeros((2, 4, 4)),
    }


def test_rpn_losses_hand_computed():
    out = _rpn_out()
    # 5 sampled anchors over the batch; the fourth anchor of image 0 and the last
    # two of image 1 are not sampled and do not count.
    bce = (_bce(0, 1) + _bce(0, 0) + _bce(2, 1) + _bce(1, 0) + _bce(-3, 0)) / 5
    l1 = (0.5 + 1.0 + 0.0 + 2.0 + 0.4) / 5     # positives only
    sl1 = (0.125 + 0.5 + 0.0 + 1.5 + 4 * 0.005) / 5
    got = rpn_losses(out)
    np.testing.assert_allclose(got['rpn_cls'], bce, rtol=1e-5)
    np.testing.assert_allclose(got['rpn_box'], l1, rtol=1e-5)
    np.testing.assert_allclose(rpn_losses(out, 1.0)['rpn_box'], sl1, rtol=1e-5)


def test_rpn_losses_with_nothing_sampled_are_zero_not_nan():
    out = _rpn_out()
    out['rpn_weights'] = jnp.zeros((2, 4))
    out['rpn_is_positive'] = jnp.zeros((2, 4), bool)
    got = rpn_losses(out)
    np.testing.assert_array_equal([got['rpn_cls'], got['rpn_box']], [0.0, 0.0])


def _box_out():
    return {
        'roi_cls_logits': jnp.array([[[2.0, 0.0, -1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]]]),
        'roi_classes': jnp.array([[0, 1, 2]]),
        'roi_valid': jnp.array([[True, True, False]]),
        'roi_is_positive': jnp.array([[False, True, False]]),
        'roi_box_deltas': jnp.array([[[1.0, 1.0, 1.0, 1.0], [0.5, -0.5, 2.0, 0.0],
                                      [3.0, 3.0, 3.0, 3.0]]]),
        'roi_box_targets': jnp.zeros((1, 3, 4)),
    }


def test_box_head_losses_hand_computed():
    out = _box_out()
    ce = (_ce([2, 0, -1], 0) + _ce([0, 3, 0], 1)) / 2     # two valid RoIs
    got = box_head_losses(out)
    np.testing.assert_allclose(got['roi_cls'], ce, rtol=1e-5)
    np.testing.assert_allclose(got['roi_box'], (0.5 + 0.5 + 2.0) / 2, rtol=1e-6)
    np.testing.assert_allclose(box_head_losses(out, 1.0)['roi_box'],
                               (0.125 + 0.125 + 1.5) / 2, rtol=1e-6)


def test_mask_loss_mean_over_pixels_then_foreground_rois():
    logits = jnp.array([[[[0.0, 2.0], [-1.0, 0.0]], [[4.0, 4.0], [4.0, 4.0]],
                         [[1.0, 1.0], [1.0, 1.0]]]])           # [1, 3, 2, 2]
    targets = jnp.array([[[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]],
                          [[1.0, 1.0], [1.0, 1.0]]]])
    out = {'mask_logits': logits, 'mask_targets': targets,
           'mask_valid': jnp.array([[True, False, True]])}
    roi0 = (_bce(0, 1) + _bce(2, 1) + _bce(-1, 0) + _bce(0, 0)) / 4
    roi2 = _bce(1, 1)
    np.testing.assert_allclose(mask_loss(out)['mask'], (roi0 + roi2) / 2, rtol=1e-5)
    out['mask_valid'] = jnp.zeros((1, 3), bool)
    assert float(mask_loss(out)['mask']) == 0.0


def test_total_loss_weights_and_terms():
    out = {**_rpn_out(), **_box_out(),
           'mask_logits': jnp.zeros((1, 1, 2, 2)), 'mask_targets': jnp.ones((1, 1, 2, 2)),
           'mask_valid': jnp.array([[True]])}
    total, terms = jax.jit(lambda o: losses.total_loss(o, {'mask': 2.0, 'rpn_box': 0.0}))(out)
    assert set(terms) == set(losses.LOSS_TERMS)
    np.testing.assert_allclose(terms['mask'], math.log(2), rtol=1e-6)
    expected = (terms['rpn_cls'] + terms['roi_cls'] + terms['roi_box'] + 2 * terms['mask'])
    np.testing.assert_allclose(total, expected, rtol=1e-6)


@pytest.mark.parametrize('beta', [0.0, 1.0])
def test_total_loss_passes_betas_to_the_right_terms(beta):
    out = {**_rpn_out(), **_box_out(),
           'mask_logits': jnp.zeros((1, 1, 2, 2)), 'mask_targets': jnp.ones((1, 1, 2, 2)),
           'mask_valid': jnp.array([[True]])}
    _, terms = jax.jit(lambda o: losses.total_loss(o, {}, rpn_beta=beta, roi_beta=0.0))(out)
    np.testing.assert_allclose(terms['rpn_box'], rpn_losses(out, beta)['rpn_box'])
    np.testing.assert_allclose(terms['roi_box'], box_head_losses(out, 0.0)['roi_box'])


def test_rpn_normalizer_batch_size_per_image_is_detectron2s():
    # Detectron2 divides both RPN sums by batch_size_per_image * num_images (here
    # 4 slots x 2 images = 8), not by the 5 anchors sampled (torchvision's 'sampled').
    out = _rpn_out()
    bce_sum = _bce(0, 1) + _bce(0, 0) + _bce(2, 1) + _bce(1, 0) + _bce(-3, 0)
    l1_sum = 0.5 + 1.0 + 0.0 + 2.0 + 0.4
    got = jax.jit(lambda o: losses.rpn_losses(o, 0.0, 'batch_size_per_image'))(out)
    np.testing.assert_allclose(got['rpn_cls'], bce_sum / 8, rtol=1e-5)
    np.testing.assert_allclose(got['rpn_box'], l1_sum / 8, rtol=1e-5)
    _, terms = jax.jit(lambda o: losses.total_loss(
        o, {}, rpn_normalizer='batch_size_per_image'))({**out, **_box_out(),
           'mask_logits': jnp.zeros((1, 1, 2, 2)), 'mask_targets': jnp.ones((1, 1, 2, 2)),
           'mask_valid': jnp.array([[True]])})
    np.testing.assert_allclose(terms['rpn_cls'], bce_sum / 8, rtol=1e-5)
    with pytest.raises(ValueError, match='rpn_loss_normalizer'):
        losses.rpn_losses(out, 0.0, 'per_anchor')


def test_box_loss_l1_detectron2_and_smooth_l1_torchvision():
    # The same deltas (0.5, -0.5, 2, 0) of the one positive RoI, over 2 sampled RoIs:
    # Detectron2's L1 sums |d|; torchvision's smooth L1 with beta 1/9 gives
    # |d| - 1/18 wherever |d| >= 1/9 and d^2 * 9 / 2 below (0 here).
    out = _box_out()
    np.testing.assert_allclose(box_head_losses(out, 0.0)['roi_box'], 3.0 / 2, rtol=1e-6)
    expected = ((0.5 - 1 / 18) * 2 + (2.0 - 1 / 18)) / 2
    np.testing.assert_allclose(box_head_losses(out, 1 / 9)['roi_box'], expected, rtol=1e-6)


def test_model_config_rpn_normalizer_reaches_the_loss():
    config = ml_collections.ConfigDict({'model': {'rpn_loss_normalizer': 'sampled'}})
    assert MaskRCNNModel(config, {'num_classes': 2})._loss_settings()[-1] == 'sampled'
    config.model.rpn_loss_normalizer = 'batch_size_per_image'
    out = {**_rpn_out(), **_box_out(), 'mask_logits': jnp.zeros((1, 1, 2, 2)),
           'mask_targets': jnp.ones((1, 1, 2, 2)), 'mask_valid': jnp.array([[True]])}
    model = MaskRCNNModel(config, {'num_classes': 2})
    total = jax.jit(model.loss_function)(out, {})
    _, terms = losses.total_loss(out, {}, rpn_normalizer='batch_size_per_image')
    np.testing.assert_allclose(total, sum(terms.values()), rtol=1e-6)
    np.testing.assert_allclose(terms['rpn_box'], (0.5 + 1.0 + 0.0 + 2.0 + 0.4) / 8,
                               rtol=1e-5)
