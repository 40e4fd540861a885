"""Mask R-CNN ViTDet-B (plain ViT-B + simple feature pyramid), 100 epochs at batch 64.

  python -m projects.maskrcnn.tools.convert_checkpoint --source=mae \
      mae_pretrain_vit_base.pth /tmp/mae_vit_base
  python projects/maskrcnn/main.py --config=configs/maskrcnn_vitdet_b_100ep_coco.py \
      --workdir=/tmp/maskrcnn_vitdet_b_100ep_coco \
      --config.init_from.checkpoint_path=/tmp/mae_vit_base

Expected: box AP 51.6 / mask AP 45.9 on val2017, Detectron2's published figure for this
recipe (projects/ViTDet, mask_rcnn_vitdet_b_100ep.py); not yet measured with Detectax.
Recipe (docs/vitdet.md): ViT-B initialised from MAE (the conversion above; pyramid and
heads from scratch), window 14 with global blocks 2, 5, 8, 11, drop path 0.1; simple
pyramid with channel LayerNorm; 2-conv RPN; "4conv1fc" box head and mask head with LN;
RGB pixels; LSJ 1024 (scale 0.1-2.0) with flip, square pad 1024; AdamW lr 1e-4, weight
decay 0.1 except the ViT blocks' LayerNorms and pos_embed, layer-wise lr decay 0.7;
184,375 steps, warmup 250 from 0.001, lr x0.1 at 163,889 and 177,546; bfloat16.
Data and the evaluation difference as in maskrcnn_r50_fpn_lsj_100ep_coco.py.
"""

import dataclasses

import ml_collections

from configs import maskrcnn_r50_fpn_lsj_100ep_coco
from projects.maskrcnn import optim_rules
from projects.maskrcnn.modeling.backbones import vit
from projects.maskrcnn.modeling.necks import simple_fpn


def get_config(size: str = 'B'):
    """The ViTDet recipe for ViT `size` ('B', 'L', 'H'), 100 epochs."""
    config = maskrcnn_r50_fpn_lsj_100ep_coco.get_config()
    config.experiment_name = f'maskrcnn_vitdet_{size.lower()}_100ep_coco'
    d = config.dataset_configs
    d.channel_order = 'RGB'
    d.pixel_mean = (123.675, 116.28, 103.53)
    d.pixel_std = (58.395, 57.12, 57.375)

    m = config.model
    # Every ViTSpec key, the `size` row of VIT_SIZES filled in, so that the command line
    # can set any of them (e.g. --config.model.backbone.remat=True).
    m.backbone = ml_collections.ConfigDict(
        {'name': 'vit', 'size': size, **vit.ViTSpec(size=size).resolved()})
    m.neck = ml_collections.ConfigDict(
        {'name': 'simple_fpn', **dataclasses.asdict(simple_fpn.SimpleFPNSpec(channels=256))})
    m.box_head.norm = 'ln'
    m.mask_head.norm = 'ln'

    o = config.optimizer_configs
    o.optimizer = 'adamw'
    o.weight_decay = 0.1
    o.weight_decay_norm = 0.0
    o.no_weight_decay = optim_rules.VITDET_NO_WEIGHT_DECAY
    o.layerwise_decay = {'B': 0.7, 'L': 0.8, 'H': 0.9}[size]
    config.lr_configs.base_learning_rate = 1e-4
    config.lr_configs.warmup_steps = 250
    config.lr_configs.warmup_factor = 0.001
    return config
