"""Detectron2's R50-FPN LSJ Mask R-CNN (`new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ`)
converts onto configs/maskrcnn_r50_fpn_lsj_100ep_coco.py.

The pickle written here holds the tensors Detectron2 names for that model, read off
detectron2/modeling: ResNet-50 and FPN with norm='SyncBN' (`layers/wrappers.py`'s
Conv2d keeps its norm as `.norm`, and a normed conv has no bias), StandardRPNHead with
conv_dims [-1, -1] (`conv.conv0`, `conv.conv1`), FastRCNNConvFCHead "4conv1fc" and
MaskRCNNConvUpsampleHead with NaiveSyncBatchNorm conv norms; BatchNorm2d's
`num_batches_tracked` and the model's `pixel_mean` / `pixel_std` too. Widths are tiny;
the model is the LSJ config with the same widths. The box head's convs get another
width than the FPN, so that fc1's input channels must come from the convs.
"""

import functools
import json
import pickle
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import maskrcnn_r50_fpn_lsj_100ep_coco
from projects.maskrcnn import checkpoint_io, trainer
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.tools import convert_checkpoint as cc
from tests import run_utils

WIDTH, FPN, BOX_CONV, FC, MASK_CONV, K = 1, 4, 6, 8, 5, 2
BLOCKS = (3, 4, 6, 3)  # ResNet-50, res2..res5
EPS = 1e-5             # Detectron2's BatchNorm epsilon


def lsj_config():
    config = maskrcnn_r50_fpn_lsj_100ep_coco.get_config()
    m = config.model
    m.backbone.width = WIDTH
    m.neck.channels = FPN
    m.box_head.conv_dim = BOX_CONV
    m.box_head.fc_dim = FC
    m.mask_head.conv_dim = MASK_CONV
    return config


def lsj_model(dtype: str | None = None) -> MaskRCNNModel:
    """The LSJ config's detector at this file's widths (in `dtype` if given; the
    config's own is bfloat16)."""
    config = lsj_config()
    if dtype:
        config.dtype = dtype
    meta = {'num_classes': K, 'input_shape': (-1, 64, 64, 3), 'max_instances': 4,
            'gt_mask_size': 14}
    return MaskRCNNModel(config, meta)


def init_shapes(model):
    init = functools.partial(trainer.init_variables, model, meta=model.dataset_meta_data)
    return jax.eval_shape(init, jax.random.PRNGKey(0))


class _Writer:
    """Draws the tensors of one Detectron2 state dict, in torch layouts."""

    def __init__(self, seed=0):
        self.rng, self.state = np.random.default_rng(seed), {}

    def put(self, name, *shape, low=-1.0, high=1.0):
        self.state[name] = self.rng.uniform(low, high, shape).astype(np.float32)

    def conv(self, prefix, out, inp, k, norm=True):
        self.put(f'{prefix}.weight', out, inp, k, k, low=-0.5, high=0.5)
        if not norm:
            self.put(f'{prefix}.bias', out)
            return
        self.put(f'{prefix}.norm.weight', out, low=0.5, high=1.5)
        self.put(f'{prefix}.norm.bias', out)
        self.put(f'{prefix}.norm.running_mean', out)
        self.put(f'{prefix}.norm.running_var', out, low=0.5, high=2.0)
        self.state[f'{prefix}.norm.num_batches_tracked'] = np.array(184375, np.int64)


