"""Tests for tools/convert_checkpoint.py and tools/name_maps.py.

The torchvision input is a real torch file: golden/torchvision_tiny_maskrcnn.pth,
written by torch.save in tools/make_golden.py from a tiny torchvision MaskRCNN
(ResNet-50 layout at width 1, FPN 4, box head 8, mask head 4, 2 classes) whose
tensors random_weights.py drew with seed 1. torch is not needed to read it.
The Detectron2 inputs are pickles laid out like the model zoo's, written here.
"""

import json
import logging
import pathlib
import pickle
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import trainer
from projects.maskrcnn.modeling import layers, specs
from projects.maskrcnn.modeling.detector import MaskRCNN
from projects.maskrcnn.modeling.heads.bbox_head import BoxHead
from projects.maskrcnn.tools import convert_checkpoint as cc
from projects.maskrcnn.tools import random_weights
from tests.tools.legacy_pickles import python2_pickle

TINY_PTH = pathlib.Path(__file__).parent / 'golden' / 'torchvision_tiny_maskrcnn.pth'
TINY_SEED = 1


def tiny_model(num_classes=2, norm='frozen_bn'):
    return MaskRCNN(num_classes=num_classes,
                    backbone=specs.BackboneSpec(depth=50, width=1, norm=norm),
                    fpn=specs.FPNSpec(channels=4), box_head=specs.BoxHeadSpec(fc_dim=8),
                    mask_head=specs.MaskHeadSpec(conv_dim=4))


def init_shapes(model):
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                          jnp.array([[64, 64]]))


def init_variables(model):
    """Zero-filled variables of the model's shapes (the values a load replaces)."""
    return jax.tree_util.tree_map(lambda s: jnp.full(s.shape, -7.0, s.dtype), init_shapes(model))


def shapes_of(tree):
    return jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), dict(tree))


@pytest.fixture(scope='module')
def tv_state():
    state, _ = cc.read_source(str(TINY_PTH), 'torchvision')
    return state


def _flat(tree):
    return flax.traverse_util.flatten_dict(dict(tree))


# ----------------------------------------------------------------------------
# torchvision
# ----------------------------------------------------------------------------

def test_torch_file_holds_the_seeded_weights(tv_state):
    expected = random_weights.random_state_dict(
        [(k, v.shape) for k, v in tv_state.items()], TINY_SEED)
    assert len(tv_state) == 307  # every variable of the tiny Detectax model
    for name, value in expected.items():
        np.testing.assert_array_equal(tv_state[name], value, err_msg=name)


def test_torchvision_conversion_fills_every_variable_of_the_model(tv_state):
    conversion = cc.convert(tv_state, 'torchvision')
    assert conversion.unused == [] and conversion.ignored == []
    assert shapes_of(conversion.variables) == shapes_of(init_shapes(tiny_model()))
    assert len(conversion.loaded) == len(tv_state)
    assert conversion.loaded['backbone.body.layer3.2.bn3.running_var'] == \
        'frozen/body/res4_block2/norm3/var'
    assert conversion.loaded['roi_heads.box_head.fc6.weight'] == 'params/box_predictor/fc1/kernel'


def test_cli_checkpoint_loads_through_init_from(tv_state, tmp_path):
    out = tmp_path / 'converted'
    assert cc.main(['--source=torchvision', str(TINY_PTH), str(out)]) == 0
    report = json.loads((out / 'conversion.json').read_text())
    assert report['unused'] == [] and report['source'] == 'torchvision'
    conversion = cc.convert(tv_state, 'torchvision')
    for norm in ('frozen_bn', 'bn'):  # both batch-norm layouts load
        variables = dict(init_variables(tiny_model(norm=norm)))
        params = variables.pop('params')
        params, state = trainer.load_init_checkpoint(str(out), params, variables)
        loaded = _flat({'params': params, **state})
        assert not any(np.all(np.asarray(v) == -7.0) for v in loaded.values()), norm
        if norm == 'frozen_bn':
            expected = _flat(conversion.variables)
            assert set(loaded) == set(expected)
            for key, value in expected.items():
                np.testing.assert_array_equal(loaded[key], value, err_msg='/'.join(key))


def test_existing_output_directory_is_refused(tmp_path):
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        cc.main(['--source=torchvision', str(TINY_PTH), str(tmp_path)])


def _numpy_conv_oihw(x_chw, w_oihw, b):
    """Same-padded stride-1 convolution as torch computes it (cross-correlation)."""
    o, _, k, _ = w_oihw.shape
    pad = k // 2
    xp = np.pad(x_chw, ((0, 0), (pad, pad), (pad, pad)))
    h, w = x_chw.shape[1:]
    out = np.zeros((o, h, w))
    for dy in range(k):
        for dx in range(k):
            out += np.einsum('oc,chw->ohw', w_oihw[:, :, dy, dx], xp[:, dy:dy + h, dx:dx + w])
    return out + b[:, None, None]


