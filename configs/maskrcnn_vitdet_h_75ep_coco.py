"""Mask R-CNN ViTDet-H, 75 epochs at batch 64.

  python -m projects.maskrcnn.tools.convert_checkpoint --source=mae \
      mae_pretrain_vit_huge_p14to16.pth /tmp/mae_vit_huge
  python projects/maskrcnn/main.py --config=configs/maskrcnn_vitdet_h_75ep_coco.py \
      --workdir=/tmp/maskrcnn_vitdet_h_75ep_coco \
      --config.init_from.checkpoint_path=/tmp/mae_vit_huge

Expected: box AP 56.7 / mask AP 50.2 on val2017 (Detectron2's published figure; not yet
measured with Detectax). The ViT-B recipe with ViT-H (global blocks 7, 15, 23, 31), drop
path 0.5, layer-wise lr decay 0.9, weight decay on every parameter, and 75 epochs:
138,281 steps, lr x0.1 at 122,916 and 133,159.
"""

from configs import maskrcnn_vitdet_b_100ep_coco


def get_config():
    config = maskrcnn_vitdet_b_100ep_coco.get_config('H')
    config.experiment_name = 'maskrcnn_vitdet_h_75ep_coco'
    config.optimizer_configs.no_weight_decay = ()   # Detectron2's ViT-H decays everything
    config.num_training_steps = 138_281
    config.lr_configs.decay_steps = (122_916, 133_159)
    return config
