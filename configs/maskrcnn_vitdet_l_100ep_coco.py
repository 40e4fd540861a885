"""Mask R-CNN ViTDet-L, 100 epochs at batch 64.

  python -m projects.maskrcnn.tools.convert_checkpoint --source=mae \
      mae_pretrain_vit_large.pth /tmp/mae_vit_large
  python projects/maskrcnn/main.py --config=configs/maskrcnn_vitdet_l_100ep_coco.py \
      --workdir=/tmp/maskrcnn_vitdet_l_100ep_coco \
      --config.init_from.checkpoint_path=/tmp/mae_vit_large

Expected: box AP 55.5 / mask AP 49.2 on val2017 (Detectron2's published figure; not yet
measured with Detectax). The ViT-B recipe with ViT-L (global blocks 5, 11, 17, 23),
drop path 0.4 and layer-wise lr decay 0.8.
"""

from configs import maskrcnn_vitdet_b_100ep_coco


def get_config():
    return maskrcnn_vitdet_b_100ep_coco.get_config('L')