def detectron2_lsj_state(seed=0, width=WIDTH, fpn=FPN, box_conv=BOX_CONV, fc=FC,
                         mask_conv=MASK_CONV, num_classes=K) -> dict[str, np.ndarray]:
    """The R50 LSJ model's state dict at these widths (published: 64, 256, 256, 1024,
    256, 80)."""
    w = _Writer(seed)
    w.conv('backbone.bottom_up.stem.conv1', width, 3, 7)
    inp = width
    for stage, blocks in enumerate(BLOCKS, start=2):
        mid = width * 2 ** (stage - 2)
        for b in range(blocks):
            p = f'backbone.bottom_up.res{stage}.{b}'
            if b == 0:
                w.conv(f'{p}.shortcut', 4 * mid, inp, 1)
            w.conv(f'{p}.conv1', mid, inp, 1)
            w.conv(f'{p}.conv2', mid, mid, 3)
            w.conv(f'{p}.conv3', 4 * mid, mid, 1)
            inp = 4 * mid
        w.conv(f'backbone.fpn_lateral{stage}', fpn, inp, 1)
        w.conv(f'backbone.fpn_output{stage}', fpn, fpn, 3)
    for k in range(2):
        w.conv(f'proposal_generator.rpn_head.conv.conv{k}', fpn, fpn, 3, norm=False)
    w.conv('proposal_generator.rpn_head.objectness_logits', 3, fpn, 1, norm=False)
    w.conv('proposal_generator.rpn_head.anchor_deltas', 12, fpn, 1, norm=False)
    for k in range(1, 5):
        w.conv(f'roi_heads.box_head.conv{k}', box_conv, fpn if k == 1 else box_conv, 3)
        w.conv(f'roi_heads.mask_head.mask_fcn{k}', mask_conv, fpn if k == 1 else mask_conv, 3)
    w.put('roi_heads.box_head.fc1.weight', fc, box_conv * 7 * 7, low=-0.2, high=0.2)
    w.put('roi_heads.box_head.fc1.bias', fc)
    w.put('roi_heads.box_predictor.cls_score.weight', num_classes + 1, fc)  # background last
    w.put('roi_heads.box_predictor.cls_score.bias', num_classes + 1)
    w.put('roi_heads.box_predictor.bbox_pred.weight', 4 * num_classes, fc)
    w.put('roi_heads.box_predictor.bbox_pred.bias', 4 * num_classes)
    w.put('roi_heads.mask_head.deconv.weight', mask_conv, mask_conv, 2, 2)  # [in, out, kh, kw]
    w.put('roi_heads.mask_head.deconv.bias', mask_conv)
    w.conv('roi_heads.mask_head.predictor', num_classes, mask_conv, 1, norm=False)
    w.state['pixel_mean'] = np.array([103.53, 116.28, 123.675], np.float32).reshape(3, 1, 1)
    w.state['pixel_std'] = np.ones((3, 1, 1), np.float32)
    return w.state


@pytest.fixture(scope='module')
def d2_state():
    return detectron2_lsj_state()


@pytest.fixture(scope='module')
def converted(d2_state, tmp_path_factory):
    """The pickle converted by the command line, and its report."""
    tmp = tmp_path_factory.mktemp('lsj')
    path, out = tmp / 'model_final.pkl', tmp / 'converted'
    path.write_bytes(pickle.dumps({'model': d2_state, '__author__': 'Detectron2 Model Zoo',
                                   'matching_heuristics': True}, protocol=4))
    command = [sys.executable, '-m', 'projects.maskrcnn.tools.convert_checkpoint',
               '--source=detectron2', '--model_input=bgr', str(path), str(out)]
    code, output = run_utils.run(command, run_utils.subprocess_env())
    assert code == 0, output[-3000:]
    return out, output, json.loads((out / 'conversion.json').read_text())


def _flat(tree):
    return flax.traverse_util.flatten_dict(dict(tree), sep='/')


def test_every_source_tensor_lands(d2_state, converted):
    _, output, report = converted
    assert 'unused' not in output and report['unused'] == [], report['unused']
    ignored = sorted(n for n in d2_state if n.endswith('num_batches_tracked')) + \
        ['pixel_mean', 'pixel_std']
    assert report['ignored'] == sorted(ignored)
    assert set(report['loaded']) == set(d2_state) - set(ignored)
    assert "first conv kept in BGR order" in output


