"""Every config file in configs/ loads, passes the config check and builds its model
(traced with jax.eval_shape at the config's full size: nothing is computed)."""

import functools
import glob
import importlib
import os

import jax
import jax.numpy as jnp
import pytest

from projects.maskrcnn import config_check, trainer
from projects.maskrcnn.model import MaskRCNNModel
from projects.maskrcnn.modeling.backbones.vit import VIT_SIZES

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          'configs')
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIG_DIR, '*.py'))
                 if not p.endswith('__init__.py'))


def test_the_published_recipes_exist():
    for name in ('maskrcnn_r50_fpn_1x_coco', 'maskrcnn_r50_fpn_3x_coco',
                 'maskrcnn_r101_fpn_3x_coco', 'maskrcnn_r50_fpn_lsj_100ep_coco',
                 'maskrcnn_r50_fpn_torchvision_coco', 'demo_shapes',
                 'maskrcnn_vitdet_b_100ep_coco', 'maskrcnn_vitdet_l_100ep_coco',
                 'maskrcnn_vitdet_h_75ep_coco', 'demo_shapes_vitdet'):
        assert name in CONFIGS


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model(name):
    config = importlib.import_module(f'configs.{name}').get_config()
    config_check.check_config(config, num_devices=1)
    num_classes = 3 if config.dataset_name == 'shapes' else 80
    d = config.dataset_configs
    meta = {'num_classes': num_classes, 'input_shape': (-1, *d.image_size, 3),
            'max_instances': d.max_instances, 'gt_mask_size': d.gt_mask_size}
    model = MaskRCNNModel(config, meta)
    variables = jax.eval_shape(functools.partial(trainer.init_variables, model, meta=meta),
                               jax.random.PRNGKey(0))
    params = variables['params']
    # The class-specific heads have K + 1 (box scores) and K (masks) outputs.
    assert params['box_predictor']['cls_score']['kernel'].shape[-1] == num_classes + 1
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
    backbone = config.model.backbone
    if backbone.get('name', 'resnet') == 'vit':
        blocks = sum(1 for k in params['body'] if k.startswith('blocks_'))
        depth = backbone.get('depth') or VIT_SIZES[backbone.size].depth
        assert blocks == depth, (blocks, depth)
        return
    stages = sum(1 for k in params['body'] if k.startswith('res'))
    expected = {18: 8, 34: 16, 50: 16, 101: 33, 152: 50}[backbone.depth]
    assert stages == expected, (stages, backbone.depth)
