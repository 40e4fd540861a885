"""Mask R-CNN R50-FPN on COCO 2017 with Detectron2's 3x recipe (270k steps at batch 16).

  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_3x_coco.py \
      --workdir=/tmp/maskrcnn_r50_fpn_3x_coco

Data and initialisation as in maskrcnn_r50_fpn_1x_coco.py. Expected (Detectron2's
figure, not yet measured with Detectax): box AP 41.0 / mask AP 37.2.
"""

from configs import maskrcnn_r50_fpn_1x_coco


def get_config():
    config = maskrcnn_r50_fpn_1x_coco.get_config()
    config.experiment_name = 'maskrcnn_r50_fpn_3x_coco'
    config.num_training_steps = 270_000
    config.lr_configs.decay_steps = (210_000, 250_000)
    return config
