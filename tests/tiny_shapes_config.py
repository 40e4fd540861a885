"""A few-second shapes run for tests: 64x64 images, a ResNet-18 of width 8."""

from configs import demo_shapes


def get_config():
    config = demo_shapes.get_config()
    config.experiment_name = 'tiny_shapes'
    d = config.dataset_configs
    d.image_size = (64, 64)
    d.train_min_sizes = (64,)
    d.max_size = 64
    d.eval_min_size = 64
    d.shapes_image_size = 64
    d.num_train = 16
    d.num_val = 6
    d.max_shapes = 3
    d.gt_mask_size = 14
    m = config.model
    m.backbone.width = 8
    m.neck.channels = 16
    m.rpn.pre_nms_topk_train = 100
    m.rpn.post_nms_topk_train = 32
    m.rpn.pre_nms_topk_test = 50
    m.rpn.post_nms_topk_test = 16
    m.roi_heads.batch_size_per_image = 16
    m.box_head.fc_dim = 32
    m.mask_head.conv_dim = 8
    m.mask_head.num_convs = 1
    m.mask_head.num_fg_slots = 4
    m.test.detections_per_image = 8
    config.batch_size = 2
    config.eval_batch_size = 4
    config.num_training_steps = 4
    config.log_summary_steps = 2
    config.log_eval_steps = 4
    config.checkpoint_steps = 2
    config.lr_configs.warmup_steps = 2
    config.lr_configs.decay_steps = (3,)
    config.compute_validation_loss = True   # off in the demo; the tests cover it
    return config
