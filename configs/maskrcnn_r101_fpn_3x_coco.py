"""Mask R-CNN R101-FPN on COCO 2017 with Detectron2's 3x recipe (270k steps at batch 16).

  python projects/maskrcnn/main.py --config=configs/maskrcnn_r101_fpn_3x_coco.py \
      --workdir=/tmp/maskrcnn_r101_fpn_3x_coco

Data as in maskrcnn_r50_fpn_1x_coco.py; initialise from ImageNet R-101 weights converted
with tools/convert_checkpoint. Expected (Detectron2's figure, not yet measured with
Detectax): box AP 42.9 / mask AP 38.6.
"""

from configs import maskrcnn_r50_fpn_3x_coco


def get_config():
    config = maskrcnn_r50_fpn_3x_coco.get_config()
    config.experiment_name = 'maskrcnn_r101_fpn_3x_coco'
    config.model.backbone.depth = 101
    return config