def test_converted_layouts_compute_what_torch_computes(tv_state):
    params = cc.convert(tv_state, 'torchvision').variables['params']
    rng = np.random.default_rng(0)
    # A 3x3 convolution (RPN head): OIHW -> HWIO.
    x = rng.normal(size=(4, 6, 5)).astype(np.float32)
    p = params['rpn_head']['conv0']
    ours = layers.conv(4, 3, use_bias=True).apply({'params': p}, x.transpose(1, 2, 0)[None])[0]
    torch_like = _numpy_conv_oihw(x, tv_state['rpn.head.conv.0.0.weight'],
                                  tv_state['rpn.head.conv.0.0.bias'])
    np.testing.assert_allclose(ours, torch_like.transpose(1, 2, 0), rtol=1e-5, atol=1e-5)
    # The first box-head FC: torch flattens pooled features as (C, H, W).
    pooled = rng.normal(size=(4, 7, 7)).astype(np.float32)
    logits, deltas = BoxHead(2, fc_dim=8).apply({'params': params['box_predictor']},
                                                pooled.transpose(1, 2, 0)[None])
    relu = lambda v: np.maximum(v, 0)
    h = relu(tv_state['roi_heads.box_head.fc6.weight'] @ pooled.reshape(-1)
             + tv_state['roi_heads.box_head.fc6.bias'])
    h = relu(tv_state['roi_heads.box_head.fc7.weight'] @ h + tv_state['roi_heads.box_head.fc7.bias'])
    cls = tv_state['roi_heads.box_predictor.cls_score.weight'] @ h \
        + tv_state['roi_heads.box_predictor.cls_score.bias']
    box = tv_state['roi_heads.box_predictor.bbox_pred.weight'] @ h \
        + tv_state['roi_heads.box_predictor.bbox_pred.bias']
    np.testing.assert_allclose(logits[0], cls, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(deltas[0], box.reshape(3, 4)[1:], rtol=1e-5, atol=1e-5)
    # The mask head's 2x2 stride-2 transposed conv: weight [in, out, kh, kw].
    x = rng.normal(size=(4, 3, 5)).astype(np.float32)
    w = tv_state['roi_heads.mask_predictor.conv5_mask.weight']
    b = tv_state['roi_heads.mask_predictor.conv5_mask.bias']
    ours = layers.Upsample2xConv(4).apply({'params': params['mask_predictor']['deconv']},
                                          x.transpose(1, 2, 0)[None])[0]
    torch_like = np.zeros((4, 6, 10))
    for a in range(2):
        for c in range(2):
            torch_like[:, a::2, c::2] = np.einsum('ihw,io->ohw', x, w[:, :, a, c])
    np.testing.assert_allclose(ours, (torch_like + b[:, None, None]).transpose(1, 2, 0),
                               rtol=1e-5, atol=1e-5)


def _heads_only(num_outputs: int) -> dict[str, np.ndarray]:
    """Class heads whose rows hold their own index, to follow them through."""
    rows = lambda n, width: np.repeat(np.arange(n, dtype=np.float32)[:, None], width, 1)
    return {'roi_heads.box_predictor.cls_score.weight': rows(num_outputs, 8),
            'roi_heads.box_predictor.cls_score.bias': np.arange(num_outputs, dtype=np.float32),
            'roi_heads.box_predictor.bbox_pred.weight': rows(4 * num_outputs, 8),
            'roi_heads.mask_predictor.mask_fcn_logits.weight': rows(num_outputs, 4)[..., None, None],
            'roi_heads.mask_predictor.mask_fcn_logits.bias': np.arange(num_outputs, dtype=np.float32)}


def test_torchvision_coco_heads_keep_the_80_categories_in_id_order():
    params = cc.convert(_heads_only(91), 'torchvision').variables['params']
    ids = np.array(cc.COCO_CATEGORY_IDS)
    assert len(ids) == 80 and ids[-1] == 90 and 12 not in ids
    np.testing.assert_array_equal(params['box_predictor']['cls_score']['kernel'][0],
                                  np.concatenate([[0], ids]))
    np.testing.assert_array_equal(params['box_predictor']['cls_score']['bias'],
                                  np.concatenate([[0], ids]))
    np.testing.assert_array_equal(params['box_predictor']['bbox_pred']['kernel'][0],
                                  (4 * ids[:, None] + np.arange(4)).reshape(-1))
    np.testing.assert_array_equal(params['mask_predictor']['predictor']['kernel'][0, 0, 0], ids)
    every = cc.convert(_heads_only(91), 'torchvision', all_classes=True).variables['params']
    np.testing.assert_array_equal(every['mask_predictor']['predictor']['bias'], np.arange(1, 91))


def test_published_torchvision_names_convert_like_current_ones(tv_state):
    old = {}
    for name, value in tv_state.items():
        name = re.sub(r'^rpn\.head\.conv\.0\.0\.', 'rpn.head.conv.', name)
        name = re.sub(r'^(backbone\.fpn\.\w+_blocks\.\d)\.0\.', r'\1.', name)
        name = re.sub(r'^roi_heads\.mask_head\.(\d)\.0\.',
                      lambda m: f'roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.', name)
        old[name] = value
    assert 'rpn.head.conv.weight' in old and 'roi_heads.mask_head.mask_fcn4.bias' in old
    a, b = cc.convert(tv_state, 'torchvision'), cc.convert(old, 'torchvision')
    assert b.unused == []
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, b.variables)


