"""The ViTDet-B/L/H configs: Detectron2's parameter counts, layer-wise lr multipliers,
weight-decay mask and schedule, on the real configs (shapes only, jax.eval_shape)."""

import functools
import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import optim, optim_rules
from projects.maskrcnn.model import MaskRCNNModel

CONFIGS = {'B': 'maskrcnn_vitdet_b_100ep_coco', 'L': 'maskrcnn_vitdet_l_100ep_coco',
           'H': 'maskrcnn_vitdet_h_75ep_coco'}
# width, depth, heads, number of global blocks, layer-wise decay (Detectron2's ViTDet
# COCO configs).
SIZES = {'B': (768, 12, 12, 4, 0.7), 'L': (1024, 24, 16, 4, 0.8), 'H': (1280, 32, 16, 4, 0.9)}
NUM_CLASSES = 80


def _conv(cin, cout, k, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def detectron2_param_count(size: str) -> dict[str, int]:
    """Parameters of Detectron2's ViTDet Mask R-CNN, from its layer list:
    ViT trunk, SimpleFeaturePyramid (LN), 2-conv RPN, 4conv1fc box head (LN), the box
    predictor and the 4-conv mask head (LN) with its deconv and predictor."""
    c, depth, heads, n_global, _ = SIZES[size]
    block = (2 * c + _conv(c, 3 * c, 1) + _conv(c, c, 1) + 2 * c
             + _conv(c, 4 * c, 1) + _conv(4 * c, c, 1))
    rel_pos = 2 * (c // heads) * ((depth - n_global) * (2 * 14 - 1) + n_global * (2 * 64 - 1))
    trunk = _conv(3, c, 16) + (1 + 14 * 14) * c + depth * block + rel_pos
    ln, f = 2 * 256, 256
    out = lambda cin: _conv(cin, f, 1, False) + ln + _conv(f, f, 3, False) + ln
    simfp = (_conv(c, c // 2, 2) + c + _conv(c // 2, c // 4, 2) + out(c // 4)   # P2
             + _conv(c, c // 2, 2) + out(c // 2)                                # P3
             + out(c) + out(c))                                                 # P4, P5
    rpn = 2 * _conv(f, f, 3) + _conv(f, 3, 1) + _conv(f, 12, 1)
    box = 4 * (_conv(f, f, 3, False) + ln) + f * 7 * 7 * 1024 + 1024
    predictor = (1024 + 1) * (NUM_CLASSES + 1) + (1024 + 1) * 4 * NUM_CLASSES
    mask = 4 * (_conv(f, f, 3, False) + ln) + _conv(f, f, 2) + _conv(f, NUM_CLASSES, 1)
    return {'body': trunk, 'neck': simfp, 'rpn_head': rpn,
            'box_predictor': box + predictor, 'mask_predictor': mask}


@functools.cache
def _config_and_params(size):
    config = importlib.import_module(f'configs.{CONFIGS[size]}').get_config()
    model = MaskRCNNModel(config, {'num_classes': NUM_CLASSES}).flax_model
    # Parameter shapes do not depend on the input size: trace at 64x64.
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 64, 64, 3)),
                                                  jnp.array([[64, 64]])))
    return config, variables['params']


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('size', ['B', 'L', 'H'])
def test_parameter_count_equals_detectron2s(size):
    _, params = _config_and_params(size)
    expected = detectron2_param_count(size)
    assert {k: _count(params[k]) for k in expected} == expected
    assert set(params) == set(expected)


def test_vit_b_trunk_is_85_9_million():
    assert round(detectron2_param_count('B')['body'] / 1e6, 1) == 85.9


# Named parameters: (path, layer id) with depth + 1 for everything outside the trunk.
def _named(depth):
    return {'body/patch_embed/proj/kernel': 0, 'body/pos_embed': 0,
            'body/blocks_0/attn/qkv/kernel': 1,
            f'body/blocks_{depth - 1}/mlp/fc2/bias': depth,
            'neck/simfp_2_4_norm/scale': depth + 1,
            'box_predictor/conv1/kernel': depth + 1, 'rpn_head/conv0/kernel': depth + 1}


@pytest.mark.parametrize('size', ['B', 'L', 'H'])
def test_layerwise_lr_multipliers(size):
    config, params = _config_and_params(size)
    _, depth, _, _, decay = SIZES[size]
    assert config.optimizer_configs.layerwise_decay == decay
    scales = flax.traverse_util.flatten_dict(
        optim_rules.layerwise_lr_scales(params, config.optimizer_configs.layerwise_decay),
        sep='/')
    for path, layer in _named(depth).items():
        assert scales[path] == pytest.approx(decay ** (depth + 1 - layer)), path
    if size == 'B':
        assert scales['body/patch_embed/proj/bias'] == pytest.approx(0.0097, abs=1e-4)


@pytest.mark.parametrize('size', ['B', 'L', 'H'])
def test_weight_decay_mask(size):
    config, params = _config_and_params(size)
    labels = flax.traverse_util.flatten_dict(
        optim.parameter_labels(params, (), config.optimizer_configs.no_weight_decay), sep='/')
    exempt = size != 'H'   # ViT-H decays everything
    for path in ('body/blocks_3/norm1/scale', 'body/blocks_3/norm2/bias', 'body/pos_embed'):
        assert labels[path] == ('no_decay' if exempt else 'decay'), path
    for path in ('body/blocks_3/attn/rel_pos_h', 'body/blocks_3/attn/qkv/bias',
                 'neck/simfp_2_1/scale', 'neck/simfp_5_2_norm/bias', 'box_predictor/norm4/scale',
                 'mask_predictor/norm1/bias', 'rpn_head/conv1/bias'):
        assert labels[path] == 'decay', path
    assert 'frozen' not in labels.values()


@pytest.mark.parametrize('size', ['B', 'L', 'H'])
def test_recipe(size):
    config, _ = _config_and_params(size)
    steps, decays = ((138_281, (122_916, 133_159)) if size == 'H'
                     else (184_375, (163_889, 177_546)))
    assert config.num_training_steps == steps and tuple(config.lr_configs.decay_steps) == decays
    assert config.batch_size == 64
    schedule = optim.learning_rate_schedule(config.lr_configs)
    np.testing.assert_allclose(float(schedule(0)), 1e-7, rtol=1e-4)
    np.testing.assert_allclose(float(schedule(1000)), 1e-4, rtol=1e-4)
    np.testing.assert_allclose(float(schedule(decays[1] + 1)), 1e-6, rtol=1e-4)
    o, d, m = config.optimizer_configs, config.dataset_configs, config.model
    assert (o.optimizer, o.weight_decay, o.grad_clip_norm) == ('adamw', 0.1, None)
    assert d.large_scale_jitter and d.horizontal_flip and tuple(d.image_size) == (1024, 1024)
    assert d.channel_order == 'RGB' and tuple(d.pixel_std) == (58.395, 57.12, 57.375)
    assert (m.rpn.num_convs, m.box_head.num_convs, m.box_head.num_fc, m.box_head.norm,
            m.mask_head.num_convs, m.mask_head.norm) == (2, 4, 1, 'ln', 4, 'ln')
    assert m.backbone.drop_path_rate == {'B': 0.1, 'L': 0.4, 'H': 0.5}[size]