def test_converted_tree_is_the_lsj_models(converted):
    """Same names and shapes as `init` for params and batch_stats, and every array of the
    model is filled from the file by `init_from`."""
    out, _, _ = converted
    restored = checkpoint_io.restore(checkpoint_io.locate(str(out)))
    shapes = init_shapes(lsj_model())
    assert set(shapes) == {'params', 'batch_stats'}  # SyncBN everywhere: nothing frozen
    shape_of = lambda tree: {k: tuple(np.shape(v)) for k, v in _flat(tree).items()}
    assert shape_of(restored['params']) == shape_of(shapes['params'])
    assert shape_of(restored['model_state']['batch_stats']) == shape_of(shapes['batch_stats'])
    filled = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, -7.0, s.dtype), shapes)
    params, state = trainer.load_init_checkpoint(str(out), filled['params'],
                                                 {'batch_stats': filled['batch_stats']})
    loaded = _flat({'params': params, **state})
    assert len(loaded) == len(_flat(shapes))
    left = [k for k, v in loaded.items() if np.any(np.asarray(v) == -7.0)]
    assert left == []


def _fc1_rows(channels: int, side: int = 7) -> np.ndarray:
    """Column of Detectron2's fc1 weight (input flattened as C, H, W) for each row of
    ours (input flattened as H, W, C)."""
    y, x, c = np.unravel_index(np.arange(side * side * channels), (side, side, channels))
    return np.ravel_multi_index((c, y, x), (channels, side, side))


def test_each_kind_lands_in_its_layout(d2_state, converted):
    out, _, report = converted
    restored = checkpoint_io.restore(checkpoint_io.locate(str(out)))
    ours = _flat({'params': restored['params'],
                  'batch_stats': restored['model_state']['batch_stats']})
    hwio = lambda a: a.transpose(2, 3, 1, 0)
    d2 = d2_state
    expected = {
        # FPN norm (SyncBN after the lateral and output convs)
        'params/neck/lateral_norm_c3/scale': d2['backbone.fpn_lateral3.norm.weight'],
        'batch_stats/neck/output_norm_c5/var': d2['backbone.fpn_output5.norm.running_var'],
        'params/neck/lateral_c4/kernel': hwio(d2['backbone.fpn_lateral4.weight']),
        # 2-conv RPN
        'params/rpn_head/conv1/kernel': hwio(d2['proposal_generator.rpn_head.conv.conv1.weight']),
        'params/rpn_head/conv1/bias': d2['proposal_generator.rpn_head.conv.conv1.bias'],
        # box head convs and their norms
        'params/box_predictor/conv2/kernel': hwio(d2['roi_heads.box_head.conv2.weight']),
        'params/box_predictor/norm3/bias': d2['roi_heads.box_head.conv3.norm.bias'],
        'batch_stats/box_predictor/norm4/mean': d2['roi_heads.box_head.conv4.norm.running_mean'],
        # fc1 after the convs: rows of the (C, 7, 7) flattening reordered to (7, 7, C)
        'params/box_predictor/fc1/kernel': d2['roi_heads.box_head.fc1.weight'][
            :, _fc1_rows(BOX_CONV)].T,
        # mask head norms
        'params/mask_predictor/norm2/scale': d2['roi_heads.mask_head.mask_fcn2.norm.weight'],
        'batch_stats/mask_predictor/norm1/var': d2['roi_heads.mask_head.mask_fcn1.norm.running_var'],
        # SyncBN running statistics of the stem and the res blocks
        'batch_stats/body/stem_norm/mean': d2['backbone.bottom_up.stem.conv1.norm.running_mean'],
        'batch_stats/body/res4_block3/norm2/var':
            d2['backbone.bottom_up.res4.3.conv2.norm.running_var'],
        'batch_stats/body/res2_block0/shortcut_norm/mean':
            d2['backbone.bottom_up.res2.0.shortcut.norm.running_mean'],
        # --model_input=bgr: the first conv keeps Detectron2's BGR input channels
        'params/body/stem_conv/kernel': hwio(d2['backbone.bottom_up.stem.conv1.weight']),
    }
    for key, value in expected.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)
    # Batch norm, whole (all four vectors as one frozen norm, which the checkpoint also
    # splits into params and batch_stats): not the LayerNorm of ViTDet's heads.
    for leaf, ours_leaf in (('weight', 'scale'), ('running_var', 'var')):
        for name, module in (('box_head.conv3', 'box_predictor/norm3'),
                             ('mask_head.mask_fcn4', 'mask_predictor/norm4')):
            assert report['loaded'][f'roi_heads.{name}.norm.{leaf}'] == \
                f'frozen/{module}/{ours_leaf}'


