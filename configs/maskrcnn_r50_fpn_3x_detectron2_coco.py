"""Mask R-CNN R50-FPN 3x, Detectron2's conventions, on COCO.

Evaluate Detectron2's model-zoo weights (expected: box AP 41.0, mask AP 37.2):

  wget https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl
  python -m projects.maskrcnn.tools.convert_checkpoint --source=detectron2 \\
      model_final_f10217.pkl /tmp/d2_maskrcnn_r50_3x
  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_3x_detectron2_coco.py \\
      --workdir=/tmp/d2_maskrcnn_r50_3x_eval --config.eval_only=True \\
      --config.init_from.checkpoint_path=/tmp/d2_maskrcnn_r50_3x

The 1x config with Detectron2's 3x schedule: 270k steps, lr x0.1 at 210k and 250k.
"""

from configs import maskrcnn_r50_fpn_1x_detectron2_coco


def get_config():
    config = maskrcnn_r50_fpn_1x_detectron2_coco.get_config()
    config.experiment_name = 'maskrcnn_r50_fpn_3x_detectron2_coco'
    config.num_training_steps = 270_000
    config.lr_configs.decay_steps = (210_000, 250_000)
    return config
