"""Tests for modeling/heads: mask head, box head and RPN head shapes and layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.modeling.heads.bbox_head import BoxHead
from projects.maskrcnn.modeling.heads.mask_head import MaskHead
from projects.maskrcnn.modeling.heads.rpn import RPNHead


def _fill(shapes, seed=0):
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        if path[-1].key == 'scale':
            return jnp.ones(s.shape, s.dtype)
        return jnp.asarray(rng.normal(0, 0.2, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.mark.parametrize('upsample', ['deconv', 'bilinear'])
@pytest.mark.parametrize('class_agnostic,out_channels', [(False, 3), (True, 1)])
def test_mask_head_output_shape(upsample, class_agnostic, out_channels):
    head = MaskHead(num_classes=3, conv_dim=8, num_convs=2, upsample=upsample,
                    class_agnostic=class_agnostic)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 14, 14, 6)), jnp.float32)
    variables = _fill(jax.eval_shape(head.init, jax.random.PRNGKey(0), x))
    assert ('deconv' in variables['params']) == (upsample == 'deconv')
    out = head.apply(variables, x)
    assert out.shape == (5, 28, 28, out_channels) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_mask_head_unknown_upsample_is_an_error():
    with pytest.raises(ValueError, match="upsample 'nearest'"):
        jax.eval_shape(MaskHead(num_classes=2, upsample='nearest').init,
                       jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, 4)))


@pytest.mark.parametrize('class_agnostic,num_reg', [(False, 4), (True, 1)])
def test_box_head_output_shapes(class_agnostic, num_reg):
    head = BoxHead(num_classes=4, fc_dim=16, class_agnostic=class_agnostic)
    x = jnp.zeros((2, 6, 7, 7, 8))
    logits, deltas = jax.eval_shape(head.init_with_output, jax.random.PRNGKey(0), x)[0]
    assert logits.shape == (2, 6, 5)          # K + 1, background at 0
    assert deltas.shape == (2, 6, num_reg, 4)


def test_rpn_head_layout_matches_anchor_order():
    # Objectness and deltas are flattened position-major, then anchor, as the
    # anchors are: the output for (y, x, a) sits at (y * W + x) * A + a.
    head = RPNHead(num_anchors=3)
    feats = [jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 5, 6)), jnp.float32),
             jnp.asarray(np.random.default_rng(2).normal(size=(2, 2, 3, 6)), jnp.float32)]
    variables = _fill(jax.eval_shape(head.init, jax.random.PRNGKey(0), feats))
    logits, deltas = head.apply(variables, feats)
    assert [l.shape for l in logits] == [(2, 60), (2, 18)]
    assert [d.shape for d in deltas] == [(2, 60, 4), (2, 18, 4)]
    # Recompute the 1x1 predictors on the shared conv's output for one position.
    p = variables['params']
    hidden = jax.nn.relu(jax.lax.conv_general_dilated(
        feats[0], p['conv0']['kernel'], (1, 1), ((1, 1), (1, 1)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + p['conv0']['bias'])
    y, x = 2, 3
    h = np.asarray(hidden[1, y, x])
    obj = h @ np.asarray(p['objectness']['kernel'][0, 0]) + np.asarray(p['objectness']['bias'])
    reg = h @ np.asarray(p['deltas']['kernel'][0, 0]) + np.asarray(p['deltas']['bias'])
    for a in range(3):
        np.testing.assert_allclose(logits[0][1, (y * 5 + x) * 3 + a], obj[a], rtol=1e-4,
                                   atol=1e-4)
        np.testing.assert_allclose(deltas[0][1, (y * 5 + x) * 3 + a], reg[4 * a:4 * a + 4],
                                   rtol=1e-4, atol=1e-4)


def test_box_head_without_convs_keeps_its_parameter_names():
    head = BoxHead(num_classes=4, fc_dim=16)
    params = jax.eval_shape(head.init, jax.random.PRNGKey(0), jnp.zeros((2, 7, 7, 8)))['params']
    assert set(params) == {'fc1', 'fc2', 'cls_score', 'bbox_pred'}
    assert params['fc1']['kernel'].shape == (7 * 7 * 8, 16)


@pytest.mark.parametrize('norm', ['none', 'bn', 'gn', 'ln'])
def test_4conv1fc_box_head_has_detectron2_like_names(norm):
    # Detectron2's FastRCNNConvFCHead keys: conv1..conv4 (with .norm), fc1.
    head = BoxHead(num_classes=4, num_convs=4, conv_dim=32, norm=norm, num_fc=1, fc_dim=16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 7, 7, 8)), jnp.float32)
    variables = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
    params = variables['params']
    convs = {f'conv{i}' for i in range(1, 5)}
    norms = set() if norm == 'none' else {f'norm{i}' for i in range(1, 5)}
    assert set(params) == convs | norms | {'fc1', 'cls_score', 'bbox_pred'}
    assert params['conv1']['kernel'].shape == (3, 3, 8, 32)
    assert params['conv2']['kernel'].shape == (3, 3, 32, 32)
    assert ('bias' in params['conv1']) == (norm == 'none')   # no bias before a norm
    assert params['fc1']['kernel'].shape == (7 * 7 * 32, 16)
    assert ('batch_stats' in variables) == (norm == 'bn')
    if norm != 'none':
        assert set(params['norm1']) == {'scale', 'bias'}
        assert params['norm1']['scale'].shape == (32,)
    # Runs, in training (batch statistics updated) and in inference.
    filled = _fill(variables)
    if norm == 'bn':  # running mean and variance 1 (random values could be negative)
        filled['batch_stats'] = jax.tree_util.tree_map(lambda s: jnp.ones(s.shape, s.dtype),
                                                       variables['batch_stats'])
    variables = filled
    mutable = ['batch_stats'] if norm == 'bn' else False
    out = head.apply(variables, x, train=True, mutable=mutable)
    (logits, deltas) = out[0] if mutable else out
    assert logits.shape == (2, 3, 5) and deltas.shape == (2, 3, 4, 4)
    logits_eval, _ = head.apply(variables, x)
    assert np.all(np.isfinite(np.asarray(logits))) and np.all(np.isfinite(np.asarray(logits_eval)))


def test_box_head_rois_do_not_mix_in_group_and_layer_norm():
    # Each RoI's outputs depend on that RoI alone (norms over one RoI's map, or per position).
    for norm in ('gn', 'ln'):
        head = BoxHead(num_classes=2, num_convs=2, conv_dim=32, norm=norm, num_fc=1, fc_dim=8)
        x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 7, 7, 4)), jnp.float32)
        variables = _fill(jax.eval_shape(head.init, jax.random.PRNGKey(0), x))
        full, _ = head.apply(variables, x)
        alone, _ = head.apply(variables, x[:, :1])
        np.testing.assert_allclose(np.asarray(full[:, :1]), np.asarray(alone), rtol=1e-5,
                                   atol=1e-5, err_msg=norm)


def test_box_head_initialisers_are_detectron2s():
    # MSRA (He normal, fan_out) on the convs; c2_xavier_fill (uniform, bound sqrt(3 / fan_in))
    # on the fc layers.
    head = BoxHead(num_classes=2, num_convs=1, conv_dim=64, norm='bn', num_fc=1, fc_dim=64)
    params = head.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 16)))['params']
    conv = np.asarray(params['conv1']['kernel'])
    np.testing.assert_allclose(conv.std(), np.sqrt(2.0 / (3 * 3 * 64)), rtol=0.05)
    fc = np.asarray(params['fc1']['kernel'])
    bound = np.sqrt(3.0 / (7 * 7 * 64))
    assert np.abs(fc).max() <= bound and np.abs(fc).max() > 0.95 * bound
    np.testing.assert_allclose(fc.std(), bound / np.sqrt(3.0), rtol=0.05)
    assert np.all(np.asarray(params['fc1']['bias']) == 0)


def test_mask_head_layer_norm():
    head = MaskHead(num_classes=3, conv_dim=8, num_convs=2, norm='ln')
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 14, 14, 6)), jnp.float32)
    variables = jax.eval_shape(head.init, jax.random.PRNGKey(0), x)
    assert set(variables) == {'params'}
    assert set(variables['params']['norm1']) == {'scale', 'bias'}
    assert 'bias' not in variables['params']['conv1']
    out = head.apply(_fill(variables), x)
    assert out.shape == (2, 28, 28, 3) and np.all(np.isfinite(np.asarray(out)))
