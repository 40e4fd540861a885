"""Tests for tools/random_weights.py: both sides of the parity test must draw the same weights."""

import numpy as np
import pytest

from projects.maskrcnn.tools import random_weights

NAMES = [
    ('backbone.body.layer1.0.conv1.weight', (8, 4, 1, 1)),
    ('backbone.body.layer1.0.bn1.weight', (8,)),
    ('backbone.body.layer1.0.bn1.bias', (8,)),
    ('backbone.body.layer1.0.bn1.running_mean', (8,)),
    ('backbone.body.layer1.0.bn1.running_var', (8,)),
    ('backbone.body.layer1.0.bn1.num_batches_tracked', ()),
    ('backbone.body.layer1.0.conv3.weight', (16, 8, 1, 1)),
    ('backbone.body.layer1.0.bn3.weight', (16,)),
    ('backbone.body.layer1.0.bn3.running_mean', (16,)),
    ('rpn.head.cls_logits.weight', (3, 256, 1, 1)),
    ('roi_heads.box_head.fc6.weight', (1024, 12544)),
    ('roi_heads.mask_predictor.conv5_mask.weight', (256, 256, 2, 2)),
    ('roi_heads.mask_predictor.mask_fcn_logits.weight', (91, 256, 1, 1)),
]


def test_same_seed_same_weights_in_any_order():
    a = random_weights.random_state_dict(NAMES, seed=3)
    b = random_weights.random_state_dict(list(reversed(NAMES)), seed=3)
    c = random_weights.random_state_dict(NAMES, seed=4)
    for name, _ in NAMES:
        np.testing.assert_array_equal(a[name], b[name])
        if a[name].size > 1:
            assert not np.array_equal(a[name], c[name]), name


def test_rules_follow_the_layer_kinds():
    w = random_weights.random_state_dict(NAMES, seed=0)
    assert w['backbone.body.layer1.0.bn1.num_batches_tracked'].dtype == np.int64
    assert w['backbone.body.layer1.0.conv1.weight'].dtype == np.float32
    assert np.all((w['backbone.body.layer1.0.bn1.weight'] >= 0.5)
                  & (w['backbone.body.layer1.0.bn1.weight'] <= 1.0))
    # The norm that ends a bottleneck's residual branch is kept small.
    assert np.all(w['backbone.body.layer1.0.bn3.weight'] <= 0.3)
    assert np.all(w['backbone.body.layer1.0.bn1.running_var'] >= 0.5)
    fc6 = w['roi_heads.box_head.fc6.weight']
    assert fc6.std() == pytest.approx(np.sqrt(2 / 12544), rel=0.01)
    deconv = w['roi_heads.mask_predictor.conv5_mask.weight']
    assert deconv.std() == pytest.approx(np.sqrt(2 / 256), rel=0.02)   # fan-in of one input position
    rpn = w['rpn.head.cls_logits.weight']
    assert rpn.std() == pytest.approx(0.25 * np.sqrt(2 / 256), rel=0.1)
    mask = w['roi_heads.mask_predictor.mask_fcn_logits.weight'].reshape(91, -1)
    np.testing.assert_allclose(mask.mean(1), 0.0, atol=1e-6)


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match='no rule for foo.scale'):
        random_weights.random_state_dict([('foo.scale', (3,))], seed=0)