def test_default_reverses_the_first_conv_for_rgb_configs(d2_state):
    kernel = cc.convert(d2_state, 'detectron2', reverse_input_channels=True).variables[
        'params']['body']['stem_conv']['kernel']
    np.testing.assert_array_equal(
        kernel, d2_state['backbone.bottom_up.stem.conv1.weight'][:, ::-1].transpose(2, 3, 1, 0))


def _conv_nchw(x, w):
    """Same-padded stride-1 cross-correlation, [N, C, H, W] * [O, C, k, k]."""
    pad = w.shape[-1] // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    h, wd = x.shape[2:]
    return sum(np.einsum('oc,nchw->nohw', w[:, :, dy, dx], xp[:, :, dy:dy + h, dx:dx + wd])
               for dy in range(w.shape[2]) for dx in range(w.shape[3]))


def detectron2_box_head(d2, pooled_nchw):
    """Detectron2's 4conv1fc head and predictor in eval mode, in numpy (NCHW)."""
    x = pooled_nchw.astype(np.float64)
    col = lambda v: v[None, :, None, None]
    for k in range(1, 5):
        p = f'roi_heads.box_head.conv{k}'
        x = _conv_nchw(x, d2[f'{p}.weight'])
        x = (x - col(d2[f'{p}.norm.running_mean'])) / np.sqrt(col(d2[f'{p}.norm.running_var']) + EPS)
        x = np.maximum(x * col(d2[f'{p}.norm.weight']) + col(d2[f'{p}.norm.bias']), 0)
    x = x.reshape(len(x), -1)  # torch's Flatten: (C, H, W) order
    h = np.maximum(x @ d2['roi_heads.box_head.fc1.weight'].T + d2['roi_heads.box_head.fc1.bias'], 0)
    cls = h @ d2['roi_heads.box_predictor.cls_score.weight'].T + \
        d2['roi_heads.box_predictor.cls_score.bias']
    box = h @ d2['roi_heads.box_predictor.bbox_pred.weight'].T + \
        d2['roi_heads.box_predictor.bbox_pred.bias']
    return cls, box


def test_box_head_on_converted_weights_computes_what_detectron2_computes(d2_state):
    """The fc1 flattening order matters: a forward pass of the LSJ model's box head on
    the converted weights against Detectron2's head in numpy."""
    variables = cc.convert(d2_state, 'detectron2').variables
    params, stats = cc.trainable_bn_layout(variables['frozen'])
    variables = {'params': cc._merge(variables['params'], params), 'batch_stats': stats}
    pooled = np.random.default_rng(1).normal(size=(3, FPN, 7, 7)).astype(np.float32)
    logits, deltas = lsj_model('float32').flax_model.apply(
        variables, jnp.asarray(pooled.transpose(0, 2, 3, 1)),
        method=lambda m, x: m.box_predictor(x, train=False))
    cls, box = detectron2_box_head(d2_state, pooled)
    # Detectax puts background first, Detectron2 last.
    np.testing.assert_allclose(logits, np.concatenate([cls[:, -1:], cls[:, :-1]], 1),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(deltas, box.reshape(3, K, 4), rtol=1e-4, atol=1e-4)
