"""A few-second ViTDet shapes run for tests: 64x64 images, a 4-block ViT of width 32.

The sizes are those of the tiny Detectron2-layout ViTDet that
tests/tools/golden/vitdet_tiny.pth holds (projects/maskrcnn/tools/make_vitdet_golden.py),
with heads of 8 channels, so that file's weights (and heads of that width) load.
"""

import ml_collections

from tests import tiny_shapes_config

WIDTH, DEPTH, HEADS, GLOBAL_BLOCKS, IMAGE_SIZE = 32, 4, 2, (1, 3), 512
CHANNELS, FC_DIM = 8, 16


def get_config():
    config = tiny_shapes_config.get_config()
    config.experiment_name = 'tiny_vitdet_shapes'
    m = config.model
    m.backbone = ml_collections.ConfigDict({
        'name': 'vit', 'width': WIDTH, 'depth': DEPTH, 'num_heads': HEADS,
        'global_blocks': GLOBAL_BLOCKS, 'image_size': IMAGE_SIZE, 'drop_path_rate': 0.1})
    m.neck = ml_collections.ConfigDict({'name': 'simple_fpn', 'channels': CHANNELS})
    m.rpn.num_convs = 2
    m.box_head.num_convs = 4
    m.box_head.conv_dim = CHANNELS
    m.box_head.norm = 'ln'
    m.box_head.num_fc = 1
    m.box_head.fc_dim = FC_DIM
    m.mask_head.num_convs = 4
    m.mask_head.conv_dim = CHANNELS
    m.mask_head.norm = 'ln'
    config.optimizer_configs.optimizer = 'adamw'
    config.optimizer_configs.weight_decay = 0.1
    config.optimizer_configs.layerwise_decay = 0.7
    config.optimizer_configs.no_weight_decay = (
        r'(.+/)?blocks_\d+/norm[12]/(scale|bias)', r'(.+/)?pos_embed')
    config.lr_configs.base_learning_rate = 1e-4
    return config
