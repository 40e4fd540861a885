"""Mask R-CNN R50-FPN from scratch with large-scale jitter, 100 epochs at batch 64.

  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_lsj_100ep_coco.py \
      --workdir=/tmp/maskrcnn_r50_fpn_lsj_100ep_coco

Follows Detectron2's "new baselines" recipe: 1024x1024 crops of images rescaled by
0.1-2.0, SyncBN everywhere (batch statistics over the global batch), no frozen stage,
no pretrained weights, SGD lr 0.1 at batch 64, weight decay 4e-5, 100 epochs of
COCO train2017 (184k steps), lr x0.1 at 89% and 96%. Detectron2 reaches box AP 44.6 /
mask AP 40.3 (not yet measured with Detectax). One difference: Detectron2's box head
there has 4 conv layers before its fc; Detectax's box head is the 2-fc head.
Data as in maskrcnn_r50_fpn_1x_coco.py. Needs many accelerators: batch 64.
"""

from configs import maskrcnn_r50_fpn_1x_coco

STEPS = 184_375  # 100 epochs of 118k images at batch 64


def get_config():
    config = maskrcnn_r50_fpn_1x_coco.get_config()
    config.experiment_name = 'maskrcnn_r50_fpn_lsj_100ep_coco'
    d = config.dataset_configs
    d.image_size = (1024, 1024)
    d.large_scale_jitter = True
    d.lsj_scale_range = (0.1, 2.0)
    d.eval_min_size = 1024
    d.max_size = 1024

    m = config.model
    m.backbone.norm = 'bn'
    m.backbone.freeze_at = 0
    m.fpn.norm = 'bn'
    m.rpn.num_convs = 2
    m.mask_head.norm = 'bn'

    config.batch_size = 64
    config.num_training_steps = STEPS
    config.log_eval_steps = 10_000
    config.optimizer_configs.weight_decay = 4e-5
    config.lr_configs.base_learning_rate = 0.1
    config.lr_configs.warmup_steps = 250
    config.lr_configs.decay_steps = (int(STEPS * 0.889), int(STEPS * 0.963))
    return config
