"""Tests for optim_rules.py and its use by optim.build_optimizer: Detectron2's
ViTDet weight-decay set and layer-wise lr decay, on the real parameter trees
of ViT-B/L/H (shapes only, through jax.eval_shape)."""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from projects.maskrcnn import optim, optim_rules
from projects.maskrcnn.modeling.backbones import vit


@functools.cache
def vit_params(size: str):
    """{'body': ViT params, 'neck': ..., 'box_head': ...} as zero arrays of the real shapes."""
    shapes = jax.eval_shape(vit.ViTSpec(size=size).build().init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 224, 224, 3)))['params']
    body = jax.tree_util.tree_map(lambda s: np.zeros(s.shape[-1:], np.float32), shapes)
    v = np.zeros(4, np.float32)
    return {'body': body,
            'neck': {'simfp_2_0': {'kernel': v, 'bias': v}, 'simfp_2_4_norm': {'scale': v, 'bias': v}},
            'box_head': {'conv1': {'kernel': v}, 'conv1_norm': {'scale': v, 'bias': v}}}


def _get(tree, path):
    for key in path.split('/'):
        tree = tree[key]
    return tree


@pytest.mark.parametrize('size, decay, depth', [('B', 0.7, 12), ('L', 0.8, 24), ('H', 0.9, 32)])
def test_layerwise_multipliers_of_named_parameters(size, decay, depth):
    assert vit.VIT_SIZES[size].layerwise_decay == decay
    params = vit_params(size)
    assert optim_rules.count_blocks(params) == depth
    scales = optim_rules.layerwise_lr_scales(params, decay)
    expected = {
        'body/patch_embed/proj/kernel': decay ** (depth + 1),
        'body/patch_embed/proj/bias': decay ** (depth + 1),
        'body/pos_embed': decay ** (depth + 1),
        'body/blocks_0/norm1/scale': decay ** depth,
        'body/blocks_0/attn/rel_pos_h': decay ** depth,
        f'body/blocks_{depth - 1}/mlp/fc2/kernel': decay,
        f'body/blocks_{depth // 2}/attn/qkv/bias': decay ** (depth - depth // 2),
        'neck/simfp_2_0/kernel': 1.0,
        'box_head/conv1_norm/scale': 1.0,
    }
    for path, value in expected.items():
        assert _get(scales, path) == pytest.approx(value, rel=1e-12), path
    if size == 'B':  # Detectron2's ViT-B: stem 0.7^13
        assert _get(scales, 'body/pos_embed') == pytest.approx(0.0097, abs=1e-4)


@pytest.mark.parametrize('size', ['B', 'L', 'H'])
def test_weight_decay_mask_of_named_parameters(size):
    params = vit_params(size)
    patterns = () if size == 'H' else optim_rules.VITDET_NO_WEIGHT_DECAY  # ViT-H decays all
    labels = flax.traverse_util.flatten_dict(optim.parameter_labels(params, (), patterns))
    labels = {'/'.join(k): v for k, v in labels.items()}
    exempt = {'body/pos_embed', 'body/blocks_0/norm1/scale', 'body/blocks_0/norm1/bias',
              'body/blocks_3/norm2/scale', 'body/blocks_3/norm2/bias'}
    decayed = {'body/patch_embed/proj/kernel', 'body/patch_embed/proj/bias',
               'body/blocks_0/attn/qkv/bias', 'body/blocks_0/attn/rel_pos_h',
               'body/blocks_3/attn/rel_pos_w', 'body/blocks_3/mlp/fc1/bias',
               'neck/simfp_2_0/bias', 'neck/simfp_2_4_norm/scale', 'neck/simfp_2_4_norm/bias',
               'box_head/conv1_norm/scale'}
    for path in exempt:
        assert labels[path] == ('decay' if size == 'H' else 'no_decay'), path
    for path in decayed:
        assert labels[path] == 'decay', path
    depth = vit.VIT_SIZES[size].depth
    n_exempt = sum(v == 'no_decay' for v in labels.values())
    assert n_exempt == (0 if size == 'H' else 1 + 4 * depth)
    # Without patterns the ResNet rule stays: every norm module is exempt.
    default = flax.traverse_util.flatten_dict(optim.parameter_labels(params, ()))
    assert default[('neck', 'simfp_2_4_norm', 'scale')] == 'no_decay'


def _config(**opt):
    config = ml_collections.ConfigDict()
    config.lr_configs = {'base_learning_rate': 1e-4}
    config.optimizer_configs = {'optimizer': 'adamw', 'weight_decay': 0.1, **opt}
    config.model = {'backbone': {}}
    return config


def test_build_optimizer_scales_updates_and_decay_per_layer():
    params = {'body': {'pos_embed': np.ones(3, np.float32),
                       'blocks_0': {'norm1': {'scale': np.ones(3, np.float32)},
                                    'attn': {'rel_pos_h': np.ones(3, np.float32)}},
                       'blocks_1': {'mlp': {'fc1': {'kernel': np.ones(3, np.float32)}}}},
              'neck': {'simfp_4_0_norm': {'scale': np.ones(3, np.float32)}}}
    config = _config(layerwise_decay=0.5, no_weight_decay=optim_rules.VITDET_NO_WEIGHT_DECAY)
    tx, _ = optim.build_optimizer(config, params)
    # Zero gradients: the update is the decoupled weight decay, -lr * scale * 0.1 * p.
    zeros = jax.tree_util.tree_map(np.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    flat = {'/'.join(k): float(v[0]) for k, v in flax.traverse_util.flatten_dict(updates).items()}
    lr_wd = 1e-4 * 0.1
    assert flat['body/pos_embed'] == 0.0 and flat['body/blocks_0/norm1/scale'] == 0.0
    assert flat['body/blocks_0/attn/rel_pos_h'] == pytest.approx(-lr_wd * 0.5 ** 2)
    assert flat['body/blocks_1/mlp/fc1/kernel'] == pytest.approx(-lr_wd * 0.5)
    assert flat['neck/simfp_4_0_norm/scale'] == pytest.approx(-lr_wd)
    # Unit gradients, no decay: Adam's first step moves every weight by lr * scale.
    ones = jax.tree_util.tree_map(np.ones_like, params)
    tx, _ = optim.build_optimizer(_config(layerwise_decay=0.5, weight_decay=0.0), params)
    updates, _ = tx.update(ones, tx.init(params), params)
    assert float(updates['body']['pos_embed'][0]) == pytest.approx(-1e-4 * 0.5 ** 3, rel=1e-4)
    assert float(updates['neck']['simfp_4_0_norm']['scale'][0]) == pytest.approx(-1e-4, rel=1e-4)


def test_bad_rules_are_named():
    with pytest.raises(ValueError, match='layerwise_decay=1.5'):
        optim_rules.layerwise_lr_scales(vit_params('B'), 1.5)
    with pytest.raises(ValueError, match='no blocks_i modules'):
        optim_rules.layerwise_lr_scales({'neck': {'a': np.ones(1)}}, 0.7)
    with pytest.raises(TypeError, match='sequence of regular expressions'):
        optim_rules.no_decay_rule(r'.*pos_embed')
    with pytest.raises(ValueError, match=r"bad pattern '\(unclosed'"):
        optim_rules.no_decay_rule(['(unclosed'])
