"""Demo: a tiny ViTDet (plain ViT + simple pyramid) trained from scratch on the shapes data.

  python projects/maskrcnn/main.py --config=configs/demo_shapes_vitdet.py \
      --workdir=/tmp/vitdet_demo

Expected: see docs/vitdet.md (measured time and mask AP on a 2-core CPU).
Same data, anchors, RoI settings and evaluation as configs/demo_shapes.py; the model is
ViTDet's at a small size: a 6-block ViT of width 128 over the 128x128 image's 8x8
tokens (windows of 4x4 tokens, blocks 2 and 5 global), the simple pyramid (P2-P6, 64
channels, channel LayerNorm), a 2-conv RPN, a "4conv1fc" box head and a mask head with
LayerNorm; AdamW with ViTDet's weight-decay exemptions, no layer-wise decay (nothing is
pretrained).
"""

import dataclasses

import ml_collections

from configs import demo_shapes
from projects.maskrcnn import optim_rules
from projects.maskrcnn.modeling.backbones import vit
from projects.maskrcnn.modeling.necks import simple_fpn


def get_config():
    config = demo_shapes.get_config()
    config.experiment_name = 'demo_shapes_vitdet'
    m = config.model
    spec = vit.ViTSpec(width=128, depth=6, num_heads=4, global_blocks=(2, 5), window_size=4,
                       image_size=128, pretrain_grid=8, drop_path_rate=0.0)
    m.backbone = ml_collections.ConfigDict({'name': 'vit', 'size': spec.size, **spec.resolved()})
    m.neck = ml_collections.ConfigDict(
        {'name': 'simple_fpn', **dataclasses.asdict(simple_fpn.SimpleFPNSpec(channels=64))})
    m.rpn.num_convs = 2
    m.box_head.num_convs = 4
    m.box_head.conv_dim = 64
    m.box_head.norm = 'ln'
    m.box_head.num_fc = 1
    m.box_head.fc_dim = 256
    m.mask_head.norm = 'ln'

    o = config.optimizer_configs
    o.optimizer = 'adamw'
    o.weight_decay = 0.05
    o.weight_decay_norm = 0.0
    o.no_weight_decay = optim_rules.VITDET_NO_WEIGHT_DECAY
    o.grad_clip_norm = 1.0
    config.lr_configs.base_learning_rate = 1e-3
    config.lr_configs.warmup_steps = 100
    config.lr_configs.warmup_factor = 0.001
    # Four evaluations (about 20 s each), so that the run draws its AP-versus-time curve
    # (TensorBoard's valid/* and results.json).
    config.log_eval_steps = 275
    return config