def test_imagenet_resnet_loads_as_the_backbone_only(tv_state, tmp_path, caplog):
    body = {k[len('backbone.body.'):]: v for k, v in tv_state.items()
            if k.startswith('backbone.body.')}
    body['fc.weight'], body['fc.bias'] = np.ones((10, 32), np.float32), np.ones(10, np.float32)
    conversion = cc.convert(body, 'torchvision')
    assert conversion.unused == ['fc.bias', 'fc.weight']
    assert set(conversion.variables['params']) == {'body'}
    cc.save(conversion, str(tmp_path / 'backbone'))
    variables = dict(init_variables(tiny_model()))
    params = variables.pop('params')
    with caplog.at_level(logging.INFO):
        params, state = trainer.load_init_checkpoint(str(tmp_path / 'backbone'), params, variables)
    np.testing.assert_array_equal(params['body']['stem_conv']['kernel'],
                                  tv_state['backbone.body.conv1.weight'].transpose(2, 3, 1, 0))
    assert np.all(np.asarray(params['neck']['output_c2']['kernel']) == -7.0)  # kept at init
    assert np.all(np.asarray(state['frozen']['body']['res5_block2']['norm3']['var'])
                  == tv_state['backbone.body.layer4.2.bn3.running_var'])


def test_heads_of_another_num_classes_are_skipped_and_listed(tv_state, tmp_path, caplog):
    cc.save(cc.convert(tv_state, 'torchvision'), str(tmp_path / 'ckpt'))
    variables = dict(init_variables(tiny_model(num_classes=4)))
    params = variables.pop('params')
    with caplog.at_level(logging.INFO):
        params, _ = trainer.load_init_checkpoint(str(tmp_path / 'ckpt'), params, variables)
    for head in (params['box_predictor']['cls_score'], params['box_predictor']['bbox_pred'],
                 params['mask_predictor']['predictor']):
        assert all(np.all(np.asarray(v) == -7.0) for v in head.values())
    assert not np.any(np.asarray(params['box_predictor']['fc2']['kernel']) == -7.0)
    assert 'params/box_predictor/cls_score/kernel' in caplog.text


# ----------------------------------------------------------------------------
# Detectron2
# ----------------------------------------------------------------------------

