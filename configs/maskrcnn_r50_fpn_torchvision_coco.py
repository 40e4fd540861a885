"""Mask R-CNN R50-FPN with torchvision's conventions (`maskrcnn_resnet50_fpn`, v1), on COCO.

Evaluate torchvision's published COCO weights (expected: box AP 37.9, mask AP 34.6,
torchvision's model card):

  wget https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth
  python -m projects.maskrcnn.tools.convert_checkpoint --source=torchvision \\
      maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth /tmp/tv_maskrcnn_r50
  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_torchvision_coco.py \\
      --workdir=/tmp/tv_maskrcnn_r50_eval --config.eval_only=True \\
      --config.init_from.checkpoint_path=/tmp/tv_maskrcnn_r50

Train with torchvision's recipe (26 epochs at batch 16) from its ImageNet
ResNet-50 (https://download.pytorch.org/models/resnet50-0676ba61.pth, converted
the same way) by dropping `--config.eval_only`.

Differences from the Detectron2 base, all torchvision's: stride in the 3x3
conv, cell anchors rounded to whole pixels and ratio-major, proposals with sides >= 1e-3 and
2000 kept per image in training, RoIAlign with aligned=False and 2 samples per
bin, torchvision's level epsilon, detections with sides >= 1e-2, smooth-L1
beta 1/9, RPN losses divided by the anchors sampled (not by 256 per image),
soft mask targets (read as aligned=False RoIAlign reads, not thresholded),
training images resized to 800 (no multi-scale). Image statistics are
ImageNet's (the base's). The data are configs/maskrcnn_r50_fpn_1x_coco.py's
(see there how to build the COCO 2017 dataset).
"""

from configs import maskrcnn_r50_fpn_1x_coco


def get_config():
    config = maskrcnn_r50_fpn_1x_coco.get_config()
    config.dtype = 'float32'  # the reference's arithmetic, for parity with published AP
    config.experiment_name = 'maskrcnn_r50_fpn_torchvision_coco'
    d = config.dataset_configs
    d.train_min_sizes = (800,)
    d.resize_rounding = 'floor'  # GeneralizedRCNNTransform floors the resized size

    m = config.model
    m.backbone.stride_in_1x1 = False
    m.backbone.norm = 'frozen_bn'
    m.backbone.norm_eps = 1e-5
    m.backbone.freeze_at = 2           # trainable_backbone_layers=3
    m.anchors.round_cell_anchors = True
    m.anchors.order = 'ratio_major'    # the RPN head's channel order
    m.rpn.pre_nms_topk_train = 2000
    m.rpn.post_nms_topk_train = 2000
    m.rpn.pre_nms_topk_test = 1000
    m.rpn.post_nms_topk_test = 1000
    m.rpn.min_box_size = 1e-3
    m.rpn.min_box_size_inclusive = True
    m.roi_heads.sampling_ratio = 2
    m.roi_heads.aligned = False
    m.roi_heads.level_rule = 'torchvision'
    m.test.score_threshold = 0.05
    m.test.nms_threshold = 0.5
    m.test.detections_per_image = 100
    m.test.min_box_size = 1e-2
    m.test.min_box_size_inclusive = True
    m.rpn_smooth_l1_beta = 1.0 / 9
    m.roi_smooth_l1_beta = 1.0 / 9
    m.rpn_loss_normalizer = 'sampled'
    m.mask_head.targets = 'soft'

    # 26 epochs of 117k images at batch 16, lr steps at epochs 16 and 22.
    config.num_training_steps = 190_000
    config.lr_configs.decay_steps = (117_000, 161_000)
    return config
