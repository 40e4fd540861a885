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
