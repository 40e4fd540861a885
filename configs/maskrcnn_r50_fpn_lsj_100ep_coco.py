"""Mask R-CNN R50-FPN from scratch with large-scale jitter, 100 epochs at batch 64.

  python projects/maskrcnn/main.py --config=configs/maskrcnn_r50_fpn_lsj_100ep_coco.py \
      --workdir=/tmp/maskrcnn_r50_fpn_lsj_100ep_coco

Detectron2's "new baselines" recipe (configs/new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py),
which reaches box AP 44.6 / mask AP 40.3 on val2017 (not yet measured with Detectax; its
published weights convert with `convert_checkpoint --source=detectron2 --model_input=bgr`,
docs/weights.md):
- model: ResNet-50 (stride in the 1x1 conv) and FPN with SyncBN (batch statistics over the
  global batch), no frozen stage, no pretrained weights; 2-conv RPN head; "4conv1fc" box
  head (4 x 3x3 conv 256 + SyncBN, one fc 1024); mask head convs with SyncBN; BGR input
  with the Caffe mean and unit std;
- data: 1024x1024 crops of images rescaled by 0.1-2.0, horizontal flip;
- schedule: SGD momentum 0.9, lr 0.1 at batch 64, weight decay 4e-5 (0 on norms),
  184,375 steps (100 epochs of 118k images), lr x0.1 at 163,889 and 177,546, linear
  warmup over 500 steps from factor 0.067; mixed precision.

What Detectax cannot match, exactly:
- evaluation: Detectron2 tests at shortest side 800, longest at most 1333 (its common
  test loader); one static padded size serves training and evaluation here, so this
  config evaluates at longest side 1024 (as Detectron2's ViTDet recipes do);
- cropped instances keep their box clipped to the crop; Detectron2 recomputes the box
  from the cropped mask (`recompute_boxes`);
- a training image scaled below 1024 is padded with the mean (0 after normalisation);
  Detectron2's FixedSizeCrop pads with pixel value 128 before normalisation;
- the mask head runs on a fixed 128 foreground slots per image (model.mask_head.num_fg_slots),
  so its SyncBN statistics also see the empty slots of images with fewer foreground RoIs;
  Detectron2's see the foreground RoIs alone;
- mixed precision is bfloat16 (Detectron2: float16 autocast with loss scaling, and
  gradients all-reduced in float16).
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
    d.horizontal_flip = True
    d.eval_min_size = 1024
    d.max_size = 1024
    d.channel_order = 'BGR'              # Detectron2's input_format
    d.pixel_mean = (103.53, 116.28, 123.675)
    d.pixel_std = (1.0, 1.0, 1.0)

    m = config.model
    m.backbone.name = 'resnet'
    m.backbone.depth = 50
    m.backbone.stride_in_1x1 = True
    m.backbone.norm = 'bn'
    m.backbone.freeze_at = 0
    m.neck.name = 'fpn'
    m.neck.channels = 256
    m.neck.norm = 'bn'
    m.rpn.num_convs = 2
    m.roi_heads.sampling_ratio = 0       # ROIAlignV2: adaptive sampling, aligned
    m.roi_heads.aligned = True
    # Exact adaptive sampling for every box of a 1024 image: at most 32 P5 cells a side,
    # ceil(32 / 7) = 5 samples per bin and axis.
    m.roi_heads.adaptive_sampling_cap = 5
    m.box_head.num_convs = 4
    m.box_head.conv_dim = 256
    m.box_head.norm = 'bn'
    m.box_head.num_fc = 1
    m.box_head.fc_dim = 1024
    m.mask_head.num_convs = 4
    m.mask_head.conv_dim = 256
    m.mask_head.norm = 'bn'

    config.batch_size = 64
    config.num_training_steps = STEPS
    config.log_eval_steps = 10_000
    config.optimizer_configs.momentum = 0.9
    config.optimizer_configs.weight_decay = 4e-5
    config.optimizer_configs.weight_decay_norm = 0.0
    config.lr_configs.base_learning_rate = 0.1
    config.lr_configs.warmup_steps = 500
    config.lr_configs.warmup_factor = 0.067
    config.lr_configs.decay_steps = (163_889, 177_546)
    config.lr_configs.decay_factor = 0.1
    return config
