"""Mask R-CNN R50-FPN 1x with Detectron2's conventions (MSRA backbone), on COCO.

Evaluate Detectron2's model-zoo weights (expected: box AP 38.6, mask AP 35.2,
Detectron2's MODEL_ZOO.md):

  wget https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x/137260431/model_final_a54504.pkl
  python -m projects.maskrcnn.tools.convert_checkpoint --source=detectron2 \\
      model_final_a54504.pkl /tmp/d2_maskrcnn_r50_1x
  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_1x_detectron2_coco.py \\
      --workdir=/tmp/d2_maskrcnn_r50_1x_eval --config.eval_only=True \\
      --config.init_from.checkpoint_path=/tmp/d2_maskrcnn_r50_1x

Train (90k steps at batch 16) from https://dl.fbaipublicfiles.com/detectron2/ImageNetPretrained/MSRA/R-50.pkl,
converted the same way, by dropping `--config.eval_only`.

The MSRA weights expect BGR images with the Caffe mean and unit std; the
converter reverses the first conv's input channels, so the pipeline keeps
feeding RGB and the mean below is Detectron2's, in RGB order. RoIAlign samples
adaptively (at most `adaptive_sampling_cap` per bin and axis, see
projects/maskrcnn/ops/roi_align.py) with aligned=True. Data and schedule are
configs/maskrcnn_r50_fpn_1x_coco.py's.
"""

from configs import maskrcnn_r50_fpn_1x_coco


def get_config():
    config = maskrcnn_r50_fpn_1x_coco.get_config()
    config.dtype = 'float32'  # the reference's arithmetic, for parity with published AP
    config.experiment_name = 'maskrcnn_r50_fpn_1x_detectron2_coco'
    d = config.dataset_configs
    d.pixel_mean = (123.675, 116.28, 103.53)   # Detectron2's BGR mean, reversed
    d.pixel_std = (1.0, 1.0, 1.0)
    d.resize_rounding = 'round'  # ResizeShortestEdge: int(size * scale + 0.5)

    m = config.model
    m.backbone.depth = 50
    m.backbone.stride_in_1x1 = True
    m.backbone.norm = 'frozen_bn'
    m.backbone.norm_eps = 1e-5
    m.backbone.freeze_at = 2
    m.anchors.round_cell_anchors = False
    m.rpn.pre_nms_topk_train = 2000
    m.rpn.post_nms_topk_train = 1000
    m.rpn.pre_nms_topk_test = 1000
    m.rpn.post_nms_topk_test = 1000
    m.rpn.min_box_size = 0.0
    m.roi_heads.sampling_ratio = 0
    m.roi_heads.adaptive_sampling_cap = 4
    m.roi_heads.aligned = True
    m.roi_heads.level_rule = 'detectron2'
    m.rpn_smooth_l1_beta = 0.0
    m.roi_smooth_l1_beta = 0.0
    return config
