"""The configs for converted torchvision and Detectron2 weights: they pass the
config check, build, trace, and hold the conventions of their reference."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from projects.maskrcnn import config_check
from projects.maskrcnn.model import MaskRCNNModel

CONFIGS = ('maskrcnn_r50_fpn_torchvision_coco', 'maskrcnn_r50_fpn_1x_detectron2_coco',
           'maskrcnn_r50_fpn_3x_detectron2_coco', 'maskrcnn_r101_fpn_3x_detectron2_coco')


def _config(name):
    return importlib.import_module(f'configs.{name}').get_config()


def _num_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_and_traces(name):
    config = _config(name)
    config_check.check_config(config, 1)
    model = MaskRCNNModel(config, {'num_classes': 80}).flax_model
    images = jax.ShapeDtypeStruct((1, 256, 320, 3), jnp.float32)
    sizes = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, sizes)
    out = jax.eval_shape(model.apply, variables, images, sizes)
    assert out['detection_masks'].shape == (1, 100, 28, 28)
    depth = 101 if 'r101' in name else 50
    assert sum(1 for k in variables['params']['body'] if k.startswith('res4_')) == \
        {50: 6, 101: 23}[depth]


def test_torchvision_config_has_torchvisions_size_and_conventions():
    config = _config('maskrcnn_r50_fpn_torchvision_coco')
    m = config.model
    assert not m.backbone.stride_in_1x1 and m.anchors.round_cell_anchors
    assert (m.roi_heads.aligned, m.roi_heads.sampling_ratio, m.roi_heads.level_rule) == \
        (False, 2, 'torchvision')
    assert (m.rpn.min_box_size, m.test.min_box_size) == (1e-3, 1e-2)
    assert config.dataset_configs.pixel_std == (58.395, 57.12, 57.375)
    model = MaskRCNNModel(config, {'num_classes': 90}).flax_model
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                               jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.float32),
                               jax.ShapeDtypeStruct((1, 2), jnp.int32))
    # torchvision's model has 44,401,393 parameters; it also regresses boxes
    # (4 x 1025) and predicts a mask (257) for the background class.
    assert _num_params(variables['params']) == 44_401_393 - 4 * 1025 - 257


def test_detectron2_configs_have_detectron2s_conventions():
    one, three = _config(CONFIGS[1]), _config(CONFIGS[2])
    m = one.model
    assert m.backbone.stride_in_1x1 and not m.anchors.round_cell_anchors
    assert (m.roi_heads.aligned, m.roi_heads.sampling_ratio, m.roi_heads.level_rule) == \
        (True, 0, 'detectron2')
    assert one.dataset_configs.pixel_std == (1.0, 1.0, 1.0)
    assert one.num_training_steps == 90_000 and three.num_training_steps == 270_000
    assert tuple(three.lr_configs.decay_steps) == (210_000, 250_000)


def _detectron2_r50_lsj_counts(num_classes=80):
    """Parameters and SyncBN statistics of Detectron2's R50-FPN 100ep LSJ model, counted
    from its published layer list (configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py
    on configs/common/models/mask_rcnn_fpn.py), not from Detectax's modules.

    Convolutions followed by SyncBN have no bias; each SyncBN has a weight and a bias
    (trainable) and a running mean and variance (statistics). Layers, as (in, out,
    kernel, bias, syncbn):
    - ResNet-50: stem 7x7 3->64; stages res2..res5 of 3, 4, 6, 3 bottlenecks of width
      64, 128, 256, 512 (1x1 in->w, 3x3 w->w, 1x1 w->4w, and a 1x1 in->4w shortcut
      in each stage's first block), every conv with SyncBN;
    - FPN: 1x1 lateral c->256 and 3x3 output 256->256 on each of res2..res5, SyncBN;
      P6 is a max pool (no parameters);
    - RPN head: 2 x 3x3 256->256 with bias ("2conv"), 1x1 objectness 256->3 and 1x1
      deltas 256->12, with bias;
    - box head "4conv1fc": 4 x 3x3 256->256 with SyncBN, fc 256*7*7->1024;
      predictor: cls_score 1024->K+1, bbox_pred 1024->4K;
    - mask head: 4 x 3x3 256->256 with SyncBN, deconv 2x2 256->256 with bias,
      predictor 1x1 256->K with bias.
    """
    layers = [(3, 64, 7, False, True)]
    in_ch = 64
    for blocks, width in zip((3, 4, 6, 3), (64, 128, 256, 512)):
        for block in range(blocks):
            layers += [(in_ch, width, 1, False, True), (width, width, 3, False, True),
                       (width, 4 * width, 1, False, True)]
            if block == 0:
                layers.append((in_ch, 4 * width, 1, False, True))
            in_ch = 4 * width
    for c in (256, 512, 1024, 2048):
        layers += [(c, 256, 1, False, True), (256, 256, 3, False, True)]
    layers += [(256, 256, 3, True, False)] * 2 + [(256, 3, 1, True, False),
                                                  (256, 12, 1, True, False)]
    layers += [(256, 256, 3, False, True)] * 4 + [(256 * 7 * 7, 1024, 1, True, False),
                                                  (1024, num_classes + 1, 1, True, False),
                                                  (1024, 4 * num_classes, 1, True, False)]
    layers += [(256, 256, 3, False, True)] * 4 + [(256, 256, 2, True, False),
                                                  (256, num_classes, 1, True, False)]
    params = sum(i * o * k * k + (o if bias else 0) + (2 * o if bn else 0)
                 for i, o, k, bias, bn in layers)
    statistics = sum(2 * o for _, o, _, _, bn in layers if bn)
    return params, statistics


def test_lsj_config_has_detectron2s_r50_lsj_parameter_count():
    config = _config('maskrcnn_r50_fpn_lsj_100ep_coco')
    config_check.check_config(config, 1)
    model = MaskRCNNModel(config, {'num_classes': 80}).flax_model
    images = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    sizes = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images, sizes)
    params, statistics = _detectron2_r50_lsj_counts()
    assert (params, statistics) == (46_301_232, 61_312)  # the sums above, written out
    assert _num_params(variables['params']) == params
    assert _num_params(variables['batch_stats']) == statistics
    assert set(variables) == {'params', 'batch_stats'}   # no frozen statistics: SyncBN
    box = variables['params']['box_predictor']
    assert {'conv1', 'conv4', 'norm4', 'fc1'} <= set(box) and 'fc2' not in box
    assert 'conv1' in variables['params']['rpn_head']   # the second RPN conv