_TV_TO_D2 = [
    (r'backbone\.body\.conv1\.', 'backbone.bottom_up.stem.conv1.'),
    (r'backbone\.body\.bn1\.', 'backbone.bottom_up.stem.conv1.norm.'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.conv(\d)\.',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.bn(\d)\.',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.conv{m[3]}.norm.'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.downsample\.0\.',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.'),
    (r'backbone\.body\.layer(\d)\.(\d+)\.downsample\.1\.',
     lambda m: f'backbone.bottom_up.res{int(m[1]) + 1}.{m[2]}.shortcut.norm.'),
    (r'backbone\.fpn\.inner_blocks\.(\d)\.0\.', lambda m: f'backbone.fpn_lateral{int(m[1]) + 2}.'),
    (r'backbone\.fpn\.layer_blocks\.(\d)\.0\.', lambda m: f'backbone.fpn_output{int(m[1]) + 2}.'),
    (r'rpn\.head\.conv\.0\.0\.', 'proposal_generator.rpn_head.conv.'),
    (r'rpn\.head\.cls_logits\.', 'proposal_generator.rpn_head.objectness_logits.'),
    (r'rpn\.head\.bbox_pred\.', 'proposal_generator.rpn_head.anchor_deltas.'),
    (r'roi_heads\.box_head\.fc6\.', 'roi_heads.box_head.fc1.'),
    (r'roi_heads\.box_head\.fc7\.', 'roi_heads.box_head.fc2.'),
    (r'roi_heads\.mask_head\.(\d)\.0\.', lambda m: f'roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.'),
    (r'roi_heads\.mask_predictor\.conv5_mask\.', 'roi_heads.mask_head.deconv.'),
    (r'roi_heads\.mask_predictor\.mask_fcn_logits\.', 'roi_heads.mask_head.predictor.'),
]


def detectron2_layout(tv_state):
    """The same weights as a Detectron2 model-zoo state dict (names from
    detectron2/modeling): background last in cls_score, no background rows in
    bbox_pred and the mask predictor, the first conv taking BGR."""
    out = {'pixel_mean': np.zeros((3, 1, 1), np.float32)}
    for name, value in tv_state.items():
        new = name
        for pattern, repl in _TV_TO_D2:
            new = re.sub('^' + pattern, repl, new)
        if new.startswith('roi_heads.box_predictor.cls_score.'):
            value = np.concatenate([value[1:], value[:1]])
        elif new.startswith('roi_heads.box_predictor.bbox_pred.'):
            value = value[4:]
        elif new.startswith('roi_heads.mask_head.predictor.'):
            value = value[1:]
        elif new == 'backbone.bottom_up.stem.conv1.weight':
            value = value[:, ::-1]
        out[new] = np.ascontiguousarray(value)
    return out


def test_detectron2_model_zoo_pickle_converts_like_the_torchvision_file(tv_state, tmp_path):
    path = tmp_path / 'model_final.pkl'
    path.write_bytes(pickle.dumps({'model': detectron2_layout(tv_state),
                                   '__author__': 'Detectron2 Model Zoo',
                                   'matching_heuristics': True}, protocol=4))
    assert cc.main(['--source=detectron2', str(path), str(tmp_path / 'out')]) == 0
    report = json.loads((tmp_path / 'out' / 'conversion.json').read_text())
    assert report['unused'] == [] and report['ignored'] == ['pixel_mean']
    assert any('BGR' in note for note in report['notes'])
    state, meta = cc.read_source(str(path), 'detectron2')
    ours = cc.convert(state, 'detectron2', reverse_input_channels=True).variables
    reference = cc.convert(tv_state, 'torchvision').variables
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, reference)


def test_caffe2_backbone_pickle_loads_as_the_backbone(tv_state, tmp_path):
    """R-50.pkl layout: Python 2 pickle, `res2_0_branch2a_w`, batch norm folded
    into `_bn_s` / `_bn_b`, the ImageNet classifier `pred_w` / `pred_b`."""
    branches = {'conv1': '2a', 'conv2': '2b', 'conv3': '2c'}
    c2 = {'pred_w': np.ones((10, 32), np.float32), 'pred_b': np.ones(10, np.float32)}
    eps = 1e-5
    for name, value in tv_state.items():
        m = re.fullmatch(r'backbone\.body\.(?:layer(\d)\.(\d+)\.)?(conv\d|bn\d|downsample\.\d)\.'
                         r'(weight|bias|running_mean|running_var)', name)
        if not m:
            continue
        stage, block, layer, leaf = m.groups()
        prefix = 'res_conv1' if stage is None else f'res{int(stage) + 1}_{block}_branch'
        if layer.startswith('conv') or layer == 'downsample.0':
            key = 'conv1_w' if stage is None else \
                f'{prefix}{branches.get(layer, "1")}_w'
            c2[key] = value
        elif leaf == 'weight':
            conv = 'conv' + layer[-1] if layer.startswith('bn') else 'downsample'
            base = name.rsplit('.', 1)[0]
            scale = value / np.sqrt(tv_state[base + '.running_var'] + eps)
            bias = tv_state[base + '.bias'] - tv_state[base + '.running_mean'] * scale
            tag = '' if stage is None else branches.get(conv, '1')
            c2[f'{prefix}{tag}_bn_s'] = scale.astype(np.float32)
            c2[f'{prefix}{tag}_bn_b'] = bias.astype(np.float32)
    assert 'res4_5_branch2c_bn_s' in c2 and 'res_conv1_bn_b' in c2
    path = tmp_path / 'R-50.pkl'
    path.write_bytes(python2_pickle(c2))
    state, meta = cc.read_source(str(path), 'detectron2')
    conversion = cc.convert(state, 'detectron2')
    assert conversion.unused == ['pred_b', 'pred_w']
    frozen = conversion.variables['frozen']['body']
    assert shapes_of(frozen) == shapes_of(init_shapes(tiny_model())['frozen']['body'])
    norm = frozen['res3_block1']['norm2']
    np.testing.assert_array_equal(norm['mean'], 0.0)
    np.testing.assert_array_equal(norm['var'], 1.0)
    np.testing.assert_array_equal(norm['scale'], c2['res3_1_branch2b_bn_s'])
    np.testing.assert_array_equal(conversion.variables['params']['body']['stem_conv']['kernel'],
                                  c2['conv1_w'].transpose(2, 3, 1, 0))
