"""Mask R-CNN R101-FPN 3x, Detectron2's conventions, on COCO.

Evaluate Detectron2's model-zoo weights (expected: box AP 42.9, mask AP 38.6):

  wget https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_101_FPN_3x/138205316/model_final_a3ec72.pkl
  python -m projects.maskrcnn.tools.convert_checkpoint --source=detectron2 \\
      model_final_a3ec72.pkl /tmp/d2_maskrcnn_r101_3x
  python projects/maskrcnn/main.py --config=configs/maskrcnn_r101_fpn_3x_detectron2_coco.py \\
      --workdir=/tmp/d2_maskrcnn_r101_3x_eval --config.eval_only=True \\
      --config.init_from.checkpoint_path=/tmp/d2_maskrcnn_r101_3x

The R50 3x config with a ResNet-101 trunk (backbone for training:
https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-101.pkl).
"""

from configs import maskrcnn_r50_fpn_3x_detectron2_coco


def get_config():
    config = maskrcnn_r50_fpn_3x_detectron2_coco.get_config()
    config.experiment_name = 'maskrcnn_r101_fpn_3x_detectron2_coco'
    config.model.backbone.depth = 101
    return config
